"""Attach the exporter to a facilitator built on the official x402 Python SDK.

:func:`attach_x402_facilitator` registers six hooks on an ``x402Facilitator`` (async) or
``x402FacilitatorSync``. The ``before`` hooks note when a verify or settle started; the
``after`` and ``failure`` hooks write the exchange (the request body proxy mode would see,
and the facilitator's answer) to the spool and return. Nothing else runs in the payment's
way: the sender thread derives the events and delivers them. A hook never raises into the
facilitator: whatever goes wrong is counted in ``x402_exporter_hook_dropped_total``.

The SDK calls the failure hooks with an exception, not the answer: an invalid verify or a
failed settle arrives as a plain ``Exception`` whose message is the answer's reason, which
is recorded as that answer (its ``invalidMessage`` or ``errorMessage`` is not passed on);
any other exception is one the facilitator raised, which proxy mode would see as an error
answer and record nothing for, so neither do the hooks.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ..errors import ConfigError
from ..networks import NetworkTable
from .metrics import HookMetrics
from .sender import Sender, SenderLimits, Target
from .spool import DeadLetter, Spool, read_dead_letters

log = logging.getLogger(__name__)

DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
"""The spool's default bound: about 200 000 verify/settle answers of x402 EVM payments."""

DEFAULT_MAX_EXCHANGE_BYTES = 1024 * 1024
"""The largest single answer spooled (request and answer bodies); larger ones are dropped."""

_HOOKS = (
    "on_before_verify",
    "on_after_verify",
    "on_verify_failure",
    "on_before_settle",
    "on_after_settle",
    "on_settle_failure",
)


class HookableFacilitator(Protocol):
    """What the hooks need of a facilitator: the SDK's six hook registrations."""

    def on_before_verify(self, hook: Any) -> Any:
        """Register a hook run before each verify."""

    def on_after_verify(self, hook: Any) -> Any:
        """Register a hook run after a valid verify."""

    def on_verify_failure(self, hook: Any) -> Any:
        """Register a hook run after an invalid or failed verify."""

    def on_before_settle(self, hook: Any) -> Any:
        """Register a hook run before each settle."""

    def on_after_settle(self, hook: Any) -> Any:
        """Register a hook run after a successful settle."""

    def on_settle_failure(self, hook: Any) -> Any:
        """Register a hook run after a failed (or pending) settle."""


class HookAttachment:
    """The hooks attached to one facilitator, their spool and their sender.

    ``close(deadline)`` (or leaving ``with``/``async with``) delivers what the spool holds
    for at most ``deadline`` seconds; whatever is left is delivered by the next
    attachment on the same ``spool_dir``.
    """

    def __init__(
        self,
        spool: Spool,
        sender: Sender,
        metrics: HookMetrics,
        registry: CollectorRegistry,
        max_exchange_bytes: int,
        close_deadline: float,
    ) -> None:
        self.spool = spool
        self.sender = sender
        self.metrics = metrics
        self.registry = registry
        self.max_exchange_bytes = max_exchange_bytes
        self.close_deadline = close_deadline
        self.spool_empty = False
        """After :meth:`close`: whether everything spooled was delivered."""
        self._closed = False
        self._logged_at = -60.0  # when an error was last logged (monotonic seconds)
        self._started: contextvars.ContextVar[tuple[object, float, float] | None] = (
            contextvars.ContextVar("x402_exporter_hook_started", default=None)
        )
        self._dropped = {reason: metrics.dropped.labels(reason) for reason in _DROP_LABELS}
        self._spooled = {endpoint: metrics.spooled.labels(endpoint) for endpoint in _ENDPOINTS}

    # ------------------------------------------------------------------ the hooks

    def before(self, context: Any) -> None:
        """``on_before_verify``/``on_before_settle``: note when the exchange started."""
        try:
            self._started.set((context.payment_payload, time.perf_counter(), time.time()))
        except Exception:  # a hook never raises into the facilitator
            self._dropped["error"].inc()

    def after_verify(self, context: Any) -> None:
        """``on_after_verify``: spool the verify answer."""
        self._spool_result("verify", context)

    def after_settle(self, context: Any) -> None:
        """``on_after_settle``: spool the settle answer."""
        self._spool_result("settle", context)

    def verify_failed(self, context: Any) -> None:
        """``on_verify_failure``: spool an invalid answer (see the module docstring)."""
        self._spool_failure("verify", context, "isValid", "invalidReason")

    def settle_failed(self, context: Any) -> None:
        """``on_settle_failure``: spool a failed (or pending) answer."""
        self._spool_failure("settle", context, "success", "errorReason")

    def _spool_result(self, endpoint: str, context: Any) -> None:
        try:
            self._spool(endpoint, context, _json(context.result))
        except Exception:
            self._failed(endpoint)

    def _spool_failure(self, endpoint: str, context: Any, flag: str, reason_key: str) -> None:
        try:
            error = context.error
            if type(error) is not Exception:  # raised by the facilitator: no answer
                self._started.set(None)
                return
            answer = json.dumps({flag: False, reason_key: str(error)}).encode()
            self._spool(endpoint, context, answer)
        except Exception:
            self._failed(endpoint)

    def _failed(self, endpoint: str) -> None:
        """Count an answer lost to an error; log it with its traceback at most once a minute,
        so that a broken spool does not flood the facilitator's log."""
        self._dropped["error"].inc()
        now = time.monotonic()
        if now - self._logged_at >= 60.0:
            self._logged_at = now
            log.exception("hooks: an answer was not spooled", extra={"endpoint": endpoint})

    def _spool(self, endpoint: str, context: Any, answer: bytes) -> None:
        if self._closed:
            self._dropped["closed"].inc()
            return
        perf, now = time.perf_counter(), time.time()
        payload = context.payment_payload
        started = self._started.get()
        if started is not None and started[0] is payload:
            latency_ms = round((perf - started[1]) * 1000, 3)
            received_ms = int(started[2] * 1000)
        else:  # attached while this exchange was under way
            latency_ms, received_ms = 0.0, int(now * 1000)
        self._started.set(None)
        request = b'{"x402Version":%d,"paymentPayload":%s,"paymentRequirements":%s}' % (
            payload.x402_version,
            _json(payload),
            _json(context.requirements),
        )
        if len(request) + len(answer) > self.max_exchange_bytes:
            self._dropped["too_large"].inc()
            return
        if not self.spool.append(
            endpoint, request, answer, latency_ms, received_ms, int(now * 1000)
        ):
            self._dropped["spool_full"].inc()
            return
        self._spooled[endpoint].inc()

    def attach(self, facilitator: HookableFacilitator) -> None:
        """Register the hooks on ``facilitator`` too (a process with several facilitators,
        async and sync, shares one spool and one sender)."""
        _check(facilitator)
        facilitator.on_before_verify(self.before)
        facilitator.on_after_verify(self.after_verify)
        facilitator.on_verify_failure(self.verify_failed)
        facilitator.on_before_settle(self.before)
        facilitator.on_after_settle(self.after_settle)
        facilitator.on_settle_failure(self.settle_failed)

    # ------------------------------------------------------------------ lifetime

    def close(self, deadline: float | None = None) -> bool:
        """Stop spooling, deliver what the spool holds within ``deadline`` seconds (the
        attachment's default when None) and close the spool; True when all was delivered."""
        if self._closed:
            return self.spool_empty
        self._closed = True
        flushed = self.sender.stop(self.close_deadline if deadline is None else deadline)
        self.spool_empty = flushed
        self.spool.close()
        return flushed

    async def aclose(self, deadline: float | None = None) -> bool:
        """:meth:`close` without blocking the event loop."""
        return await asyncio.to_thread(self.close, deadline)

    def dead_letters(self) -> list[DeadLetter]:
        """The events the exporter refused, kept in the spool for the operator (read from
        the spool file once the attachment is closed)."""
        if not self._closed:
            return self.spool.dead_letters()
        return read_dead_letters(self.spool.path.parent)

    def __enter__(self) -> HookAttachment:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> HookAttachment:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _check(facilitator: object) -> None:
    missing = [name for name in _HOOKS if not callable(getattr(facilitator, name, None))]
    if missing:
        raise ConfigError(
            f"{type(facilitator).__name__} is not an x402 SDK facilitator (it has no "
            f"{missing[0]}); pass an x402Facilitator or x402FacilitatorSync"
        )


