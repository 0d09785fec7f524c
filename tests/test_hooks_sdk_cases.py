"""Every case of the SDK suite (tests/x402_cases.py) driven through the SDK facilitator's own
``verify``/``settle`` with the hooks attached, delivering to a real exporter: the first half
with the exporter up, each case's metric deltas exact; the second half with the exporter
stopped, then restarted and the spool flushed, the restarted exporter's counters exactly
the second half's; the analytics exactly every case; every event once. The Solana cases
run the same way over the in-memory SPL ledger, each case's deltas exact."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import ExporterProcess, LabelSet, http_request, sample_values
from aiohttp.test_utils import TestServer
from conftest import free_port, wait_until
from hooks_helpers import start_on
from prometheus_client import CollectorRegistry
from x402.schemas import SchemeNotFoundError
from x402_cases import (
    CASES,
    FEE_BPS,
    SVM_CASES,
    SVM_MINTS,
    Case,
    CaseRun,
    Concurrently,
    DelayReceipt,
    Drain,
    FailBroadcast,
    Fund,
    Restart,
    ServerSettle,
    ServerVerify,
    Settle,
    Sign,
    Verify,
    World,
    build_chains,
    build_world,
)
from x402_svm_chain import SVM_CLIENT_WARNING, SolanaRpc

from exporter.hooks import HookAttachment, SenderLimits, attach_x402_facilitator

pytestmark = pytest.mark.slow

FAST = SenderLimits(idle_seconds=0.02, backoff_base=0.05, backoff_cap=0.3, request_timeout=5.0)
SERIES = (
    "facilitator_payments_total",
    "facilitator_volume_usd_total",
    "facilitator_fees_usd_total",
    "facilitator_settlement_duration_seconds_count",
    "facilitator_pending_payments",
    "exporter_events_received_total",
    "exporter_events_duplicate_total",
    "exporter_events_rejected_total",
)
Series = tuple[str, LabelSet]


class Facilitator:
    """The facilitator process of the hooks' side: the SDK facilitator over the chains,
    the hooks attached, restartable on the same spool."""

    def __init__(self, url: str, spool: Path, *, solana: bool = False) -> None:
        self.url, self.spool, self.solana = url, spool, solana
        self.world = self._world()
        self.facilitator = self.world.facilitator()
        self.attachments: list[HookAttachment] = []
        self.attach()

    def _world(self) -> World:
        return build_world() if self.solana else World(build_chains())

    def new_world(self) -> World:
        """A fresh world (each case starts from its own) and an SDK facilitator over it,
        attached to the same hooks."""
        self.world = self._world()
        self.facilitator = self.world.facilitator()
        self.attachment.attach(self.facilitator)
        return self.world

    def attach(self) -> None:
        """A new attachment on the same spool, on the current facilitator."""
        self.attachment = attach_x402_facilitator(
            self.facilitator,
            url=self.url,
            spool_dir=self.spool,
            fee_bps=FEE_BPS,
            registry=CollectorRegistry(),
            limits=FAST,
        )
        self.attachments.append(self.attachment)

    def restart(self) -> None:
        """The process goes away (nothing delivered on the way out) and comes back with a
        new SDK facilitator over the same chains."""
        self.attachment.close(0.0)
        self.facilitator = self.world.facilitator()
        self.attach()

    def unrecorded(self) -> Tally[str]:
        """x402_exporter_hook_unrecorded_total by reason, over every attachment so far."""
        tally: Tally[str] = Tally()
        for attachment in self.attachments:
            for reason in ("unparseable", "unknown_network", "unknown_asset"):
                labels = {"reason": reason}
                name = "x402_exporter_hook_unrecorded_total"
                tally[reason] += int(attachment.registry.get_sample_value(name, labels) or 0)
        return +tally

    def delivered(self) -> bool:
        """Whether the spool holds nothing undelivered."""
        return self.attachment.spool.undelivered() == 0


async def drive(case: Case, run: CaseRun, side: Facilitator) -> None:
    """Run the case's steps against the facilitator (checking each answer)."""
    for step in case.steps:
        if isinstance(step, Fund | Drain | DelayReceipt | FailBroadcast):
            run.apply(step)
        elif isinstance(step, Sign):
            await run.sign(step)
        elif isinstance(step, Restart):
            side.restart()
        elif isinstance(step, Concurrently):
            await asyncio.gather(*(in_order(group, run, side) for group in step.groups))
        else:
            await exchange(step, run, side)


async def in_order(steps: tuple[Any, ...], run: CaseRun, side: Facilitator) -> None:
    """One group of a ``Concurrently`` step."""
    for step in steps:
        if isinstance(step, Sign):
            await run.sign(step)
        else:
            await exchange(step, run, side)


async def exchange(
    step: Verify | Settle | ServerVerify | ServerSettle, run: CaseRun, side: Facilitator
) -> None:
    """One verify or settle through the facilitator itself; a ``ServerSettle`` retries a
    ``settlement_pending`` answer once, as the SDK's resource server does."""
    payment = run.payments[step.label]
    facilitator = side.facilitator
    try:
        if isinstance(step, Verify | ServerVerify):
            verified = await facilitator.verify(payment.payload, payment.requirements)
            got = "valid" if verified.is_valid else str(verified.invalid_reason)
        else:
            settled = await facilitator.settle(payment.payload, payment.requirements)
            if isinstance(step, ServerSettle) and settled.error_reason == "settlement_pending":
                settled = await facilitator.settle(payment.payload, payment.requirements)
            got = "settled" if settled.success else str(settled.error_reason)
    except SchemeNotFoundError:
        got = "http 500"  # what the facilitator's HTTP server answers for it
    assert got == step.expect, (step, got)


