"""The InfluxDB side of the analytics: :class:`AnalyticsSource` as Flux over the enriched points.

Each protocol method runs one Flux file shipped in ``exporter/analytics/queries/`` (package
data, read with :mod:`importlib.resources`), once per span, through ``influxdb-client``'s
async query API. The files hold no value: every value reaches them through the client's query
``params``, which it sends as the request's ``extern`` (an AST prepended to the query). The
exporter passes one parameter, a record named ``params``, so the queries read
``params.start``, ``params.bucket``, ... (the record type-checks against the preamble of
``tests/fluxcheck.py``; nothing is ever formatted into Flux text).

Protocol method -> Flux file (its results, by ``yield`` name):

* ``window_totals`` -> ``window_totals.flux`` (records, settled, second_half, batches, gas,
  revenue)
* ``settled_buckets`` -> ``settled_buckets.flux`` (records, sums, parties)
* ``settled_order_values`` -> ``settled_order_values.flux`` (amount, settlement)
* ``top_lists`` -> ``top_lists.flux`` (routes, payers, payees)
* ``point_in_time`` -> ``point_in_time.flux`` (ids, terminal_ids, websocket), over the
  bounded look-back ``state_lookback_ms`` (never all history)

Event time. A window ``(at - span, at]`` holds the records whose event millisecond ``t``
satisfies ``at - span < t <= at``, i.e. ``at - span + 1 <= t <= at``. A point's timestamp is
``t * 10^6 + d`` nanoseconds with ``0 <= d < 10^6`` (:func:`exporter.records.point_time_ns`: the
ledger probes for a free offset ``d`` but never past the millisecond),
so those points are exactly the ones in ``[(at - span + 1) * 10^6, (at + 1) * 10^6)``, which is
Flux's half-open ``range(start, stop)``: see :func:`window_range`.

Exact money: ``*_micro`` fields are int64 in InfluxDB, and Flux's int64 addition wraps
silently past 2^63. The queries sum each amount split at :data:`EXACT_SPLIT` (columns ``hi``
and ``lo``), which :func:`_exact_sum` adds up here in Python integers; the annotated CSV types
them ``long`` and ``influxdb-client`` parses them as Python ``int``. Every value is checked on
the way in (:func:`_int` refuses a float), and sums over series (networks, statuses) are added
up here in Python integers.

Round trips: one query per span and method, run concurrently (at most
``max_concurrent_queries`` at once); ``Analytics.compute_all`` costs about thirty small
requests. Counts are bare aggregates that InfluxDB pushes down to its storage engine; money
sums run in the query engine (two-part sums); what each query scans is in docs/flux-cost.md.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, Final, Protocol, TypeVar, cast

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.array_expression import ArrayExpression
from influxdb_client.domain.date_time_literal import DateTimeLiteral
from influxdb_client.domain.duration import Duration
from influxdb_client.domain.duration_literal import DurationLiteral
from influxdb_client.domain.identifier import Identifier
from influxdb_client.domain.integer_literal import IntegerLiteral
from influxdb_client.domain.model_property import ModelProperty
from influxdb_client.domain.object_expression import ObjectExpression
from influxdb_client.domain.string_literal import StringLiteral
from influxdb_client.domain.unary_expression import UnaryExpression
from influxdb_client.rest import ApiException

from ..errors import StoreError, StoreServerError, StoreTimeoutError
from ..store.influx.answers import WayOut, answer_message, classify_answer
from .aggregates import NetworkSums, exact_int, number, text
from .models import (
    BucketTotals,
    PayeeTotals,
    PayerTotals,
    PointInTime,
    RankRequest,
    RankValues,
    RouteTotals,
    TopLists,
    WindowTotals,
)

_T = TypeVar("_T")

NS_PER_MS: Final = 1_000_000

QUERY_NAMES: Final[tuple[str, ...]] = (
    "window_totals",
    "settled_buckets",
    "settled_order_values",
    "top_lists",
    "point_in_time",
)
"""The shipped Flux files (``exporter/analytics/queries/<name>.flux``), one per protocol method."""

PARAMS_NAME: Final = "params"
"""The one query parameter: a record holding every value a query reads."""

NO_RANK: Final = 0
"""Stands in for an empty rank list (ranks are 1-based, so 0 never matches)."""

DEFAULT_MAX_CONCURRENT_QUERIES: Final = 4
DEFAULT_STATE_LOOKBACK_MS: Final = 24 * 60 * 60 * 1000
"""How far back ``point_in_time`` looks for pending payments and the WebSocket count: a
payment received earlier and never settled is abandoned, not pending settlement."""
EXACT_SPLIT: Final = 1_000_000_000
"""The queries sum ``v // EXACT_SPLIT`` and ``v % EXACT_SPLIT`` (Flux truncates, Python adds
back ``hi * EXACT_SPLIT + lo``), so no int64 sum wraps."""
DEFAULT_TIMEOUT_SECONDS: Final = 60.0

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


@cache
def flux_query(name: str) -> str:
    """The text of the shipped Flux file ``name`` (from the package data, read once)."""
    if name not in QUERY_NAMES:
        raise ValueError(f"unknown Flux query {name!r}; shipped: {', '.join(QUERY_NAMES)}")
    return resources.files(__package__).joinpath("queries", f"{name}.flux").read_text("utf-8")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class FluxTime:
    """A Flux ``time`` parameter, in nanoseconds since the Unix epoch (exact, unlike datetime)."""

    ns: int

    def rfc3339(self) -> str:
        """The instant as an RFC 3339 literal with nine fraction digits, in UTC."""
        seconds, fraction = divmod(self.ns, 1_000_000_000)
        whole = _EPOCH + timedelta(seconds=seconds)
        return f"{whole:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


@dataclass(frozen=True, slots=True)
class FluxDuration:
    """A Flux ``duration`` parameter, in nanoseconds."""

    ns: int


ParamValue = str | int | FluxTime | FluxDuration | tuple[int, ...]
"""What a query parameter may be: string, int, time, duration, or array of ints."""

Params = Mapping[str, ParamValue]


def window_range(at_ms: int, span_ms: int) -> tuple[FluxTime, FluxTime]:
    """The Flux ``[start, stop)`` holding exactly the points whose event ms is in
    ``(at - span, at]``.

    An event at ms ``t`` is stored at ``t * 10^6 + d`` ns with ``0 <= d < 10^6``; it belongs
    when ``at - span + 1 <= t <= at``, so start is ``(at - span + 1)`` ms and stop, exclusive,
    ``(at + 1)`` ms: an event at exactly ``at - span`` lies wholly before start, one at
    exactly ``at`` (whatever its ``d``) before stop.
    """
    if span_ms <= 0:
        raise ValueError(f"a window span must be positive, got {span_ms}")
    return FluxTime((at_ms - span_ms + 1) * NS_PER_MS), FluxTime((at_ms + 1) * NS_PER_MS)


def _node(kind: object, *args: object, **kwargs: object) -> Any:
    """One influxdb-client AST model (its generated constructors are unannotated)."""
    return cast(Callable[..., Any], kind)(*args, **kwargs)


def _literal(value: ParamValue) -> Any:
    """The Flux AST literal of one parameter value (the form influxdb-client sends)."""
    if isinstance(value, bool):
        raise TypeError("booleans are not used as Flux query parameters here")
    if isinstance(value, str):
        return _node(StringLiteral, "StringLiteral", value)
    if isinstance(value, int):
        if value < 0:
            magnitude = _node(IntegerLiteral, "IntegerLiteral", str(-value))
            return _node(UnaryExpression, "UnaryExpression", operator="-", argument=magnitude)
        return _node(IntegerLiteral, "IntegerLiteral", str(value))
    if isinstance(value, FluxTime):
        return _node(DateTimeLiteral, "DateTimeLiteral", value.rfc3339())
    if isinstance(value, FluxDuration):
        if value.ns <= 0:
            raise ValueError(f"a duration parameter must be positive, got {value.ns} ns")
        duration = _node(Duration, magnitude=value.ns, unit="ns")
        return _node(DurationLiteral, "DurationLiteral", [duration])
    if isinstance(value, tuple):
        if not value:
            raise ValueError("an array parameter needs at least one element (Flux types [] badly)")
        return _node(ArrayExpression, "ArrayExpression", elements=[_literal(v) for v in value])
    raise TypeError(f"unsupported Flux parameter {value!r}")


def params_record(params: Params) -> Any:
    """The Flux record expression ``{name: literal, ...}`` of a query's parameters.

    influxdb-client turns each entry of its ``params`` into ``option <key> = <expression>``
    in the request's ``extern``; a value that is already an AST expression is sent as it is.
    Passed as ``params={"params": params_record(...)}`` it declares the ``params`` record
    that the Flux files read.
    """
    properties = [
        _node(
            ModelProperty,
            "Property",
            key=_node(Identifier, "Identifier", name),
            value=_literal(value),
        )
        for name, value in params.items()
    ]
    return _node(ObjectExpression, "ObjectExpression", properties=properties)


# --------------------------------------------------------------------------- transport


class FluxQuerier(Protocol):
    """Runs one Flux query with its parameters and answers its tables (``FluxTable``)."""

    async def query(self, flux: str, params: Params) -> list[Any]:
        """The tables of every result of ``flux`` run with ``params``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


