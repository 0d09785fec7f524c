"""InfluxDB 2.x store: enriched points over ``/api/v2/write``, at least once through faults.

The points themselves (schema, escaping, timestamps) are :mod:`.line_protocol`'s; this
module sends them.

Transport: the official async client's generated write service
(``WriteService.post_write_async`` on ``InfluxDBClientAsync``'s aiohttp session) with a
body this module gzips itself (level 1, in a worker thread), at most
:data:`MAX_LINES_PER_WRITE` lines per request; failures surface as ``ApiException``
with the status code and headers (``Retry-After``). ``WriteApiAsync.write`` sends the
same request but gzips at level 9 on the event loop and reports a bare boolean:
measured here on 5,000-line batches of simulated records, level 9 costs ~9.8 us a line
against ~2.1 us for level 1 (for bodies 35 % against 38 % of the raw size), and posting
pre-rendered lines reached ~71k lines/s through ``WriteApiAsync`` against ~200k through
the service call.

Answers and what they become (the :class:`~exporter.store.forwarder.Forwarder` retries errors):

- 2xx: delivered.
- 429 / 503: :class:`StoreRetryAfterError` carrying ``Retry-After`` (seconds or an
  HTTP date; :data:`DEFAULT_RETRY_AFTER_SECONDS` when absent, at most
  :data:`~exporter.retry.MAX_RETRY_AFTER_SECONDS`).
- 413: the batch is split in halves, each written on its own; a single line InfluxDB
  still finds too large is refused for good.
- 400 (a line that does not parse: InfluxDB OSS then writes nothing of the request) and
  422 (partial write, e.g. a field type conflict: the other lines are written):
  the request is bisected until the offending lines are isolated; each is returned as a
  :class:`StoreRejection` with InfluxDB's message, the rest is written. A poison line
  thus costs about two requests per halving and is never retried again. A 400 about the
  request as a whole (unreadable body, bad precision, no org) names no line: it is a
  :class:`StoreClientError`, retried, and never turns good records into dead letters.
- 401 / 403, and 404 (org or bucket not found, which is also what InfluxDB answers to a
  token that cannot see the bucket): :class:`StoreAuthError`.
- other 4xx: :class:`StoreClientError`; 5xx and connection failures:
  :class:`StoreServerError`; no answer within the timeout: :class:`StoreTimeoutError`.

A URL carrying user info (``user:password@``) is refused when the store is made: the
client sends the token as the ``Authorization`` header, beside which aiohttp refuses
credentials in the URL, and no message ever prints them.

A failure in the middle of a bisection abandons the whole write: the outbox keeps every
record and the next attempt rewrites the halves already written, which is idempotent.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException
from influxdb_client.service.write_service import WriteService

from ...config import redact_url
from ...errors import (
    ConfigError,
    StoreAuthError,
    StoreClientError,
    StoreError,
    StoreRetryAfterError,
    StoreServerError,
    StoreTimeoutError,
)
from ...records import StoreRecord, StoreRejection
from ...retry import parse_retry_after
from ..base import has_user_info
from .line_protocol import Encoder, analytics_lines, point_line, to_line

# The line-protocol renderers are re-exported: the benchmarks compare them through here.
__all__ = [
    "DEFAULT_RETRY_AFTER_SECONDS",
    "GZIP_LEVEL",
    "MAX_LINES_PER_WRITE",
    "Encoder",
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

DEFAULT_RETRY_AFTER_SECONDS = 5.0
"""The pause after a 429/503 that names no ``Retry-After``."""

_MESSAGE_LIMIT = 500
_CHECK_URL = "check that EXPORTER_INFLUX_URL names InfluxDB 2.x"


def _gzip(lines: Sequence[str]) -> bytes:
    return gzip.compress("\n".join(lines).encode(), GZIP_LEVEL)


def _encode(
    encoder: Encoder, records: Sequence[StoreRecord], max_lines: int
) -> tuple[list[str], bytes]:
    """Render every record and gzip the first request's body (in a worker thread)."""
    lines = [encoder(record) for record in records]
    return lines, _gzip(lines[:max_lines])


def _message(error: ApiException) -> str:
    body = error.body
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        text = decoded["message"]
    text = text.strip() or str(error.reason or "")
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