def snapshot(exporter: ExporterProcess) -> dict[Series, float]:
    """The payment series of the exporter's /metrics."""
    text = exporter.metrics_text()
    found: dict[Series, float] = {}
    for name in SERIES:
        for labels, value in sample_values(text, name).items():
            found[(name, labels)] = value
    return found


def deltas(before: dict[Series, float], after: dict[Series, float]) -> dict[Series, float]:
    """What changed, rounded to micro-units, zeros left out."""
    changed = {
        key: round(after.get(key, 0.0) - before.get(key, 0.0), 6)
        for key in set(after) | set(before)
    }
    return {key: value for key, value in changed.items() if value}


def expected(cases: list[Case]) -> dict[Series, float]:
    """The metric deltas ``cases`` must cause."""
    out: dict[Series, float] = {}

    def add(name: str, value: float, **labels: str) -> None:
        key = (name, frozenset(labels.items()))
        out[key] = round(out.get(key, 0.0) + value, 6)

    for case in cases:
        for c in case.counted:
            net = c.network
            add("facilitator_payments_total", c.settled, network=net, status="success")
            add("facilitator_payments_total", c.failed, network=net, status="failed")
            add("facilitator_volume_usd_total", float(c.volume), network=net)
            add("facilitator_fees_usd_total", float(c.fees), network=net)
            add("facilitator_settlement_duration_seconds_count", c.settled, network=net)
            add("facilitator_pending_payments", c.pending, network=net)
            for kind in ("received", "verified", "settled", "failed"):
                add("exporter_events_received_total", getattr(c, kind), type=f"payment:{kind}")
        add("exporter_events_rejected_total", case.conflicts, reason="conflict")
    return {key: value for key, value in out.items() if value}


@pytest.fixture
def port() -> int:
    """The exporter's port, the same across its restarts."""
    return free_port()


async def test_every_sdk_case_through_the_hooks(tmp_path: Path, port: int) -> None:
    data, log_path = tmp_path / "data", tmp_path / "exporter.log"
    exporter = start_on(port, data, log_path)
    side = Facilitator(exporter.url, tmp_path / "spool")
    half = len(CASES) // 2
    try:
        for case in CASES[:half]:
            await exactly(case, side, exporter)
        exporter.terminate()
        for case in CASES[half:]:  # the exporter is down: everything waits in the spool
            await drive(case, CaseRun([side.new_world()]), side)
        exporter = start_on(port, data, log_path)
        assert await side.attachment.aclose(20.0)
        after = snapshot(exporter)
        second = expected(list(CASES[half:]))
        # a restarted exporter's counters start at zero, its pending gauge from the ledger
        pending = {k: v for k, v in expected(list(CASES)).items() if k[0] == PENDING}
        second = {k: v for k, v in second.items() if k[0] != PENDING} | pending
        assert {k: v for k, v in after.items() if v} == second
        assert_analytics(exporter, list(CASES))
    finally:
        exporter.kill()
        for attachment in side.attachments:
            attachment.close(0.0)
    for attachment in side.attachments:
        assert attachment.dead_letters() == []


@pytest.mark.filterwarnings(SVM_CLIENT_WARNING)
async def test_every_solana_case_through_the_hooks(
    tmp_path: Path, port: int, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    rpc = await aiohttp_server(SolanaRpc(list(SVM_MINTS.values())).app(), port=0)
    rpc_url = str(rpc.make_url("")).rstrip("/")
    exporter = start_on(port, tmp_path / "data", tmp_path / "exporter.log")
    side = Facilitator(exporter.url, tmp_path / "spool", solana=True)
    try:
        for case in SVM_CASES:
            await exactly(case, side, exporter, rpc_url)
        assert await side.attachment.aclose(20.0)
        assert_analytics(exporter, list(SVM_CASES))
    finally:
        exporter.kill()
        for attachment in side.attachments:
            attachment.close(0.0)
    assert side.attachment.dead_letters() == []


async def exactly(
    case: Case, side: Facilitator, exporter: ExporterProcess, svm_rpc_url: str | None = None
) -> None:
    """Run ``case`` and check the exporter's deltas and the unrecorded answers exactly."""
    before = snapshot(exporter)
    unrecorded = side.unrecorded()
    await drive(case, CaseRun([side.new_world()], svm_rpc_url), side)
    wait_until(side.delivered, what=f"{case.name} delivered")
    assert deltas(before, snapshot(exporter)) == expected([case]), case.name
    failures = {k: v for k, v in case.recording_failures.items() if k in REASONS}
    assert side.unrecorded() - unrecorded == Tally(failures), case.name


PENDING = "facilitator_pending_payments"
REASONS = ("unparseable", "unknown_network", "unknown_asset")


def assert_analytics(exporter: ExporterProcess, cases: list[Case]) -> None:
    """The payments analytic of the last hour holds exactly every case."""
    exporter.wait_caught_up()
    now = int(time.time() * 1000)
    status, body = http_request(f"{exporter.url}/v1/analytics/payments?window=1h&at={now}")
    assert status == 200, body
    totals = json.loads(body)
    counted = [c for case in cases for c in case.counted]
    assert totals["successfulPayments"] == sum(c.settled for c in counted)
    assert totals["failedPayments"] == sum(c.failed for c in counted)
    assert Decimal(totals["totalVolume"]) == sum((Decimal(c.volume) for c in counted), Decimal(0))
    assert Decimal(totals["totalFees"]) == sum((c.fees for c in counted), Decimal(0))