_QUERY_WAY_OUT = WayOut(
    auth="check EXPORTER_INFLUX_TOKEN, EXPORTER_INFLUX_ORG and EXPORTER_INFLUX_BUCKET",
    not_found="check EXPORTER_INFLUX_TOKEN, EXPORTER_INFLUX_ORG and EXPORTER_INFLUX_BUCKET",
    client="InfluxDB refused the query itself (its message says why)",
)


class InfluxQueryClient:
    """:class:`FluxQuerier` over ``InfluxDBClientAsync``'s query API.

    The async client must be created on the event loop that uses it, so it is opened by
    the first query; :meth:`close` releases its connection pool.
    """

    def __init__(
        self, url: str, token: str, org: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        """Remember where to query; nothing connects until the first query."""
        self.url = url.rstrip("/")
        self.org = org
        self.timeout_seconds = timeout_seconds
        self._token = token
        self._client: Any = None

    async def query(self, flux: str, params: Params) -> list[Any]:
        """Run ``flux`` with ``params`` as the ``params`` record; its tables, every result's."""
        if self._client is None:
            self._client = InfluxDBClientAsync(
                url=self.url,
                token=self._token,
                org=self.org,
                timeout=max(1, int(self.timeout_seconds * 1000)),
            )
        try:
            tables = await self._client.query_api().query(
                flux, params={PARAMS_NAME: params_record(params)}
            )
        except ApiException as error:
            raise self._refused(error) from error
        except TimeoutError as error:  # before OSError: aiohttp's timeouts are both
            raise StoreTimeoutError(
                f"InfluxDB at {self.url} did not answer a query within "
                f"{self.timeout_seconds:g}s (EXPORTER_INFLUX_TIMEOUT_SECONDS)"
            ) from error
        except (aiohttp.ClientError, OSError) as error:
            raise StoreServerError(
                f"InfluxDB at {self.url} is unreachable: {type(error).__name__}: {error}"
            ) from error
        return list(tables)

    def _refused(self, error: ApiException) -> StoreError:
        """The error family's name for an InfluxDB answer other than 200 to a query."""
        headers: Mapping[str, str] = error.headers or {}
        return classify_answer(
            int(error.status or 0),
            answer_message(error.body, error.reason),
            headers.get("Retry-After"),
            f"InfluxDB at {self.url} (org {self.org!r})",
            _QUERY_WAY_OUT,
            request="a query ",
        )

    async def close(self) -> None:
        """Close the client's HTTP session, if one was opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


# --------------------------------------------------------------------------- the source


class FluxAnalyticsSource:
    """:class:`exporter.analytics.source.AnalyticsSource` over InfluxDB 2.x, in Flux."""

    def __init__(
        self,
        querier: FluxQuerier,
        bucket: str,
        max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT_QUERIES,
        state_lookback_ms: int = DEFAULT_STATE_LOOKBACK_MS,
    ) -> None:
        """Query ``bucket`` through ``querier``, at most ``max_concurrent_queries`` at once;
        point-in-time state over the last ``state_lookback_ms`` before the instant asked."""
        if max_concurrent_queries < 1:
            raise ValueError(f"max_concurrent_queries must be >= 1, got {max_concurrent_queries}")
        _check_spans([state_lookback_ms])
        self.querier = querier
        self.bucket = bucket
        self.state_lookback_ms = state_lookback_ms
        self._slots = asyncio.Semaphore(max_concurrent_queries)
        self._closed = False

    @classmethod
    def connect(
        cls,
        url: str,
        token: str,
        org: str,
        bucket: str,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT_QUERIES,
        state_lookback_ms: int = DEFAULT_STATE_LOOKBACK_MS,
    ) -> FluxAnalyticsSource:
        """A source querying the InfluxDB at ``url`` (connects on first use)."""
        client = InfluxQueryClient(url, token, org, timeout_seconds)
        return cls(client, bucket, max_concurrent_queries, state_lookback_ms)

    async def close(self) -> None:
        """Release the querier's connections; no query runs after."""
        self._closed = True
        await self.querier.close()

    async def _run(self, name: str, params: Params) -> list[Any]:
        async with self._slots:
            if self._closed:
                raise StoreError(f"analytics of InfluxDB bucket {self.bucket!r} are closed")
            return await self.querier.query(flux_query(name), {"bucket": self.bucket, **params})

    async def _per_span(
        self,
        name: str,
        spans: Iterable[int],
        params: Callable[[int], Params],
        parse: Callable[[list[Any]], _T],
    ) -> dict[int, _T]:
        """Run query ``name`` once per distinct span, concurrently; parsed answers by span."""
        distinct = list(dict.fromkeys(spans))

        async def one(span: int) -> _T:
            return parse(await self._run(name, params(span)))

        answers = await asyncio.gather(*(one(span) for span in distinct))
        return dict(zip(distinct, answers, strict=True))

    async def window_totals(self, at_ms: int, spans_ms: Sequence[int]) -> dict[int, WindowTotals]:
        """Per span: per-network counters and sums, second-half fees, revenue by kind."""
        _check_spans(spans_ms)

        def params(span: int) -> Params:
            start, stop = window_range(at_ms, span)
            # A 1 ms window has an empty second half (span // 2 == 0): the query still needs
            # a valid range there, and its answer is dropped below.
            half = window_range(at_ms, span // 2)[0] if span // 2 else start
            return {"start": start, "stop": stop, "half_start": half}

        totals = await self._per_span(
            "window_totals", spans_ms, params, window_totals_from_tables
        )
        return {
            span: t if span // 2 else replace(t, fees_second_half_micro=0)
            for span, t in totals.items()
        }

    async def settled_buckets(
        self, at_ms: int, spans_ms: Sequence[int], bucket_ms: int
    ) -> dict[int, list[BucketTotals]]:
        """Per span: settled records per UTC bucket of ``bucket_ms``."""
        _check_spans(spans_ms)
        if bucket_ms <= 0:
            raise ValueError(f"bucket_ms must be positive, got {bucket_ms}")

        def params(span: int) -> Params:
            start, stop = window_range(at_ms, span)
            return {"start": start, "stop": stop, "every": FluxDuration(bucket_ms * NS_PER_MS)}

        return await self._per_span(
            "settled_buckets", spans_ms, params, lambda t: buckets_from_tables(t, bucket_ms)
        )

    async def settled_order_values(
        self, at_ms: int, ranks: Mapping[int, RankRequest]
    ) -> dict[int, RankValues]:
        """Per span: the settled amounts and settlement times at the requested ranks."""
        _check_spans(list(ranks))
        wanted = [span for span, request in ranks.items() if request.amount or request.settlement]

        def params(span: int) -> Params:
            start, stop = window_range(at_ms, span)
            request = ranks[span]
            return {
                "start": start,
                "stop": stop,
                "settled": request.settled,
                "timed": max(request.timed_count, 1),
                "amount_ranks": request.amount or (NO_RANK,),
                "settlement_ranks": request.settlement or (NO_RANK,),
            }

        found = await self._per_span(
            "settled_order_values",
            wanted,
            params,
            lambda tables: tables,
        )
        return {
            span: rank_values_from_tables(found[span], request) if span in found else RankValues()
            for span, request in ranks.items()
        }

    async def top_lists(
        self, at_ms: int, spans_ms: Sequence[int], limit: int
    ) -> dict[int, TopLists]:
        """Per span: the first ``limit`` payers, payees and routes over settled records."""
        _check_spans(spans_ms)
        if isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")

        def params(span: int) -> Params:
            start, stop = window_range(at_ms, span)
            return {"start": start, "stop": stop, "limit": limit}

        return await self._per_span(
            "top_lists", spans_ms, params, lambda t: top_lists_from_tables(t, limit)
        )

    async def point_in_time(self, at_ms: int) -> PointInTime:
        """Pending payments and the latest WebSocket client count as of ``at_ms``, from the
        records of the look-back ``(at_ms - state_lookback_ms, at_ms]``."""
        start, stop = window_range(at_ms, self.state_lookback_ms)
        return point_in_time_from_tables(
            await self._run("point_in_time", {"start": start, "stop": stop})
        )


def _check_spans(spans: Iterable[int]) -> None:
    bad = [s for s in spans if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
    if bad:
        raise ValueError(f"spans must be positive window lengths in ms, got {bad!r}")


# --------------------------------------------------------------------------- results


def _rows(tables: Iterable[Any]) -> Iterator[tuple[str, Mapping[str, object]]]:
    """Every record of every table as (result name, column values)."""
    for table in tables:
        for record in table.records:
            values: Mapping[str, object] = record.values
            yield str(values.get("result")), values


def _int(value: object) -> int:
    return exact_int(value, "InfluxDB")


def _float(value: object) -> float:
    return number(value, "InfluxDB")


def _str(value: object) -> str:
    """A string column; a tag a point does not carry (null) is ``""``."""
    return "" if value is None else text(value, "InfluxDB")


def _exact_sum(row: Mapping[str, object]) -> int:
    """The exact integer sum of a row summed in two parts (``hi`` and ``lo`` columns)."""
    return _int(row.get("hi")) * EXACT_SPLIT + _int(row.get("lo"))


def _epoch_ms(value: object) -> int:
    """Epoch milliseconds (floored) of a ``dateTime`` column parsed by influxdb-client."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a time from InfluxDB, got {value!r}")
    moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


def _unexpected(result: str, query: str) -> RuntimeError:
    return RuntimeError(f"{query}.flux answered an unexpected result {result!r}")


def window_totals_from_tables(tables: Iterable[Any]) -> WindowTotals:
    """The :class:`WindowTotals` of one ``window_totals.flux`` answer (per-series rows)."""
    networks: dict[str, NetworkSums] = defaultdict(NetworkSums)
    second_half = 0
    kinds: dict[str, int] = {}
    for result, row in _rows(tables):
        value = row.get("_value")
        if result == "revenue":
            kind = _str(row.get("kind"))
            kinds[kind] = kinds.get(kind, 0) + _exact_sum(row)
            continue
        if result == "second_half":
            second_half += _exact_sum(row)
            continue
        acc = networks[_str(row.get("network"))]
        field = row.get("_field")
        if result == "records":
            acc.add_status(row.get("status"), _int(value))
        elif result == "settled":
            if field == "amount_micro":
                acc.volume += _exact_sum(row)
            elif field == "fee_micro":
                acc.fees += _exact_sum(row)
        elif result == "settlement":
            acc.settlement_ms += _float(value)
        elif result == "settlement_count":
            acc.timed += _int(value)
        elif result == "batches":
            acc.batches += _int(value)
        elif result == "gas":
            if field == "gas_used":
                acc.gas_used += _int(value)
            elif field == "payment_count":
                acc.batch_payments += _int(value)
        else:
            raise _unexpected(result, "window_totals")
    return WindowTotals(
        networks=[
            acc.totals(network)
            for network, acc in sorted(networks.items())
            if acc.events or acc.batches
        ],
        fees_second_half_micro=second_half,
        revenue_by_kind=kinds,
    )


def buckets_from_tables(tables: Iterable[Any], bucket_ms: int) -> list[BucketTotals]:
    """The non-empty buckets of one ``settled_buckets.flux`` answer, by start."""
    # bucket start -> [settled, volume, fees, payers, payees]
    acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for result, row in _rows(tables):
        start_ms = _epoch_ms(row.get("_start"))
        sums = acc[start_ms - start_ms % bucket_ms]
        field = row.get("_field")
        if result == "records":
            sums[0] += _int(row.get("_value"))
        elif result == "sums":
            if field == "amount_micro":
                sums[1] += _exact_sum(row)
            elif field == "fee_micro":
                sums[2] += _exact_sum(row)
        elif result == "parties":
            if field == "payer":
                sums[3] += _int(row.get("_value"))
            elif field == "payee":
                sums[4] += _int(row.get("_value"))
        else:
            raise _unexpected(result, "settled_buckets")
    return [
        BucketTotals(
            start_ms=start, settled=s[0], volume_micro=s[1], fees_micro=s[2],
            unique_payers=s[3], unique_payees=s[4],
        )
        for start, s in sorted(acc.items())
        if s[0] > 0
    ]


def rescaled_rank(rank: int, settled: int, count: int) -> int:
    """The position among ``count`` values that rank ``rank`` of ``settled`` selects:
    ``ceil((rank - 0.5) / settled * count)``, exactly ``rank`` when ``count == settled``.

    ``settled_order_values.flux`` applies the same integer formula to the count its own read
    saw, so records written since ``settled`` was counted select the same fraction.
    """
    return ((2 * rank - 1) * count + 2 * settled - 1) // (2 * settled)


def rank_values_from_tables(tables: Iterable[Any], request: RankRequest) -> RankValues:
    """The requested rank values of one ``settled_order_values.flux`` answer.

    Each row carries its position and the count ``n`` of values its read saw; rank ``k`` of
    ``request.settled`` is the value at :func:`rescaled_rank` of ``n``. Raises
    :class:`RuntimeError` when a field answered no row although ranks were asked: the window
    lost every settled record since the count.
    """
    found: dict[str, dict[int, object]] = {"amount": {}, "settlement": {}}
    counts: dict[str, int] = {}
    for result, row in _rows(tables):
        if result not in found:
            raise _unexpected(result, "settled_order_values")
        found[result][_int(row.get("rank"))] = row.get("_value")
        counts[result] = _int(row.get("n"))

    def values(result: str, ranks: tuple[int, ...]) -> dict[int, object]:
        if not ranks:
            return {}
        n0 = request.settled if result == "amount" else request.timed_count
        at = {k: rescaled_rank(k, n0, counts.get(result, 0)) for k in ranks}
        missing = sorted(k for k, position in at.items() if position not in found[result])
        if missing:
            raise RuntimeError(
                f"settled_order_values.flux did not answer {result} ranks {missing} of "
                f"{request.settled} settled records (its read saw {counts.get(result, 0)})"
            )
        return {k: found[result][position] for k, position in at.items()}

    return RankValues(
        amount={k: _int(v) for k, v in values("amount", request.amount).items()},
        settlement={k: _float(v) for k, v in values("settlement", request.settlement).items()},
    )


def top_lists_from_tables(tables: Iterable[Any], limit: int) -> TopLists:
    """The three lists of one ``top_lists.flux`` answer, in the contract's order."""
    payers: list[PayerTotals] = []
    payees: list[PayeeTotals] = []
    routes: list[RouteTotals] = []
    for result, row in _rows(tables):
        amount, count = _exact_sum(row), _int(row.get("payments"))
        if result == "payers":
            payers.append(
                PayerTotals(_str(row.get("payer")), amount, count, _int(row.get("last_ms")))
            )
        elif result == "payees":
            payees.append(
                PayeeTotals(_str(row.get("payee")), amount, count, _int(row.get("payers")))
            )
        elif result == "routes":
            routes.append(
                RouteTotals(_str(row.get("payer")), _str(row.get("payee")), amount, count)
            )
        else:
            raise _unexpected(result, "top_lists")
    # Flux already sorted and cut each list; sorting again costs nothing and makes the
    # order independent of how the answer was split into tables.
    return TopLists(payers=payers, payees=payees, routes=routes).first(limit)


def point_in_time_from_tables(tables: Iterable[Any]) -> PointInTime:
    """Pending payments (distinct ids minus distinct terminal ids) and WebSocket clients."""
    ids = terminal = clients = 0
    for result, row in _rows(tables):
        value = _int(row.get("_value"))
        if result == "ids":
            ids += value
        elif result == "terminal_ids":
            terminal += value
        elif result == "websocket":
            clients = value
        else:
            raise _unexpected(result, "point_in_time")
    return PointInTime(pending_payments=ids - terminal, websocket_clients=clients)