# InfluxDB's 400 answers about the request as a whole rather than a line in it (bad
# gzip, precision or org, empty body): retried like other client errors, never bisected.
_REQUEST_LEVEL_400 = (
    "unable to read data",
    "gzipped http body",
    "invalid precision",
    "writing requires points",
    "provide either orgid or org",
)


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
    """The InfluxDB 2.x store: gzip'd line-protocol writes through ``influxdb-client``.

    The async client must be created on the event loop that uses it, so it is opened
    lazily by the first call; :meth:`close` releases its connection pool.
    """

    name = "influxdb"

    def __init__(
        self,
        url: str,
        token: str,
        org: str,
        bucket: str,
        timeout_seconds: float = 10.0,
        max_lines: int = MAX_LINES_PER_WRITE,
        encoder: Encoder = to_line,
    ) -> None:
        """Remember where to write; nothing connects until the first write.

        ``encoder`` exists for the benchmark, which compares :func:`to_line` with
        :func:`point_line`; both give the same bytes.
        """
        if not 1 <= max_lines <= MAX_LINES_PER_WRITE:
            raise ValueError(f"max_lines must be in 1..{MAX_LINES_PER_WRITE}")
        if has_user_info(url):
            # The client sends the token as the Authorization header, and aiohttp then
            # refuses every request whose URL carries credentials of its own.
            raise ConfigError(
                f"EXPORTER_INFLUX_URL {redact_url(url)} carries user info, which InfluxDB "
                "2.x does not use (it authenticates with EXPORTER_INFLUX_TOKEN): remove "
                "the 'user:password@' part"
            )
        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self.timeout_seconds = timeout_seconds
        self.max_lines = max_lines
        self.encoder = encoder
        self._token = token
        self._client: InfluxDBClientAsync | None = None
        self._service: Any = None
        self.requests = 0
        """Write requests sent (bisection and 413 splits included), for tests and logs."""

    def _open(self) -> Any:
        if self._service is None:
            self._client = InfluxDBClientAsync(
                url=self.url,
                token=self._token,
                org=self.org,
                timeout=max(1, int(self.timeout_seconds * 1000)),
                enable_gzip=False,  # bodies arrive here already compressed
            )
            self._service = cast(Callable[[Any], Any], WriteService)(self._client.api_client)
        return self._service

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Write ``records`` in requests of at most ``max_lines`` lines.

        Returns the records InfluxDB refused for good (with its message); raises a
        :class:`StoreError` when anything else went wrong, and then every record is
        written again on the next attempt.
        """
        if not records:
            return []
        lines, first_body = await asyncio.to_thread(
            _encode, self.encoder, records, self.max_lines
        )
        refused: list[StoreRejection] = []
        for start in range(0, len(records), self.max_lines):
            end = start + self.max_lines
            body = first_body if start == 0 else None
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
        service = self._open()
        self.requests += 1
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
            raise self._classify(error) from error
        except TimeoutError as error:
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

    def _classify(self, error: ApiException) -> Exception:
        status = int(error.status or 0)
        message = _message(error)
        where = f"InfluxDB {self.url} bucket {self.bucket!r} org {self.org!r}"
        if status == 400 and any(text in message.lower() for text in _REQUEST_LEVEL_400):
            return StoreClientError(
                f"{where} refused the request ({status}: {message}): {_CHECK_URL} itself, "
                "not a proxy that rewrites requests"
            )
        if status in (400, 413, 422):
            return _LinesRefused(status, message)
        if status in (429, 503):
            headers: Mapping[str, str] = error.headers or {}
            retry_after = parse_retry_after(
                headers.get("Retry-After"), time.time(), default=DEFAULT_RETRY_AFTER_SECONDS
            )
            return StoreRetryAfterError(
                f"{where} answered {status} ({message}) and asked for a pause of "
                f"{retry_after:g}s",
                retry_after,
            )
        if status in (401, 403):
            return StoreAuthError(
                f"{where} refused the token ({status}: {message}): set "
                "EXPORTER_INFLUX_TOKEN to a token that may write to the bucket"
            )
        if status == 404:
            return StoreAuthError(
                f"{where}: not found ({message}); check EXPORTER_INFLUX_ORG, "
                "EXPORTER_INFLUX_BUCKET and that the token may write there"
            )
        if 400 <= status < 500:
            return StoreClientError(f"{where} answered {status} ({message}): {_CHECK_URL}")
        if status >= 500:
            return StoreServerError(
                f"{where} answered {status} ({message}): InfluxDB's own log says why"
            )
        return StoreError(f"{where} answered {status} ({message}): {_CHECK_URL}")

    async def check(self) -> InfluxCheck:
        """Ping InfluxDB, then test the credentials with an empty write.

        InfluxDB checks the token, org and bucket before it parses the body, so an empty
        body answers 400 ("writing requires points") exactly when all three are right,
        and writes nothing either way.
        """
        self._open()
        assert self._client is not None
        try:
            version = str(await self._client.version())
        except ApiException as error:
            return InfluxCheck(False, None, "unknown", f"/ping answered {error.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            return InfluxCheck(False, None, "unknown", f"{type(error).__name__}: {error}")
        try:
            await self._post(gzip.compress(b""))
        except StoreClientError as error:
            if "writing requires points" in str(error):
                return InfluxCheck(True, version, "accepted", "token, org and bucket accepted")
            return InfluxCheck(True, version, "unknown", str(error))
        except _LinesRefused as error:
            return InfluxCheck(True, version, "unknown", error.message)
        except StoreAuthError as error:
            refused = "not found" not in str(error)
            return InfluxCheck(True, version, "refused" if refused else "not found", str(error))
        except StoreError as error:
            return InfluxCheck(True, version, "unknown", str(error))
        return InfluxCheck(True, version, "accepted", "empty write accepted")

    async def close(self) -> None:
        """Close the client's connection pool."""
        client, self._client, self._service = self._client, None, None
        if client is not None:
            await cast(Callable[[], Any], client.close)()
