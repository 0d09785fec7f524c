// Settled amounts and settlement times at given ranks of one window:
// AnalyticsSource.settled_order_values for one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics/flux.py); params.settled: the settled count n0 the
// amount ranks refer to (int, at least 1); params.timed: the count of settled records with
// a settlement time the settlement ranks refer to (int, at least 1); params.amount_ranks and
// params.settlement_ranks: 1-based ranks into those ([int]; [0] when none is wanted, rank 0
// never matches).
//
// Ranks are computed within this query, over the values this very read returns, so records
// written while it runs (or since n0 was counted) cannot shift them: every value of the
// window is sorted ascending in one table and numbered 1..n with a running sum, then
// numbered again from the top (sorted descending, ties in reverse), so each row knows the
// count n its read saw (rank + from_top - 1). Rank k of n0 selects position
// ceil((k - 0.5) / n0 * n) of the n values (exactly k when n = n0), as the DuckDB source
// does; each kept row carries its position and n, and the exporter maps them back to k.
// Exact for integers and floats alike (no quantile estimate, no interpolation). Cost: one
// read of the field over the window and two sorts of it (see docs/flux-cost.md).

import "array"

// Position of rank k of n0 among n values (integer arithmetic, as the exporter).
positions = (ranks, n0, n) =>
    array.map(
        arr: ranks,
        fn: (x) => ((2 * x - 1) * n + 2 * n0 - 1) / (2 * n0),
    )

ranked = (field, ranks, n0) =>
    from(bucket: params.bucket)
        |> range(start: params.start, stop: params.stop)
        |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
        |> filter(fn: (r) => r._field == field)
        |> group()
        |> keep(columns: ["_value"])
        |> sort(columns: ["_value"])
        |> map(fn: (r) => ({r with rank: 1, from_top: 1}))
        |> cumulativeSum(columns: ["rank"])
        |> sort(columns: ["_value", "rank"], desc: true)
        |> cumulativeSum(columns: ["from_top"])
        |> map(fn: (r) => ({_value: r._value, rank: r.rank, n: r.rank + r.from_top - 1}))
        |> filter(fn: (r) => contains(value: r.rank, set: positions(ranks: ranks, n0: n0, n: r.n)))

ranked(field: "amount_micro", ranks: params.amount_ranks, n0: params.settled)
    |> yield(name: "amount")

ranked(field: "settlement_ms", ranks: params.settlement_ranks, n0: params.timed)
    |> yield(name: "settlement")
