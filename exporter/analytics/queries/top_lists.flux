// Top payers, payees and routes of one window: AnalyticsSource.top_lists for one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics_flux.py); params.limit: entries per list (int).
//
// One aggregation per (payer, payee) feeds the three lists: routes directly, payers and
// payees by adding it up again (a payee's distinct payers are its routes). Each list is
// ordered amount descending (sorted ascending on the negated amount), then by address
// ascending (Flux compares strings byte by byte: code point order), then cut to the limit.

pairs =
    from(bucket: params.bucket)
        |> range(start: params.start, stop: params.stop)
        |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
        |> filter(fn: (r) => r._field == "amount_micro" or r._field == "payer" or r._field == "payee")
        |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
        |> group(columns: ["payer", "payee"])
        |> reduce(
            identity: {amount: 0, payments: 0, last_ms: 0},
            fn: (r, accumulator) => {
                ms = int(v: r._time) / 1000000

                return {
                    amount: accumulator.amount + r.amount_micro,
                    payments: accumulator.payments + 1,
                    last_ms: if ms > accumulator.last_ms then ms else accumulator.last_ms,
                }
            },
        )

pairs
    |> group()
    |> map(fn: (r) => ({r with order: 0 - r.amount}))
    |> sort(columns: ["order", "payer", "payee"])
    |> limit(n: params.limit)
    |> yield(name: "routes")

pairs
    |> group(columns: ["payer"])
    |> reduce(
        identity: {amount: 0, payments: 0, last_ms: 0},
        fn: (r, accumulator) =>
            ({
                amount: accumulator.amount + r.amount,
                payments: accumulator.payments + r.payments,
                last_ms: if r.last_ms > accumulator.last_ms then r.last_ms else accumulator.last_ms,
            }),
    )
    |> group()
    |> map(fn: (r) => ({r with order: 0 - r.amount}))
    |> sort(columns: ["order", "payer"])
    |> limit(n: params.limit)
    |> yield(name: "payers")

pairs
    |> group(columns: ["payee"])
    |> reduce(
        identity: {amount: 0, payments: 0, payers: 0},
        fn: (r, accumulator) =>
            ({
                amount: accumulator.amount + r.amount,
                payments: accumulator.payments + r.payments,
                payers: accumulator.payers + 1,
            }),
    )
    |> group()
    |> map(fn: (r) => ({r with order: 0 - r.amount}))
    |> sort(columns: ["order", "payee"])
    |> limit(n: params.limit)
    |> yield(name: "payees")
