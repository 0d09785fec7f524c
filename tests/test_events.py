"""Event validation: a table of bad inputs with the error text each must produce."""

from __future__ import annotations

import copy
import itertools
import json
import time
from typing import Any, cast

import pytest
from conftest import BASE_MS, batch_created, batch_settled, failed, received, settled, verified
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from pydantic_core import SchemaValidator

from exporter import events as events_module
from exporter.events import (
    Event,
    EventError,
    MalformedJSONError,
    canonical_json,
    dedup_key,
    format_micro,
    parse_event,
    parse_event_array_json,
    parse_event_json,
    to_micro,
)


def _with(event: dict[str, Any], **data: Any) -> dict[str, Any]:
    changed = copy.deepcopy(event)
    for key, value in data.items():
        if value is _DROP:
            del changed["data"][key]
        else:
            changed["data"][key] = value
    return changed


_DROP = object()

BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("not an object", [1], "event: must be a JSON object, got list"),
    (
        "unknown type",
        {"type": "payment:refunded", "data": {}},
        "type: unknown event type 'payment:refunded'",
    ),
    ("no type", {"data": {}}, "type: field required"),
    ("missing amount", _with(received("p"), amount=_DROP), "data.amount: field required"),
    (
        "NaN amount",
        _with(received("p"), amount="NaN"),
        "data.amount: must be a plain non-negative decimal string",
    ),
    ("Infinity amount", _with(received("p"), amount="Infinity"), "data.amount: must be a plain"),
    ("exponent amount", _with(received("p"), amount="1e3"), "data.amount: must be a plain"),
    ("negative amount", _with(received("p"), amount="-1.5"), "data.amount: must be a plain"),
    ("empty amount", _with(received("p"), amount=""), "data.amount: must be a plain"),
    (
        "19 fractional zeros",
        _with(received("p"), amount="1." + "0" * 19),
        'data.amount: must be a plain non-negative decimal string such as "1.50" (at most '
        "12 integer and 18 fractional digits), got '1.0000000000000000000'",
    ),
    ("dot without fraction", _with(received("p"), amount="10."), "data.amount: must be a plain"),
    ("zeros without a whole part", _with(received("p"), amount=".500000"), "data.amount: must"),
    (
        "19 fractional digits",
        _with(received("p"), amount="0." + "1" * 19),
        "data.amount: must be a plain",
    ),
    ("number amount", _with(received("p"), amount=1.5), "data.amount: Input should be a valid"),
    (
        "13 integer digits",
        _with(received("p"), amount="1" + "0" * 12),
        "data.amount: must be a plain",
    ),
    ("bad fee", _with(settled("p"), fee="0x10"), "data.fee: must be a plain"),
    (
        "seconds timestamp",
        _with(received("p"), timestamp=1_767_225_600),
        "data.timestamp: must be Unix epoch milliseconds",
    ),
    (
        "far future timestamp",
        _with(received("p"), timestamp=int(time.time() * 1000) + 2 * 86_400_000),
        "data.timestamp: must not be more than a day in the future",
    ),
    (
        "string timestamp",
        _with(received("p"), timestamp=str(BASE_MS)),
        "data.timestamp: Input should be a valid integer",
    ),
    (
        "float timestamp",
        _with(received("p"), timestamp=BASE_MS + 0.5),
        "data.timestamp: Input should be a valid integer",
    ),
    (
        "network neither CAIP-2 nor a v1 name",
        _with(received("p"), network="basechain"),
        'data.network: must be a CAIP-2 chain id such as "eip155:8453" or an x402 v1',
    ),
    (
        "payment count zero",
        _with(batch_created("b"), paymentCount=0),
        "data.paymentCount: Input should be greater than or equal to 1",
    ),
    (
        "gas not an integer string",
        _with(batch_settled("b"), gasUsed="21000.5"),
        "data.gasUsed: must be a non-negative integer string",
    ),
    ("gas a number", _with(batch_settled("b"), gasUsed=21000), "data.gasUsed: Input should be"),
    (
        "negative verification time",
        _with(verified("p"), verificationTime=-1),
        "data.verificationTime: Input should be greater than or equal to 0",
    ),
    ("payer with spaces", _with(received("p"), payer=" 0xabc"), "data.payer: must be an address"),
    (
        "control char in payment id",
        _with(received("p"), paymentId="a\x00b"),
        "data.paymentId: must be a non-empty id",
    ),
    (
        "bad revenue kind",
        {
            "type": "revenue:recorded",
            "data": {"kind": "tips", "amount": "1", "network": "eip155:1", "timestamp": BASE_MS},
        },
        "data.kind: Input should be 'gas_sponsorship' or 'premium'",
    ),
    (
        "negative websocket count",
        {"type": "websocket:clients", "data": {"count": -1, "timestamp": BASE_MS}},
        "data.count: Input should be greater than or equal to 0",
    ),
    (
        "data not an object",
        {"type": "payment:received", "data": "x"},
        "data: must be a JSON object",
    ),
]


