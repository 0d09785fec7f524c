// Settled amounts and settlement times at given ranks of one window:
// AnalyticsSource.settled_order_values for one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics_flux.py); params.amount_ranks and
// params.settlement_ranks: 1-based ranks ([int]; [0] when none is wanted, rank 0 never
// matches).
//
// Rank k of n values is sorted(values)[k - 1]: every value of the window is sorted
// ascending in one table, numbered 1..n with a running sum, and the wanted numbers kept.
// Exact for integers and floats alike (no quantile estimate, no interpolation).

ranked = (field, ranks) =>
    from(bucket: params.bucket)
        |> range(start: params.start, stop: params.stop)
        |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
        |> filter(fn: (r) => r._field == field)
        |> group()
        |> keep(columns: ["_value"])
        |> sort(columns: ["_value"])
        |> map(fn: (r) => ({r with rank: 1}))
        |> cumulativeSum(columns: ["rank"])
        |> filter(fn: (r) => contains(value: r.rank, set: ranks))

ranked(field: "amount_micro", ranks: params.amount_ranks)
    |> yield(name: "amount")

ranked(field: "settlement_ms", ranks: params.settlement_ranks)
    |> yield(name: "settlement")
