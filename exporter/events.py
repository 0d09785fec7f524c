"""Payment events: the input contract, validated strictly and normalised once.

Every event is ``{"type": ..., "data": {...}, "id"?: ...}``. Validation rejects what
would corrupt money or time (exponents, negatives, seconds mistaken for milliseconds)
with a message naming the field; unknown extra fields are ignored because producers
add fields over time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Any, Literal, NotRequired, cast, get_args, get_type_hints

import orjson
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError, SchemaValidator, core_schema
from typing_extensions import TypedDict  # pydantic validates typing's only from 3.12

from .networks import BUILTIN_TABLE, CAIP2, NetworkTable

MICRO = 1_000_000
"""Micro-units per token unit: money is kept as integer micro-units (10^-6)."""

MIN_TIMESTAMP_MS = 946_684_800_000
"""2000-01-01T00:00:00Z: anything earlier is seconds mistaken for milliseconds."""

MAX_FUTURE_SKEW_MS = 86_400_000
"""Timestamps more than a day ahead of the exporter's clock are refused."""

_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,18})?")
_INTEGER = re.compile(r"[0-9]{1,30}")
_EVM_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_EVM_TX = re.compile(r"0x[0-9a-fA-F]{64}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]+")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decimal_string(value: str) -> str:
    if not _DECIMAL.fullmatch(value):
        raise PydanticCustomError(
            "decimal_string",
            'must be a plain non-negative decimal string such as "1.50" '
            "(at most 12 integer and 18 fractional digits), got {shown}",
            {"shown": _show(value)},
        )
    whole, _, fraction = value.partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def _integer_string(value: str) -> str:
    if not _INTEGER.fullmatch(value):
        raise PydanticCustomError(
            "integer_string",
            'must be a non-negative integer string such as "21000", got {shown}',
            {"shown": _show(value)},
        )
    return value.lstrip("0") or "0"


def _timestamp(value: int) -> int:
    now_ms = int(time.time() * 1000)
    if value < MIN_TIMESTAMP_MS:
        raise PydanticCustomError(
            "timestamp_range",
            "must be Unix epoch milliseconds; {value} is before 2000-01-01 "
            "(seconds instead of milliseconds?)",
            {"value": value},
        )
    if value > now_ms + MAX_FUTURE_SKEW_MS:
        raise PydanticCustomError(
            "timestamp_range",
            "must not be more than a day in the future; {value} is ahead of now ({now})",
            {"value": value, "now": now_ms},
        )
    return value


_NETWORK_TABLE: ContextVar[NetworkTable] = ContextVar("network_table", default=BUILTIN_TABLE)
"""The table names are looked up in while an event is parsed: the built-in one unless a
parse function was given the operator's (with ``EXPORTER_NETWORK_ALIASES``)."""


@contextlib.contextmanager
def network_names(networks: NetworkTable | None) -> Iterator[None]:
    """Within this block, events are parsed with ``networks`` (None: unchanged), e.g. the
    table with the operator's ``EXPORTER_NETWORK_ALIASES``. Entered once per request body:
    per event it would cost more than parsing a small event."""
    if networks is None:
        yield
        return
    token = _NETWORK_TABLE.set(networks)
    try:
        yield
    finally:
        _NETWORK_TABLE.reset(token)


def _network(value: str) -> str:
    """A CAIP-2 id as given, or the CAIP-2 id of an x402 v1 network name (``base``) or of
    an operator's alias."""
    caip2 = _NETWORK_TABLE.get().caip2(value)
    if caip2 is None:
        raise PydanticCustomError(
            "caip2",
            'must be a CAIP-2 chain id such as "eip155:8453" or an x402 v1 network name '
            'such as "base", got {shown}',
            {"shown": _show(value)},
        )
    return caip2


def _address(value: str) -> str:
    if _EVM_ADDRESS.fullmatch(value):
        return value.lower()
    if not _PRINTABLE.fullmatch(value) or value != value.strip():
        raise PydanticCustomError(
            "address",
            "must be an address without spaces or control characters, got {shown}",
            {"shown": _show(value)},
        )
    return _encodable(value)


def _transaction(value: str) -> str:
    if _EVM_TX.fullmatch(value):
        return value.lower()
    if not _PRINTABLE.fullmatch(value):
        raise PydanticCustomError(
            "transaction",
            "must be a transaction id without control characters, got {shown}",
            {"shown": _show(value)},
        )
    return _encodable(value)


