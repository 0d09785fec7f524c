"""Realistic, deterministic x402 facilitator traffic for tests, benchmarks and demos.

:class:`Simulator` turns a :class:`SimulationConfig` into a stream of event dicts that
follow the input contract (docs/architecture.md) the way a busy facilitator would
produce them: Zipf-skewed payers and payees, log-normal amounts and latencies with a heavy
settlement tail, a few percent failures (some before a payment id exists), settlement
batches, revenue records, WebSocket client counts, and the delivery faults the exporter
must absorb (a ``settled`` delivered before its ``received``, identical re-deliveries).

Everything is derived from one ``random.Random(seed)`` and from the timestamps given by
the caller, so the same seed, parameters and call sequence give byte-identical events.
:func:`~exporter.cli.simulate_live.run_simulation` sends a live stream to a running
exporter over HTTP.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from ..events import round_half_even_div as _round_half_even_div

EventDict = dict[str, object]
"""One event as a JSON-ready dict: ``{"type": ..., "data": {...}}`` (plus ``id`` if enabled)."""

DAY_MS = 86_400_000

DEFAULT_NETWORKS: dict[str, float] = {
    "eip155:8453": 0.55,  # Base
    "eip155:84532": 0.10,  # Base Sepolia
    "eip155:42161": 0.12,  # Arbitrum
    "eip155:10": 0.08,  # Optimism
    "eip155:137": 0.10,  # Polygon
    "eip155:1": 0.05,  # Ethereum
}
"""Default share of payments per CAIP-2 network."""

# network -> (median settlement time ms, median gas sponsorship in USD)
_PROFILES: dict[str, tuple[float, float]] = {
    "eip155:8453": (2_000.0, 0.002),
    "eip155:84532": (2_000.0, 0.0005),
    "eip155:42161": (1_200.0, 0.003),
    "eip155:10": (2_000.0, 0.002),
    "eip155:137": (2_500.0, 0.004),
    "eip155:1": (14_000.0, 0.9),
    "eip155:43114": (2_000.0, 0.02),
}
_DEFAULT_PROFILE = (2_500.0, 0.005)

_UNKNOWN_ERRORS = (
    "invalid_payload: malformed X-PAYMENT header",
    "invalid_payment_requirements",
    "unsupported_scheme",
    "invalid_network",
    "invalid_x402_version",
)
_VERIFY_ERRORS = (
    "insufficient_funds",
    "invalid_exact_evm_payload_signature",
    "invalid_exact_evm_payload_authorization_valid_before",
    "invalid_exact_evm_payload_authorization_value",
    "invalid_exact_evm_payload_recipient_mismatch",
)
_SETTLE_ERRORS = (
    "settlement_failed: transaction reverted",
    "settlement_failed: nonce already used",
    "settlement_timeout: transaction not confirmed in 60s",
    "settlement_failed: rpc unavailable",
)
_PREMIUM_AMOUNTS = (9_990_000, 29_000_000, 99_000_000)

_MICRO = 1_000_000
_MIN_AMOUNT = 1_000  # 0.001 USD in micro-units
_MAX_AMOUNT = 100_000_000  # 100 USD
_VERIFY_CAP_MS = 5_000
_SETTLE_CAP_MS = 60_000
_BATCH_SETTLE_CAP_MS = 30_000

# heap actions
_EMIT = 0
_EMIT_COPY = 1
_SETTLE = 2
_BATCH_TIMER = 3
_WS_TIMER = 4


@dataclass
class SimulationConfig:
    """Every knob of the simulated facilitator; defaults give realistic mainnet-like traffic."""

    seed: int = 42
    networks: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_NETWORKS))
    """CAIP-2 network -> relative share of payments."""
    payers: int = 10_000
    payees: int = 500
    zipf_s: float = 1.1
    """Zipf exponent of payer and payee popularity (rank k has weight k^-s)."""
    failure_fraction: float = 0.03
    """Share of payment attempts that end in ``payment:failed``."""
    unknown_failure_share: float = 0.2
    """Share of failures that happen before a payment id exists (``paymentId: "unknown"``)."""
    unknown_network_fraction: float = 0.5
    """Share of those unknown failures that still name their network."""
    failed_network_fraction: float = 0.5
    """Share of other failures whose event repeats the network (optional field)."""
    settled_network_fraction: float = 0.5
    """Share of settlements whose event repeats the network (optional field)."""
    amount_median_usd: float = 0.05
    """Median payee list price; prices are log-normal, clipped to 0.001..100 USD."""
    amount_sigma: float = 1.6
    fixed_price_fraction: float = 0.75
    """Share of payments at the payee's list price; the rest vary log-normally around it."""
    fee_rate: float = 0.005
    """Facilitator fee as a fraction of the amount (rounded half to even to a micro-unit)."""
    verification_median_ms: float = 150.0
    verification_sigma: float = 0.35
    settlement_sigma: float = 0.45
    """Log-normal spread of settlement time around the network's median (Base ~2 s)."""
    settlement_tail_fraction: float = 0.03
    """Share of settlements in the slow tail (about 4-20x the median, capped at 60 s)."""
    settlement_batch_size: int = 25
    """A network's open batch is created once it holds this many settled payments..."""
    batch_max_wait_ms: int = 300_000
    """...or this long after its first payment settled, whichever comes first."""
    gas_sponsorship_fraction: float = 0.05
    """Share of settlements followed by a ``revenue:recorded`` gas sponsorship."""
    premium_fraction: float = 0.0005
    """Chance per payment attempt of a ``revenue:recorded`` premium subscription."""
    websocket_interval_ms: int = 60_000
    """Period of ``websocket:clients`` events (0: none)."""
    websocket_clients: int = 40
    """Mean the WebSocket client count wanders around."""
    out_of_order_fraction: float = 0.02
    """Share of settled payments delivered settled-first (then received and verified)."""
    duplicate_fraction: float = 0.01
    """Share of events delivered a second time, byte-identical, up to 30 s later."""
    diurnal_amplitude: float = 0.35
    """:meth:`Simulator.history` only: relative swing of the daily traffic cycle."""
    diurnal_peak_hour_utc: float = 15.0
    daily_growth: float = 0.01
    """:meth:`Simulator.history` only: traffic growth per day (0.01 = 1 %/day)."""
    event_ids: bool = False
    """Give every event a top-level producer ``id`` (dedup then keys on it)."""
    id_namespace: str = ""
    """Prefix of payment, batch and event ids, to keep separate runs apart."""

    def __post_init__(self) -> None:
        """Refuse settings that would produce invalid or meaningless traffic."""
        fractions = {
            "failure_fraction": self.failure_fraction,
            "unknown_failure_share": self.unknown_failure_share,
            "unknown_network_fraction": self.unknown_network_fraction,
            "failed_network_fraction": self.failed_network_fraction,
            "settled_network_fraction": self.settled_network_fraction,
            "fixed_price_fraction": self.fixed_price_fraction,
            "fee_rate": self.fee_rate,
            "settlement_tail_fraction": self.settlement_tail_fraction,
            "gas_sponsorship_fraction": self.gas_sponsorship_fraction,
            "premium_fraction": self.premium_fraction,
            "out_of_order_fraction": self.out_of_order_fraction,
            "duplicate_fraction": self.duplicate_fraction,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 0.0 <= self.diurnal_amplitude < 1.0:
            raise ValueError(
                f"diurnal_amplitude must be within [0, 1), got {self.diurnal_amplitude}"
            )
        if self.daily_growth <= -1.0:
            raise ValueError(f"daily_growth must be > -1, got {self.daily_growth}")
        if not self.networks or any(w <= 0 for w in self.networks.values()):
            raise ValueError("networks needs at least one network, every weight > 0")
        for name in ("payers", "payees", "settlement_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_max_wait_ms < 1 or self.websocket_interval_ms < 0:
            raise ValueError("batch_max_wait_ms must be >= 1 and websocket_interval_ms >= 0")
        if self.amount_median_usd <= 0 or self.zipf_s <= 0:
            raise ValueError("amount_median_usd and zipf_s must be > 0")


def _money(micro: int) -> str:
    """Render micro-units with 2 to 6 decimals: ``"1.50"``, ``"0.000125"``."""
    whole, fraction = divmod(micro, _MICRO)
    digits = f"{fraction:06d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{whole}.{digits}"


def _cumulative(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


class _Batch:
    __slots__ = ("serial", "count", "amount", "fees")

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.count = 0
        self.amount = 0
        self.fees = 0


class _Run:
    """The mutable state of one timeline: pending future events, open batches."""

    def __init__(self, sim: Simulator, websocket_start: int | None) -> None:
        self.cfg = sim.config
        self.rng = sim._rng
        self.heap: list[tuple[int, int, int, Any]] = []
        self.out: list[tuple[int, EventDict]] = []
        self.counter = itertools.count()
        self.batches: dict[str, _Batch] = {}
        self.batch_serial = 0
        self.last_anonymous: dict[str, int] = {}
        self.draining = False
        self.clock = 0  # time of the latest arrival or action processed
        self.pending_settles = 0
        self.ws_count = self.cfg.websocket_clients
        self.dup = self.cfg.duplicate_fraction
        if websocket_start is not None and self.cfg.websocket_interval_ms > 0:
            self.schedule(websocket_start, _WS_TIMER, None)

    def schedule(self, due: int, action: int, payload: Any) -> None:
        heapq.heappush(self.heap, (due, next(self.counter), action, payload))

    def emit(self, due: int, event: EventDict) -> None:
        rng = self.rng
        if self.cfg.event_ids:
            event["id"] = f"{self.cfg.id_namespace}evt_{rng.getrandbits(96):024x}"
        self.out.append((due, event))
        if rng.random() < self.dup:
            delay = min(int(math.exp(6.7 + 0.8 * rng.gauss(0.0, 1.0))), 30_000)
            copy = dict(event)
            copy["data"] = dict(event["data"])  # type: ignore[call-overload]
            self.schedule(due + delay, _EMIT_COPY, copy)

    def anonymous_ts(self, kind: str, ts: int) -> int:
        """Keep id-less events of one kind at distinct timestamps (their dedup key)."""
        last = self.last_anonymous.get(kind, -1)
        if ts <= last:
            ts = last + 1
        self.last_anonymous[kind] = ts
        return ts

    def process(self, due: int, action: int, payload: Any) -> None:
        if action == _EMIT:
            self.emit(due, payload)
        elif action == _EMIT_COPY:
            self.out.append((due, payload))
        elif action == _SETTLE:
            self.settle(due, payload)
        elif action == _BATCH_TIMER:
            network, serial = payload
            batch = self.batches.get(network)
            if batch is not None and batch.serial == serial:
                self.close_batch(due, network, batch)
        elif action == _WS_TIMER and not self.draining:
            self.websocket(due)

    def websocket(self, due: int) -> None:
        rng = self.rng
        target = self.cfg.websocket_clients
        drift = (target - self.ws_count) * 0.1 + rng.gauss(0.0, 1.5)
        self.ws_count = max(0, self.ws_count + round(drift))
        ts = self.anonymous_ts("ws", due)
        event: EventDict = {
            "type": "websocket:clients",
            "data": {"count": self.ws_count, "timestamp": ts},
        }
        self.emit(due, event)
        self.schedule(due + self.cfg.websocket_interval_ms, _WS_TIMER, None)

    def settle(self, due: int, payload: Any) -> None:
        settled, delayed, network, amount, fee, payment_id = payload
        self.pending_settles -= 1
        self.emit(due, settled)
        if delayed is not None:
            for event in delayed:
                self.emit(due, event)
        rng = self.rng
        cfg = self.cfg
        if rng.random() < cfg.gas_sponsorship_fraction:
            median = _PROFILES.get(network, _DEFAULT_PROFILE)[1]
            gas = max(1, int(median * _MICRO * math.exp(0.5 * rng.gauss(0.0, 1.0))))
            self.emit(
                due,
                {
                    "type": "revenue:recorded",
                    "data": {
                        "kind": "gas_sponsorship",
                        "amount": _money(gas),
                        "network": network,
                        "timestamp": due,
                        "paymentId": payment_id,
                    },
                },
            )
        batch = self.batches.get(network)
        if batch is None:
            self.batch_serial += 1
            batch = _Batch(self.batch_serial)
            self.batches[network] = batch
            self.schedule(due + cfg.batch_max_wait_ms, _BATCH_TIMER, (network, batch.serial))
        batch.count += 1
        batch.amount += amount
        batch.fees += fee
        if batch.count >= cfg.settlement_batch_size:
            self.close_batch(due, network, batch)
        if self.draining and self.pending_settles == 0:
            self.flush_batches(due)

    def flush_batches(self, due: int) -> None:
        """Close every open batch now: the run is over and nothing else will settle."""
        for network, batch in list(self.batches.items()):
            self.close_batch(due, network, batch)

    def close_batch(self, due: int, network: str, batch: _Batch) -> None:
        del self.batches[network]
        rng = self.rng
        batch_id = f"{self.cfg.id_namespace}batch_{rng.getrandbits(64):016x}"
        self.emit(
            due,
            {
                "type": "batch:created",
                "data": {
                    "batchId": batch_id,
                    "paymentCount": batch.count,
                    "totalAmount": _money(batch.amount),
                    "network": network,
                    "timestamp": due,
                },
            },
        )
        gas = (21_000 + 30_000 * batch.count) * (0.92 + 0.16 * rng.random())
        delay = min(int(2_500 * math.exp(0.5 * rng.gauss(0.0, 1.0))), _BATCH_SETTLE_CAP_MS)
        settled_at = due + max(delay, 200)
        self.schedule(
            settled_at,
            _EMIT,
            {
                "type": "batch:settled",
                "data": {
                    "batchId": batch_id,
                    "transaction": f"0x{rng.getrandbits(256):064x}",
                    "totalFees": _money(batch.fees),
                    "gasUsed": str(min(int(gas), 1_000_000)),
                    "timestamp": settled_at,
                },
            },
        )


class Simulator:
    """A seeded x402 facilitator: yields contract-valid events in delivery order."""

    def __init__(self, config: SimulationConfig | None = None) -> None:
        """Draw the payer/payee populations and per-payee prices from the seed."""
        self.config = cfg = config if config is not None else SimulationConfig()
        self._rng = rng = random.Random(cfg.seed)
        self._network_names = list(cfg.networks)
        self._network_cum = _cumulative([cfg.networks[n] for n in self._network_names])
        self.payers = [f"0x{rng.getrandbits(160):040x}" for _ in range(cfg.payers)]
        self.payees = [f"0x{rng.getrandbits(160):040x}" for _ in range(cfg.payees)]
        self._payer_cum = _cumulative([k**-cfg.zipf_s for k in range(1, cfg.payers + 1)])
        self._payee_cum = _cumulative([k**-cfg.zipf_s for k in range(1, cfg.payees + 1)])
        self._prices = [self._price(rng) for _ in range(cfg.payees)]
        self._fee_ppm = round(cfg.fee_rate * _MICRO)
        # fixed prices repeat: render them and their fees once
        self._price_text = [_money(p) for p in self._prices]
        self._price_fee = [_round_half_even_div(p * self._fee_ppm, _MICRO) for p in self._prices]
        self._price_fee_text = [_money(f) for f in self._price_fee]
        self._settle_median = {
            n: _PROFILES.get(n, _DEFAULT_PROFILE)[0] for n in self._network_names
        }

    def _price(self, rng: random.Random) -> int:
        """A payee's list price: log-normal, rounded to two significant digits."""
        cfg = self.config
        usd = cfg.amount_median_usd * math.exp(cfg.amount_sigma * rng.gauss(0.0, 1.0))
        micro = min(max(int(usd * _MICRO), _MIN_AMOUNT), _MAX_AMOUNT)
        step = int(10 ** max(len(str(micro)) - 2, 0))
        return min(max(round(micro / step) * step, _MIN_AMOUNT), _MAX_AMOUNT)

    def timeline(
        self, start_ms: int, payments: int | None, rate_per_s: float
    ) -> Iterator[tuple[int, EventDict]]:
        """Like :meth:`events`, each event paired with its delivery time (epoch ms).

        Delivery times never decrease. An event's own timestamp equals its delivery time
        except for out-of-order and duplicate deliveries (and, by a millisecond or so,
        for id-less events pushed apart so that their dedup keys differ).
        """
        return self._timeline(self._poisson(start_ms, payments, rate_per_s), start_ms)

    def events(self, start_ms: int, payments: int | None, rate_per_s: float) -> Iterator[EventDict]:
        """Events of ``payments`` attempts (None: endless) at ``rate_per_s``, in delivery order.

        Attempts arrive as a Poisson process starting at ``start_ms``. Every attempt ends
        in exactly one ``payment:settled`` or ``payment:failed``; after the last arrival,
        what is still in flight settles at its own time and open batches close once their
        last payment has settled, so a finite run is complete.
        """
        return map(itemgetter(1), self.timeline(start_ms, payments, rate_per_s))

    def history(self, payments: int, days: float, end_ms: int) -> Iterator[EventDict]:
        """``payments`` attempts spread over the ``days`` before ``end_ms``, for backfills.

        Arrivals follow a daily cycle (``diurnal_amplitude``, peak at
        ``diurnal_peak_hour_utc``) and a trend (``daily_growth``); exactly ``payments``
        arrivals fall in ``[end_ms - days, end_ms - tail)``, the tail being the longest a
        payment and its batch can stay in flight (``batch_max_wait_ms`` + 155 s, about
        8 minutes by default), so that every event timestamp lies in
        ``[end_ms - days, end_ms]``.
        """
        span_ms = int(days * DAY_MS)
        tail_ms = (
            _VERIFY_CAP_MS
            + _SETTLE_CAP_MS
            + self.config.batch_max_wait_ms
            + _BATCH_SETTLE_CAP_MS
            + 60_000
        )
        if span_ms <= 2 * tail_ms:
            raise ValueError(f"history needs more than {2 * tail_ms / 60_000:.0f} minutes")
        if payments < 0:
            raise ValueError("payments must be >= 0")
        start_ms = end_ms - span_ms
        arrivals = self._shaped_arrivals(start_ms, end_ms - tail_ms, payments)
        return map(itemgetter(1), self._timeline(arrivals, start_ms))

    def _poisson(self, start_ms: int, payments: int | None, rate_per_s: float) -> Iterator[float]:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        expo = self._rng.expovariate
        scale = 1000.0 / rate_per_s
        t = float(start_ms)
        counter = itertools.count() if payments is None else range(payments)
        for _ in counter:
            t += expo(1.0) * scale
            yield t

    def _intensity(self, t_ms: float, start_ms: int) -> float:
        cfg = self.config
        phase = ((t_ms % DAY_MS) / DAY_MS - cfg.diurnal_peak_hour_utc / 24.0) * 2.0 * math.pi
        daily = 1.0 + cfg.diurnal_amplitude * math.cos(phase)
        return daily * math.pow(1.0 + cfg.daily_growth, (t_ms - start_ms) / DAY_MS)

    def _shaped_arrivals(self, start_ms: int, stop_ms: int, payments: int) -> Iterator[float]:
        """Exactly ``payments`` Poisson arrivals in [start, stop) under the shaped intensity.

        Conditioned on their number, Poisson arrivals are uniform order statistics in
        cumulative-intensity space; those come from normalised exponential spacings
        (drawn twice from one sub-seed, so nothing is held in memory), then mapped back
        to time through a tabulated inverse of the cumulative intensity.
        """
        span = stop_ms - start_ms
        cell = max(60_000.0, span / 200_000)
        cells = max(1, math.ceil(span / cell))
        edges = [start_ms + min(k * cell, span) for k in range(cells + 1)]
        cum = [0.0]
        for k in range(cells):
            width = edges[k + 1] - edges[k]
            cum.append(cum[-1] + self._intensity(edges[k] + width / 2, start_ms) * width)
        total_intensity = cum[-1]
        sub_seed = self._rng.getrandbits(64)
        expo = random.Random(sub_seed).expovariate
        total = math.fsum(expo(1.0) for _ in range(payments + 1))
        expo = random.Random(sub_seed).expovariate
        acc = 0.0
        for _ in range(payments):
            acc += expo(1.0)
            x = acc / total * total_intensity
            k = min(bisect.bisect_right(cum, x) - 1, cells - 1)
            low, high = cum[k], cum[k + 1]
            frac = (x - low) / (high - low) if high > low else 0.0
            yield edges[k] + frac * (edges[k + 1] - edges[k])

    def _timeline(
        self, arrivals: Iterator[float], websocket_start: int | None
    ) -> Iterator[tuple[int, EventDict]]:
        run = _Run(self, websocket_start)
        heap, out, process = run.heap, run.out, run.process
        pop = heapq.heappop
        for t in arrivals:
            while heap and heap[0][0] <= t:
                due, _, action, payload = pop(heap)
                run.clock = due
                process(due, action, payload)
                if out:
                    yield from out
                    out.clear()
            run.clock = int(t)
            self._arrive(run, run.clock)
            yield from out
            out.clear()
        # The arrivals are over: complete what is in flight; open batches close as soon
        # as their last payment has settled instead of waiting for their timers.
        run.draining = True
        if run.pending_settles == 0:
            run.flush_batches(run.clock)
            yield from out
            out.clear()
        while heap:
            due, _, action, payload = pop(heap)
            run.clock = due
            process(due, action, payload)
            if out:
                yield from out
                out.clear()

    def _pick_network(self) -> str:
        cum = self._network_cum
        i = bisect.bisect_right(cum, self._rng.random() * cum[-1])
        return self._network_names[min(i, len(cum) - 1)]

    def _arrive(self, run: _Run, ts: int) -> None:
        """One payment attempt at ``ts``: emit what happens now, schedule the rest."""
        cfg = self.config
        rng = self._rng
        rand = rng.random
        gauss = rng.gauss
        ns = cfg.id_namespace
        if rand() < cfg.premium_fraction:
            at = run.anonymous_ts("premium", ts)
            amount = _PREMIUM_AMOUNTS[int(rand() * len(_PREMIUM_AMOUNTS))]
            run.emit(
                ts,
                {
                    "type": "revenue:recorded",
                    "data": {
                        "kind": "premium",
                        "amount": _money(amount),
                        "network": self._pick_network(),
                        "timestamp": at,
                    },
                },
            )
        outcome = rand()
        failure = cfg.failure_fraction
        if outcome < failure * cfg.unknown_failure_share:
            data: dict[str, object] = {
                "paymentId": "unknown",
                "error": _UNKNOWN_ERRORS[int(rand() * len(_UNKNOWN_ERRORS))],
                "timestamp": run.anonymous_ts("unknown", ts),
            }
            if rand() < cfg.unknown_network_fraction:
                data["network"] = self._pick_network()
            run.emit(ts, {"type": "payment:failed", "data": data})
            return
        network = self._pick_network()
        payer_cum, payee_cum = self._payer_cum, self._payee_cum
        payer = self.payers[
            min(bisect.bisect_right(payer_cum, rand() * payer_cum[-1]), len(payer_cum) - 1)
        ]
        payee_index = min(
            bisect.bisect_right(payee_cum, rand() * payee_cum[-1]), len(payee_cum) - 1
        )
        fixed = rand() < cfg.fixed_price_fraction
        if fixed:
            amount = self._prices[payee_index]
            amount_text = self._price_text[payee_index]
        else:
            amount = int(self._prices[payee_index] * math.exp(gauss(0.0, 1.0)))
            amount = min(max(amount, _MIN_AMOUNT), _MAX_AMOUNT)
            amount_text = _money(amount)
        payment_id = f"{ns}pay_{rng.getrandbits(96):024x}"
        received: EventDict = {
            "type": "payment:received",
            "data": {
                "paymentId": payment_id,
                "payer": payer,
                "payee": self.payees[payee_index],
                "amount": amount_text,
                "network": network,
                "timestamp": ts,
            },
        }
        verify_ms = int(
            cfg.verification_median_ms * math.exp(cfg.verification_sigma * gauss(0.0, 1.0))
        )
        verify_ms = min(max(verify_ms, 5), _VERIFY_CAP_MS)
        verified_at = ts + verify_ms
        settle_ms = self._settle_median[network] * math.exp(cfg.settlement_sigma * gauss(0.0, 1.0))
        if rand() < cfg.settlement_tail_fraction:
            settle_ms *= math.exp(1.4 + 0.8 * abs(gauss(0.0, 1.0)))
        settle_ms_int = min(max(int(settle_ms), 50), _SETTLE_CAP_MS)

        if outcome < failure:
            if rand() < 0.5:  # refused at verification: no verified event
                error = _VERIFY_ERRORS[int(rand() * len(_VERIFY_ERRORS))]
                failed_at = verified_at
            else:  # verified, then the settlement attempt failed
                error = _SETTLE_ERRORS[int(rand() * len(_SETTLE_ERRORS))]
                failed_at = verified_at + settle_ms_int
                run.schedule(verified_at, _EMIT, self._verified(payment_id, verify_ms, verified_at))
            failed_data: dict[str, object] = {
                "paymentId": payment_id,
                "error": error,
                "timestamp": failed_at,
            }
            if rand() < cfg.failed_network_fraction:
                failed_data["network"] = network
            run.emit(ts, received)
            run.schedule(failed_at, _EMIT, {"type": "payment:failed", "data": failed_data})
            return

        if fixed:
            fee = self._price_fee[payee_index]
            fee_text = self._price_fee_text[payee_index]
        else:
            fee = _round_half_even_div(amount * self._fee_ppm, _MICRO)
            fee_text = _money(fee)
        settled_at = verified_at + settle_ms_int
        settled_data: dict[str, object] = {
            "paymentId": payment_id,
            "transaction": f"0x{rng.getrandbits(256):064x}",
            "fee": fee_text,
            "settlementTime": settle_ms_int,
            "timestamp": settled_at,
        }
        if rand() < cfg.settled_network_fraction:
            settled_data["network"] = network
        settled: EventDict = {"type": "payment:settled", "data": settled_data}
        verified = self._verified(payment_id, verify_ms, verified_at)
        payload: tuple[Any, ...]
        if rand() < cfg.out_of_order_fraction:
            payload = (settled, (received, verified), network, amount, fee, payment_id)
        else:
            run.emit(ts, received)
            run.schedule(verified_at, _EMIT, verified)
            payload = (settled, None, network, amount, fee, payment_id)
        run.schedule(settled_at, _SETTLE, payload)
        run.pending_settles += 1

    @staticmethod
    def _verified(payment_id: str, verify_ms: int, at: int) -> EventDict:
        return {
            "type": "payment:verified",
            "data": {"paymentId": payment_id, "verificationTime": verify_ms, "timestamp": at},
        }


def encode_event(event: EventDict) -> bytes:
    """Compact JSON bytes of one event, as POSTed (and as one NDJSON line, sans newline)."""
    return json.dumps(event, separators=(",", ":")).encode()


def encode_ndjson(events: list[EventDict]) -> bytes:
    """An NDJSON body (one event per line, trailing newline) for ``application/x-ndjson``."""
    return b"".join(encode_event(e) + b"\n" for e in events)
