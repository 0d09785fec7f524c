"""Proxy mode pinned to its upstream: hostile targets, headers, sizes and credentials.

The upstream is a recording aiohttp server on port 0; each test checks what reached it
(nothing, for a refused request) and what the client got back. Absolute-form targets go
over a raw socket, since HTTP clients only send origin form.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import AppClient
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter._logging import LogfmtFormatter
from exporter.addresses import redact_url
from exporter.ingest.upstream import ForwardRefused, Upstream, end_to_end

TOKEN = "ingest-token-0123456789abcdef"


@dataclass
class Recorder:
    """An upstream facilitator that records every request and answers as configured."""

    url: str = ""
    seen: list[tuple[str, str, CIMultiDict[str]]] = field(default_factory=list)
    answer_bytes: int = 2
    chunked: bool = False
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        """Every path, every method."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.raw_path, CIMultiDict(request.headers)))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        body = b"{" + b" " * max(0, self.answer_bytes - 2) + b"}"
        if not self.chunked:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 65536):
            await response.write(body[start : start + 65536])
        await response.write_eof()
        return response


@pytest.fixture
async def upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Recorder]:
    """The recording upstream on a free loopback port."""
    recorder = Recorder()
    server = await aiohttp_server(recorder.app(), port=0)
    recorder.url = str(server.make_url("")).rstrip("/")
    yield recorder
    if recorder.hold is not None:
        recorder.hold.set()


Start = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def start(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
    registry: CollectorRegistry,
    upstream: Recorder,
) -> Start:
    """Start the exporter in proxy mode in front of the recorder (settings overridable)."""

    async def run(**overrides: Any) -> AppClient:
        options: dict[str, Any] = {
            "data_dir": data_dir,
            "listen": "127.0.0.1:0",
            "upstream_facilitator": upstream.url,
            "upstream_timeout_seconds": 5.0,
        }
        options.update(overrides)
        return await aiohttp_client(create_app(Settings(**options), registry))

    return run


