"""InfluxDB store: enriched points over the v2 or the v1 write API, at least once through faults.

The points themselves (schema, escaping, timestamps) are :mod:`.line_protocol`'s; this
module sends them, over one of two write APIs (``EXPORTER_INFLUX_API``):

- ``v2`` (InfluxDB 2.x): ``POST /api/v2/write?org=&bucket=&precision=ns`` with
  ``Authorization: Token``, through the official async client's generated write service
  (``WriteService.post_write_async`` on ``InfluxDBClientAsync``'s aiohttp session);
  failures surface as ``ApiException`` with the status code and headers. ``WriteApiAsync.write``
  sends the same request but gzips at level 9 on the event loop and reports a bare
  boolean: measured here on 5,000-line batches of simulated records, level 9 costs
  ~9.8 us a line against ~2.1 us for level 1 (for bodies 35 % against 38 % of the raw
  size), and posting pre-rendered lines reached ~71k lines/s through ``WriteApiAsync``
  against ~200k through the service call.
- ``v1`` (InfluxDB 1.x, and the v1 compatibility API of 1.8+, 2.x and 3):
  ``POST /write?db=&rp=&precision=ns`` on an aiohttp session of its own, authenticated by
  HTTP Basic (``EXPORTER_INFLUX_USERNAME``/``EXPORTER_INFLUX_PASSWORD``; 1.x also takes
  ``u``/``p`` query parameters, which would put the password in every URL) or by
  ``Authorization: Token`` (2.x tokens; ``user:password`` on 1.8+), or not at all.

Either way the body is gzip'd here (level 1, in a worker thread), at most
:data:`MAX_LINES_PER_WRITE` lines per request.

Answers and what they become (the :class:`~exporter.store.forwarder.Forwarder` retries
errors; statuses are classified once for every InfluxDB request by :mod:`.answers`):

- 2xx: delivered.
- 429 / 503: :class:`StoreRetryAfterError` carrying ``Retry-After`` (seconds or an
  HTTP date; :data:`DEFAULT_RETRY_AFTER_SECONDS` when absent, at most
  :data:`~exporter.retry.MAX_RETRY_AFTER_SECONDS`).
- 413: the batch is split in halves, each written on its own; a single line InfluxDB
  still finds too large is refused for good.
- A refused line: v2 answers 400 for a line that does not parse (InfluxDB OSS then writes
  nothing of the request) and 422 for a partial write (e.g. a field type conflict: the
  other lines are written); v1 (1.x) answers 400 ``partial write: ...`` for both, having
  written the lines it could. The request is bisected until the offending lines are
  isolated; each is returned as a :class:`StoreRejection` with InfluxDB's message, the
  rest is written. A poison line thus costs about two requests per halving and is never
  retried again. A 400 about the request as a whole (unreadable body, bad precision, no
  org or database) names no line: it is a :class:`StoreClientError`, retried, and never
  turns good records into dead letters. On v1 only answers that say ``partial write``,
  ``unable to parse`` or ``field type conflict`` count as naming a line.
- 401 / 403, and 404 (org, bucket or database not found, which is also what InfluxDB
  2.x answers to a token that cannot see the bucket): :class:`StoreAuthError`.
- other 4xx: :class:`StoreClientError`; 5xx and connection failures:
  :class:`StoreServerError`; no answer within the timeout: :class:`StoreTimeoutError`.

A URL carrying user info (``user:password@``) is refused when the store is made: the
credentials have settings of their own, aiohttp refuses credentials in the URL beside an
``Authorization`` header, and no message ever prints them.

A failure in the middle of a bisection abandons the whole write: the outbox keeps every
record and the next attempt rewrites the halves already written, which is idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException
from influxdb_client.service.write_service import WriteService

from ...addresses import redact_url
from ...errors import (
    ConfigError,
    StoreAuthError,
    StoreClientError,
    StoreError,
    StoreServerError,
    StoreTimeoutError,
)
from ...records import StoreRecord, StoreRejection
from ..base import has_user_info
from .answers import DEFAULT_RETRY_AFTER_SECONDS, WayOut, answer_message, classify_answer
from .line_protocol import Encoder, analytics_lines, point_line, to_line

# The line-protocol renderers are re-exported: the benchmarks compare them through here.
__all__ = [
    "DEFAULT_RETRY_AFTER_SECONDS",
    "GZIP_LEVEL",
    "EncodedBatch",
    "MAX_LINES_PER_WRITE",
    "Encoder",
    "InfluxApi",
    "InfluxCheck",
    "InfluxStore",
    "point_line",
    "to_line",
]

log = logging.getLogger(__name__)

MAX_LINES_PER_WRITE = 5_000
"""Most lines in one write request (InfluxDB's recommended batch size)."""

GZIP_LEVEL = 1
"""Compression of write bodies: level 1 is ~5x cheaper than 9 for ~10 % more bytes."""

InfluxApi = Literal["v2", "v1"]
"""The write API: ``/api/v2/write`` (org and bucket) or ``/write`` (database)."""

_ERROR_BODY_LIMIT = 64 * 1024
"""Most bytes of an error answer read (InfluxDB's are a line; a proxy's may be a page)."""

_WAY_OUT = {
    "v2": WayOut(
        auth="set EXPORTER_INFLUX_TOKEN to a token that may write to the bucket",
        not_found="check EXPORTER_INFLUX_ORG, EXPORTER_INFLUX_BUCKET and that the token "
        "may write there",
        client="check that EXPORTER_INFLUX_URL names InfluxDB 2.x itself, not a proxy "
        "that rewrites requests (or set EXPORTER_INFLUX_API=v1 for InfluxDB 1.x)",
    ),
    "v1": WayOut(
        auth="set EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_PASSWORD (or "
        "EXPORTER_INFLUX_TOKEN) to credentials that may write to the database",
        not_found="check EXPORTER_INFLUX_BUCKET (the database, which must exist) and that "
        "the credentials may write there",
        client="check that EXPORTER_INFLUX_URL names InfluxDB itself, not a proxy that "
        "rewrites requests, and that it speaks EXPORTER_INFLUX_API=v1",
    ),
}


def _gzip(lines: Sequence[str]) -> bytes:
    return gzip.compress("\n".join(lines).encode(), GZIP_LEVEL)


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Records rendered to line protocol, with the first request's gzip'd body."""

    lines: list[str]
    first_body: bytes


def _encode(encoder: Encoder, records: Sequence[StoreRecord], max_lines: int) -> EncodedBatch:
    """Render every record and gzip the first request's body (in a worker thread)."""
    lines = [encoder(record) for record in records]
    return EncodedBatch(lines, _gzip(lines[:max_lines]))


# InfluxDB 2.x's 400 answers about the request as a whole rather than a line in it (bad
# gzip, precision or org, empty body): retried like other client errors, never bisected.
_REQUEST_LEVEL_400 = (
    "unable to read data",
    "gzipped http body",
    "invalid precision",
    "writing requires points",
    "provide either orgid or org",
)
# InfluxDB 1.x's 400 answers that name lines (it wrote the others): anything else, such
# as "database is required" or a gzip error ("unexpected EOF"), is about the request.
_LINE_LEVEL_400_V1 = ("partial write", "unable to parse", "field type conflict")


class _LinesRefused(Exception):
    """400/422/413: some line of the request is refused (never leaves this module)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class InfluxCheck:
    """What ``check-config --ping`` learns about the configured InfluxDB."""

    reachable: bool
    version: str | None
    credentials: str
    """``accepted``, ``refused``, ``not found`` (org or bucket) or ``unknown``."""
    detail: str


class InfluxStore:
    """The InfluxDB store: gzip'd line-protocol writes over the v2 or the v1 write API.

    The HTTP clients must be created on the event loop that uses them, so they are
    opened lazily by the first call; :meth:`close` releases their connection pools.
    """

    name = "influxdb"

    def __init__(
        self,
        url: str,
        token: str | None,
        org: str | None,
        bucket: str,
        timeout_seconds: float = 10.0,
        max_lines: int = MAX_LINES_PER_WRITE,
        encoder: Encoder = to_line,
        *,
        api: InfluxApi = "v2",
        username: str | None = None,
        password: str | None = None,
        retention_policy: str | None = None,
    ) -> None:
        """Remember where to write; nothing connects until the first write.

        ``bucket`` is the database for ``api="v1"``. ``encoder`` exists for the
        benchmark, which compares :func:`to_line` with :func:`point_line`; both give the
        same bytes.
        """
        if not 1 <= max_lines <= MAX_LINES_PER_WRITE:
            raise ValueError(f"max_lines must be in 1..{MAX_LINES_PER_WRITE}")
        if api == "v2" and not (token and org):
            raise ValueError("the v2 write API needs a token and an org")
        if has_user_info(url):
            # Credentials have settings of their own, and aiohttp refuses every request
            # whose URL carries credentials beside an Authorization header.
            raise ConfigError(
                f"EXPORTER_INFLUX_URL {redact_url(url)} carries user info, which the "
                "exporter does not use (it authenticates with EXPORTER_INFLUX_TOKEN, or "
                "EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_PASSWORD for the v1 API): "
                "remove the 'user:password@' part"
            )
        self.url = url.rstrip("/")
        self.api: InfluxApi = api
        self.org = org
        self.bucket = bucket
        self.retention_policy = retention_policy
        self.timeout_seconds = timeout_seconds
        self.max_lines = max_lines
        self.encoder = encoder
        self._token = token
        self._username = username
        self._password = password
        self._client: InfluxDBClientAsync | None = None
        self._service: Any = None
        self._session: aiohttp.ClientSession | None = None
        if api == "v1":
            where = f"InfluxDB {self.url} database {bucket!r}"
            if retention_policy:
                where += f" retention policy {retention_policy!r}"
        else:
            where = f"InfluxDB {self.url} bucket {bucket!r} org {org!r}"
        self._where = where
        self.requests = 0
        """Write requests sent (bisection and 413 splits included), for tests and logs."""

    def _open(self) -> Any:
        if self._service is None:
            self._client = InfluxDBClientAsync(
                url=self.url,
                token=self._token or "",
                org=self.org or "",
                timeout=max(1, int(self.timeout_seconds * 1000)),
                enable_gzip=False,  # bodies arrive here already compressed
            )
            self._service = cast(Callable[[Any], Any], WriteService)(self._client.api_client)
        return self._service

    def _open_v1(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Content-Type": "text/plain; charset=utf-8"}
            if self._username is not None:
                pair = f"{self._username}:{self._password or ''}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            elif self._token:
                headers["Authorization"] = f"Token {self._token}"
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_seconds)
            )
        return self._session

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Write ``records`` in requests of at most ``max_lines`` lines.

        Returns the records InfluxDB refused for good (with its message); raises a
        :class:`StoreError` when anything else went wrong, and then every record is
        written again on the next attempt.
        """
        if not records:
            return []
        encoded = await asyncio.to_thread(_encode, self.encoder, records, self.max_lines)
        return await self.write_prepared(records, encoded)

    def prepare(self, records: Sequence[StoreRecord]) -> EncodedBatch:
        """Render ``records`` and gzip the first request (pure CPU, for a worker thread).

        The forwarder prepares the next batch this way while the current one is in
        flight, so InfluxDB does not wait for the rendering between requests.
        """
        return _encode(self.encoder, records, self.max_lines)

    async def write_prepared(
        self, records: list[StoreRecord], prepared: object
    ) -> list[StoreRejection]:
        """:meth:`write` from :meth:`prepare`'s result for the same ``records``."""
        if not isinstance(prepared, EncodedBatch) or len(prepared.lines) != len(records):
            raise TypeError("write_prepared takes what prepare() made of the same records")
        lines = prepared.lines
        refused: list[StoreRejection] = []
        for start in range(0, len(records), self.max_lines):
            end = start + self.max_lines
            body = prepared.first_body if start == 0 else None
            await self._write_span(records[start:end], lines[start:end], body, refused)
        return refused

    async def write_analytics(self, rows: list[tuple[str, str, int, str, float]]) -> None:
        """Write computed analytics as ``analytics`` points (tags ``name``, ``window``).

        Rows are (name, window, time_ms, field, value); rows sharing name, window and time
        become one point. Equal timestamps from every exporter on the same schedule make a
        repeated write overwrite the point.
        """
        lines = analytics_lines(rows)
        if lines:
            await self._post(_gzip(lines))

    async def _write_span(
        self,
        records: Sequence[StoreRecord],
        lines: Sequence[str],
        body: bytes | None,
        refused: list[StoreRejection],
    ) -> None:
        if body is None:
            body = await asyncio.to_thread(_gzip, lines) if len(lines) > 100 else _gzip(lines)
        try:
            await self._post(body)
            return
        except _LinesRefused as error:
            if len(lines) == 1:
                log.warning(
                    "influxdb refused a line for good; kept as a dead letter",
                    extra={"status": error.status, "reason": error.message, "line": lines[0]},
                )
                refused.append(
                    StoreRejection(records[0], f"influxdb {error.status}: {error.message}")
                )
                return
            log.debug(
                "influxdb refused part of a write; bisecting",
                extra={"status": error.status, "lines": len(lines), "reason": error.message},
            )
        middle = len(lines) // 2
        await self._write_span(records[:middle], lines[:middle], None, refused)
        await self._write_span(records[middle:], lines[middle:], None, refused)

    async def _post(self, body: bytes) -> None:
        self.requests += 1
        try:
            if self.api == "v1":
                await self._post_v1(body)
            else:
                await self._post_v2(body)
        except TimeoutError as error:  # before OSError: aiohttp's timeouts are both
            raise StoreTimeoutError(
                f"InfluxDB at {self.url} did not answer within {self.timeout_seconds:g}s: check "
                "that it is up, or raise EXPORTER_INFLUX_TIMEOUT_SECONDS if it is only slow"
            ) from error
        except (aiohttp.ClientError, OSError) as error:
            raise StoreServerError(
                f"InfluxDB at {self.url} unreachable ({type(error).__name__}: "
                f"{error}): check that InfluxDB runs there and that "
                "EXPORTER_INFLUX_URL names it"
            ) from error

    async def _post_v2(self, body: bytes) -> None:
        service = self._open()
        try:
            await service.post_write_async(
                org=self.org,
                bucket=self.bucket,
                body=body,
                precision="ns",
                content_encoding="gzip",
                content_type="text/plain; charset=utf-8",
                _return_http_data_only=False,
            )
        except ApiException as error:
            headers: Mapping[str, str] = error.headers or {}
            raise self._refusal(
                int(error.status or 0),
                answer_message(error.body, error.reason),
                headers.get("Retry-After"),
            ) from error

    async def _post_v1(self, body: bytes) -> None:
        session = self._open_v1()
        params = {"db": self.bucket, "precision": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        async with session.post(
            f"{self.url}/write",
            params=params,
            data=body,
            headers={"Content-Encoding": "gzip"},
        ) as answer:
            if 200 <= answer.status < 300:
                return
            text = await answer.content.read(_ERROR_BODY_LIMIT)
            raise self._refusal(
                answer.status,
                answer_message(text, answer.reason),
                answer.headers.get("Retry-After"),
            )

    def _refusal(self, status: int, message: str, retry_after: str | None) -> Exception:
        """What an answer other than 2xx to a write means: a refused line, else an error."""
        lowered = message.lower()
        if status == 413:
            return _LinesRefused(status, message)
        if status in (400, 422):
            if self.api == "v1":
                names_lines = any(text in lowered for text in _LINE_LEVEL_400_V1)
            else:
                names_lines = not any(text in lowered for text in _REQUEST_LEVEL_400)
            if names_lines:
                return _LinesRefused(status, message)
        return classify_answer(status, message, retry_after, self._where, _WAY_OUT[self.api])

    async def version(self) -> str:
        """The InfluxDB version ``/ping`` reports (raises what a write would on failure)."""
        if self.api == "v2":
            self._open()
            assert self._client is not None
            try:
                return str(await self._client.version())
            except ApiException as error:
                raise StoreServerError(f"/ping answered {error.status}") from error
        session = self._open_v1()
        async with session.get(f"{self.url}/ping") as answer:
            if not 200 <= answer.status < 300:
                raise StoreServerError(f"/ping answered {answer.status}")
            return answer.headers.get("X-Influxdb-Version", "unknown")

    async def check(self) -> InfluxCheck:
        """Ping InfluxDB, then test the credentials with an empty write.

        InfluxDB checks the credentials and names before it parses the body, so an empty
        body answers 400 ("writing requires points", 2.x) or 204 (1.x) exactly when they
        are right, and writes nothing either way.
        """
        try:
            version = await self.version()
        except StoreServerError as error:
            return InfluxCheck(False, None, "unknown", str(error))
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            return InfluxCheck(False, None, "unknown", f"{type(error).__name__}: {error}")
        names = "token, org and bucket" if self.api == "v2" else "credentials and database"
        try:
            await self._post(gzip.compress(b""))
        except StoreClientError as error:
            if "writing requires points" in str(error):
                return InfluxCheck(True, version, "accepted", f"{names} accepted")
            return InfluxCheck(True, version, "unknown", str(error))
        except _LinesRefused as error:
            if "writing requires points" in error.message:
                return InfluxCheck(True, version, "accepted", f"{names} accepted")
            return InfluxCheck(True, version, "unknown", error.message)
        except StoreAuthError as error:
            refused = "answered 404" not in str(error)
            return InfluxCheck(True, version, "refused" if refused else "not found", str(error))
        except StoreError as error:
            return InfluxCheck(True, version, "unknown", str(error))
        return InfluxCheck(True, version, "accepted", "empty write accepted")

    async def close(self) -> None:
        """Close the clients' connection pools."""
        client, self._client, self._service = self._client, None, None
        if client is not None:
            await cast(Callable[[], Any], client.close)()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
