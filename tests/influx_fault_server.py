"""An InfluxDB stand-in for tests and benchmarks, with scriptable faults.

Not a test module. It implements what the exporter's InfluxDB store talks to:
``POST /api/v2/write`` (gzip-aware, token-checked, org and bucket checked, every request
recorded with its query string and lines), the v1 ``POST /write`` (database ``db`` =
``bucket``, optional ``rp`` among ``retention_policies``, ``Authorization: Token`` or
HTTP Basic with ``username``/``password``; answers as InfluxDB 1.x does),
``GET /ping`` and ``GET /health``. Accepted
lines are kept as points keyed like InfluxDB keys them, by series (measurement and tag
set) and timestamp, so a rewrite overwrites and distinct events stay distinct.

Faults, by rule or scripted per request:

- ``script``: the next write requests get these :class:`Reply` answers in order (500,
  429 with ``Retry-After``, 401, a slow answer that outlasts the client's timeout, ...);
- ``max_lines``: more lines than this in one request answers 413, as InfluxDB does
  above its batch size limit;
- ``bad_markers``: a request holding a line that contains one of these substrings is
  refused with 400 and InfluxDB's parse-error body naming the first such line, and none
  of its lines is written (InfluxDB OSS 2.x parses the whole batch before writing); on
  ``/write`` the other lines are written and the answer is 1.x's 400 ``partial write:
  unable to parse``;
- ``conflict_markers``: such lines are dropped with 422 ``partial write`` while the
  other lines of the request are written, as InfluxDB does on field type conflicts; on
  ``/write`` the answer is 1.x's 400 ``partial write: field type conflict``, and with
  ``v1_conflict_drops_batch`` nothing of the request is written (a whole batch refused);
- :meth:`InfluxFaultServer.outage`: stop listening (connection refused) until
  :meth:`InfluxFaultServer.resume`.

Error bodies have InfluxDB's shape: ``{"code": ..., "message": ...}`` on the v2 API,
``{"error": ...}`` on ``/write``. All state is
guarded by a lock, so a test may drive the server from another thread
(:class:`ThreadedInfluxFaultServer`), e.g. while the exporter runs as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gzip
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

_T = TypeVar("_T")

VERSION = "v2.7.11"
"""The InfluxDB version the stand-in reports in ``X-Influxdb-Version`` and /health."""

VERSION_V1 = "1.6.7~rc0"
"""The version ``/write`` answers report, as Debian's InfluxDB 1.6 does."""

PointKey = tuple[str, int]
"""How InfluxDB identifies a point: (series key ``measurement,tags``, timestamp ns)."""


@dataclass(frozen=True)
class Reply:
    """One scripted answer to a write request.

    ``status`` 2xx accepts and writes the request's lines; any other status refuses it
    with ``message`` in InfluxDB's error body. ``delay`` seconds pass before the server
    answers (or until it stops), so a delay above the client's timeout is a timeout.
    """

    status: int = 204
    message: str = "scripted failure"
    retry_after: str | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class WriteRequest:
    """A write request as the server received it."""

    query: dict[str, str]
    content_encoding: str | None
    authorization: str | None
    lines: tuple[str, ...]
    status: int
    at: float
    """``time.monotonic()`` when the request arrived."""


_ERROR_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    413: "request too large",
    422: "unprocessable entity",
    429: "too many requests",
    500: "internal error",
    503: "unavailable",
}


def split_point(line: str) -> tuple[str, str, int]:
    """Split a line-protocol line into (series key, field set, timestamp).

    The series key ends at the first space not escaped by a backslash; the timestamp is
    the last space-separated token (string field values may hold spaces, never the
    timestamp).
    """
    index = line.find(" ")
    while index > 0:
        backslashes = len(line[:index]) - len(line[:index].rstrip("\\"))
        if backslashes % 2 == 0:
            fields, _, timestamp = line[index + 1 :].rpartition(" ")
            return line[:index], fields, int(timestamp)
        index = line.find(" ", index + 1)
    raise ValueError(f"not a line-protocol point: {line!r}")


def _complete(line: str) -> bool:
    """Whether ``line`` holds a whole point: its string fields' quotes are balanced."""
    if '"' not in line:
        return True
    try:
        _, fields, _ = split_point(line)
    except ValueError:
        return False
    unescaped = fields.replace("\\\\", "")
    return (unescaped.count('"') - unescaped.count('\\"')) % 2 == 0


def split_lines(text: str) -> list[str]:
    """Split a write body into points; a newline inside a quoted string field stays."""
    lines: list[str] = []
    pending: str | None = None
    for piece in text.split("\n"):
        pending = piece if pending is None else pending + "\n" + piece
        if _complete(pending):
            if pending:
                lines.append(pending)
            pending = None
    if pending:
        lines.append(pending)
    return lines


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"X-Platform-Error-Code": _ERROR_CODES.get(status, "internal error")}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {"code": _ERROR_CODES.get(status, "internal error"), "message": message}
    return web.json_response(body, status=status, headers=headers)


