// State as of an instant: AnalyticsSource.point_in_time.
//
// params.bucket: string; params.start: the epoch; params.stop: at + 1 ms, so [start, stop)
// holds every point whose event millisecond is at or before at (see window_range in
// exporter/analytics_flux.py).
//
// Pending payments are the payment ids with a received record and no terminal one
// (settled, or failed with an id other than "unknown"). With R the received ids and T the
// terminal ids, |R - T| = |R + T| - |T|: two distinct counts over one table each, with no
// grouping per payment id.

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

// The WebSocket client count of the latest millisecond, the greatest count within it:
// per-millisecond maxima, then the last of them.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "websocket" and r._field == "count")
    |> aggregateWindow(every: 1ms, fn: max, createEmpty: false)
    |> last()
    |> yield(name: "websocket")
