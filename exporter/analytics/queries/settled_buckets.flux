// Settled payments per UTC time bucket of one window: AnalyticsSource.settled_buckets for
// one span.
//
// params.bucket: string; params.start, params.stop: the window as [start, stop) (see
// window_range in exporter/analytics_flux.py); params.every: the bucket width (1h or 1d).
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

// Volume and fees per (network, field, bucket): integer sums.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "amount_micro" or r._field == "fee_micro")
    |> window(every: params.every)
    |> sum()
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