def _identifier(value: str) -> str:
    if not _PRINTABLE.fullmatch(value):
        raise PydanticCustomError(
            "identifier",
            "must be a non-empty id without control characters, got {shown}",
            {"shown": _show(value)},
        )
    return _encodable(value)


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "unicode", "must be valid Unicode text (it holds a lone surrogate escape)"
        ) from None
    return value


# Each string type has one validator: the checks run in one call (pydantic's per-validator
# call costs more than the checks). Patterns that admit only ASCII need no Unicode check.
_Str = Annotated[str, Field(strict=True, max_length=256)]
DecimalString = Annotated[_Str, AfterValidator(_decimal_string)]
IntegerString = Annotated[_Str, AfterValidator(_integer_string)]
Timestamp = Annotated[int, Field(strict=True), AfterValidator(_timestamp)]
Network = Annotated[_Str, AfterValidator(_network)]
Address = Annotated[_Str, AfterValidator(_address)]
Transaction = Annotated[_Str, AfterValidator(_transaction)]
Identifier = Annotated[_Str, AfterValidator(_identifier)]
DurationMs = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
ErrorText = Annotated[str, Field(strict=True, max_length=2048), AfterValidator(_encodable)]

UNKNOWN_PAYMENT_ID = "unknown"
"""The payment id of a failure that happened before any payment id existed."""

# Events are validated into plain dicts (TypedDicts), not model instances: building two
# model objects per event cost about as much as parsing and checking it, and every
# consumer only reads fields. Unknown extra fields are dropped.
_IGNORE_EXTRA = ConfigDict(extra="ignore")


@with_config(_IGNORE_EXTRA)
class PaymentReceivedData(TypedDict):
    """A payment request arrived at the facilitator."""

    paymentId: Identifier
    payer: Address
    payee: Address
    amount: DecimalString
    network: Network
    timestamp: Timestamp


@with_config(_IGNORE_EXTRA)
class PaymentVerifiedData(TypedDict):
    """The payment's signature and funds were verified."""

    paymentId: Identifier
    verificationTime: NotRequired[DurationMs | None]
    """Optional: not every facilitator measures it."""
    timestamp: Timestamp


@with_config(_IGNORE_EXTRA)
class PaymentSettledData(TypedDict):
    """The payment was settled on chain."""

    paymentId: Identifier
    transaction: NotRequired[Transaction | None]
    """Optional: some facilitators report a settlement without its hash."""
    fee: DecimalString
    settlementTime: NotRequired[DurationMs | None]
    """Optional: without it the settlement counts everywhere but in settlement times."""
    timestamp: Timestamp
    network: NotRequired[Network | None]


@with_config(_IGNORE_EXTRA)
class PaymentFailedData(TypedDict):
    """The payment failed; ``paymentId`` is ``"unknown"`` when it failed before having one."""

    paymentId: Identifier
    error: ErrorText
    timestamp: Timestamp
    network: NotRequired[Network | None]


@with_config(_IGNORE_EXTRA)
class BatchCreatedData(TypedDict):
    """Payments were grouped into a settlement batch."""

    batchId: Identifier
    paymentCount: Annotated[int, Field(strict=True, ge=1, le=1_000_000_000)]
    totalAmount: DecimalString
    network: Network
    timestamp: Timestamp


@with_config(_IGNORE_EXTRA)
class BatchSettledData(TypedDict):
    """A batch was settled on chain."""

    batchId: Identifier
    transaction: Transaction
    totalFees: DecimalString
    gasUsed: IntegerString
    timestamp: Timestamp


@with_config(_IGNORE_EXTRA)
class RevenueRecordedData(TypedDict):
    """Revenue other than facilitator fees (gas sponsorship, premium features)."""

    kind: Literal["gas_sponsorship", "premium"]
    amount: DecimalString
    network: Network
    timestamp: Timestamp
    paymentId: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class WebsocketClientsData(TypedDict):
    """The facilitator's count of connected WebSocket clients."""

    count: Annotated[int, Field(strict=True, ge=0, le=1_000_000_000)]
    timestamp: Timestamp