@pytest.mark.parametrize(("case", "event", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_naming_the_field(case: str, event: Any, expected: str) -> None:
    with pytest.raises(EventError) as caught:
        parse_event(event)
    assert expected in str(caught.value)


_BAD_OBJECTS = [case for case in BAD_INPUTS if isinstance(case[1], dict)]


@pytest.mark.parametrize(
    ("case", "event", "expected"), _BAD_OBJECTS, ids=[c[0] for c in _BAD_OBJECTS]
)
def test_bad_json_input_gets_the_same_error(case: str, event: Any, expected: str) -> None:
    # The JSON paths validate natively first and fall back to the worded checks.
    raw = json.dumps(event).encode()
    with pytest.raises(EventError) as caught:
        parse_event_json(raw)
    assert expected in str(caught.value)
    assert parse_event_array_json(b"[" + raw + b"]") is None


def test_two_bad_fields_are_both_named() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(received("p"), amount="-1", network="basechain"))
    assert str(caught.value) == (
        'data.amount: must be a plain non-negative decimal string such as "1.50" (at most 12 '
        "integer and 18 fractional digits), got '-1'; data.network: must be a CAIP-2 chain id "
        'such as "eip155:8453" or an x402 v1 network name such as "base", got \'basechain\''
    )


def test_every_event_type_validates() -> None:
    events = [
        received("p"),
        verified("p"),
        settled("p"),
        failed("p"),
        failed("unknown"),
        batch_created("b"),
        batch_settled("b"),
        {
            "type": "revenue:recorded",
            "data": {"kind": "premium", "amount": "2", "network": "eip155:1", "timestamp": BASE_MS},
        },
        {"type": "websocket:clients", "data": {"count": 7, "timestamp": BASE_MS}},
    ]
    parsed = [parse_event(e) for e in events]
    assert [p["type"] for p in parsed] == [e["type"] for e in events]
    # Every type has a canonical form, and it parses back to the same event.
    assert [parse_event(json.loads(canonical_json(p))) for p in parsed] == parsed


def test_evm_addresses_are_lower_cased_and_others_kept() -> None:
    mixed = "0x" + "AbCdEf0123" * 4
    event = parse_event(_with(received("p"), payer=mixed, payee="So1anaPayeeAddress"))
    assert event["type"] == "payment:received"
    assert event["data"]["payer"] == mixed.lower()
    assert event["data"]["payee"] == "So1anaPayeeAddress"


def test_unknown_fields_are_ignored() -> None:
    event = received("p")
    event["data"]["route"] = "/api/weather"
    event["extra"] = {"x": 1}
    parsed = parse_event(event)
    assert b"route" not in canonical_json(parsed)


def test_canonical_form_does_not_depend_on_field_order() -> None:
    event = received("p")
    reordered = {"data": dict(reversed(event["data"].items())), "type": event["type"]}
    assert canonical_json(parse_event(reordered)) == canonical_json(parse_event(event))
    assert canonical_json(parse_event(event)).startswith(b'{"type":"payment:received","data":')


# Text the validators accept: anything but C0 controls, DEL and lone surrogates.
_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters=[*map(chr, range(32)), "\x7f"]),
    min_size=1,
    max_size=40,
)
_DURATION = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
# pydantic's serializer wrote the canonical bodies that ledgers already hold.
_PYDANTIC_CANONICAL = TypeAdapter(Event)


