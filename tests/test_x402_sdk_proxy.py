"""Proxy mode driven by the official x402 SDK, end to end, case by case (``x402_cases``).

Two twin facilitators run the SDK's own facilitator logic over in-memory chains built
alike (``x402_chain``), each served over HTTP (``x402_upstream_helpers``). The exporter
proxies the second. Every exchange of a case goes straight to the first twin and through
the proxy to the second, with the SDK's HTTP facilitator client or its resource server, so
the proxied answer must equal the direct one, and the two chains must end in the same
state. Then every metric the case touches and the analytics must have moved by exactly
what the case says, and nothing else may have moved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import AppClient, async_wait_until
from prometheus_client import CollectorRegistry
from x402.http import HTTPFacilitatorClient
from x402.schemas import SettleResponse, VerifyResponse
from x402.server import x402ResourceServer
from x402_cases import (
    CASES,
    FEE_BPS,
    MICRO,
    SVM_CASES,
    SVM_MINTS,
    Case,
    CaseRun,
    Concurrently,
    Counted,
    Exchange,
    Restart,
    ServerSettle,
    ServerVerify,
    Settle,
    Sign,
    Step,
    Verify,
    World,
    build_world,
    settled_by_payer,
)
from x402_svm_chain import SVM_CLIENT_WARNING, SolanaRpc
from x402_upstream_helpers import SdkFacilitatorServer, facilitator_client, resource_server

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.ingest.proxy import PROXY

NOW_S = float(int(time.time()))
"""The proxy's clock: every event an exporter process derives is stamped with this instant
plus a minute per restart before it."""
AT_MS = int(NOW_S * 1000) + 600_000
"""The instant the analytics are asked for (events of a case lie in its 1 h window)."""

_TRACKED_PREFIXES = (
    "facilitator_payments_total",
    "facilitator_volume_usd_total",
    "facilitator_fees_usd_total",
    "facilitator_settlement_duration_seconds_count",
    "facilitator_pending_payments",
    "x402_",
    "exporter_events_",
    "exporter_join_timeouts",
    "exporter_network_labels_overflow",
)
_UNTRACKED_SUFFIXES = ("_bucket", "_sum", "_created")

Series = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Twin:
    """One facilitator and the SDK clients that reach it (straight or through the proxy)."""

    world: World
    client: HTTPFacilitatorClient
    server: x402ResourceServer


class Exporter:
    """The exporter in proxy mode, restartable on its data directory.

    Each process has its own registry, where counters start at zero as in a new process;
    a metric's change over a case is the sum of its changes within each process.
    """

    def __init__(
        self,
        settings: Settings,
        start_app: Callable[[web.Application], Awaitable[AppClient]],
        proxied: Twin,
    ) -> None:
        self.settings = settings
        self.start_app = start_app
        self.proxied = proxied
        self.app_client: AppClient | None = None
        self.registry = CollectorRegistry()
        self.finished: list[dict[Series, float]] = []
        self.started_at: dict[Series, float] = {}

    @property
    def client(self) -> AppClient:
        """The running process's HTTP client."""
        assert self.app_client is not None
        return self.app_client

    async def start(self) -> None:
        """Start a process, point the proxied twin's SDK clients at it, note its metrics."""
        generation = len(self.finished)
        self.registry = CollectorRegistry()
        self.app_client = await self.start_app(create_app(self.settings, self.registry))
        self.app_client.app[PROXY].clock = lambda: NOW_S + 60 * generation
        await self.proxied.client.aclose()
        self.proxied.client = facilitator_client(_url(self.app_client.server))
        self.proxied.server = await resource_server(self.proxied.client)
        self.started_at = _metrics(self.registry)

    async def restart(self) -> None:
        """Stop the process once its recordings are committed, then start another."""
        await self.quiesce()
        self.finished.append(_deltas(self.started_at, _metrics(self.registry)))
        await self.client.close()
        await self.start()

    async def quiesce(self) -> None:
        """Every derived event committed and shipped to the store."""
        await self.client.app[PROXY].drain()
        ledger = self.client.app[COMMITTER].ledger

        async def shipped() -> bool:
            return bool(ledger.backlog == 0)

        await async_wait_until(shipped, what="the store caught up with the ledger")

    def metric_deltas(self) -> dict[Series, float]:
        """Every tracked metric's change since the first start, over all processes."""
        total: dict[Series, float] = {}
        for deltas in [*self.finished, _deltas(self.started_at, _metrics(self.registry))]:
            for key, value in deltas.items():
                total[key] = total.get(key, 0.0) + value
        return {key: value for key, value in total.items() if value != 0}