@with_config(_IGNORE_EXTRA)
class PaymentReceived(TypedDict):
    """Envelope of ``payment:received``."""

    type: Literal["payment:received"]
    data: PaymentReceivedData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class PaymentVerified(TypedDict):
    """Envelope of ``payment:verified``."""

    type: Literal["payment:verified"]
    data: PaymentVerifiedData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class PaymentSettled(TypedDict):
    """Envelope of ``payment:settled``."""

    type: Literal["payment:settled"]
    data: PaymentSettledData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class PaymentFailed(TypedDict):
    """Envelope of ``payment:failed``."""

    type: Literal["payment:failed"]
    data: PaymentFailedData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class BatchCreated(TypedDict):
    """Envelope of ``batch:created``."""

    type: Literal["batch:created"]
    data: BatchCreatedData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class BatchSettled(TypedDict):
    """Envelope of ``batch:settled``."""

    type: Literal["batch:settled"]
    data: BatchSettledData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class RevenueRecorded(TypedDict):
    """Envelope of ``revenue:recorded``."""

    type: Literal["revenue:recorded"]
    data: RevenueRecordedData
    id: NotRequired[Identifier | None]


@with_config(_IGNORE_EXTRA)
class WebsocketClients(TypedDict):
    """Envelope of ``websocket:clients``."""

    type: Literal["websocket:clients"]
    data: WebsocketClientsData
    id: NotRequired[Identifier | None]


Event = Annotated[
    PaymentReceived
    | PaymentVerified
    | PaymentSettled
    | PaymentFailed
    | BatchCreated
    | BatchSettled
    | RevenueRecorded
    | WebsocketClients,
    Field(discriminator="type"),
]
"""Any one event (a validated, normalised dict), discriminated on ``type``."""

EVENT_TYPES: tuple[str, ...] = (
    "payment:received",
    "payment:verified",
    "payment:settled",
    "payment:failed",
    "batch:created",
    "batch:settled",
    "revenue:recorded",
    "websocket:clients",
)

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
# One adapter per member of the union, by its ``type`` tag (for canonical_json).
_ADAPTER_BY_TYPE: dict[str, TypeAdapter[Any]] = {
    get_args(get_type_hints(cls)["type"])[0]: TypeAdapter(cls)
    for cls in get_args(get_args(Event)[0])
}
_EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


# The fast path. Every check above runs as a Python call per field, which is half the
# cost of validating an event. For the usual shape of each value the same check can run
# inside pydantic-core: constraints on the field's own schema (a pattern, lower-casing
# where the check lowers) that admit only values the Python check accepts *and returns
# unchanged*. Anything else fails the fast validator and takes the full one, which also
# words the errors. The future bound on timestamps moves with the clock, so the fast
# path checks it after validation.
_CANONICAL_DECIMAL = r"^(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{0,17}[1-9])?$"
# Amounts as facilitators write USDC ("0.010000"): a canonical whole part and a fraction
# ending in zeros, which the Python check would strip; the native pattern admits them
# and one string method strips them, instead of failing over to the whole Python check.
_TRAILING_ZEROS_DECIMAL = r"^(?:0|[1-9][0-9]{0,11})\.[0-9]{0,17}0$"
_CANONICAL_INTEGER = r"^(?:0|[1-9][0-9]{0,29})$"
_ASCII_VISIBLE_ENDS = r"^[!-~](?:[ -~]*[!-~])?$"  # printable ASCII, no outer spaces
_THE_CHECK_ITSELF = None


def _without_trailing_zeros(value: str) -> str:
    """``"0.010000"`` -> ``"0.01"``, ``"1.000000"`` -> ``"1"``: what :func:`_decimal_string`
    returns for a value :data:`_TRAILING_ZEROS_DECIMAL` admits."""
    return value.rstrip("0").rstrip(".")


# Per Python check, the constraints of each native choice, tried in order. A choice may
# name, under "then", a Python function applied to what its constraints admitted.
_NATIVE_FORMS: dict[Any, tuple[dict[str, Any] | None, ...]] = {
    _identifier: ({"pattern": r"^[^\x00-\x1f\x7f]+$"},),
    _network: ({"pattern": f"^{CAIP2.pattern}$"}, _THE_CHECK_ITSELF),  # v1 names: the check
    _address: (
        {"pattern": f"^{_EVM_ADDRESS.pattern}$", "to_lower": True},
        {"pattern": _ASCII_VISIBLE_ENDS},
    ),
    _transaction: ({"pattern": f"^{_EVM_TX.pattern}$", "to_lower": True}, {"pattern": r"^[ -~]+$"}),
    # Values that need other normalising still get it, from the Python check.
    _decimal_string: (
        {"pattern": _CANONICAL_DECIMAL},
        {"pattern": _TRAILING_ZEROS_DECIMAL, "then": _without_trailing_zeros},
        _THE_CHECK_ITSELF,
    ),
    _integer_string: ({"pattern": _CANONICAL_INTEGER}, _THE_CHECK_ITSELF),
    _timestamp: ({"ge": MIN_TIMESTAMP_MS},),
    _encodable: ({},),  # a lone surrogate is invalid JSON before any check sees it
}


