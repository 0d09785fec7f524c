"""The ingest endpoint ``POST /v1/events`` (docs/architecture.md section 3).

Accepts one event object, a JSON array of events or NDJSON, optionally gzip-encoded;
answers 202 only after the ledger committed the events. Every refusal is answered with
the same JSON shape, counted by reason and kept as a dead letter with its raw bytes;
when signed deliveries are on (:mod:`exporter.ingest.signing`), only once the signature is verified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpProcessingError

from ..auth import bearer_token_matches
from ..errors import LedgerUnavailableError
from ..events import (
    Event,
    EventError,
    MalformedJSONError,
    latest_timestamp_ms,
    network_names,
    parse_event,
    parse_event_array_json,
    parse_event_json,
)
from ..ledger import DeadLetter, GroupCommitter, Outcome, PreparedEvent, Submission
from ..metrics import Metrics
from ..networks import NetworkTable
from .dead_letters import (
    DEFAULT_DEAD_LETTER_MAX_BYTES,
    DEFAULT_DEAD_LETTER_MAX_BYTES_PER_MINUTE,
    DeadLetterGate,
    DeadLetterLimits,
)
from .signing import SIGNATURE_HEADER, SignatureError, SignatureHeader, SignatureVerifier

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_GZIP_SLICE = 64 * 1024
_GZIP_MAX_MEMBERS = 1000
"""Concatenated gzip files are valid gzip, but each member costs a decoder: an 8 MiB body
of empty members would hold 400,000 of them (a second of CPU)."""


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Request limits of the ingest endpoint."""

    max_body_bytes: int
    max_batch_events: int
    max_backlog_events: int
    body_read_timeout_seconds: float = 30.0
    """How long a body may take to arrive after its headers (slow senders hold a connection)."""
    max_inflight_body_bytes: int | None = None
    """Bytes of bodies read or processed at once across connections; None: 8 bodies of
    ``max_body_bytes``."""
    dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES
    """Bytes of a refused body kept in its dead letter."""
    dead_letter_max_bytes_per_minute: int = DEFAULT_DEAD_LETTER_MAX_BYTES_PER_MINUTE
    """Bytes refusals may add to the ledger per minute; past it they are only counted."""


@dataclass(slots=True)
class _Rejection:
    index: int
    error: str


@dataclass(slots=True)
class _Parsed:
    # Each item is a valid event or its validation error, with the bytes it came as
    # (None for items of a fully valid array: their canonical form stands in).
    items: list[tuple[Event | EventError, bytes | None]] = field(default_factory=list)
    single: bool = False


class _Refused(Exception):
    """The request as a whole is refused with ``status``."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str | None = None,
        raw: bytes = b"",
        rejected: list[_Rejection] | None = None,
        headers: dict[str, str] | None = None,
        raw_size: int | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.reason = reason
        self.raw = raw
        self.rejected = rejected or []
        self.headers = headers
        self.raw_size = raw_size
        """The body's size as received when ``raw`` is only its head."""