async def raw_request(client: AppClient, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (request line and headers) and ``body`` over a socket; status and body."""
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        answer = await reader.read()
    finally:
        writer.close()
    return int(status_line.split()[1]), answer


def refused(registry: CollectorRegistry, reason: str) -> float:
    """``x402_proxy_refused_requests_total{reason}``."""
    return registry.get_sample_value("x402_proxy_refused_requests_total", {"reason": reason}) or 0


@pytest.mark.parametrize(
    "target",
    ["munity://x/settle", "http://127.0.0.1:9/settle", "//evil.example/settle", "*"],
)
async def test_a_target_not_in_origin_form_is_refused_and_never_forwarded(
    start: Start, upstream: Recorder, registry: CollectorRegistry, target: str
) -> None:
    # Beyond loopback, so that the Host guard (which would answer 421 first) is not in play.
    client = await start(listen="0.0.0.0:9402", ingest_token=TOKEN)
    head = f"POST {target} HTTP/1.1\nHost: localhost\nContent-Length: 2\nConnection: close\n"
    status, body = await raw_request(client, head, b"{}")
    assert status == 400
    assert upstream.seen == []
    if target != "*":  # aiohttp answers the asterisk form itself
        assert b"origin-form" in body
        assert refused(registry, "bad_target") == 1


@pytest.mark.parametrize(
    "path",
    ["/../admin", "/x/../../admin", "/%2e%2e/admin", "/%2E%2e/%2e%2e/admin", "/a%2fb", "/a%5cb"],
)
async def test_a_path_that_leaves_the_base_or_hides_a_separator_is_refused(
    start: Start, upstream: Recorder, path: str
) -> None:
    client = await start(upstream_facilitator=upstream.url + "/x402")
    status, _ = await raw_request(
        client, f"POST {path} HTTP/1.1\nHost: localhost\nContent-Length: 0\nConnection: close\n"
    )
    assert status == 400
    assert upstream.seen == []


async def test_dot_segments_are_resolved_inside_the_base_path(
    start: Start, upstream: Recorder
) -> None:
    client = await start(upstream_facilitator=upstream.url + "/x402/")
    status, _ = await raw_request(
        client, "GET /a/./b/../supported?x=1 HTTP/1.1\nHost: localhost\nConnection: close\n"
    )
    assert status == 200
    assert [(method, path) for method, path, _ in upstream.seen] == [
        ("GET", "/x402/a/supported?x=1")
    ]


def test_the_upstream_url_is_always_the_configured_origin() -> None:
    pinned = Upstream.parse("https://user:pa%3Ass@fac.example.com/base")
    for target in ["/verify", "/a/../settle?q=@evil.example", "/@evil.example/x", "/:443/x"]:
        url = pinned.target(target)
        assert (url.scheme, url.host, url.port) == ("https", "fac.example.com", 443)
        assert url.raw_path.startswith("/base/")
        assert url.user is None and url.password is None
    for target in ["munity://x/settle", "//fac.example.community/settle", "/%zz"]:
        with pytest.raises(ForwardRefused):
            pinned.target(target)


async def test_headers_named_in_connection_are_not_forwarded(
    start: Start, upstream: Recorder
) -> None:
    client = await start()
    response = await client.get(
        "/supported", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-End": "2"}
    )
    assert response.status == 200
    ((_, _, headers),) = upstream.seen
    assert "X-Hop" not in headers
    assert headers["X-End"] == "2"


def test_answer_headers_named_in_connection_are_dropped() -> None:
    kept = end_to_end(
        [("Connection", "X-Hop, close"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("X-End", "2")]
    )
    assert list(kept.items()) == [("X-End", "2")]


async def test_credentials_in_the_upstream_url_go_in_authorization_and_are_never_shown(
    start: Start, upstream: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    secret_url = upstream.url.replace("http://", "http://operator:s3cret-pass@")
    client = await start(upstream_facilitator=secret_url)
    caplog.set_level(logging.DEBUG)
    response = await client.get("/supported", headers={"Authorization": "Bearer client-own"})
    assert response.status == 200
    ((_, _, headers),) = upstream.seen
    expected = "Basic " + base64.b64encode(b"operator:s3cret-pass").decode()
    assert headers.getall("Authorization") == [expected]
    await upstream_down(client)
    answer = await client.post("/verify", data=b"{}")
    text = await answer.text()
    assert answer.status == 502
    assert "s3cret-pass" not in text and "operator" not in text
    assert "***@" in text
    logged = "\n".join(LogfmtFormatter().format(record) for record in caplog.records)
    assert "s3cret-pass" not in logged


async def upstream_down(client: AppClient) -> None:
    """Point the running proxy at a closed port (same credentials), as if the upstream died."""
    from exporter.ingest.proxy import PROXY

    proxy = client.app[PROXY]
    closed = proxy.upstream.origin.with_port(1)
    proxy.upstream = Upstream(
        closed,
        "",
        proxy.upstream.authorization,
        redact_url(str(closed.with_user("operator").with_password("s3cret-pass"))),
    )


async def test_an_upstream_answer_over_the_limit_is_cut_off_with_a_502(
    start: Start, upstream: Recorder
) -> None:
    client = await start(proxy_max_response_bytes=100_000)
    for chunked in (False, True):
        upstream.answer_bytes, upstream.chunked = 5_000_000, chunked
        response = await client.get("/supported")
        assert response.status == 502
        assert "100000 bytes" in (await response.json())["error"]
    upstream.answer_bytes, upstream.chunked = 100_000, True
    response = await client.get("/supported")
    assert response.status == 200
    assert len(await response.read()) == 100_000


async def test_a_request_body_over_the_limit_gets_413_and_is_not_forwarded(
    start: Start, upstream: Recorder, registry: CollectorRegistry
) -> None:
    client = await start(proxy_max_request_bytes=1000)
    response = await client.post("/verify", data=b"x" * 1001)
    assert response.status == 413
    assert upstream.seen == []
    assert refused(registry, "too_large") == 1


async def test_requests_beyond_the_upstream_slots_get_503_without_being_forwarded(
    start: Start, upstream: Recorder, registry: CollectorRegistry
) -> None:
    client = await start(proxy_max_concurrent_requests=1)
    upstream.hold = asyncio.Event()
    first = asyncio.ensure_future(client.get("/supported"))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    second = await client.get("/supported")
    assert second.status == 503
    assert second.headers["Retry-After"] == "1"
    upstream.hold.set()
    assert (await first).status == 200
    assert len(upstream.seen) == 1
    assert refused(registry, "overloaded") == 1


@pytest.mark.parametrize(
    "path", ["/v1/events/", "/V1/Events", "/v1/analytics/", "/metrics/", "/readyz/x"]
)
async def test_the_exporters_own_paths_never_fall_through_to_the_upstream(
    start: Start, upstream: Recorder, path: str
) -> None:
    client = await start(ingest_token=TOKEN)
    response = await client.post(path, data=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 404
    assert upstream.seen == []


async def test_the_ingest_token_is_never_sent_upstream(start: Start, upstream: Recorder) -> None:
    client = await start(ingest_token=TOKEN)
    response = await client.get("/supported", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    ((_, _, headers),) = upstream.seen
    assert "Authorization" not in headers


def test_log_values_from_the_network_cannot_forge_lines_or_move_the_cursor() -> None:
    record = logging.LogRecord("exporter", logging.WARNING, "", 0, "refused", None, None)
    record.path = "/x\r\nlevel=error msg=forged\x1b[2J\x07\x7f\x9b"
    line = LogfmtFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line)
    assert "\\u001b" in line and "\\u007f" in line


def test_check_config_never_prints_credentials_written_into_a_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    from exporter.cli.main import main

    monkeypatch.setenv("EXPORTER_UPSTREAM_FACILITATOR", "https://operator:s3cret-pass@fac.example")
    monkeypatch.setenv("EXPORTER_DATA_DIR", str(data_dir))
    assert main(["check-config"]) == 0
    shown = capsys.readouterr()
    assert "s3cret-pass" not in shown.out + shown.err
    assert "https://***@fac.example" in shown.out
