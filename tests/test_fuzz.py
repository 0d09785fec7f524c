"""Schemathesis against a real exporter server, driven by the document it serves.

Every operation is fuzzed with data that fits the spec and data that does not. Each
answer must be a documented status with a body that matches its schema, never a 5xx.
Afterwards every event in the ledger re-validates, and every refusal left a dead letter.
``EXPORTER_TEST_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 15, drawn
the same way every run; with the variable set, drawn afresh each run).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.events import canonical_json, parse_event_json
from exporter.ledger import Ledger
from exporter.openapi import OPENAPI_PATH

EXAMPLES = int(os.environ.get("EXPORTER_TEST_FUZZ_EXAMPLES", "15"))
DERANDOMIZE = "EXPORTER_TEST_FUZZ_EXAMPLES" not in os.environ
"""The default run draws the same examples every time; a longer run explores afresh."""
TOKEN = "fuzz-token-3c5e"
WHOLE_BODY_REFUSALS = frozenset({400, 408, 413, 415})
"""Statuses whose refusal keeps the body as one dead letter (the others keep each event)."""


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@dataclass
class _Server:
    """The exporter app on its own loop and thread, at a real port."""

    settings: Settings
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    url: str = ""

    def __enter__(self) -> _Server:
        from aiohttp import web

        self.app = create_app(self.settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()
        self.thread = thread

        async def start() -> int:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return int(self.runner.addresses[0][1])

        port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def ledger(self) -> Ledger:
        """The running app's ledger (its reads are thread-safe)."""
        return self.app[COMMITTER].ledger


@dataclass
class _Tally:
    """What the ingest answers say should be in the ledger."""

    dead_letters: int = 0
    accepted: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int, body: dict[str, Any]) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 401:
            return
        self.accepted += body["accepted"]
        if status in WHOLE_BODY_REFUSALS:
            self.dead_letters += 1
        else:
            self.dead_letters += len(body["rejected"])


def _send(
    case: Any, base_url: str, session: requests.Session, headers: dict[str, str] | None
) -> Any:
    """Send a case as schemathesis would, gzip-encoding the body when its header says so."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
    encoding = str(kwargs["headers"].get("Content-Encoding", "")).lower()
    if encoding in ("gzip", "x-gzip"):
        if "json" in kwargs:
            kwargs["data"] = json.dumps(kwargs.pop("json")).encode()
        data = kwargs.get("data") or b""
        kwargs["data"] = gzip.compress(data.encode() if isinstance(data, str) else data)
    kwargs.pop("timeout", None)
    return session.request(**kwargs, timeout=30)


@pytest.fixture(params=[None, TOKEN], ids=["no-token", "token"], scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Server]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    config = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        ingest_token=request.param,
        max_batch_events=50,
        body_read_timeout_seconds=5,
    )
    with _Server(config) as running:
        yield running


@pytest.mark.slow
def test_fuzzed_requests_get_documented_answers_and_the_ledger_stays_valid(
    server: _Server,
) -> None:
    token = (
        server.settings.ingest_token.get_secret_value() if server.settings.ingest_token else None
    )
    # Unknown query parameters are ignored by design, so they are not "invalid" requests.
    config = SchemathesisConfig.from_dict({"generation": {"allow-extra-parameters": False}})
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    tally = _Tally()
    session = requests.Session()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    # Schemathesis leaves out the operation the document was loaded from.
    assert labels | {f"GET {OPENAPI_PATH}"} == {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    for operation in operations:
        definition = operation.definition.raw
        negatable = bool(definition.get("parameters") or definition.get("requestBody"))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negatable else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=DERANDOMIZE,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = _send(case, server.url, session, headers)
                assert response.status_code < 500, response.text
                # Positive data can still be refused for what a schema cannot say
                # (a timestamp more than a day ahead of now, an id conflict): 422/409.
                case.validate_response(
                    response,
                    excluded_checks=[positive_data_acceptance],
                    headers=headers,
                )
                if case.operation.path == "/v1/events":
                    tally.count(response.status_code, response.json())

            check()
    ledger = server.ledger
    stored = 0
    for _seq, _key, body in ledger.iter_events():
        event = parse_event_json(body)  # raises if anything malformed was stored
        assert canonical_json(event) == body
        stored += 1
    assert stored >= tally.accepted
    letters = ledger.dead_letters(limit=1_000_000)
    assert len(letters) == tally.dead_letters, tally.statuses
    if token is not None:
        assert tally.statuses.get(401, 0) > 0  # negative cases without the token
