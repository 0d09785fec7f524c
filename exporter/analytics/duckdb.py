"""The DuckDB side of the analytics: :class:`AnalyticsSource` as SQL over the store's tables.

Every query is parameterised (``$n`` placeholders; only placeholders and column names are
ever put into SQL text) and filters on integer ``time_ms`` bounds, so DuckDB's zone maps
skip the row groups outside the widest window. Sums of BIGINT come back as HUGEINT and
are converted to Python ``int``: money stays exact.

Several windows are answered by one scan where sums allow it. All the windows asked for
share the end ``at``, so they are nested: a row is tagged with its *ring*, the index of
the smallest window edge it lies within, and aggregated once per (group, ring); a window's
sums and counts are then the sums over its rings, done in Python. Distinct counts are not
additive, so they are aggregated on the minimum ring per (group, party) instead: a party
counts in a window when its minimum ring lies inside it. Order statistics and top lists do
not decompose over rings, so they run once per window, except that a window holding
exactly as many settled records as the next narrower one holds the same records (they are
nested) and reuses its answer: the 90-day window of a store with 30 days of history costs
nothing more than the 30-day one.

Payers and payees are grouped by a 64-bit hash of the address, far smaller than the
address, once the window is known to hold no two parties with the same hash (see
``DuckDBTuning.party_key``); addresses are read back only for the parties that rank.

Order statistics are selected by rank exactly, in passes of binned counts that need
little memory whatever the window holds (see ``_select_ranks``). The contract tests check
them against the brute-force oracle for every rank of small ``n``.

Queries run one at a time per source (DuckDB already uses all its threads for one query,
and the store's buffer pool is small: concurrent scans only compete for it).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb

from ..errors import StoreError
from ..store.duckdb import DuckDBStore
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

_Row = tuple[object, ...]


def _int(value: object) -> int:
    return exact_int(value, "DuckDB")


def _float(value: object) -> float:
    return number(value, "DuckDB")


def _str(value: object) -> str:
    return text(value, "DuckDB")


def _ring_sql(first_edge_param: int, edges: int) -> str:
    """``CASE`` giving a row's ring: the index of the smallest edge ``e`` with
    ``time_ms > at - e``. ``$1`` is ``at``; all edges but the last (the widest, which the
    query's own filter applies) are parameters from ``first_edge_param`` on."""
    whens = " ".join(
        f"WHEN time_ms > $1 - ${first_edge_param + i} THEN {i}" for i in range(edges - 1)
    )
    return f"CASE {whens} ELSE {edges - 1} END" if whens else "0"


def _edges(spans: Sequence[int]) -> list[int]:
    if not spans or any(s <= 0 for s in spans):
        raise ValueError(f"spans must be positive window lengths in ms, got {list(spans)!r}")
    return sorted(set(spans))


def _window_totals_sql(edge_count: int) -> str:
    ring = _ring_sql(3, edge_count)
    where = "time_ms > $1 - $2 AND time_ms <= $1"
    return f"""
SELECT 'p', network, {ring} AS ring, count(*),
       count(*) FILTER (WHERE status = 'received'),
       count(*) FILTER (WHERE status = 'settled'),
       count(*) FILTER (WHERE status = 'failed'),
       sum(amount_micro) FILTER (WHERE status = 'settled'),
       sum(fee_micro) FILTER (WHERE status = 'settled'),
       sum(settlement_ms) FILTER (WHERE status = 'settled'),
       count(settlement_ms) FILTER (WHERE status = 'settled')
FROM payment WHERE {where} GROUP BY ALL
UNION ALL
SELECT 'b', network, {ring} AS ring, count(*), 0, 0, 0,
       sum(gas_used), sum(payment_count), NULL, 0
FROM batch WHERE status = 'settled' AND {where} GROUP BY ALL
UNION ALL
SELECT 'r', kind, {ring} AS ring, count(*), 0, 0, 0, sum(amount_micro), NULL, NULL, 0
FROM revenue WHERE {where} GROUP BY ALL
"""


def _buckets_sql(edge_count: int, party_key: str | None) -> str:
    """Settled sums and distinct parties per (bucket, ring), parties by ``party_key`` (or
    by address when None)."""
    ring = _ring_sql(4, edge_count)
    payer, payee = (party_key.format(c) if party_key else c for c in ("payer", "payee"))
    return f"""
WITH s AS MATERIALIZED (
    SELECT time_ms - time_ms % $2 AS bucket, {ring} AS ring, {payer} AS payer,
           {payee} AS payee, amount_micro, fee_micro
    FROM payment WHERE status = 'settled' AND time_ms > $1 - $3 AND time_ms <= $1
)
SELECT 0, bucket, ring, count(*), sum(amount_micro), sum(fee_micro) FROM s GROUP BY ALL
UNION ALL
SELECT 1, bucket, r, count(*), NULL, NULL
FROM (SELECT bucket, payer, min(ring) AS r FROM s GROUP BY ALL) GROUP BY ALL
UNION ALL
SELECT 2, bucket, r, count(*), NULL, NULL
FROM (SELECT bucket, payee, min(ring) AS r FROM s GROUP BY ALL) GROUP BY ALL
"""


_SETTLED_IN_WINDOW = "status = 'settled' AND time_ms > $1 - $2 AND time_ms <= $1"

# Parties (payers, payees) are grouped by a 64-bit hash of the address, not by the address:
# a fixed-width key takes a fraction of the memory and time of a 42-character string, and
# the aggregations over every (payer, payee) pair of a window are what outgrew the buffer
# pool (217,000 pairs of a million payments needed more than 48MB). The answers stay exact:
# _parties_distinct_sql first checks that the window has as many distinct keys as
# addresses, so no two parties share one; addresses are then read back only for the keys
# that rank. Were two parties ever to collide, the address-keyed queries run instead.


def _parties_distinct_sql(party_key: str) -> str:
    """Whether the window's payers, and its payees, have as many distinct keys as addresses."""
    return "SELECT " + " AND ".join(
        f"(SELECT count(*) = count(DISTINCT {party_key.format(column)}) FROM "
        f"(SELECT DISTINCT {column} FROM payment WHERE {_SETTLED_IN_WINDOW}))"
        for column in ("payer", "payee")
    )


def _parties_distinct(
    query: Callable[[str, list[object]], list[_Row]], at_ms: int, span: int, party_key: str
) -> bool:
    [(distinct,)] = query(_parties_distinct_sql(party_key), [at_ms, span])
    return distinct is True


# Order statistics are selected by narrowing, not with quantile_disc: that aggregate
# holds every value of the window in one allocation, and 2,000,000 settled payments in
# the 90-day window asked more of it than a 64MB buffer pool has. A pass
# counts the values of a range in at most DuckDBTuning.rank_bins equal-width bins (a hash
# aggregate of few groups, in little memory) and keeps the bin holding each wanted rank; a
# range of at most DuckDBTuning.rank_read_at_most values is read in order. Binning is
# monotone in the value, so a bin's values are exactly those between its least and greatest.
_RANK_COLUMNS = {"amount_micro": True, "settlement_ms": False}  # column: integer values


@dataclass(frozen=True, slots=True)
class DuckDBTuning:
    """How the DuckDB source trades memory for passes; the defaults suit the store's small
    buffer pool. Smaller values take the same paths on little data."""

    party_key: str = "hash({})"
    """SQL of a party's fixed-width key, ``{}`` standing for its address column."""
    rank_bins: int = 16_384
    """Bins a pass of rank selection counts a range in."""
    rank_read_at_most: int = 16_384
    """A range of at most this many values is read in order instead of binned."""
    tied_at_most: int = 1_000
    """Rows fetched beyond a top list's limit for the ties with its last row."""


def _rank_range_sql(column: str) -> str:
    return (
        f"SELECT count({column}), min({column}), max({column}) "
        f"FROM payment WHERE {_SETTLED_IN_WINDOW}"
    )


def _rank_bins_sql(column: str, integer: bool) -> str:
    # $3, $4: the range; $5: the bin width.
    bin_of = f"({column} - $3) // $5" if integer else f"floor(({column} - $3) / $5)"
    return (
        f"SELECT {bin_of} AS bin, count(*), min({column}), max({column}) FROM payment "
        f"WHERE {_SETTLED_IN_WINDOW} AND {column} BETWEEN $3 AND $4 GROUP BY bin ORDER BY bin"
    )


def _rank_read_sql(column: str) -> str:
    return (
        f"SELECT {column} FROM payment "
        f"WHERE {_SETTLED_IN_WINDOW} AND {column} BETWEEN $3 AND $4 ORDER BY {column}"
    )


@dataclass(slots=True)
class _RankRange:
    """Values ``low..high`` of one column, preceded by ``below`` smaller ones."""

    ranks: list[int]
    low: Any
    high: Any
    below: int
    count: int


def _select_ranks(
    query: Callable[[str, list[object]], list[_Row]],
    column: str,
    window: list[object],
    ranks: tuple[int, ...],
    settled: int,
    tuning: DuckDBTuning,
) -> dict[int, object]:
    """The values of ``column`` at 1-based ``ranks`` of ``settled`` among the window's records.

    Records committed since ``settled`` was counted make the window hold ``count`` values:
    rank ``k`` then selects the same fraction of them, ``ceil((k - 0.5) / settled * count)``,
    as nearest-rank selection does (and exactly ``k`` when nothing changed).
    """
    if not ranks:
        return {}
    if not all(1 <= k <= settled for k in ranks):
        raise ValueError(f"{column}: ranks {ranks} are outside 1..{settled}")
    integer = _RANK_COLUMNS[column]
    [(counted, low, high)] = query(_rank_range_sql(column), window)
    count = _int(counted)
    if count == 0:
        raise RuntimeError(f"{column}: the window lost its {settled} settled records")
    at = {k: ((2 * k - 1) * count + 2 * settled - 1) // (2 * settled) for k in ranks}
    found: dict[int, object] = {}
    pending = [_RankRange(sorted(set(at.values())), low, high, 0, count)]
    while pending:
        part = pending.pop()
        bounds = [*window, part.low, part.high]
        if part.low == part.high:
            found.update(dict.fromkeys(part.ranks, part.low))
        elif part.count <= tuning.rank_read_at_most:
            values = [value for (value,) in query(_rank_read_sql(column), bounds)]
            found.update({k: values[k - part.below - 1] for k in part.ranks})
        else:
            if integer:
                width: object = -(-(part.high - part.low + 1) // tuning.rank_bins)
            else:
                width = (part.high - part.low) / tuning.rank_bins or (part.high - part.low)
            before = part.below
            for _, in_bin, least, greatest in query(
                _rank_bins_sql(column, integer), [*bounds, width]
            ):
                in_bin = _int(in_bin)
                wanted = [k for k in part.ranks if before < k <= before + in_bin]
                if wanted:
                    pending.append(_RankRange(wanted, least, greatest, before, in_bin))
                before += in_bin
    return {k: found[position] for k, position in at.items()}


# By party keys, each list is its own query (one hash aggregate each: three scans of the
# window need less memory at once than one scan feeding three aggregates) and is cut after
# its first limit + DuckDBTuning.tied_at_most rows by amount; the rows tied with the
# limit-th are ordered by address in Python, once addresses are read back.


def _top_keys_sql(party_key: str) -> tuple[str, str, str]:
    """Routes, payers and payees by party key: (list, payer, payee, amount, count, extra)."""
    payer, payee = party_key.format("payer"), party_key.format("payee")
    ranked = f"FROM payment WHERE {_SETTLED_IN_WINDOW} GROUP BY {{}} ORDER BY 4 DESC LIMIT $3"
    return (
        f"SELECT 0, {payer}, {payee}, sum(amount_micro), count(*), NULL {ranked.format('2, 3')}",
        f"SELECT 1, {payer}, NULL, sum(amount_micro), count(*), max(time_ms) {ranked.format(2)}",
        f"SELECT 2, NULL, {payee}, sum(amount_micro), count(*), count(DISTINCT {payer}) "
        + ranked.format(3),
    )


def _party_names_sql(party_key: str) -> str:
    """(0 payer | 1 payee, key, address) of the window's parties whose key is in $3 | $4."""
    return " UNION ALL ".join(
        f"SELECT DISTINCT {i}, {party_key.format(column)}, {column} FROM payment "
        f"WHERE {_SETTLED_IN_WINDOW} AND {party_key.format(column)} IN "
        f"(SELECT unnest(${i + 3}::UBIGINT[]))"
        for i, column in enumerate(("payer", "payee"))
    )


_KeyedLists = tuple[list[_Row], list[_Row], list[_Row]]
"""Routes, payers and payees rows of :func:`_top_keys_sql`: the first ``limit`` and their ties."""


def _top_keys(
    query: Callable[[str, list[object]], list[_Row]],
    window: list[object],
    limit: int,
    tuning: DuckDBTuning,
) -> _KeyedLists | None:
    """The rows that may make ``window``'s top lists, by party key; None when more rows tie
    with the limit-th of a list than were fetched (the address-keyed query must decide)."""
    fetched = limit + tuning.tied_at_most
    sqls = _top_keys_sql(tuning.party_key)
    routes, payers, payees = (query(sql, [*window, fetched]) for sql in sqls)
    lists: _KeyedLists = (routes, payers, payees)
    for rows in lists:  # each by amount, descending
        if len(rows) >= limit:
            last = _int(rows[limit - 1][3])
            if len(rows) == fetched and _int(rows[-1][3]) == last:
                return None
            del rows[sum(1 for row in rows if _int(row[3]) >= last) :]
    return lists


def _party_names(
    query: Callable[[str, list[object]], list[_Row]],
    window: list[object],
    keyed: Iterable[_KeyedLists],
    party_key: str,
) -> tuple[dict[object, str], dict[object, str]]:
    """Payer and payee addresses by key, for every key in ``keyed`` (all in ``window``)."""
    wanted: tuple[set[object], set[object]] = (set(), set())
    for routes, payers, payees in keyed:
        for kind, payer, payee, *_ in routes + payers + payees:
            if kind != 2:
                wanted[0].add(payer)
            if kind != 1:
                wanted[1].add(payee)
    names: tuple[dict[object, str], dict[object, str]] = ({}, {})
    for side, key, name in query(_party_names_sql(party_key), [*window, *map(list, wanted)]):
        names[_int(side)][key] = _str(name)
    return names


def _named_top_lists(
    keyed: _KeyedLists, names: tuple[dict[object, str], dict[object, str]], limit: int
) -> TopLists:
    """The first ``limit`` of each keyed list, ties ordered by address."""
    routes, payers, payees = keyed
    payer_of, payee_of = names
    return TopLists(
        payers=[
            PayerTotals(payer_of[p], _int(a), _int(n), _int(last))
            for _, p, _, a, n, last in payers
        ],
        payees=[
            PayeeTotals(payee_of[q], _int(a), _int(n), _int(distinct))
            for _, _, q, a, n, distinct in payees
        ],
        routes=[
            RouteTotals(payer_of[p], payee_of[q], _int(a), _int(n)) for _, p, q, a, n, _ in routes
        ],
    ).first(limit)


# Address-keyed: one aggregation by (payer, payee) feeds the three lists, routes directly,
# payers and payees by summing it again (a payee's distinct payers are its pairs).
_TOP_LISTS_SQL = f"""
WITH pairs AS MATERIALIZED (
    SELECT payer, payee, sum(amount_micro) AS amount, count(*) AS n, max(time_ms) AS last
    FROM payment WHERE {_SETTLED_IN_WINDOW} GROUP BY payer, payee
)
(SELECT 0, payer, payee, amount, n, NULL FROM pairs
 ORDER BY amount DESC, payer, payee LIMIT $3)
UNION ALL
(SELECT 1, payer, NULL, sum(amount) AS total, sum(n), max(last) FROM pairs
 GROUP BY payer ORDER BY total DESC, payer LIMIT $3)
UNION ALL
(SELECT 2, payee, NULL, sum(amount) AS total, sum(n), count(*) FROM pairs
 GROUP BY payee ORDER BY total DESC, payee LIMIT $3)
"""

_POINT_IN_TIME_SQL = """
SELECT
    (SELECT count(*) FROM (
        SELECT payment_id FROM payment
        WHERE time_ms <= $1 AND status IN ('received', 'settled', 'failed')
        GROUP BY payment_id
        HAVING bool_or(status = 'received')
           AND NOT bool_or(status = 'settled' OR (status = 'failed' AND payment_id <> 'unknown'))
    )),
    (SELECT count FROM websocket WHERE time_ms <= $1 ORDER BY time_ms DESC, count DESC LIMIT 1)
"""


def _settled_counts_sql(spans: int) -> str:
    """Settled records per span (``$2`` narrowest ... ``$n`` widest), in one scan."""
    counts = ", ".join(f"count(*) FILTER (WHERE time_ms > $1 - ${i + 2})" for i in range(spans))
    return (
        f"SELECT {counts} FROM payment "
        f"WHERE status = 'settled' AND time_ms > $1 - ${spans + 1} AND time_ms <= $1"
    )


class DuckDBAnalyticsSource:
    """:class:`exporter.analytics.source.AnalyticsSource` over a :class:`DuckDBStore`."""

    def __init__(self, store: DuckDBStore, tuning: DuckDBTuning | None = None) -> None:
        """Query ``store`` (its ``payment``, ``batch``, ``revenue`` and ``websocket`` tables)."""
        self.store = store
        self.tuning = tuning or DuckDBTuning()
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._closed = False

    def _query_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    async def _run(self, work: Callable[[], _T]) -> _T:
        # One query at a time (see the module docstring), waiting without holding a thread.
        async with self._query_lock():
            if self._closed:
                raise StoreError(f"analytics of the DuckDB store {self.store.path} are closed")
            try:
                return await asyncio.to_thread(work)
            except duckdb.Error as error:
                raise StoreError(
                    f"DuckDB store {self.store.path} could not answer an analytics query: "
                    f"{type(error).__name__}: {error}"
                ) from error

    async def close(self) -> None:
        """Wait for the query in flight and answer no other; the store stays open."""
        async with self._query_lock():
            self._closed = True

    async def window_totals(self, at_ms: int, spans_ms: Sequence[int]) -> dict[int, WindowTotals]:
        """Per span: per-network counters and sums, second-half fees, revenue by kind."""
        edges = sorted(set(_edges(spans_ms)) | {s // 2 for s in spans_ms if s // 2 > 0})
        sql = _window_totals_sql(len(edges))
        rows = await self._run(lambda: self.store.query(sql, [at_ms, edges[-1], *edges[:-1]]))
        return _window_totals(rows, edges, spans_ms)

    async def settled_buckets(
        self, at_ms: int, spans_ms: Sequence[int], bucket_ms: int
    ) -> dict[int, list[BucketTotals]]:
        """Per span: settled records grouped by ``time_ms - time_ms % bucket_ms``."""
        if bucket_ms <= 0:
            raise ValueError(f"bucket_ms must be positive, got {bucket_ms}")
        edges = _edges(spans_ms)

        def work() -> list[_Row]:
            key = self.tuning.party_key
            by_key = _parties_distinct(self.store.query, at_ms, edges[-1], key)
            sql = _buckets_sql(len(edges), key if by_key else None)
            return self.store.query(sql, [at_ms, bucket_ms, edges[-1], *edges[:-1]])

        return _buckets(await self._run(work), edges, spans_ms)

    async def settled_order_values(
        self, at_ms: int, ranks: Mapping[int, RankRequest]
    ) -> dict[int, RankValues]:
        """Per span: settled amounts and settlement times at the requested ranks."""
        spans = _edges(list(ranks)) if ranks else []

        def work() -> dict[int, RankValues]:
            out: dict[int, RankValues] = {}
            previous: tuple[RankRequest, RankValues] | None = None
            for span in spans:  # narrowest first
                request = ranks[span]
                if not (request.amount or request.settlement):
                    out[span] = RankValues()
                    continue
                if previous is not None and previous[0] == request:
                    # Nested windows with as many settled records hold the same records.
                    out[span] = previous[1]
                    continue
                window: list[object] = [at_ms, span]
                query, n, tuning = self.store.query, request.settled, self.tuning
                amounts = _select_ranks(
                    query, "amount_micro", window, request.amount, n, tuning
                )
                times = _select_ranks(
                    query, "settlement_ms", window, request.settlement, request.timed_count, tuning
                )
                out[span] = RankValues(
                    amount={k: _int(v) for k, v in amounts.items()},
                    settlement={k: _float(v) for k, v in times.items()},
                )
                previous = (request, out[span])
            return out

        return await self._run(work)

    async def top_lists(
        self, at_ms: int, spans_ms: Sequence[int], limit: int
    ) -> dict[int, TopLists]:
        """Per span: the first ``limit`` payers, payees and routes (one scan per span)."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        spans = _edges(spans_ms)
        counts_sql = _settled_counts_sql(len(spans))

        def work() -> dict[int, TopLists]:
            query, tuning = self.store.query, self.tuning
            [counts] = query(counts_sql, [at_ms, *spans])
            by_key: bool | None = None  # checked over the widest window, when first needed
            answered: dict[int, TopLists] = {}
            keyed: dict[int, _KeyedLists] = {}
            answered_by: dict[int, int] = {}  # span -> the span whose lists it has
            previous_count, previous = 0, 0
            for span, count in zip(spans, counts, strict=True):  # narrowest first
                # Nested windows with as many settled records hold the same records.
                if _int(count) != previous_count:
                    if by_key is None:
                        by_key = _parties_distinct(query, at_ms, spans[-1], tuning.party_key)
                    keys = _top_keys(query, [at_ms, span], limit, tuning) if by_key else None
                    if keys is not None:
                        keyed[span] = keys
                    else:
                        answered[span] = _top_lists(query(_TOP_LISTS_SQL, [at_ms, span, limit]))
                    previous, previous_count = span, _int(count)
                answered_by[span] = previous
            if keyed:
                names = _party_names(
                    query, [at_ms, max(keyed)], keyed.values(), tuning.party_key
                )
                answered.update({s: _named_top_lists(k, names, limit) for s, k in keyed.items()})
            empty = TopLists([], [], [])
            return {span: answered.get(answered_by[span], empty) for span in spans}

        return await self._run(work)

    async def point_in_time(self, at_ms: int) -> PointInTime:
        """Pending payments and the latest WebSocket client count as of ``at_ms``."""
        [(pending, clients)] = await self._run(
            lambda: self.store.query(_POINT_IN_TIME_SQL, [at_ms])
        )
        return PointInTime(pending_payments=_int(pending), websocket_clients=_int(clients))


def _window_totals(
    rows: list[_Row], edges: list[int], spans: Sequence[int]
) -> dict[int, WindowTotals]:
    ring_of = {edge: i for i, edge in enumerate(edges)}
    sums: dict[tuple[str, int], NetworkSums] = defaultdict(NetworkSums)  # (network, ring)
    revenue: dict[tuple[str, int], int] = {}
    for tag, name, ring, count, received, settled, failed, a, b, c, timed in rows:
        key = (_str(name), _int(ring))
        if tag == "p":
            sums[key].add(
                NetworkSums(
                    events=_int(count), received=_int(received), settled=_int(settled),
                    failed=_int(failed), volume=_int(a), fees=_int(b), settlement_ms=_float(c),
                    timed=_int(timed),
                )
            )
        elif tag == "b":
            batches = NetworkSums(batches=_int(count), gas_used=_int(a), batch_payments=_int(b))
            sums[key].add(batches)
        else:
            revenue[key] = _int(a)

    out: dict[int, WindowTotals] = {}
    for span in spans:
        inside = ring_of[span]
        half = ring_of.get(span // 2, -1)
        networks: dict[str, NetworkSums] = defaultdict(NetworkSums)
        second_half = 0
        for (network, ring), ring_sums in sums.items():
            if ring <= inside:
                networks[network].add(ring_sums)
                if ring <= half:
                    second_half += ring_sums.fees
        kinds: dict[str, int] = defaultdict(int)
        for (kind, ring), amount in revenue.items():
            if ring <= inside:
                kinds[kind] += amount
        out[span] = WindowTotals(
            networks=[acc.totals(network) for network, acc in networks.items()],
            fees_second_half_micro=second_half,
            revenue_by_kind=dict(kinds),
        )
    return out


def _buckets(
    rows: list[_Row], edges: list[int], spans: Sequence[int]
) -> dict[int, list[BucketTotals]]:
    sums: dict[tuple[int, int], tuple[int, int, int]] = {}
    firsts: dict[tuple[int, int, int], int] = {}  # (kind, bucket, min ring) -> parties
    for kind, bucket, ring, count, volume, fees in rows:
        key = (_int(bucket), _int(ring))
        if kind == 0:
            sums[key] = (_int(count), _int(volume), _int(fees))
        else:
            firsts[(_int(kind), *key)] = _int(count)
    out: dict[int, list[BucketTotals]] = {}
    for span in spans:
        inside = edges.index(span)
        acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        for (bucket, ring), (count, volume, fees) in sums.items():
            if ring <= inside:
                a = acc[bucket]
                a[0] += count
                a[1] += volume
                a[2] += fees
        for (kind, bucket, ring), parties in firsts.items():
            if ring <= inside:
                acc[bucket][2 + kind] += parties
        out[span] = [
            BucketTotals(
                start_ms=bucket, settled=a[0], volume_micro=a[1], fees_micro=a[2],
                unique_payers=a[3], unique_payees=a[4],
            )
            for bucket, a in sorted(acc.items())
        ]
    return out


def _top_lists(rows: list[_Row]) -> TopLists:
    payers: list[PayerTotals] = []
    payees: list[PayeeTotals] = []
    routes: list[RouteTotals] = []
    for kind, first, second, amount, count, extra in rows:
        if kind == 0:
            routes.append(RouteTotals(_str(first), _str(second), _int(amount), _int(count)))
        elif kind == 1:
            payers.append(PayerTotals(_str(first), _int(amount), _int(count), _int(extra)))
        else:
            payees.append(PayeeTotals(_str(first), _int(amount), _int(count), _int(extra)))
    return TopLists(payers=payers, payees=payees, routes=routes)