@given(
    payment_id=_TEXT,
    error=st.text(st.characters(exclude_categories=["Cs"]), max_size=60),
    duration=_DURATION,
    event_id=st.none() | _TEXT,
    network=st.none() | st.just("eip155:8453"),
)
def test_canonical_form_is_byte_for_byte_what_ledgers_already_hold(
    payment_id: str, error: str, duration: float, event_id: str | None, network: str | None
) -> None:
    # Stored bodies tell a redelivery (a duplicate) from a changed event (a conflict),
    # so the bytes must not differ from those earlier versions wrote, for any text,
    # float or null field.
    raw_events = [
        verified(payment_id, ms=duration),
        settled(payment_id, settlement_ms=duration),
        {**failed(payment_id, error=error), "id": event_id},
        _with(failed(payment_id, error=error), network=network),
    ]
    for raw in raw_events:
        event = parse_event(raw)
        # A lifecycle event's id is no part of its identity, so not of its body either.
        expected = cast(Event, {"type": event["type"], "data": event["data"]})
        assert canonical_json(event) == _PYDANTIC_CANONICAL.dump_json(expected, exclude_none=True)


def test_decimal_strings_are_normalised_so_equal_amounts_compare_equal() -> None:
    a = parse_event(_with(received("p"), amount="001.50"))
    b = parse_event(_with(received("p"), amount="1.5"))
    assert canonical_json(a) == canonical_json(b)


@pytest.mark.parametrize(
    ("amount", "micro"),
    [
        ("0", 0),
        ("0.000001", 1),
        ("1.5", 1_500_000),
        ("0.0000005", 0),
        ("0.0000015", 2),
        ("0.0000025", 2),
        ("999999999999.9999995", 10**18),
        ("999999999999.9999985", 10**18 - 2),
    ],
)
def test_to_micro_rounds_half_to_even(amount: str, micro: int) -> None:
    assert to_micro(amount) == micro


def test_format_micro_has_six_places() -> None:
    assert format_micro(0) == "0.000000"
    assert format_micro(12_500_000) == "12.500000"
    assert format_micro(1) == "0.000001"
    assert format_micro(-1_500_001) == "-1.500001"


def test_dedup_keys_follow_the_contract() -> None:
    def key(event: dict[str, Any]) -> str:
        parsed = parse_event(event)
        return dedup_key(parsed, canonical_json(parsed))

    assert key(settled("p1")) == "payment:settled:p1"
    assert key(batch_settled("b1")) == "batch:settled:b1"
    assert key({**settled("p1"), "id": "evt-9"}) == "payment:settled:p1"
    revenue = {
        "type": "revenue:recorded",
        "id": "evt-9",
        "data": {"kind": "premium", "amount": "2", "network": "eip155:1", "timestamp": BASE_MS},
    }
    assert key(revenue) == "id:evt-9"
    unknown_a = key(failed("unknown", error="a"))
    unknown_b = key(failed("unknown", error="b"))
    assert unknown_a.startswith(f"payment:failed:{BASE_MS + 2000}:")
    assert unknown_a != unknown_b
    assert key(failed("unknown", error="a")) == unknown_a
    # Keys are stored in ledgers: a key of a hashed body must read the same in every version.
    clients = {"type": "websocket:clients", "data": {"count": 3, "timestamp": 1767225600000}}
    assert key(clients) == "websocket:clients:1767225600000:32d1857325d073922acd442f1123d6a3"


def test_the_canonical_form_keeps_the_id_of_an_event_that_never_joins() -> None:
    revenue = {
        "type": "revenue:recorded",
        "id": "r1",
        "data": {"kind": "premium", "amount": "2.50", "network": "eip155:1", "timestamp": BASE_MS},
    }
    assert canonical_json(parse_event(revenue)) == (
        b'{"type":"revenue:recorded","data":{"kind":"premium","amount":"2.5",'
        b'"network":"eip155:1","timestamp":%d},"id":"r1"}' % BASE_MS
    )


