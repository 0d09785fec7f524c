"""The hooks' background sender: spooled answers to events, events to the exporter.

One thread, so that it serves a synchronous facilitator and an asynchronous one alike and
never runs on the facilitator's event loop. Each round it turns the oldest spooled
answers into events (the mapping of :mod:`exporter.ingest.payments`, with each payment's
recorded stages kept in the spool) and delivers the oldest events as one NDJSON
``POST {url}/v1/events``. Answers decide what happens to a batch:

* 2xx: each event is delivered, except those the answer lists as rejected for a reason
  other than a conflict, which go to the spool's ``dead_letters`` table;
* 409, and duplicates or conflicts inside any answer: the exporter already holds the
  event, so it is delivered;
* 400 or 413 for a batch of several events: the batch is halved until the bad event is
  alone; then, like every other 4xx refusal, it is dead-lettered;
* 401, 403, 408, 429, 5xx, no answer or a timeout: retried with backoff, or after the
  ``Retry-After`` the exporter asked for (:mod:`exporter.retry`).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..config import check_secret
from ..errors import ConfigError
from ..ingest.payments import PaymentEvents, parse_exchange, read_answer
from ..ingest.signing import SIGNATURE_HEADER, signature_header
from ..networks import NetworkTable
from ..retry import backoff_seconds, parse_retry_after
from .metrics import HookMetrics
from .spool import DeadLetter, Spool

log = logging.getLogger(__name__)

_FINAL = frozenset({"valid", "invalid", "settled", "failed"})
_RETRIED = frozenset({401, 403, 408, 429})
_SHOWN = 300  # longest piece of an exporter's answer kept with a dead letter


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how events are delivered: the exporter's ingest URL and credentials."""

    scheme: str
    host: str
    port: int | None
    path: str
    token: str | None = None
    signing_secret: str | None = None

    @classmethod
    def parse(cls, url: str, token: str | None, signing_secret: str | None) -> Target:
        """The target of exporter base ``url``; :class:`ConfigError` when it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"exporter url {url!r} must be http:// or https:// with a host, "
                "e.g. http://exporter:9402"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(
                f"exporter url {url!r} must carry no query, fragment or credentials; "
                "pass the ingest token as token="
            )
        try:
            port = parts.port
        except ValueError as error:
            raise ConfigError(f"exporter url {url!r} has a bad port: {error}") from error
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ConfigError("token must be a non-empty single-line string")
        if signing_secret is not None:
            try:
                check_secret(signing_secret)
            except ValueError as error:
                raise ConfigError(f"signing_secret {error}") from error
        path = parts.path.rstrip("/") + "/v1/events"
        return cls(parts.scheme, parts.hostname, port, path, token, signing_secret)

    def headers(self, body: bytes) -> dict[str, str]:
        """The request headers of ``body``: content type and credentials."""
        content_type = "application/x-ndjson"
        headers = {"Content-Type": content_type}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.signing_secret is not None:
            headers[SIGNATURE_HEADER] = signature_header(
                self.signing_secret, body, content_type=content_type
            )
        return headers


@dataclass(frozen=True, slots=True)
class SenderLimits:
    """Batch sizes, timeouts and pauses of the sender."""

    max_batch_events: int = 500
    max_batch_bytes: int = 512 * 1024
    derive_batch: int = 200
    request_timeout: float = 10.0
    idle_seconds: float = 0.5
    """Pause between rounds while nothing waits. The hooks never wake the thread: one
    round per pause takes whatever gathered, so the facilitator's thread does not hand
    the interpreter lock to the sender after every answer."""
    backoff_base: float = 0.5
    backoff_cap: float = 30.0


class Sender:
    """Delivers the spool to the exporter from a background thread (see the module)."""

    def __init__(
        self,
        spool: Spool,
        target: Target,
        metrics: HookMetrics,
        networks: NetworkTable,
        limits: SenderLimits | None = None,
        clock: Callable[[], float] = time.time,
        fee_bps: int = 0,
    ) -> None:
        self.spool = spool
        self.target = target
        self.metrics = metrics
        self.limits = limits or SenderLimits()
        self.clock = clock
        self.payments = PaymentEvents(
            networks,
            fee_bps,
            on_failure=lambda reason: metrics.unrecorded.labels(reason).inc(),
            remembered=spool.remembered,
        )
        self._batch_limit = self.limits.max_batch_events
        self._attempt = 0
        self._retry_at = 0.0
        self._rng = random.Random()
        self._wake = threading.Event()
        self._closing_at: float | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="x402-exporter-hooks", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, deadline: float) -> bool:
        """Deliver what the spool holds for at most ``deadline`` seconds, then stop the
        thread; True when nothing was left undelivered (the rest stays for the next start)."""
        self._closing_at = time.monotonic() + max(deadline, 0.0)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(max(deadline, 0.0) + self.limits.request_timeout + 1.0)
        return self.spool.undelivered() == 0

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while True:
                pause = self._round()
                if self._closing_at is not None:
                    remaining = self._closing_at - time.monotonic()
                    if remaining <= 0 or (pause is None and self.spool.undelivered() == 0):
                        return
                    if pause:
                        self._wake.clear()
                        self._wake.wait(min(pause, remaining))
                    continue
                if pause is None:
                    pause = self.limits.idle_seconds
                if pause:
                    self._wake.wait(pause)
                    self._wake.clear()
        finally:
            if self._connection is not None:
                self._connection.close()

    def _round(self) -> float | None:
        """One round of deriving and delivering. Returns 0 to go on at once, None when
        idle, or the seconds to wait before trying again."""
        try:
            derived = self.derive()
            pause = self.deliver()
        except Exception as error:  # the thread must outlive any one failure
            log.exception("hooks: delivery round failed", extra={"error": repr(error)})
            pause = self._backoff()
        if derived:
            self._checkpoint()
        self._update_gauges()
        if pause is None and derived:
            return 0.0
        return pause

    def derive(self) -> int:
        """Turn the oldest spooled answers into events; the number of answers taken."""
        rows = self.spool.exchanges(self.limits.derive_batch)
        if not rows:
            return 0
        parsed = []
        for row in rows:
            time.sleep(0)  # as below
            parsed.append((row, parse_exchange(row.request, self.payments.networks)))
        pids = {x.payment_id for _, x in parsed if x is not None and x.payment_id}
        stored = self.spool.stages(pids)
        for pid in pids:
            self.payments.restore(pid, stored.get(pid, 0))
        events: list[tuple[bytes, int]] = []
        stages: dict[str, int] = {}
        for row, x in parsed:
            time.sleep(0)  # hand the interpreter lock back: a hook may be waiting for it
            answer = read_answer(row.endpoint, 200, row.answer)
            if x is None:
                if answer.outcome in _FINAL:
                    self.metrics.unrecorded.labels("unparseable").inc()
                continue
            derived = self.payments.events(
                x, answer, row.latency_ms, row.received_ms, row.answered_ms
            )
            for event in derived:
                events.append((_line(event), row.answered_ms))
            if derived and x.payment_id:
                stages[x.payment_id] = self.payments.recorded_stages(x.payment_id)
        self.spool.derived(rows[-1].seq, events, stages)
        return len(rows)

    def deliver(self) -> float | None:
        """Deliver one batch; None when there was nothing to deliver, else as ``_round``."""
        batch = self.spool.next_events(self._batch_limit, self.limits.max_batch_bytes)
        if not batch:
            return None
        waiting = self._retry_at - time.monotonic()
        if waiting > 0:  # woken by a hook during a pause the exporter asked for
            return waiting
        body = b"\n".join(line for _, line in batch) + b"\n"
        try:
            status, retry_after, answer = self._post(body)
        except TimeoutError:
            return self._failed("timeout", None)
        except (OSError, http.client.HTTPException) as error:
            log.warning("hooks: exporter unreachable", extra={"error": str(error)})
            return self._failed("unreachable", None)
        if status in _RETRIED or status >= 500:
            error_class = "auth" if status in (401, 403) else "server"
            if status in (408, 429):
                error_class = "throttled"
            if status in (401, 403):
                log.error(
                    "hooks: the exporter refused the credentials; check token= or "
                    "signing_secret= against its EXPORTER_INGEST_TOKEN or signing secret",
                    extra={"status": status},
                )
            return self._failed(error_class, retry_after)
        if status in (400, 413) and len(batch) > 1:
            self._batch_limit = max(1, len(batch) // 2)
            return 0.0
        self._attempt = 0
        self._settle(batch, status, answer)
        self._batch_limit = min(self.limits.max_batch_events, self._batch_limit * 2)
        return 0.0

    # ------------------------------------------------------------------ helpers

    def _settle(self, batch: list[tuple[int, bytes]], status: int, answer: bytes) -> None:
        now_ms = int(self.clock() * 1000)
        refused: dict[int, str] = {}
        document = _json_object(answer)
        if status == 409:
            pass  # every event conflicts with a stored copy: the exporter holds them
        elif status < 300 or (status == 422 and isinstance(document.get("rejected"), list)):
            for entry in document.get("rejected") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
                    continue
                error = str(entry.get("error", ""))
                if not error.startswith("conflict"):
                    refused[entry["index"]] = error[:_SHOWN]
        else:
            error = str(document.get("error") or answer[:_SHOWN].decode("utf-8", "replace"))
            refused = {index: error[:_SHOWN] for index in range(len(batch))}
        dead = [
            DeadLetter(seq, body, status, refused[index], now_ms)
            for index, (seq, body) in enumerate(batch)
            if index in refused
        ]
        delivered = [seq for index, (seq, _) in enumerate(batch) if index not in refused]
        self.spool.settle(delivered, dead)
        self.metrics.delivered.inc(len(delivered))
        if dead:
            self.metrics.dead_lettered.inc(len(dead))
            log.warning(
                "hooks: the exporter refused events; kept in the spool's dead_letters",
                extra={"status": status, "events": len(dead), "error": dead[0].error},
            )

    def _post(self, body: bytes) -> tuple[int, str | None, bytes]:
        timeout = self.limits.request_timeout
        if self._closing_at is not None:
            timeout = max(0.1, min(timeout, self._closing_at - time.monotonic()))
        connection = self._connection
        if connection is None:
            target = self.target
            if target.scheme == "https":
                connection = http.client.HTTPSConnection(target.host, target.port, timeout=timeout)
            else:
                connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
            self._connection = connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        try:
            connection.request("POST", self.target.path, body, self.target.headers(body))
            response = connection.getresponse()
            answer = response.read(64 * 1024)
            if not response.isclosed():
                connection.close()  # an answer larger than we read: start afresh
                self._connection = None
            return response.status, response.getheader("Retry-After"), answer
        except BaseException:
            connection.close()
            self._connection = None
            raise

    def _failed(self, error_class: str, retry_after: str | None) -> float:
        self.metrics.delivery_errors.labels(error_class).inc()
        pause = self._backoff()
        if retry_after is not None:
            pause = parse_retry_after(retry_after, self.clock(), default=pause)
        pause = max(pause, 0.01)
        self._retry_at = time.monotonic() + pause
        return pause

    def _backoff(self) -> float:
        pause = backoff_seconds(
            self._attempt, self.limits.backoff_base, self.limits.backoff_cap, self._rng
        )
        self._attempt += 1
        return pause

    def _checkpoint(self) -> None:
        try:
            self.spool.checkpoint()
        except Exception as error:  # the next round tries again
            log.warning("hooks: spool checkpoint failed", extra={"error": repr(error)})

    def _update_gauges(self) -> None:
        oldest = self.spool.oldest_ms()
        lag = 0.0 if oldest is None else max(0.0, self.clock() - oldest / 1000)
        self.metrics.lag.set(lag)
        self.metrics.spool_bytes.set(self.spool.used_bytes)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _json_object(answer: bytes) -> dict[str, Any]:
    try:
        document = json.loads(answer)
    except (ValueError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}
