// Raw totals of one analytics window: AnalyticsSource.window_totals for one span.
//
// params.bucket: string; params.start, params.stop: the window (at - span, at] in event
// milliseconds as the half-open nanosecond range [start, stop) (see window_range in
// exporter/analytics_flux.py); params.half_start: start of the second half
// (at - span / 2, at] the same way.
//
// Every branch is range |> filter |> one bare aggregate per series, which InfluxDB pushes
// down to its storage engine. Series are split by tags (network, status, kind); the
// exporter adds them up. Integer fields sum to integers: money stays exact.

// Payment records of every status, counted per (network, status): payment_id is the one
// field every payment point carries.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "payment_id")
    |> count()
    |> yield(name: "records")

// Settled payments: volume, fees (integers) and settlement time (float) per network.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(
        fn: (r) => r._field == "amount_micro" or r._field == "fee_micro" or r._field == "settlement_ms",
    )
    |> sum()
    |> yield(name: "settled")

// Fees of the payments settled in the second half of the window (growth rate).
from(bucket: params.bucket)
    |> range(start: params.half_start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "fee_micro")
    |> sum()
    |> yield(name: "second_half")

// Settled batches per network: how many, and their gas and payment counts.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "batch" and r.status == "settled")
    |> filter(fn: (r) => r._field == "batch_id")
    |> count()
    |> yield(name: "batches")

from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "batch" and r.status == "settled")
    |> filter(fn: (r) => r._field == "gas_used" or r._field == "payment_count")
    |> sum()
    |> yield(name: "gas")

// Revenue beyond facilitator fees, per (kind, network).
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "revenue" and r._field == "amount_micro")
    |> sum()
    |> yield(name: "revenue")
