// State as of an instant: AnalyticsSource.point_in_time.
//
// params.bucket: string; params.start, params.stop: the bounded look-back (at - look-back, at]
// as the half-open nanosecond range [start, stop) (see window_range and
// FluxAnalyticsSource.state_lookback_ms in exporter/analytics/flux.py). Nothing older than the
// look-back is read: the cost of this query is that of one window, however long the bucket's
// history grows.
//
// Pending payments are the payment ids with a received record in the look-back and no terminal
// one (settled, or failed with an id other than "unknown") at or before at. With R the received
// ids and T the terminal ids of the look-back, |R - T| = |R + T| - |T| (true of any two sets,
// so a terminal record whose received one is older than the look-back changes nothing): two
// distinct counts over one table each, with no grouping per payment id. A payment received
// before the look-back and never settled is not counted: it is no longer pending settlement
// but abandoned (the exporter's facilitator_pending_payments gauge, kept from its ledger,
// still counts it).

from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "payment_id")
    |> filter(
        fn: (r) =>
            r.status == "received" or r.status == "settled"
                or (r.status == "failed" and r._value != "unknown"),
    )
    |> group()
    |> distinct()
    |> count()
    |> yield(name: "ids")

from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "payment_id")
    |> filter(fn: (r) => r.status == "settled" or (r.status == "failed" and r._value != "unknown"))
    |> group()
    |> distinct()
    |> count()
    |> yield(name: "terminal_ids")

// The WebSocket client count of the latest millisecond in the look-back, the greatest count
// within it, in one pass: the accumulator keeps the latest millisecond seen and its maximum.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "websocket" and r._field == "count")
    |> group()
    |> reduce(
        identity: {ms: -1, _value: 0},
        fn: (r, accumulator) => {
            ms = int(v: r._time) / 1000000

            return
                if ms > accumulator.ms then
                    {ms: ms, _value: r._value}
                else if ms == accumulator.ms and r._value > accumulator._value then
                    {ms: ms, _value: r._value}
                else
                    accumulator
        },
    )
    |> yield(name: "websocket")
