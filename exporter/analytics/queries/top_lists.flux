// Top payers, payees and routes of one window: AnalyticsSource.top_lists for one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics/flux.py); params.limit: entries per list (int).
//
// One aggregation per (payer, payee) feeds the three lists: routes directly, payers and
// payees by adding it up again (a payee's distinct payers are its routes). Each list is
// ordered amount descending (sorted ascending on the negated amount), then by address
// ascending (Flux compares strings byte by byte: code point order), then cut to the limit.
//
// Cost, and why the limit cannot bound it: payer, payee and amount are fields (addresses are
// never tags: series cardinality), so no aggregate here can be pushed down to storage; the
// query reads the window's settled points (three fields each, joined by pivot) and holds one
// accumulator per distinct (payer, payee) pair. An exact top-k by total needs every key's
// total: a key outside the top after any prefix of the points can still enter it with the
// rest, so no key can be dropped before all points are read, whatever the limit. The limit
// bounds what is sorted last and what is sent back (3 x limit rows), not the aggregation.
// Figures at 1M payments in docs/flux-cost.md.
//
// Amounts are summed exactly: Flux's int64 addition wraps silently past 2^63, so each amount
// is split at 10^9 (hi = v / 10^9, lo = v % 10^9) and both parts are summed, then carried
// (lo back into 0 <= lo < 10^9) so that (hi, lo) orders as the amount does. The exporter
// reads hi * 10^9 + lo (exact below 9.2 * 10^8 payments per key).

// (hi, lo) with lo carried into [0, 10^9): the pair orders as hi * 10^9 + lo does.
carried = (tables=<-) =>
    tables
        |> map(
            fn: (r) =>
                ({r with
                    hi: r.hi + r.lo / 1000000000,
                    lo: r.lo % 1000000000,
                }),
        )
        |> map(fn: (r) => ({r with order_hi: 0 - r.hi, order_lo: 0 - r.lo}))

pairs =
    from(bucket: params.bucket)
        |> range(start: params.start, stop: params.stop)
        |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
        |> filter(fn: (r) => r._field == "amount_micro" or r._field == "payer" or r._field == "payee")
        |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
        |> group(columns: ["payer", "payee"])
        |> reduce(
            identity: {hi: 0, lo: 0, payments: 0, last_ms: 0},
            fn: (r, accumulator) => {
                ms = int(v: r._time) / 1000000

                return {
                    hi: accumulator.hi + r.amount_micro / 1000000000,
                    lo: accumulator.lo + r.amount_micro % 1000000000,
                    payments: accumulator.payments + 1,
                    last_ms: if ms > accumulator.last_ms then ms else accumulator.last_ms,
                }
            },
        )

pairs
    |> group()
    |> carried()
    |> sort(columns: ["order_hi", "order_lo", "payer", "payee"])
    |> limit(n: params.limit)
    |> yield(name: "routes")

pairs
    |> group(columns: ["payer"])
    |> reduce(
        identity: {hi: 0, lo: 0, payments: 0, last_ms: 0},
        fn: (r, accumulator) =>
            ({
                hi: accumulator.hi + r.hi,
                lo: accumulator.lo + r.lo,
                payments: accumulator.payments + r.payments,
                last_ms: if r.last_ms > accumulator.last_ms then r.last_ms else accumulator.last_ms,
            }),
    )
    |> group()
    |> carried()
    |> sort(columns: ["order_hi", "order_lo", "payer"])
    |> limit(n: params.limit)
    |> yield(name: "payers")

pairs
    |> group(columns: ["payee"])
    |> reduce(
        identity: {hi: 0, lo: 0, payments: 0, payers: 0},
        fn: (r, accumulator) =>
            ({
                hi: accumulator.hi + r.hi,
                lo: accumulator.lo + r.lo,
                payments: accumulator.payments + r.payments,
                payers: accumulator.payers + 1,
            }),
    )
    |> group()
    |> carried()
    |> sort(columns: ["order_hi", "order_lo", "payee"])
    |> limit(n: params.limit)
    |> yield(name: "payees")