def _answer(
    status: int,
    accepted: int = 0,
    duplicates: int = 0,
    rejected: list[_Rejection] | None = None,
    error: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if not rejected and error is None:  # the common answer, without a JSON encoder
        text = f'{{"accepted": {accepted}, "duplicates": {duplicates}, "rejected": []}}'
        return web.Response(
            status=status,
            body=text.encode(),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )
    body: dict[str, object] = {
        "accepted": accepted,
        "duplicates": duplicates,
        "rejected": [{"index": r.index, "error": r.error} for r in rejected or []],
    }
    if error is not None:
        body["error"] = error
    response = web.json_response(body, status=status, headers=headers)
    if headers is not None and headers.get("Connection") == "close":
        response.force_close()  # the server closes too (after lingering, never buffering)
    return response


@dataclass(slots=True)
class _SignatureCheck:
    header: SignatureHeader
    verified: bool = False
    covers_headers: bool = False
    """The signature is a ``v2`` one: Content-Type and Content-Encoding are authenticated."""


_SIGNATURE = web.RequestKey("exporter_signature", _SignatureCheck)


def _signature_refusal(error: SignatureError) -> _Refused:
    return _Refused(
        401,
        str(error),
        "bad_signature",
        headers={"WWW-Authenticate": f'{SIGNATURE_HEADER} realm="facilitator-exporter"'},
    )


class Receiver:
    """Turns ingest requests into ledger submissions and answers them."""

    def __init__(
        self,
        committer: GroupCommitter,
        metrics: Metrics,
        limits: IngestLimits,
        token: str | None,
        signing: SignatureVerifier | None = None,
        networks: NetworkTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.committer = committer
        self.metrics = metrics
        self.limits = limits
        self.token = token
        self.signing = signing
        self.networks = networks
        """Network names events may use: built-in v1 names plus EXPORTER_NETWORK_ALIASES."""
        self.inflight = BodyBudget(limits.max_inflight_body_bytes or 8 * limits.max_body_bytes)
        self.dead_letters = DeadLetterGate(
            DeadLetterLimits(limits.dead_letter_max_bytes, limits.dead_letter_max_bytes_per_minute),
            metrics,
            clock,
        )

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /v1/events``."""
        if self.token is not None and not bearer_token_matches(
            request.headers.get("Authorization"), self.token
        ):
            self.metrics.auth_failed("ingest", request.remote)
            return _answer(
                401,
                error="missing or wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="facilitator-exporter"'},
            )
        claim = self._body_claim(request)
        if not self.inflight.take(claim):
            self.metrics.ingest_busy.inc()
            return _answer(
                503,
                error="too many request bodies in flight (EXPORTER_MAX_INFLIGHT_BODY_BYTES); "
                "retry shortly",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        try:
            self._check_signature_header(request)
            return await self._ingest(request)
        except _Refused as refused:
            if refused.reason is not None:
                if self._signature_verified(request):
                    await self._keep_refused_body(refused)
                else:
                    self._count_unverified(request, refused)
            return _answer(
                refused.status,
                rejected=refused.rejected,
                error=refused.error,
                headers=refused.headers,
            )
        finally:
            self.inflight.give_back(claim)

    def _body_claim(self, request: web.Request) -> int:
        """The bytes a request's body may hold while it is read and processed: its declared
        length (a chunked body: the limit), twice that when gzipped (decoded beside raw)."""
        limit = self.limits.max_body_bytes
        declared = request.content_length
        size = limit if declared is None else min(declared, limit)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        return size + limit if encoding not in ("", "identity") else size

    # --------------------------------------------------------------- signed deliveries
    # With signing on, nothing a request carries is stored before its signature is verified:
    # like a wrong bearer token, an unauthenticated body is refused and counted, never kept,
    # so that a sender without the secret cannot fill the disk with dead letters.

    def _check_signature_header(self, request: web.Request) -> None:
        """Refuse a missing, malformed or stale header before the body is read."""
        if self.signing is None:
            return
        try:
            header = self.signing.check_header(request.headers.get(SIGNATURE_HEADER))
        except SignatureError as error:
            raise _signature_refusal(error) from None
        request[_SIGNATURE] = _SignatureCheck(header)

    def _check_batch_size(self, events: int, body: bytes) -> None:
        """Refuse (413) a request of more events than ``max_batch_events``."""
        if events > self.limits.max_batch_events:
            raise _Refused(
                413,
                f"{events} events in one request; the limit is {self.limits.max_batch_events}",
                "too_large",
                body,
            )

    def _verify_signature(self, request: web.Request, raw: bytes) -> None:
        """Check the signature over the body as it came on the wire, before gzip decoding."""
        check = request.get(_SIGNATURE)
        if self.signing is None or check is None:
            return
        try:
            check.covers_headers = self.signing.verify(
                check.header,
                raw,
                request.headers.get("Content-Type"),
                request.headers.get("Content-Encoding"),
            )
        except SignatureError as error:
            raise _signature_refusal(error) from None
        check.verified = True

    def _signature_verified(self, request: web.Request) -> bool:
        """Whether what the request carries may be kept: unsigned deliveries, or a verified
        signature covering the headers that decide how the body was read (``v2``). A ``v1``
        signature covers the body only: replayed with another Content-Type or
        Content-Encoding, the same bytes would be refused another way and kept again."""
        check = request.get(_SIGNATURE)
        return self.signing is None or (
            check is not None and check.verified and check.covers_headers
        )

    def _count_unverified(self, request: web.Request, refused: _Refused) -> None:
        assert refused.reason is not None
        self.metrics.reject(refused.reason)
        log.warning(
            "ingest refused without a signature over its body and headers; body not kept",
            extra={
                "reason": refused.reason,
                "status": refused.status,
                "error": refused.error,
                "remote": request.remote,
            },
        )

    async def _keep_refused_body(self, refused: _Refused) -> None:
        assert refused.reason is not None
        self.metrics.reject(refused.reason)
        letters = self.dead_letters.admit(
            [DeadLetter(refused.reason, refused.error, refused.raw, raw_size=refused.raw_size)]
        )
        if not letters:
            return
        try:
            await self.committer.submit(Submission(dead_letters=letters))
        except LedgerUnavailableError as error:
            log.error(
                "dead letter not stored", extra={"reason": refused.reason, "error": str(error)}
            )

    async def _ingest(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        ndjson = content_type in NDJSON_TYPES
        if not ndjson and content_type not in JSON_TYPES:
            self._refuse_declared_size(request)
            raw = await self._read_head(request)
            raise _Refused(
                415,
                f"unsupported Content-Type {content_type!r}: send application/json "
                "(an event or an array of events) or application/x-ndjson",
                "unsupported_media_type",
                raw,
                headers=None if request.content.is_eof() else {"Connection": "close"},
                raw_size=request.content_length,
            )
        body = await self._read_body(request)
        if ndjson:
            # Lines are counted before any is parsed: a megabyte of tiny lines would
            # otherwise hold the event loop for seconds before the batch limit refuses it.
            self._check_batch_size(_ndjson_event_count(body, self.limits.max_batch_events), body)
        with network_names(self.networks):  # the operator's aliases too
            parsed = _parse_ndjson(body) if ndjson else _parse_json(body)
        self._check_batch_size(len(parsed.items), body)
        if self.committer.ledger.backlog >= self.limits.max_backlog_events:
            return _answer(
                503,
                error=f"store backlog is over its limit of {self.limits.max_backlog_events} "
                "events; retry later",
                headers={"Retry-After": "30"},
            )
        return await self._commit(parsed, keep_letters=self._signature_verified(request))

    async def _commit(self, parsed: _Parsed, keep_letters: bool = True) -> web.Response:
        submission = Submission()
        rejected: list[_Rejection] = []
        positions: list[int] = []
        for index, (event, raw) in enumerate(parsed.items):
            if isinstance(event, EventError):
                rejected.append(_Rejection(index, str(event)))
                submission.dead_letters.append(DeadLetter("invalid", str(event), raw or b""))
                continue
            submission.events.append(PreparedEvent.of(event, raw))
            positions.append(index)
        if not parsed.items:
            return _answer(422, error="the body holds no events")
        # Invalid items of a body whose headers are not signed are counted, not kept.
        submission.dead_letters = (
            self.dead_letters.admit(submission.dead_letters) if keep_letters else []
        )
        try:
            result = await self.committer.submit(submission)
        except LedgerUnavailableError as error:
            log.error("ingest refused: ledger cannot commit", extra={"error": str(error)})
            return _answer(
                503,
                error="the ledger cannot commit right now (disk full or I/O error); retry later",
                headers={"Retry-After": "5"},
            )
        self.metrics.apply(result.effects)
        outcomes = result.outcomes
        accepted = outcomes.count(Outcome.ACCEPTED)  # counted in C, not walked in Python
        duplicates = outcomes.count(Outcome.DUPLICATE)
        conflicts = len(outcomes) - accepted - duplicates
        if conflicts:
            rejected.extend(
                _Rejection(
                    index,
                    "conflict: a stored event has the same key with a different body, or "
                    "its payment has already ended",
                )
                for index, outcome in zip(positions, outcomes, strict=True)
                if outcome is Outcome.CONFLICT
            )
        if rejected:
            rejected.sort(key=lambda r: r.index)
            invalid = len(rejected) - conflicts
            if invalid:
                self.metrics.reject("invalid", invalid)
            if conflicts:
                self.metrics.reject("conflict", conflicts)
        if duplicates:
            self.metrics.events_duplicate.inc(duplicates)
        if accepted or (duplicates and not rejected):
            return _answer(202, accepted, duplicates, rejected)
        if conflicts == len(parsed.items):  # whatever the framing: object, array or NDJSON
            what = "the event conflicts" if parsed.single else "every event conflicts"
            return _answer(409, 0, 0, rejected, error=f"{what} with a stored one")
        return _answer(422, 0, duplicates, rejected, error="no event in the body is valid")

    async def _read_head(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self.limits.body_read_timeout_seconds):
                return await request.content.read(self.limits.dead_letter_max_bytes)
        except (TimeoutError, web.RequestPayloadError, HttpProcessingError):  # no body to keep
            return b""

    def _refuse_declared_size(self, request: web.Request) -> None:
        """Refuse (413) a body whose Content-Length is over the limit before reading any of it.

        Nothing is read, so nothing of it is buffered, and the answer closes the connection
        (aiohttp discards what still arrives for its lingering time, so that the client can
        read the answer); :func:`expect_within` keeps a client that asked
        ``Expect: 100-continue`` from sending the body at all.
        """
        declared = request.content_length
        limit = self.limits.max_body_bytes
        if declared is not None and declared > limit:
            raise _Refused(
                413,
                f"body of {declared} bytes is over the limit of {limit} bytes",
                "too_large",
                headers={"Connection": "close"},
            )

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.limits.max_body_bytes
        self._refuse_declared_size(request)
        raw = await self._read_within_timeout(request, limit)
        self._verify_signature(request, raw)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in ("gzip", "x-gzip"):
            raise _Refused(
                415,
                f"unsupported Content-Encoding {encoding!r}: send gzip or no encoding",
                "unsupported_media_type",
                raw,
            )
        return _gunzip(raw, limit)

    async def _read_within_timeout(self, request: web.Request, limit: int) -> bytes:
        # aiohttp has no timeout on a body once the handler runs: a sender that dribbles
        # (or stops) would hold the connection and its buffers for as long as it likes.
        if request.content.is_eof():
            # The whole body came with the headers (a small request): reading it cannot
            # block, so it needs no timer.
            raw = request.content.read_nowait()
            if len(raw) > limit:
                raise _body_over_limit(limit, raw)
            return raw
        chunks: list[bytes] = []
        size = 0
        timeout = self.limits.body_read_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.content.iter_chunked(256 * 1024):
                    size += len(chunk)
                    chunks.append(chunk)
                    if size > limit:
                        raise _body_over_limit(limit, b"".join(chunks))
        except TimeoutError:
            status = 408
            error = f"the body did not arrive within {timeout:g} s ({size} bytes received)"
        except (web.RequestPayloadError, HttpProcessingError):
            # aiohttp's parser found the chunked framing broken: what came is kept.
            status, error = 400, f"the body's chunked framing is malformed after {size} bytes"
        else:
            return b"".join(chunks)
        close = {"Connection": "close"}
        raise _Refused(status, error, "malformed", b"".join(chunks), headers=close)


class BodyBudget:
    """Bytes of request bodies in flight across every connection, bounded: one request's
    limit bounds one body, this bounds how many are held at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when they would not fit."""
        if self.held + size > self.capacity:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        """Return bytes reserved by :meth:`take`."""
        self.held -= size


def expect_within(
    limit: int,
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``Expect: 100-continue`` handler that invites only bodies within ``limit``.

    aiohttp's default answers ``100 Continue`` to any request, so a client announcing a
    body over the limit would start sending it before the handler refuses it; with this
    one the client gets only the final 413, having sent nothing but headers.
    """

    async def expect(request: web.Request) -> web.StreamResponse | None:
        declared = request.content_length
        if declared is not None and declared > limit:
            return None  # no invitation: the handler answers 413 without reading
        expectation = request.headers.get("Expect", "")
        if request.version == aiohttp.HttpVersion11:
            if expectation.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"unknown Expect: {expectation[:40]}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    return expect


def _body_over_limit(limit: int, received: bytes) -> _Refused:
    # The rest of the body is not read: the connection is closed, not drained.
    return _Refused(
        413,
        f"body is over the limit of {limit} bytes",
        "too_large",
        received,
        headers={"Connection": "close"},
    )


def _gunzip(raw: bytes, limit: int) -> bytes:
    # A gzip body may hold several members (concatenated .gz files are valid gzip): each
    # is decoded in turn, never past the limit in total, so a bomb costs at most the limit.
    # Input goes in bounded slices of one view: handing a member the whole rest of the
    # body would copy that rest (as unused_data) once per member, quadratic in members.
    parts: list[bytes] = []
    size = 0
    view = memoryview(raw)
    offset = 0
    try:
        for _ in range(_GZIP_MAX_MEMBERS):
            decoder = zlib.decompressobj(wbits=31)
            while not decoder.eof:
                if offset >= len(view):
                    raise zlib.error("truncated gzip stream")
                piece = view[offset : offset + _GZIP_SLICE]
                offset += len(piece)
                part = decoder.decompress(piece, limit + 1 - size)
                size += len(part)
                parts.append(part)
                if size > limit or decoder.unconsumed_tail:
                    raise _Refused(
                        413,
                        f"gzip body decodes to more than the limit of {limit} bytes",
                        "too_large",
                        raw,
                    )
            offset -= len(decoder.unused_data)
            if offset >= len(view):
                return b"".join(parts)
    except zlib.error as error:
        raise _Refused(400, f"body is not valid gzip: {error}", "malformed", raw) from None
    raise _Refused(
        413,
        f"gzip body holds more than {_GZIP_MAX_MEMBERS} members (concatenated gzip files)",
        "too_large",
        raw,
    )


def _parse_json(body: bytes) -> _Parsed:
    if body.lstrip()[:1] == b"[":
        try:
            events = parse_event_array_json(body)
        except MalformedJSONError as error:
            raise _Refused(400, f"body is not valid JSON: {error}", "malformed", body) from None
        if events is not None:  # the common case: every item valid, parsed in one pass
            return _Parsed([(event, None) for event in events])
        try:
            items = json.loads(body)
        except RecursionError:
            raise _Refused(
                400, "body is not valid JSON: nested too deeply", "malformed", body
            ) from None
        return _Parsed([_check_item(item) for item in items])
    try:
        return _Parsed([(parse_event_json(body), body)], single=True)
    except MalformedJSONError as error:
        raise _Refused(400, f"body is not valid JSON: {error}", "malformed", body) from None
    except EventError as error:
        return _Parsed([(_detached(error), body)], single=True)


def _detached(error: EventError) -> EventError:
    """``error`` without its traceback, to be kept as a value.

    A traceback holds the frames it passed through, and a finished frame its caller's:
    an error kept in the list that the caller's frame holds would make a reference
    cycle holding the whole body until the cyclic collector runs (which a serving
    exporter runs rarely, and a hostile sender can outpace).
    """
    error.__traceback__ = None
    error.__context__ = None
    return error


def _check_item(item: Any) -> tuple[Event | EventError, bytes]:
    raw = json.dumps(item, separators=(",", ":")).encode()
    try:
        return parse_event(item), raw
    except EventError as error:
        return _detached(error), raw


def _ndjson_event_count(body: bytes, limit: int) -> int:
    """The number of non-blank lines of ``body``, exact whenever it may be over ``limit``
    (a newline count bounds it from above, so most bodies need no pass over their lines)."""
    upper_bound = body.count(b"\n") + 1
    if upper_bound <= limit:
        return upper_bound
    return sum(1 for line in body.split(b"\n") if line and not line.isspace())


def _parse_ndjson(body: bytes) -> _Parsed:
    parsed = _Parsed()
    latest = latest_timestamp_ms()  # the clock read once per body, not once per line
    for line_number, line in enumerate(body.split(b"\n"), start=1):
        if not line or line.isspace():  # blank; unlike strip(), isspace() copies nothing
            continue
        try:
            parsed.items.append((parse_event_json(line, latest), line))
        except EventError as error:
            parsed.items.append((_detached(error), line))
        except MalformedJSONError as error:
            index = len(parsed.items)
            raise _Refused(
                400,
                f"line {line_number} is not valid JSON: {error}",
                "malformed",
                body,
                [_Rejection(index, f"line {line_number}: {error}")],
            ) from None
    return parsed
