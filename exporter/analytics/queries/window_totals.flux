// Raw totals of one analytics window: AnalyticsSource.window_totals for one span.
//
// params.bucket: string; params.start, params.stop: the window (at - span, at] in event
// milliseconds as the half-open nanosecond range [start, stop) (see window_range in
// exporter/analytics/flux.py); params.half_start: start of the second half
// (at - span / 2, at] the same way.
//
// Counts and the float sum are bare aggregates per series, which InfluxDB pushes down to its
// storage engine. Series are split by tags (network, status, kind); the exporter adds them up.
//
// Money never wraps: Flux sums int64 values and wraps silently past 2^63 (9.2 trillion token
// units; one amount may have 12 integer digits, 10^18 micro-units). exactSum splits each
// value v at 10^9 into v / 10^9 and v % 10^9 and sums both parts (hi and lo columns); the
// exporter adds hi * 10^9 + lo in Python integers. Exact while a series holds fewer than
// 9.2 * 10^8 points in the window (each part is below 10^10 in magnitude), whatever the
// amounts. The price: these sums run in the query engine rather than in storage. Gas and
// batch payment counts are plain int64 sums: exact up to 9.2 * 10^18 gas in a window.

exactSum = (tables=<-) =>
    tables
        |> reduce(
            identity: {hi: 0, lo: 0},
            fn: (r, accumulator) =>
                ({
                    hi: accumulator.hi + r._value / 1000000000,
                    lo: accumulator.lo + r._value % 1000000000,
                }),
        )

// Payment records of every status, counted per (network, status): payment_id is the one
// field every payment point carries.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r._field == "payment_id")
    |> count()
    |> yield(name: "records")

// Settled payments: volume and fees (exact integer sums) per network.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "amount_micro" or r._field == "fee_micro")
    |> exactSum()
    |> yield(name: "settled")

// Settled payments: settlement time (float) per network.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "settlement_ms")
    |> sum()
    |> yield(name: "settlement")

// Settled payments with a settlement time (settlementTime is optional), per network.
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "settlement_ms")
    |> count()
    |> yield(name: "settlement_count")

// Fees of the payments settled in the second half of the window (growth rate).
from(bucket: params.bucket)
    |> range(start: params.half_start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == "payment" and r.status == "settled")
    |> filter(fn: (r) => r._field == "fee_micro")
    |> exactSum()
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
    |> exactSum()
    |> yield(name: "revenue")