Serve = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def started(
    aiohttp_server: Serve,
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    data_dir: Path,
) -> AsyncIterator[tuple[Twin, Twin, Exporter, str]]:
    """(direct twin, proxied twin, exporter, Solana RPC URL): facilitators up, SDK clients
    ready."""
    direct_world, proxied_world = build_world(), build_world()
    direct_upstream = await aiohttp_server(_facilitator_app(direct_world), port=0)
    proxied_upstream = await aiohttp_server(_facilitator_app(proxied_world), port=0)
    rpc = await aiohttp_server(SolanaRpc(list(SVM_MINTS.values())).app(), port=0)
    settings = Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        upstream_facilitator=_url(proxied_upstream),
        proxy_fee_bps=FEE_BPS,
        store_flush_interval_seconds=0,  # ship each commit at once: the case waits for it
    )
    direct_client = facilitator_client(_url(direct_upstream))
    direct = Twin(direct_world, direct_client, await resource_server(direct_client))
    # Pointed at the exporter by Exporter.start.
    unstarted = facilitator_client(_url(proxied_upstream))
    proxied = Twin(proxied_world, unstarted, x402ResourceServer(unstarted))
    exporter = Exporter(settings, aiohttp_client, proxied)
    await exporter.start()
    yield direct, proxied, exporter, _url(rpc)
    await direct_client.aclose()
    await proxied.client.aclose()


def _facilitator_app(world: World) -> web.Application:
    return SdkFacilitatorServer(world.facilitator()).app()


def _url(server: Any) -> str:
    return str(server.make_url("")).rstrip("/")


def _params() -> Iterator[Any]:
    for case in (*CASES, *SVM_CASES):
        yield pytest.param(case, id=case.name)


@pytest.mark.filterwarnings(SVM_CLIENT_WARNING)
@pytest.mark.parametrize("case", list(_params()))
async def test_case_through_the_proxy(
    case: Case, started: tuple[Twin, Twin, Exporter, str]
) -> None:
    direct, proxied, exporter, svm_rpc_url = started
    analytics_before = await _analytics(exporter.client)
    run = CaseRun([direct.world, proxied.world], svm_rpc_url)
    for step in case.steps:
        await _perform(step, run, direct, proxied, exporter)
    await exporter.quiesce()

    assert proxied.world.state() == direct.world.state()
    assert _shown(exporter.metric_deltas()) == _shown(_expected_metrics(case))
    analytics_after = await _analytics(exporter.client)
    assert _analytics_deltas(analytics_before, analytics_after) == _expected_analytics(case)


async def _perform(
    step: Step, run: CaseRun, direct: Twin, proxied: Twin, exporter: Exporter
) -> None:
    if isinstance(step, Sign):
        await run.sign(step)
    elif isinstance(step, Restart):
        await exporter.restart()
    elif isinstance(step, Concurrently):
        await asyncio.gather(
            *(_in_order(group, run, direct, proxied, exporter) for group in step.groups)
        )
    elif isinstance(step, Verify | Settle | ServerVerify | ServerSettle):
        straight = await _exchange(step, run, direct)
        through_proxy = await _exchange(step, run, proxied)
        assert through_proxy == straight, f"{step}: the proxy changed the answer"
        assert straight[0] == step.expect, f"{step}: {straight}"
    else:
        run.apply(step)


async def _in_order(
    steps: tuple[Step, ...], run: CaseRun, direct: Twin, proxied: Twin, exporter: Exporter
) -> None:
    for step in steps:
        await _perform(step, run, direct, proxied, exporter)


async def _exchange(step: Exchange, run: CaseRun, twin: Twin) -> tuple[str, Any]:
    """(summary, full answer) of one exchange; an error status is the client's message."""
    payment = run.payments[step.label]
    payload, requirements = payment.payload, payment.requirements
    try:
        if isinstance(step, Verify):
            answer: VerifyResponse | SettleResponse = await twin.client.verify(
                payload, requirements
            )
        elif isinstance(step, Settle):
            answer = await twin.client.settle(payload, requirements)
        elif isinstance(step, ServerVerify):
            answer = (await twin.server.verify_payment(payload, requirements)).verify
        else:
            answer = await twin.server.settle_payment(payload, requirements)
    except ValueError as error:  # the SDK client's "Facilitator verify failed (500): ..."
        status = str(error).partition("(")[2].partition(")")[0]
        return (f"http {status}", str(error))
    if isinstance(answer, VerifyResponse):
        return ("valid" if answer.is_valid else str(answer.invalid_reason), answer)
    return ("settled" if answer.success else str(answer.error_reason), answer)


def _metrics(registry: CollectorRegistry) -> dict[Series, float]:
    samples: dict[Series, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(_UNTRACKED_SUFFIXES):
                continue
            if sample.name.startswith(_TRACKED_PREFIXES):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _deltas(before: dict[Series, float], after: dict[Series, float]) -> dict[Series, float]:
    deltas = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in before.keys() | after}
    return {key: delta for key, delta in deltas.items() if delta != 0}


def _shown(deltas: dict[Series, float]) -> dict[str, float]:
    """``name{label=value,...}``: change, rounded past float noise, for readable diffs."""
    return {
        name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels)) + "}": round(value, 9)
        for (name, labels), value in deltas.items()
    }


def _series(name: str, **labels: str) -> Series:
    return (name, frozenset(labels.items()))


