// Settled payments per UTC time bucket of one window: AnalyticsSource.settled_buckets for
// one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics/flux.py); params.every: the bucket width (1h or 1d).
//
// window() cuts epoch-aligned UTC buckets; a point of event millisecond t has its
// nanosecond timestamp in [t ms, t ms + 1 ms), so it falls in the bucket of t. The first
// bucket's _start may be clipped to params.start: the exporter floors every _start to the
// bucket width. Empty buckets produce no rows.

// Settled payments per (network, bucket).
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "payment_id")
    |> window(every: params.every)
    |> count()
    |> yield(name: "records")

// Volume and fees per (network, field, bucket): exact integer sums. Flux's int64 sum wraps
// silently past 2^63; each value is split at 10^9 and both parts summed (hi, lo), which the
// exporter adds up in Python integers (exact below 9.2 * 10^8 points per series and bucket).
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "amount_micro" or r._field == "fee_micro")
    |> window(every: params.every)
    |> reduce(
        identity: {hi: 0, lo: 0},
        fn: (r, accumulator) =>
            ({hi: accumulator.hi + r._value / 1000000000, lo: accumulator.lo + r._value % 1000000000}),
    )
    |> yield(name: "sums")

// Distinct payers and payees per bucket, across networks.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "payer" or r._field == "payee")
    |> group(columns: ["_field"])
    |> window(every: params.every)
    |> distinct()
    |> count()
    |> yield(name: "parties")