# Values around what each field's check accepts, normalises or refuses.
_DECIMALISH = st.from_regex(r"0*[0-9]{1,13}(\.[0-9]{1,19}0*)?", fullmatch=True) | st.from_regex(
    r"-?[0-9]{0,14}(\.[0-9]{0,20})?(e[0-9])?", fullmatch=True
)
_HEXISH = st.from_regex(r" ?0[xX][0-9a-fA-FgG]{38,66} ?", fullmatch=True)
_EVM_ADDRESSES = st.from_regex(r"0x[0-9a-fA-F]{40}", fullmatch=True)
_EVM_TRANSACTIONS = st.from_regex(r"0x[0-9a-fA-F]{64}", fullmatch=True)
_ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300) | st.text(
    st.sampled_from([*" aZ09:-_.x", "\x00", "\t", "\n", "\x1f", "\x7f", "\xa0", "\u2028", "é"]),
    max_size=12,
)
_TIMESTAMPS = st.integers(min_value=events_module.MIN_TIMESTAMP_MS - 2, max_value=2**53) | st.just(
    int(time.time() * 1000) + events_module.MAX_FUTURE_SKEW_MS - 60_000
)
# Each checked field, in an event that is valid but for it, and values to try there.
_VARIED_FIELDS: dict[tuple[str, str], tuple[dict[str, Any], st.SearchStrategy[Any]]] = {
    ("received", "amount"): (received("p"), _DECIMALISH | _ANY_TEXT),
    ("received", "payer"): (received("p"), _EVM_ADDRESSES | _HEXISH | _ANY_TEXT),
    ("received", "network"): (
        received("p"),
        st.from_regex(r"[-a-zA-Z0-9_ ]{2,9}:[-_a-zA-Z0-9 ]{0,33}", fullmatch=True) | _ANY_TEXT,
    ),
    ("received", "paymentId"): (received("p"), _ANY_TEXT),
    ("received", "timestamp"): (received("p"), _TIMESTAMPS),
    ("settled", "transaction"): (settled("p"), _EVM_TRANSACTIONS | _HEXISH | _ANY_TEXT),
    ("settled", "fee"): (settled("p"), _DECIMALISH),
    ("batch_settled", "gasUsed"): (
        batch_settled("b"),
        st.from_regex(r"0*[0-9]{0,31}", fullmatch=True) | _ANY_TEXT,
    ),
    ("failed", "error"): (failed("p"), _ANY_TEXT),
}
_FULL_VALIDATOR = TypeAdapter(Event)


def _outcome(raw: bytes) -> Any:
    try:
        return parse_event_json(raw)
    except (EventError, MalformedJSONError):
        return "refused"


def _full_outcome(raw: bytes) -> Any:
    try:
        return _FULL_VALIDATOR.validate_json(raw)
    except ValueError:
        return "refused"


def _assert_native_path_agrees(event: dict[str, Any], field: str, value: Any) -> None:
    # The fast path may only accept what the full checks accept, and must return what
    # they return (normalised amounts, lower-cased EVM addresses and transactions).
    raw = json.dumps(_with(event, **{field: value})).encode()
    expected = _full_outcome(raw)
    assert _outcome(raw) == expected
    valid = json.dumps(event).encode()
    listed = parse_event_array_json(b"[" + valid + b"," + raw + b"]")
    if isinstance(expected, dict):
        assert listed == [_FULL_VALIDATOR.validate_json(valid), expected]
    else:
        assert listed is None


_NOW_MS = int(time.time() * 1000)
_EDGE_VALUES: list[tuple[str, str, Any]] = [
    *(
        ("received", "amount", v)
        for v in ("1.50", "001.5", "0", "0.0", "00", "1.", ".5", "0." + "0" * 17 + "1", "1e3")
    ),
    *(("received", "amount", v) for v in ("1." + "0" * 18, "9" * 12, "9" * 13, "0.5")),
    *(
        ("received", "amount", v)
        for v in ("0.010000", "1.000000", "0.000000", "10.0", "100.00", "0.0", "1.5" + "0" * 16)
    ),
    *(
        ("received", "amount", v)
        for v in ("1." + "0" * 19, "010.000", "00.10", "999999999999.000000", "1" * 13 + ".0")
    ),
    *(("settled", "fee", v) for v in ("0.000150", "0.100000", "2.000000", "0.00015")),
    *(
        ("received", "payer", v)
        for v in ("0x" + "Ab" * 20, " 0x" + "ab" * 20, "0x" + "ab" * 20 + " ", "0x" + "ab" * 19)
    ),
    *(("received", "payer", v) for v in ("So1ana", " So1ana", "So1ana ", "a\x00b", "é", "a b")),
    *(("received", "network", v) for v in ("eip155:8453", "EIP155:1", "ab:c", "eip155:", "a b:c")),
    *(("received", "paymentId", v) for v in ("", " ", "a\x00", "a\tb", "é", "\x7f", "x" * 257)),
    *(("settled", "transaction", v) for v in ("0x" + "AB" * 32, "a\x00b", "a b", " x", "é", "")),
    *(("batch_settled", "gasUsed", v) for v in ("0", "00", "0021000", "1" * 30, "1" * 31, "1.0")),
    *(("failed", "error", v) for v in ("", "x" * 2048, "x" * 2049, "a\x00b", "é")),
    *(
        ("received", "timestamp", v)
        for v in (
            events_module.MIN_TIMESTAMP_MS - 1,
            events_module.MIN_TIMESTAMP_MS,
            _NOW_MS + events_module.MAX_FUTURE_SKEW_MS - 60_000,
            _NOW_MS + events_module.MAX_FUTURE_SKEW_MS + 60_000,
        )
    ),
]