def _expected_metrics(case: Case) -> dict[Series, float]:
    expected: dict[Series, float] = {}

    def add(key: Series, value: float) -> None:
        if value:
            expected[key] = expected.get(key, 0.0) + value

    for counted in case.counted:
        net = counted.network
        add(_series("facilitator_payments_total", network=net, status="success"), counted.settled)
        add(_series("facilitator_payments_total", network=net, status="failed"), counted.failed)
        add(_series("facilitator_volume_usd_total", network=net), float(counted.volume))
        add(_series("facilitator_fees_usd_total", network=net), float(counted.fees))
        add(_series("facilitator_settlement_duration_seconds_count", network=net), counted.settled)
        add(_series("facilitator_pending_payments", network=net), counted.pending)
        for kind in ("received", "verified", "settled", "failed"):
            add(
                _series("exporter_events_received_total", type=f"payment:{kind}"),
                getattr(counted, kind),
            )
    for (endpoint, outcome, network), count in case.requests.items():
        add(
            _series(
                "x402_facilitator_requests_total",
                endpoint=endpoint,
                outcome=outcome,
                network=network,
                scheme="exact",
            ),
            count,
        )
        add(_series("x402_facilitator_request_duration_seconds_count", endpoint=endpoint), count)
    for reason, count in case.recording_failures.items():
        add(_series("x402_proxy_recording_failures_total", reason=reason), count)
    add(_series("exporter_events_duplicate_total"), case.proxy_duplicates)
    add(_series("exporter_events_rejected_total", reason="conflict"), case.conflicts)
    return expected


async def _analytics(exporter: AppClient) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for name in ("payments", "networks", "realtime", "top/payers"):
        response = await exporter.get(f"/v1/analytics/{name}?window=1h&at={AT_MS}&limit=1000")
        assert response.status == 200, await response.text()
        answers[name] = await response.json()
    return answers


_PAYMENT_FIELDS = ("totalPayments", "successfulPayments", "failedPayments")
_MONEY_FIELDS = ("totalVolume", "totalFees")


def _analytics_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Changes of the counts and sums the cases move (zero changes left out)."""
    deltas: dict[str, Any] = {}
    for name in _PAYMENT_FIELDS:
        deltas[f"payments.{name}"] = after["payments"][name] - before["payments"][name]
    for name in _MONEY_FIELDS:
        change = Decimal(after["payments"][name]) - Decimal(before["payments"][name])
        deltas[f"payments.{name}"] = change
    pending = after["realtime"]["pendingSettlements"] - before["realtime"]["pendingSettlements"]
    deltas["realtime.pendingSettlements"] = pending
    old = {entry["chainId"]: entry for entry in before["networks"]}
    for entry in after["networks"]:
        previous = old.get(entry["chainId"], {})
        chain = entry["chainId"]
        payments = entry["totalPayments"] - previous.get("totalPayments", 0)
        deltas[f"networks.{chain}.totalPayments"] = payments
        for name in _MONEY_FIELDS:
            change = Decimal(entry[name]) - Decimal(previous.get(name, "0"))
            deltas[f"networks.{chain}.{name}"] = change
    paid_before = {entry["address"]: entry for entry in before["top/payers"]}
    for entry in after["top/payers"]:
        previous = paid_before.get(entry["address"], {"paymentCount": 0, "totalPaid": "0"})
        count = entry["paymentCount"] - previous["paymentCount"]
        paid = Decimal(entry["totalPaid"]) - Decimal(previous["totalPaid"])
        if count or paid:
            deltas[f"top/payers.{entry['address']}"] = (count, paid)
    return {key: value for key, value in deltas.items() if value}


def _expected_analytics(case: Case) -> dict[str, Any]:
    def total(field: str) -> int:
        return sum(int(getattr(counted, field)) for counted in case.counted)

    volume = sum((Decimal(c.volume) for c in case.counted), Decimal(0))
    fees = sum((c.fees for c in case.counted), Decimal(0))
    expected: dict[str, Any] = {
        "payments.totalPayments": total("received"),
        "payments.successfulPayments": total("settled"),
        "payments.failedPayments": total("failed"),
        "payments.totalVolume": volume.quantize(Decimal("0.000001")),
        "payments.totalFees": fees.quantize(Decimal("0.000001")),
        "realtime.pendingSettlements": total("pending"),
    }
    for counted in case.counted:
        expected.update(_network_expectation(counted))
    for address, (count, paid) in settled_by_payer(case).items():
        expected[f"top/payers.{address}"] = (count, paid.quantize(MICRO))
    return {key: value for key, value in expected.items() if value}


def _network_expectation(counted: Counted) -> dict[str, Any]:
    chain = counted.network
    return {
        f"networks.{chain}.totalPayments": counted.received,
        f"networks.{chain}.totalVolume": Decimal(counted.volume).quantize(Decimal("0.000001")),
        f"networks.{chain}.totalFees": counted.fees.quantize(Decimal("0.000001")),
    }
