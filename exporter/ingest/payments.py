"""From an x402 verify or settle exchange to payment events: one mapping for every source.

Proxy mode reads exchanges off the wire and the SDK hooks read them from the
facilitator's own objects; both hand this module the request body (``paymentPayload``
and ``paymentRequirements``) and the facilitator's answer, and get the same events: the
same payment identity, network table, amounts and decimals, and the same handling of
answers that are not final. Nothing here does I/O or imports a server.

Payment identity is what makes a payment unique on chain, plus its signature: for an
EIP-3009 authorization the network, asset, payer and nonce (the token's
``authorizationState(authorizer, nonce)``), for Permit2 the network, payer and nonce; the
signature's digest is appended so that a payload whose signature differs, such as a forged
copy of someone else's pending authorization, can never attach an event to that payment.
Other payloads (a signed Solana transaction) are identified by a digest of the payload,
which is the same bytes in verify and settle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

from ..networks import NetworkTable

NON_FINAL_SETTLE_REASONS = frozenset({"settlement_pending"})
"""Settle ``errorReason`` values that mean "sent, not yet confirmed": the SDKs' resource
server retries them and the payment ends with a later answer, so none is a failure."""

MAX_INSPECTED_BYTES = 8 * 1024 * 1024
"""Largest decoded body inspected for payment data."""

SEEN_PAYMENTS = 100_000
"""Payment ids whose recorded stages are remembered, so each event is derived once."""

RECORDING_FAILURES = (
    "unparseable",
    "unknown_network",
    "unknown_asset",
    "invalid_event",
    "conflict",
    "ledger_unavailable",
    "overloaded",
    "internal_error",
)
"""Why an exchange (or its events) could not be recorded."""

RECEIVED, VERIFIED, SETTLED, FAILED = 1, 2, 4, 8
"""Stages of a payment that were recorded (bit flags)."""

_STAGE_OF_TYPE = {
    "payment:received": RECEIVED,
    "payment:verified": VERIFIED,
    "payment:settled": SETTLED,
    "payment:failed": FAILED,
}
_EVM_NONCE_DIGITS = 64
_ATOMIC_DIGITS = 40


@dataclass(frozen=True, slots=True)
class Exchange:
    """What a verify or settle request says about its payment."""

    version: int | None
    scheme: str | None
    network: str | None
    """CAIP-2; None when absent or not a known name."""
    raw_network: str | None
    payment_id: str | None
    payer: str | None
    payee: str | None
    asset: str | None
    atomic_amount: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    """The facilitator's answer, reduced to what the events and metrics need.

    ``outcome`` is valid/invalid (verify), settled/failed/pending (settle), or for an answer
    that says nothing about the payment: ok, client_error or upstream_error.
    """

    outcome: str
    reason: str | None = None
    payer: str | None = None
    transaction: str | None = None


def decoded(body: bytes, encoding: str | None) -> bytes:
    """``body`` without its content encoding (identity, gzip or deflate), bounded."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, detected
        inflated = decoder.decompress(body, MAX_INSPECTED_BYTES)
        if decoder.unconsumed_tail:
            raise ValueError("body too large to inspect")
        return inflated
    raise ValueError(f"unsupported encoding {encoding!r}")


def parse_exchange(raw: bytes, networks: NetworkTable) -> Exchange | None:
    """The payment a verify/settle body describes; None when it is not one."""
    try:
        return _parse_exchange(raw, networks)
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError):
        return None


def _parse_exchange(raw: bytes, networks: NetworkTable) -> Exchange:
    request = json.loads(raw)
    if not isinstance(request, dict):
        raise ValueError("not an object")
    payload = request.get("paymentPayload")
    header = request.get("paymentHeader")
    if payload is None and isinstance(header, str):  # early v1 clients send the header
        payload = json.loads(base64.b64decode(header, validate=True))
    requirements = request.get("paymentRequirements")
    if not isinstance(payload, dict) or not isinstance(requirements, dict):
        raise ValueError("paymentPayload and paymentRequirements are required")
    accepted = _object(payload.get("accepted"))
    version = request.get("x402Version", payload.get("x402Version"))
    scheme = _text(requirements.get("scheme")) or _text(accepted.get("scheme"))
    scheme = scheme or _text(payload.get("scheme"))
    raw_network = _text(requirements.get("network")) or _text(accepted.get("network"))
    raw_network = raw_network or _text(payload.get("network"))
    network = networks.caip2(raw_network) if raw_network is not None else None
    inner = _object(payload.get("payload"))
    authorization = _object(inner.get("authorization"))
    permit2 = _object(inner.get("permit2Authorization"))
    asset = _text(requirements.get("asset")) or _text(accepted.get("asset"))
    atomic = _text(requirements.get("amount")) or _text(requirements.get("maxAmountRequired"))
    atomic = atomic or _text(authorization.get("value"))
    if atomic is not None and not _is_atomic(atomic):
        atomic = None
    payer = _text(authorization.get("from")) or _text(permit2.get("from"))
    return Exchange(
        version=version if isinstance(version, int) else None,
        scheme=scheme,
        network=network,
        raw_network=raw_network,
        payment_id=payment_identity(network, asset, inner),
        payer=payer.lower() if payer and payer.startswith("0x") else payer,
        payee=_text(requirements.get("payTo")) or _text(accepted.get("payTo")),
        asset=asset,
        atomic_amount=atomic,
    )


