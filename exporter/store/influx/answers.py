"""What an InfluxDB error answer means: its message, and the error family's name for it.

One classifier for every request the exporter sends InfluxDB (writes over the v2 or the
v1 API, Flux queries), so that a status means the same everywhere: 429/503 pause for
``Retry-After``, 401/403/404 are credentials or names to fix, other 4xx are client
errors, 5xx server errors. Which 400/413/422 answers name a line of a write (and are
bisected) is the store's business, decided before it calls :func:`classify_answer`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ...errors import (
    StoreAuthError,
    StoreClientError,
    StoreError,
    StoreRetryAfterError,
    StoreServerError,
)
from ...retry import parse_retry_after

DEFAULT_RETRY_AFTER_SECONDS = 5.0
"""The pause after a 429/503 that names no ``Retry-After``."""

MESSAGE_LIMIT = 500
"""Most characters of InfluxDB's message kept in an error (it may quote a whole line)."""


@dataclass(frozen=True, slots=True)
class WayOut:
    """What an operator should check, per kind of refusal, for one kind of request."""

    auth: str
    """401/403: the credentials."""
    not_found: str
    """404: the org, bucket or database (or credentials that cannot see it)."""
    client: str
    """Any other 4xx: the request itself."""


def answer_message(body: bytes | str | None, reason: str | None = None) -> str:
    """InfluxDB's own message in an error answer, at most :data:`MESSAGE_LIMIT` characters.

    InfluxDB 2.x answers ``{"code": ..., "message": ...}``, 1.x ``{"error": ...}``;
    anything else (a proxy's page) is kept as text, and an empty body gives ``reason``.
    """
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        for name in ("message", "error"):
            if isinstance(decoded.get(name), str):
                text = decoded[name]
                break
    text = " ".join(text.split()) or str(reason or "no reason given")
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def classify_answer(
    status: int,
    message: str,
    retry_after: str | None,
    where: str,
    way_out: WayOut,
    *,
    request: str = "",
    now: float | None = None,
) -> StoreError:
    """The error family's name for an InfluxDB answer ``status`` other than 2xx.

    The message is one line: ``{where} answered {request}{status}: {message}; {what to
    do}``, e.g. ``InfluxDB at http://influxdb:8086 (org 'o') answered a query 401: ...``.
    """
    said = f"{where} answered {request}{status}: {message}"
    if status in (429, 503):
        pause = parse_retry_after(
            retry_after,
            time.time() if now is None else now,
            default=DEFAULT_RETRY_AFTER_SECONDS,
        )
        return StoreRetryAfterError(f"{said}; retry after {pause:g}s", pause)
    if status in (401, 403):
        return StoreAuthError(f"{said}; {way_out.auth}")
    if status == 404:
        return StoreAuthError(f"{said}; {way_out.not_found}")
    if 400 <= status < 500:
        return StoreClientError(f"{said}; {way_out.client}")
    if status >= 500:
        return StoreServerError(f"{said}; InfluxDB's own log says why")
    return StoreError(f"{said}; {way_out.client}")