# Ids by position: values hold control characters (escaped in ids) and timestamps that move
# with the clock, and an id must name the same case when the tests are collected again.
@pytest.mark.parametrize(
    ("kind", "field", "value"),
    _EDGE_VALUES,
    ids=[f"{index}-{kind}-{field}" for index, (kind, field, _) in enumerate(_EDGE_VALUES)],
)
def test_native_validation_agrees_with_the_full_checks_at_the_edges(
    kind: str, field: str, value: Any
) -> None:
    _assert_native_path_agrees(_VARIED_FIELDS[kind, field][0], field, value)


@settings(max_examples=400)
@given(data=st.data())
def test_native_validation_agrees_with_the_full_checks(data: st.DataObject) -> None:
    kind, field = data.draw(st.sampled_from(sorted(_VARIED_FIELDS)))
    event, values = _VARIED_FIELDS[kind, field]
    _assert_native_path_agrees(event, field, data.draw(values))


def test_the_simulators_traffic_takes_the_native_path() -> None:
    # Canonical amounts, EVM addresses and CAIP-2 networks need no Python check: if
    # this stops holding, ingest silently validates everything twice.
    from exporter.cli.simulate import SimulationConfig, Simulator, encode_event

    simulator = Simulator(SimulationConfig(seed=3, duplicate_fraction=0.0))
    lines = [encode_event(e) for e in itertools.islice(simulator.events(BASE_MS, None, 50.0), 2000)]
    for line in lines:
        assert events_module._FAST_EVENT.validate_json(line) == parse_event_json(line)


_MONEY_FIELDS = ("amount", "fee", "totalAmount", "totalFees")