def _json(model: Any) -> bytes:
    """An SDK model as its wire JSON (camelCase), straight from pydantic-core's serializer:
    what ``model_dump_json()`` gives, without its str round trip."""
    serialized: bytes = type(model).__pydantic_serializer__.to_json(model, by_alias=True)
    return serialized


_DROP_LABELS = ("spool_full", "too_large", "closed", "error")
_ENDPOINTS = ("verify", "settle")


def attach_x402_facilitator(
    facilitator: HookableFacilitator,
    *,
    url: str,
    token: str | None = None,
    spool_dir: str | Path,
    signing_secret: str | None = None,
    registry: CollectorRegistry | None = None,
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
    max_exchange_bytes: int = DEFAULT_MAX_EXCHANGE_BYTES,
    networks: NetworkTable | None = None,
    fee_bps: int = 0,
    close_deadline: float = 10.0,
    limits: SenderLimits | None = None,
) -> HookAttachment:
    """Report every verify and settle of ``facilitator`` to the exporter at ``url``.

    ``facilitator`` is an SDK ``x402Facilitator`` or ``x402FacilitatorSync``. Events go
    to ``POST {url}/v1/events`` with ``token`` (the exporter's ``EXPORTER_INGEST_TOKEN``)
    and/or signed with ``signing_secret``; they wait in ``spool_dir`` (one directory per
    facilitator process, at most ``spool_max_bytes``) until delivered. ``networks`` is the
    exporter's network table when it has aliases or asset decimals of its own, and
    ``fee_bps`` the facilitator's fee in basis points of each settled amount (as proxy
    mode's ``EXPORTER_PROXY_FEE_BPS``). The hooks' metrics go on ``registry`` (a private
    one when None; see ``attachment.registry``).
    Raises :class:`~exporter.errors.ConfigError` or :class:`~exporter.errors.SpoolError`
    with one line naming what is wrong; once attached, nothing raises into the facilitator.
    """
    _check(facilitator)
    if max_exchange_bytes <= 0 or close_deadline < 0:
        raise ConfigError("max_exchange_bytes must be > 0 and close_deadline >= 0")
    if not 0 <= fee_bps <= 10_000:
        raise ConfigError(f"fee_bps must be between 0 and 10000 (basis points), got {fee_bps}")
    target = Target.parse(url, token, signing_secret)
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    metrics = HookMetrics(registry)
    spool = Spool(Path(spool_dir), spool_max_bytes)
    sender = Sender(spool, target, metrics, networks or NetworkTable(), limits, fee_bps=fee_bps)
    attachment = HookAttachment(
        spool, sender, metrics, registry, max_exchange_bytes, close_deadline
    )
    attachment.attach(facilitator)
    sender.start()
    log.info(
        "hooks attached",
        extra={"exporter": url, "spool": str(spool.path), "spooled": spool.undelivered()},
    )
    return attachment
