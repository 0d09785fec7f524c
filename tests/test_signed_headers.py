"""Signatures cover the headers that decide how a body is read.

A ``v2`` signature signs Content-Type and Content-Encoding with the body: a captured
signed request replayed with other headers is refused (401) and leaves nothing. A ``v1``
signature (body only) still verifies, so existing senders keep working, but its
refusals are counted and never kept: a replay with other headers leaves nothing either.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import AppClient, received, require_tool
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.app import COMMITTER, REGISTRY
from exporter.ingest.signing import SIGNATURE_HEADER, sign, sign_v2, signature_header

SECRET = "whsec_a-signing-secret-of-32-chars"
JSON = "application/json"
NDJSON = "application/x-ndjson"
ClientFactory = Callable[..., Awaitable[AppClient]]


@pytest.fixture
async def client(aiohttp_client: ClientFactory, data_dir: Path) -> AppClient:
    """An exporter that requires signed deliveries."""
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", ingest_signing_secret=SECRET)
    return await aiohttp_client(create_app(settings, CollectorRegistry()))


def stored(client: AppClient) -> tuple[int, int]:
    """(events, dead letters) in the ledger."""
    stats = client.app[COMMITTER].ledger.stats()
    return stats.events, stats.dead_letters


def rejected(client: AppClient, reason: str) -> float:
    """exporter_events_rejected_total{reason}."""
    value = client.app[REGISTRY].get_sample_value(
        "exporter_events_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def _post(client: AppClient, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    response = await client.post("/v1/events", data=body, headers=headers)
    answer = await response.json()
    return response.status, str(answer.get("error", ""))


@pytest.mark.parametrize(
    ("content_type", "encoding", "replay_type", "replay_encoding"),
    [
        (JSON, None, NDJSON, None),  # a JSON array read as NDJSON
        (JSON, None, JSON, "gzip"),  # plain bytes read as gzip
        (NDJSON, "gzip", NDJSON, None),  # gzip bytes read as plain
        (NDJSON, None, JSON, None),  # NDJSON lines read as one JSON document
    ],
)
async def test_a_v2_signed_request_replayed_with_other_headers_changes_nothing(
    client: AppClient,
    content_type: str,
    encoding: str | None,
    replay_type: str,
    replay_encoding: str | None,
) -> None:
    events = [received("p1"), received("p2")]
    if content_type == NDJSON:
        body = b"\n".join(json.dumps(e).encode() for e in events)
    else:
        body = json.dumps(events).encode()
    if encoding == "gzip":
        body = gzip.compress(body)
    signature = signature_header(SECRET, body, content_type=content_type, content_encoding=encoding)
    original = {"Content-Type": content_type, SIGNATURE_HEADER: signature}
    if encoding is not None:
        original["Content-Encoding"] = encoding
    assert (await _post(client, body, original))[0] == 202
    assert stored(client) == (2, 0)

    replay = {"Content-Type": replay_type, SIGNATURE_HEADER: signature}
    if replay_encoding is not None:
        replay["Content-Encoding"] = replay_encoding
    status, error = await _post(client, body, replay)
    assert status == 401
    assert error.startswith("no signature matches: 1 v2= entry")
    assert f"{replay_type}.{replay_encoding or 'identity'}" in error  # what to sign instead
    assert stored(client) == (2, 0)  # no event, no dead letter


async def test_v2_signs_the_media_type_without_parameters(client: AppClient) -> None:
    body = json.dumps(received("p1")).encode()
    signature = signature_header(SECRET, body, content_type="Application/JSON; charset=utf-8")
    headers = {"Content-Type": "application/json; charset=UTF-8", SIGNATURE_HEADER: signature}
    assert (await _post(client, body, headers))[0] == 202


async def test_a_v2_signed_malformed_body_is_kept_as_a_dead_letter(client: AppClient) -> None:
    body = b'{"type": "payment:received",'
    headers = {
        "Content-Type": JSON,
        SIGNATURE_HEADER: signature_header(SECRET, body, content_type=JSON),
    }
    assert (await _post(client, body, headers))[0] == 400
    assert stored(client) == (0, 1)


async def test_a_v2_entry_that_fails_is_not_rescued_by_a_v1_entry(client: AppClient) -> None:
    body = json.dumps([received("p1")]).encode()
    t = int(time.time())
    header = f"t={t},v2={sign_v2(SECRET, t, body, JSON, None)},v1={sign(SECRET, t, body)}"
    status, _ = await _post(
        client, body, {"Content-Type": JSON, "Content-Encoding": "gzip", SIGNATURE_HEADER: header}
    )
    assert status == 401
    assert stored(client) == (0, 0)


async def test_v1_signers_keep_working_and_their_replays_leave_nothing(client: AppClient) -> None:
    body = json.dumps([received("p1"), received("p2")]).encode()
    t = int(time.time())
    v1 = f"t={t},v1={sign(SECRET, t, body)}"
    assert (await _post(client, body, {"Content-Type": JSON, SIGNATURE_HEADER: v1}))[0] == 202
    assert stored(client) == (2, 0)
    # The same bytes with other headers verify (v1 signs the body only) and are refused,
    # counted, but not kept: a v1 signature does not vouch for how the body is to be read.
    gz = {"Content-Type": JSON, "Content-Encoding": "gzip", SIGNATURE_HEADER: v1}
    status, error = await _post(client, body, gz)
    assert (status, error.startswith("body is not valid gzip")) == (400, True)
    status, _ = await _post(client, body, {"Content-Type": NDJSON, SIGNATURE_HEADER: v1})
    assert status == 422  # the array on one line is not an event
    assert stored(client) == (2, 0)
    assert (rejected(client, "malformed"), rejected(client, "invalid")) == (1, 1)


async def test_a_v1_signed_body_with_invalid_events_is_counted_not_kept(
    client: AppClient,
) -> None:
    body = json.dumps([received("p1"), {"type": "nope"}]).encode()
    t = int(time.time())
    v1 = f"t={t},v1={sign(SECRET, t, body)}"
    response = await client.post(
        "/v1/events", data=body, headers={"Content-Type": JSON, SIGNATURE_HEADER: v1}
    )
    answer = await response.json()
    assert (response.status, answer["accepted"], len(answer["rejected"])) == (202, 1, 1)
    assert stored(client) == (1, 0)


def test_the_openssl_recipe_makes_v2_signatures() -> None:
    openssl = require_tool("openssl")
    body = json.dumps(received("p1")).encode()
    script = (
        f'printf \'%s.application/json.identity.%s\' "$T" "$BODY" '
        f"| {openssl} dgst -sha256 -hmac \"$SECRET\" -r | cut -d' ' -f1"
    )
    result = subprocess.run(
        ["sh", "-c", script],
        env={"T": "1767225600", "BODY": body.decode(), "SECRET": SECRET},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert result.stdout.strip() == sign_v2(SECRET, 1767225600, body, JSON, None)
