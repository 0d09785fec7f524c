"""Guards at the network edge: loopback Host names, token length, refused tokens counted."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AppClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from exporter import Settings, create_app
from exporter._logging import LogfmtFormatter
from exporter.addresses import host_name, is_loopback_name

TOKEN = "guard-token-0123456789"

ClientFactory = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def start(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
) -> ClientFactory:
    """Start the exporter with the given settings overrides."""

    async def run(**overrides: Any) -> AppClient:
        options: dict[str, Any] = {"data_dir": data_dir, "listen": "127.0.0.1:0"}
        options.update(overrides)
        return await aiohttp_client(create_app(Settings(**options), registry))

    return run


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/v1/analytics/health", "/openapi.json"])
async def test_a_loopback_listener_refuses_a_foreign_host_name(
    start: ClientFactory, path: str
) -> None:
    client = await start()
    refused = await client.get(path, headers={"Host": "rebound.attacker.example"})
    assert refused.status == 421
    assert "EXPORTER_ALLOWED_HOSTS" in (await refused.json())["error"]
    for host in ("localhost:9402", "127.0.0.1", "127.3.4.5:80", "[::1]:9402", "app.localhost"):
        answered = await client.get(path, headers={"Host": host})
        assert answered.status != 421, host


async def test_a_refused_ingest_request_keeps_the_ingest_answer_shape(
    start: ClientFactory,
) -> None:
    client = await start()
    refused = await client.post("/v1/events", json={}, headers={"Host": "evil.example"})
    assert refused.status == 421
    body = await refused.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (0, 0, [])


async def test_each_host_value_keeps_its_own_verdict_past_the_kept_ones(
    start: ClientFactory,
) -> None:
    """Verdicts are remembered per Host value, a bounded number of them: a sender
    cycling through many names neither grows memory nor changes another name's answer."""
    client = await start()
    for round_ in range(2):  # the second round answers from what the first remembered
        for i in range(100):
            foreign = await client.get("/metrics", headers={"Host": f"n{i}.attacker.example"})
            assert foreign.status == 421, (round_, i)
            loopback = await client.get("/metrics", headers={"Host": f"127.0.0.{i + 1}:9402"})
            assert loopback.status == 200, (round_, i)


async def test_allowed_hosts_extend_the_loopback_names(start: ClientFactory) -> None:
    client = await start(allowed_hosts=["exporter"])
    assert (await client.get("/metrics", headers={"Host": "exporter:9402"})).status == 200
    assert (await client.get("/metrics", headers={"Host": "exporter.evil"})).status == 421


async def test_a_listener_beyond_loopback_answers_any_host_name(start: ClientFactory) -> None:
    client = await start(listen="0.0.0.0:9402", ingest_token=TOKEN)
    assert (await client.get("/metrics", headers={"Host": "exporter.internal"})).status == 200


def test_host_names_are_parsed_without_a_lookup() -> None:
    assert host_name("LocalHost:9402") == "localhost"
    assert host_name("[::1]:80") == "::1"
    assert host_name("example.com:x") is None
    assert host_name("[::1") is None
    assert host_name("") is None
    assert is_loopback_name("127.0.0.1") and is_loopback_name("::1")
    assert not is_loopback_name("localhost.evil.example")
    assert not is_loopback_name("10.0.0.1")


def test_a_short_token_is_refused_beyond_loopback_only() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(listen="0.0.0.0:9402", ingest_token="fifteen-chars..")
    message = str(caught.value)
    assert "at least 16" in message and "fifteen" not in message
    assert Settings(listen="127.0.0.1:9402", ingest_token="short").ingest_token is not None
    assert Settings(listen="0.0.0.0:9402", ingest_token="x" * 16).ingest_token is not None


async def test_refused_tokens_are_counted_by_route_and_logged_without_the_token(
    start: ClientFactory, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(ingest_token=TOKEN)
    caplog.set_level(logging.WARNING, logger="exporter.metrics")
    wrong = {"Authorization": "Bearer guessed-wrong-token"}
    for _ in range(3):
        assert (await client.post("/v1/events", json={}, headers=wrong)).status == 401
    assert (await client.get("/v1/analytics/health")).status == 401

    def failures(route: str) -> float | None:
        return registry.get_sample_value("exporter_auth_failures_total", {"route": route})

    assert failures("ingest") == 3
    assert failures("analytics") == 1
    lines = [LogfmtFormatter().format(r) for r in caplog.records if "token" in r.getMessage()]
    # One line per route within the log interval, however many refusals.
    assert len(lines) == 2
    assert all("guessed-wrong-token" not in line and TOKEN not in line for line in lines)
    assert "route=ingest" in lines[0] and "peer=127.0.0.1" in lines[0]