def payment_identity(network: str | None, asset: str | None, inner: dict[str, Any]) -> str | None:
    """The payment id of a payload (see the module docstring); None when it has none."""
    if network is None or not inner:
        return None
    signature = _text(inner.get("signature"))
    authorization = _object(inner.get("authorization"))
    permit2 = _object(inner.get("permit2Authorization"))
    if authorization and asset and signature:
        payer, nonce = _text(authorization.get("from")), _text(authorization.get("nonce"))
        if payer and _is_evm_nonce(nonce):
            return evm_payment_id(network, asset, payer, nonce or "", signature)
    if permit2 and signature:
        payer, nonce = _text(permit2.get("from")), permit2.get("nonce")
        if payer and isinstance(nonce, str | int) and str(nonce).isdigit():
            return evm_payment_id(network, "permit2", payer, str(nonce), signature)
    digest = hashlib.sha256(
        json.dumps(inner, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return f"{network}:sha256-{digest[:40]}"


def evm_payment_id(network: str, asset: str, payer: str, nonce: str, signature: str) -> str:
    """``network/asset/payer/nonce/sig-<digest>``: unique per signed authorization."""
    sig = hashlib.sha256(signature.strip().lower().encode()).hexdigest()[:16]
    return f"{network}/{asset.lower()}/{payer.lower()}/{nonce.lower()}/sig-{sig}"


def read_answer(endpoint: str, status: int, body: bytes) -> Answer:
    """What the facilitator's answer (already decoded) says about the payment."""
    fallback = Answer("ok" if status < 400 else error_outcome(status))
    if status >= 500:
        return fallback
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return fallback
    if not isinstance(answer, dict):
        return fallback
    if endpoint == "verify" and isinstance(answer.get("isValid"), bool):
        if answer["isValid"]:
            return Answer("valid", payer=_text(answer.get("payer")))
        return Answer(
            "invalid",
            _reason(answer.get("invalidReason"), answer.get("invalidMessage")),
            _text(answer.get("payer")),
        )
    if endpoint == "settle" and isinstance(answer.get("success"), bool):
        if answer["success"]:
            return Answer(
                "settled",
                payer=_text(answer.get("payer")),
                transaction=_text(answer.get("transaction")),
            )
        reason = _text(answer.get("errorReason"))
        return Answer(
            "pending" if reason in NON_FINAL_SETTLE_REASONS else "failed",
            _reason(reason, answer.get("errorMessage")),
            _text(answer.get("payer")),
            _text(answer.get("transaction")),
        )
    return fallback


def error_outcome(status: int) -> str:
    """The outcome of an answer that says nothing about the payment, by HTTP status."""
    return "client_error" if 400 <= status < 500 else "upstream_error"


class PaymentEvents:
    """Derives each payment's events once: remembers which stages it already recorded.

    A payment's first exchange yields ``payment:received``; a valid verify
    ``payment:verified``; a settle ``payment:settled``; an invalid verify or failed settle
    ``payment:failed``. A terminal payment (settled or failed) yields nothing more (except
    a settlement after a failure, which the ledger keeps as a conflict), and a
    pending settle only its ``payment:received`` until a later answer ends it (the ledger
    keeps it pending, see :meth:`recorded`).
    """

    def __init__(
        self,
        networks: NetworkTable,
        fee_bps: int = 0,
        on_failure: Callable[[str], None] | None = None,
        remembered: int = SEEN_PAYMENTS,
    ) -> None:
        self.networks = networks
        self.fee_bps = fee_bps
        self.on_failure = on_failure or (lambda reason: None)
        self.remembered = remembered
        self._seen: OrderedDict[str, int] = OrderedDict()

    def events(
        self, x: Exchange, answer: Answer, latency_ms: float, received_ms: int, now_ms: int
    ) -> list[dict[str, Any]]:
        """The events ``answer`` to exchange ``x`` adds to what was recorded before."""
        if answer.outcome not in ("valid", "invalid", "settled", "failed", "pending"):
            return []  # an answer that says nothing about the payment
        if x.network is None:
            self.on_failure("unknown_network")
            return []
        if x.payment_id is None or x.asset is None or x.atomic_amount is None:
            self.on_failure("unparseable")
            return []
        decimals = self.networks.decimals(x.network, x.asset)
        if decimals is None:
            self.on_failure("unknown_asset")
            return []
        pid = x.payment_id
        done = self._seen.get(pid, 0)
        now_ms = max(now_ms, received_ms)
        events: list[dict[str, Any]] = []
        if done & SETTLED or (done & FAILED and answer.outcome != "settled"):
            return events  # a payment ends once
        # A settlement after the payment failed (an invalid verify does not spend the
        # authorization) is still derived: the ledger keeps it as a conflict dead letter,
        # so money that moved on chain is never silently dropped.
        if not done & RECEIVED:
            amount = Decimal(x.atomic_amount).scaleb(-decimals)
            payer = x.payer or answer.payer or "unknown"
            data = {
                "paymentId": pid,
                "payer": payer,
                "payee": x.payee or "unknown",
                "amount": plain(amount),
                "network": x.network,
                "timestamp": received_ms,
            }
            events.append({"type": "payment:received", "data": data})
        if answer.outcome == "valid" and not done & VERIFIED:
            data = {"paymentId": pid, "verificationTime": latency_ms, "timestamp": now_ms}
            events.append({"type": "payment:verified", "data": data})
        elif answer.outcome == "settled":
            fee = (Decimal(x.atomic_amount) * self.fee_bps / 10_000).scaleb(-decimals)
            data = {
                "paymentId": pid,
                "transaction": answer.transaction or "",
                "fee": plain(fee),
                "settlementTime": latency_ms,
                "timestamp": now_ms,
                "network": x.network,
            }
            events.append({"type": "payment:settled", "data": data})
        elif answer.outcome in ("invalid", "failed"):
            data = {
                "paymentId": pid,
                "error": (answer.reason or f"{answer.outcome} without a reason")[:2048],
                "timestamp": now_ms,
                "network": x.network,
            }
            events.append({"type": "payment:failed", "data": data})
        if events:
            self._remember(pid, done | stages_of(events))
        return events

    def recorded(self, pid: str) -> bool:
        """Whether the payment's ``payment:received`` was derived (and not forgotten)."""
        return bool(self._seen.get(pid, 0) & RECEIVED)

    def forget(self, events: list[dict[str, Any]]) -> None:
        """Forget that ``events`` were recorded (they could not be), so a retry records them."""
        if not events:
            return
        pid = events[0]["data"]["paymentId"]
        if pid in self._seen:
            self._seen[pid] &= ~stages_of(events)

    def recorded_stages(self, pid: str) -> int:
        """The stage flags recorded for payment ``pid`` (0 when none or forgotten)."""
        return self._seen.get(pid, 0)

    def restore(self, pid: str, stages: int) -> None:
        """Take ``stages`` as what was recorded for ``pid``: state a caller keeps durably
        (the hooks' spool), so a restarted process derives each event once."""
        if stages:
            self._remember(pid, stages)
        else:
            self._seen.pop(pid, None)

    def _remember(self, pid: str, stages: int) -> None:
        self._seen[pid] = stages
        self._seen.move_to_end(pid)
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)


def stages_of(events: list[dict[str, Any]]) -> int:
    """The stage flags of ``events``."""
    stages = 0
    for event in events:
        stages |= _STAGE_OF_TYPE.get(event["type"], 0)
    return stages


def plain(value: Decimal) -> str:
    """A decimal as plain digits (no exponent), at most 18 places, no trailing zeros."""
    with localcontext() as context:
        context.prec = 100
        value = value.quantize(Decimal(1).scaleb(-18), rounding=ROUND_HALF_EVEN)
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _is_atomic(text: str) -> bool:
    return 0 < len(text) <= _ATOMIC_DIGITS and text.isascii() and text.isdigit()


def _is_evm_nonce(nonce: str | None) -> bool:
    return (
        nonce is not None
        and len(nonce) == 2 + _EVM_NONCE_DIGITS
        and nonce[:2] in ("0x", "0X")
        and all(c in "0123456789abcdefABCDEF" for c in nonce[2:])
    )


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _reason(reason: object, message: object) -> str | None:
    reason_text, message_text = _text(reason), _text(message)
    if reason_text and message_text:
        return f"{reason_text}: {message_text}"
    return reason_text or message_text