def _native_choice(schema: dict[str, Any], form: dict[str, Any]) -> Any:
    """The field's own schema (``schema`` is its function-after) constrained by ``form``."""
    constraints = {key: value for key, value in form.items() if key != "then"}
    native = {**schema["schema"], **constraints}
    then = form.get("then")
    return native if then is None else core_schema.no_info_after_validator_function(then, native)


def _natively_checked(schema: Any, full_checks: bool = True) -> Any:
    """``schema`` with each Python check in ``_NATIVE_FORMS`` replaced by its native forms,
    and by the check itself where a form says so (left out without ``full_checks``)."""
    if isinstance(schema, list):
        return [_natively_checked(item, full_checks) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "function-after":
        forms = _NATIVE_FORMS.get(schema["function"]["function"])
        if forms is not None:
            choices: list[Any] = [
                schema if form is None else _native_choice(schema, form)
                for form in forms
                if form is not None or full_checks
            ]
            if len(choices) == 1:
                return choices[0]
            return core_schema.union_schema(choices, mode="left_to_right")
    return {key: _natively_checked(value, full_checks) for key, value in schema.items()}


_FAST_EVENT = SchemaValidator(_natively_checked(_EVENT_ADAPTER.core_schema))
_FAST_EVENT_LIST = SchemaValidator(_natively_checked(_EVENT_LIST_ADAPTER.core_schema))


def latest_timestamp_ms() -> int:
    """The latest event timestamp accepted now (epoch ms): the clock plus the allowed skew."""
    return int(time.time() * 1000) + MAX_FUTURE_SKEW_MS


class EventError(ValueError):
    """An event failed validation; ``str()`` names each offending field and why."""


class MalformedJSONError(ValueError):
    """The bytes are not valid JSON; ``str()`` is the parser's message."""


def _describe(error: ValidationError) -> str:
    parts = []
    for detail in error.errors(include_url=False):
        loc = [str(p) for p in detail["loc"]]
        if loc and loc[0] in EVENT_TYPES:
            loc = loc[1:]  # the union's tag adds itself to the path
        where = ".".join(loc) or "event"
        kind = detail["type"]
        if kind == "dict_type":
            message = "must be a JSON object"
        elif kind == "union_tag_invalid":
            tag = detail.get("ctx", {}).get("tag")
            message = f"unknown event type {_show(tag)}; expected one of {', '.join(EVENT_TYPES)}"
            where = "type"
        elif kind == "union_tag_not_found":
            message = "field required"
            where = "type"
        elif kind == "missing":
            message = "field required"
        else:
            message = detail["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_event(obj: Any) -> Event:
    """Validate one decoded JSON value as an event, or raise :class:`EventError`.

    Network names are read with the built-in table, or the one :func:`network_names`
    put in place.
    """
    if not isinstance(obj, dict):
        raise EventError(f"event: must be a JSON object, got {type(obj).__name__}")
    try:
        return _EVENT_ADAPTER.validate_python(obj)
    except ValidationError as error:
        raise EventError(_describe(error)) from None


def _malformed(error: ValidationError) -> str | None:
    # The message only: an exception kept in a local of the frame that raises it is a
    # reference cycle (exception, traceback, frame) that holds the whole body until the
    # cyclic collector runs, which a hostile sender can outpace.
    for detail in error.errors(include_url=False):
        if detail["type"] == "json_invalid":
            return str(detail["msg"]).removeprefix("Invalid JSON: ")
    return None


def parse_event_json(raw: bytes, latest_ms: int | None = None) -> Event:
    """Parse and validate one event from JSON bytes in one pass.

    ``latest_ms`` is :func:`latest_timestamp_ms` as read earlier by a caller that parses
    many events (the clock is read per event otherwise); a timestamp after it is checked
    again against the clock, so the outcome is the same. Raises
    :class:`MalformedJSONError` when ``raw`` is not JSON, :class:`EventError` when it is
    JSON but not a valid event.
    """
    try:
        event: Event = _FAST_EVENT.validate_json(raw)
    except ValidationError:
        pass
    else:
        latest = latest_timestamp_ms() if latest_ms is None else latest_ms
        if event["data"]["timestamp"] <= latest:
            return event
    try:
        return _EVENT_ADAPTER.validate_json(raw)
    except ValidationError as error:
        malformed = _malformed(error)
        if malformed is None:
            raise EventError(_describe(error)) from None
    raise MalformedJSONError(malformed)


def parse_event_array_json(raw: bytes) -> list[Event] | None:
    """Parse a JSON array whose every item is a valid event, in one pass.

    Returns None when any item is invalid or the body is not an array, so that the
    caller can look at the items one by one; raises :class:`MalformedJSONError` when
    ``raw`` is not JSON at all.
    """
    try:
        events: list[Event] = _FAST_EVENT_LIST.validate_json(raw)
    except ValidationError:
        pass
    else:
        latest = latest_timestamp_ms()
        if all(event["data"]["timestamp"] <= latest for event in events):
            return events
    try:
        return _EVENT_LIST_ADAPTER.validate_json(raw)
    except ValidationError as error:
        malformed = _malformed(error)
        if malformed is None:
            return None
    raise MalformedJSONError(malformed)


@functools.lru_cache(maxsize=4096)
def to_micro(amount: str) -> int:
    """Convert a validated decimal string to integer micro-units, rounding half to even.

    Cached: prices and fees repeat, and Decimal arithmetic is on the ingest hot path.
    """
    return int(Decimal(amount).scaleb(6).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def format_micro(micro: int) -> str:
    """Render micro-units as a decimal string with exactly six places."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def round_half_even_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half to even, exactly (``denominator > 0``): the
    one rounding of money quotients (averages, medians, fees from a rate)."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def canonical_json(event: Event) -> bytes:
    """The event's normalised form: compact JSON in field order, without unknown or null fields.

    Ledgers compare these bytes to tell a duplicate from a conflict, so they must not
    change between versions: orjson writes the same bytes as pydantic's serializer for a
    validated event (a test holds the two to it) in well under half the time. Only events
    with a null optional field take pydantic's way, which leaves the nulls out.
    """
    return _canonical_json(event, join_ref(event))


def dedup_key(event: Event, body: bytes) -> str:
    """The identity of an event in the ledger (docs/architecture.md section 2).

    Lifecycle events (``payment:*`` but failures of unknown payments, ``batch:*``) are
    ``type:paymentId`` or ``type:batchId`` whatever ``id`` they carry; other events their
    ``id``, else ``body`` (:func:`canonical_json` of the event) is hashed into the key.
    """
    return _dedup_key(event, body, join_ref(event))


def event_identity(event: Event) -> tuple[str | None, bytes, str]:
    """:func:`join_ref`, :func:`canonical_json` and :func:`dedup_key` of ``event`` at once:
    each of the last two needs the first, and every accepted event needs all three."""
    ref = join_ref(event)
    body = _canonical_json(event, ref)
    return ref, body, _dedup_key(event, body, ref)


def _canonical_json(event: Event, ref: str | None) -> bytes:
    if ref is not None and "id" in event:
        # A lifecycle event is identified by its payment or batch, not by the producer's
        # id (section 2): a retry under a new id is the same event, so the id is no part
        # of the body that decides between a duplicate and a conflict.
        event = cast(Event, {"type": event["type"], "data": event["data"]})
    if event.get("id", "") is None or None in event["data"].values():
        # The adapter of the event's own type: the union's serializer costs twice as much.
        return _ADAPTER_BY_TYPE[event["type"]].dump_json(event, exclude_none=True)
    # Copied: orjson's result keeps the memory of its whole write buffer (about 4 KiB),
    # and a body lives as long as its request: 1M events peaked 14 MiB higher.
    return bytes(memoryview(orjson.dumps(event)))


def _dedup_key(event: Event, body: bytes, ref: str | None) -> str:
    if ref is not None:  # lifecycle events: their natural key, whatever id they carry
        return f"{event['type']}:{ref}"
    event_id = event.get("id")
    if event_id is not None:
        return f"id:{event_id}"
    digest = hashlib.sha256(body).hexdigest()[:32]
    return f"{event['type']}:{event['data']['timestamp']}:{digest}"


def join_ref(event: Event) -> str | None:
    """The payment or batch id an event joins on; None for events that never join.

    A failure with ``paymentId: "unknown"`` never joins: it failed before it had an id.
    """
    match event["type"]:
        case "payment:received" | "payment:verified" | "payment:settled":
            return event["data"]["paymentId"]
        case "payment:failed":
            payment_id: str = event["data"]["paymentId"]
            return None if payment_id == UNKNOWN_PAYMENT_ID else payment_id
        case "batch:created" | "batch:settled":
            return event["data"]["batchId"]
    return None