def _six_decimals(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its money written as facilitators write USDC: ``"0.010000"``."""
    changed = copy.deepcopy(event)
    for name in _MONEY_FIELDS:
        if name in changed["data"]:
            whole, _, fraction = changed["data"][name].partition(".")
            changed["data"][name] = f"{whole}.{fraction.ljust(6, '0')}"
    return changed


def test_six_decimal_amounts_take_the_native_path_to_the_same_result() -> None:
    # The native forms alone (no Python check to fall back on) accept amounts with six
    # decimals, and the event, its canonical body and its micro-units are those of the
    # same event with its amounts written shortest.
    from exporter.cli.simulate import SimulationConfig, Simulator, encode_event

    native_only = SchemaValidator(
        events_module._natively_checked(_FULL_VALIDATOR.core_schema, full_checks=False)
    )
    simulator = Simulator(SimulationConfig(seed=5, duplicate_fraction=0.0))
    trailing = fields = 0
    for shortest in itertools.islice(simulator.events(BASE_MS, None, 50.0), 2000):
        six = encode_event(_six_decimals(shortest))
        event = parse_event_json(six)
        assert native_only.validate_json(six) == event == _FULL_VALIDATOR.validate_json(six)
        assert event == parse_event_json(encode_event(shortest))
        body = canonical_json(event)
        assert body == canonical_json(parse_event_json(encode_event(shortest)))
        written, stored = json.loads(six)["data"], dict(event["data"])
        for name in _MONEY_FIELDS:
            if name in written:
                assert to_micro(stored[name]) == to_micro(written[name])
                fields += 1
                trailing += written[name].endswith("0")
    assert trailing > fields / 2  # the case in question: most of them end in zeros


def test_a_clock_read_before_parsing_does_not_refuse_a_later_timestamp() -> None:
    # The receiver reads the clock once per body; an event stamped after that read is
    # checked again against the clock, not refused.
    now = int(time.time() * 1000)
    raw = json.dumps(received("p", now + events_module.MAX_FUTURE_SKEW_MS - 60_000)).encode()
    assert parse_event_json(raw, latest_ms=now) == parse_event_json(raw)
    late = json.dumps(received("p", now + events_module.MAX_FUTURE_SKEW_MS + 60_000)).encode()
    with pytest.raises(EventError, match="data.timestamp: must not be more than a day"):
        parse_event_json(late, latest_ms=events_module.latest_timestamp_ms())


@pytest.mark.parametrize(
    ("length", "shown"),
    [(34, "'\\x00" + "a" * 34 + "'"), (35, "'\\x00" + "a" * 32 + "...")],
    ids=["40 characters shown whole", "41 cut to 37 and an ellipsis"],
)
def test_a_refused_value_is_shown_up_to_40_characters(length: int, shown: str) -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(received("p"), paymentId="\x00" + "a" * length))
    assert str(caught.value) == (
        f"data.paymentId: must be a non-empty id without control characters, got {shown}"
    )


def test_an_integer_string_is_refused_showing_it_and_kept_without_leading_zeros() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(batch_settled("b"), gasUsed="21000.5"))
    assert str(caught.value) == (
        "data.gasUsed: must be a non-negative integer string such as \"21000\", got '21000.5'"
    )
    for given_as, kept in (("0021000", "21000"), ("000", "0")):
        raw = json.dumps(_with(batch_settled("b"), gasUsed=given_as)).encode()
        for parsed in (parse_event_json(raw), parse_event(json.loads(raw))):
            assert parsed["type"] == "batch:settled"
            assert parsed["data"]["gasUsed"] == kept


def test_an_unknown_type_is_refused_listing_every_known_one() -> None:
    with pytest.raises(EventError) as caught:
        parse_event({"type": "payment:refunded", "data": {}})
    assert str(caught.value) == (
        "type: unknown event type 'payment:refunded'; expected one of payment:received, "
        "payment:verified, payment:settled, payment:failed, batch:created, batch:settled, "
        "revenue:recorded, websocket:clients"
    )


@pytest.mark.parametrize("raw", [b"5", b'"x"', b"null"])
def test_json_that_is_not_an_object_is_refused_as_the_event(raw: bytes) -> None:
    with pytest.raises(EventError) as caught:
        parse_event_json(raw)
    assert str(caught.value) == "event: must be a JSON object"


def test_a_transaction_id_with_a_control_character_is_refused_showing_it() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(settled("p"), transaction="a\x00b"))
    assert str(caught.value) == (
        "data.transaction: must be a transaction id without control characters, got 'a\\x00b'"
    )


def test_a_lone_surrogate_from_decoded_json_is_refused_naming_it() -> None:
    # json.loads accepts "\ud800" escapes; such an id cannot be stored as UTF-8.
    item = json.loads(json.dumps(_with(received("p"), paymentId="a\ud800")))
    with pytest.raises(EventError) as caught:
        parse_event(item)
    assert str(caught.value) == (
        "data.paymentId: Input should be a valid string, unable to parse raw data as a "
        "unicode string"
    )


def test_an_address_with_outer_spaces_is_refused_showing_it() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(received("p"), payer=" 0xabc"))
    assert str(caught.value) == (
        "data.payer: must be an address without spaces or control characters, got ' 0xabc'"
    )


def test_seconds_given_for_milliseconds_are_refused_saying_so() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(_with(received("p"), timestamp=1_700_000_000))
    assert str(caught.value) == (
        "data.timestamp: must be Unix epoch milliseconds; 1700000000 is before 2000-01-01 "
        "(seconds instead of milliseconds?)"
    )


def test_a_timestamp_exactly_a_day_ahead_is_accepted_and_one_ms_more_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now_ms = BASE_MS + 5_000
    monkeypatch.setattr(time, "time", lambda: now_ms / 1000)
    latest = now_ms + events_module.MAX_FUTURE_SKEW_MS
    assert parse_event(_with(received("p"), timestamp=latest))["data"]["timestamp"] == latest
    with pytest.raises(EventError) as caught:
        parse_event(_with(received("p"), timestamp=latest + 1))
    assert str(caught.value) == (
        f"data.timestamp: must not be more than a day in the future; {latest + 1} is ahead "
        f"of now ({now_ms})"
    )


def test_the_latest_timestamp_accepted_is_a_day_after_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    assert events_module.latest_timestamp_ms() == 1_800_000_000_250 + 86_400_000


def test_a_null_id_leaves_the_canonical_form_and_the_key_as_without_one() -> None:
    clients = {"type": "websocket:clients", "data": {"count": 3, "timestamp": BASE_MS}}
    without, null = parse_event(clients), parse_event({**clients, "id": None})
    assert canonical_json(null) == canonical_json(without)
    assert dedup_key(null, canonical_json(null)) == dedup_key(without, canonical_json(without))