def _error_v1(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"X-Influxdb-Error": message, "X-Influxdb-Version": VERSION_V1}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return web.json_response({"error": message}, status=status, headers=headers)


@dataclass
class InfluxFaultServer:
    """The stand-in: an aiohttp app on a loopback port with recorded state and faults."""

    token: str = "test-token"
    org: str = "test-org"
    bucket: str = "payments"
    record_points: bool = True
    """When False only requests and line counts are kept (for benchmarks)."""
    username: str | None = None
    """With ``password``: HTTP Basic credentials ``/write`` accepts beside the token."""
    password: str | None = None
    retention_policies: tuple[str, ...] = ("autogen",)
    max_lines: int | None = None
    bad_markers: tuple[str, ...] = ()
    conflict_markers: tuple[str, ...] = ()
    v1_conflict_drops_batch: bool = False
    script: collections.deque[Reply] = field(default_factory=collections.deque)
    requests: list[WriteRequest] = field(default_factory=list)
    points: dict[PointKey, str] = field(default_factory=dict)
    deliveries: collections.Counter[PointKey] = field(default_factory=collections.Counter)
    lines_accepted: int = 0
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _stopping: asyncio.Event | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        """The aiohttp application (routes only; state lives on this object)."""
        app = web.Application(
            client_max_size=256 * 1024 * 1024,
            handler_args={"auto_decompress": False},  # decoded here, as InfluxDB does
        )
        app.router.add_post("/api/v2/write", self._write)
        app.router.add_post("/write", self._write)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/health", self._health)
        app.router.add_get("/_fault/stats", self._stats)
        return app

    async def start(self) -> str:
        """Listen on loopback (port 0 picks a free port, kept across outages)."""
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            await runner.cleanup()
            raise
        self.port = int(sock.getsockname()[1])
        await web.SockSite(runner, sock).start()
        self._runner = runner
        return self.url

    async def stop(self) -> None:
        """Stop listening and close every connection; recorded state is kept."""
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def outage(self) -> None:
        """Simulate InfluxDB going away: connections are refused until :meth:`resume`."""
        await self.stop()

    async def resume(self) -> None:
        """End an :meth:`outage`: listen again on the same port."""
        await self.start()

    # ------------------------------------------------------------------ state

    def push(self, *replies: Reply) -> None:
        """Script the answers to the next write requests, in order."""
        with self._lock:
            self.script.extend(replies)

    def point_keys(self) -> set[PointKey]:
        """The distinct points written so far."""
        with self._lock:
            return set(self.points)

    def written_lines(self) -> list[str]:
        """The stored point lines (the last write of each point)."""
        with self._lock:
            return list(self.points.values())

    def request_log(self) -> list[WriteRequest]:
        """Every write request so far."""
        with self._lock:
            return list(self.requests)

    # ------------------------------------------------------------------ handlers

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(
            status=204, headers={"X-Influxdb-Version": VERSION, "X-Influxdb-Build": "OSS"}
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "influxdb",
                "message": "ready for queries and writes",
                "status": "pass",
                "checks": [],
                "version": VERSION,
                "commit": "fault-server",
            }
        )

    async def _stats(self, request: web.Request) -> web.Response:
        with self._lock:
            stats = {
                "requests": len(self.requests),
                "linesAccepted": self.lines_accepted,
                "points": len(self.points),
            }
        return web.json_response(stats)

    async def _write(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        raw = await request.read()
        encoding = request.headers.get("Content-Encoding")
        if encoding in ("gzip", "x-gzip"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as error:
                return _error(400, f"unable to read data: {error}")
        text = raw.decode()
        if self.record_points:
            lines = tuple(split_lines(text))
        else:  # benchmarks: count lines without parsing them
            lines = tuple(line for line in text.split("\n") if line)
        with self._lock:
            reply = self.script.popleft() if self.script else None
        if reply is not None and reply.delay > 0:
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
        if request.path == "/write":
            response = self._answer_v1(request, lines, reply)
        else:
            response = self._answer(request, lines, reply)
        with self._lock:
            self.requests.append(
                WriteRequest(
                    dict(request.query),
                    encoding,
                    request.headers.get("Authorization"),
                    lines if self.record_points else (),
                    response.status,
                    arrived,
                )
            )
        return response

    def _answer(
        self, request: web.Request, lines: tuple[str, ...], reply: Reply | None
    ) -> web.Response:
        if request.headers.get("Authorization") != f"Token {self.token}":
            return _error(401, "unauthorized access")
        if reply is not None and not 200 <= reply.status < 300:
            return _error(reply.status, reply.message, reply.retry_after)
        query = request.query
        if query.get("org") != self.org:
            return _error(404, f'organization name "{query.get("org")}" not found')
        if query.get("bucket") != self.bucket:
            return _error(404, f'bucket "{query.get("bucket")}" not found')
        if query.get("precision", "ns") != "ns":
            return _error(400, "this stand-in only speaks precision=ns")
        if not lines:
            return _error(400, "writing requires points")
        if self.max_lines is not None and len(lines) > self.max_lines:
            return _error(413, "unable to read data: points batch is too large")
        for line in lines:
            if any(marker in line for marker in self.bad_markers):
                return _error(400, f"unable to parse '{line}': invalid field format")
        good = lines
        dropped: list[str] = []
        if self.conflict_markers:
            good = tuple(ln for ln in lines if not any(m in ln for m in self.conflict_markers))
            dropped = [ln for ln in lines if ln not in good]
        self._apply(good)
        if dropped:
            return _error(
                422,
                "failure writing points to database: partial write: field type conflict: "
                f"input field in line '{dropped[0]}' is type string, already exists as "
                f"type integer dropped={len(dropped)}",
            )
        return web.Response(status=204)

    def _authorised_v1(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization")
        if given == f"Token {self.token}":
            return True
        if self.username is None or given is None or not given.startswith("Basic "):
            return False
        expected = f"{self.username}:{self.password or ''}".encode()
        return base64.b64decode(given.removeprefix("Basic ")) == expected

    def _answer_v1(
        self, request: web.Request, lines: tuple[str, ...], reply: Reply | None
    ) -> web.Response:
        """What InfluxDB 1.x answers to ``POST /write`` (probed on 1.6)."""
        if not self._authorised_v1(request):
            return _error_v1(401, "authorization failed")
        if reply is not None and not 200 <= reply.status < 300:
            return _error_v1(reply.status, reply.message, reply.retry_after)
        query = request.query
        if "db" not in query:
            return _error_v1(400, "database is required")
        if query["db"] != self.bucket:
            return _error_v1(404, f'database not found: "{query["db"]}"')
        if query.get("rp", "autogen") not in self.retention_policies:
            return _error_v1(500, f"retention policy not found: {query['rp']}")
        if query.get("precision", "ns") != "ns":
            return _error_v1(400, "this stand-in only speaks precision=ns")
        if self.max_lines is not None and len(lines) > self.max_lines:
            return _error_v1(413, "Request Entity Too Large")
        unparsed = [ln for ln in lines if any(m in ln for m in self.bad_markers)]
        conflicting = [ln for ln in lines if any(m in ln for m in self.conflict_markers)]
        good = tuple(ln for ln in lines if ln not in unparsed and ln not in conflicting)
        if unparsed:
            self._apply(good)
            return _error_v1(
                400, f"partial write: unable to parse '{unparsed[0]}': invalid number dropped=0"
            )
        if conflicting:
            if not self.v1_conflict_drops_batch:
                self._apply(good)
            dropped = len(lines) if self.v1_conflict_drops_batch else len(conflicting)
            return _error_v1(
                400,
                f'partial write: field type conflict: input field "payment_id" on measurement '
                f'"payment" is type string, already exists as type integer dropped={dropped}',
            )
        self._apply(lines)
        return web.Response(status=204, headers={"X-Influxdb-Version": VERSION_V1})

    def _apply(self, lines: tuple[str, ...]) -> None:
        with self._lock:
            self.lines_accepted += len(lines)
            if not self.record_points:
                return
            for line in lines:
                series, _, timestamp = split_point(line)
                key = (series, timestamp)
                self.points[key] = line
                self.deliveries[key] += 1


class ThreadedInfluxFaultServer:
    """An :class:`InfluxFaultServer` running on its own event loop in a daemon thread.

    For tests that cannot share their loop with the server, e.g. those driving an
    exporter subprocess with blocking calls.
    """

    def __init__(self, server: InfluxFaultServer | None = None) -> None:
        self.server = server if server is not None else InfluxFaultServer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="influx-fault-server", daemon=True
        )

    def __enter__(self) -> InfluxFaultServer:
        self._thread.start()
        self.call(self.server.start())
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        self.call(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine of the server on its loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)


@contextlib.contextmanager
def threaded_fault_server(**options: Any) -> Iterator[tuple[InfluxFaultServer, Any]]:
    """Run a fault server in a thread; yields it and a function running its coroutines."""
    runner = ThreadedInfluxFaultServer(InfluxFaultServer(**options))
    with runner as server:
        yield server, runner.call


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a stand-alone fault server until killed; its URL is the first stdout line.

    ``python tests/influx_fault_server.py [--count-only] [--port N]``: used by
    ``bench/ship.py`` to keep the server's work off the measured process's cores.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count-only", action="store_true", help="count lines, keep no points")
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--org", default="test-org")
    parser.add_argument("--bucket", default="payments")
    args = parser.parse_args(argv)
    server = InfluxFaultServer(
        token=args.token,
        org=args.org,
        bucket=args.bucket,
        record_points=not args.count_only,
        port=args.port,
    )

    async def serve() -> None:
        sys.stdout.write(await server.start() + "\n")
        sys.stdout.flush()
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
