"""Helpers shared by the store and forwarder tests (not a test module).

Golden records with their line protocol, events prepared as the receiver prepares them,
payments committed to a ledger, a store that fails on purpose, the InfluxDB fault server
and a store aimed at it, and small polling and metric readers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from _exporter_process import clean_env
from conftest import BASE_MS, async_wait_until, received, settled
from influx_fault_server import InfluxFaultServer, PointKey, split_point
from ledger_helpers import prepare
from prometheus_client import CollectorRegistry

from exporter.ledger import GroupCommitter, Submission
from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    Store,
    StoreRecord,
    StoreRejection,
    WebsocketRecord,
)
from exporter.store.influx.store import InfluxApi, InfluxStore, to_line

ADDR_A = "0x" + "a" * 40
ADDR_B = "0x" + "b" * 40
TX = "0x" + "c" * 64

GOLDEN: list[tuple[StoreRecord, str]] = [
    (
        PaymentRecord(
            "payment:settled:p1",
            BASE_MS + 2000,
            "eip155:8453",
            "settled",
            "p1",
            ADDR_A,
            ADDR_B,
            1_500_000,
            10_000,
            1500.0,
            None,
            TX,
            None,
        ),
        "payment,network=eip155:8453,status=settled amount_micro=1500000i,fee_micro=10000i,"
        f'payee="{ADDR_B}",payer="{ADDR_A}",payment_id="p1",settlement_ms=1500,tx="{TX}" '
        "1767225602000326206",
    ),
    (
        PaymentRecord(
            "payment:received:p1",
            BASE_MS,
            "eip155:8453",
            "received",
            "p1",
            ADDR_A,
            ADDR_B,
            1_500_000,
        ),
        "payment,network=eip155:8453,status=received amount_micro=1500000i,"
        f'payee="{ADDR_B}",payer="{ADDR_A}",payment_id="p1" 1767225600000460678',
    ),
    (
        PaymentRecord(
            "payment:verified:p1",
            BASE_MS + 100,
            "eip155:8453",
            "verified",
            "p1",
            verification_ms=120.25,
        ),
        'payment,network=eip155:8453,status=verified payment_id="p1",verification_ms=120.25 '
        "1767225600100162285",
    ),
    (
        # Escaping: spaces, commas and equals signs in tags; quotes and backslashes in
        # string fields (spaces, commas and equals stay as they are inside quotes).
        PaymentRecord(
            "payment:failed:p2",
            BASE_MS + 2000,
            "net work,a=b",
            "failed",
            'id "q" \\ x',
            error='said "no", then\\ quit = done',
        ),
        "payment,network=net\\ work\\,a\\=b,status=failed "
        'error="said \\"no\\", then\\\\ quit = done",payment_id="id \\"q\\" \\\\ x" '
        "1767225602000857725",
    ),
    (
        BatchRecord(
            "batch:settled:b1",
            BASE_MS + 5000,
            "eip155:8453",
            "settled",
            "b1",
            2,
            3_000_000,
            20_000,
            84_000,
            "0x" + "d" * 64,
        ),
        'batch,network=eip155:8453,status=settled batch_id="b1",gas_used=84000i,'
        "payment_count=2i,total_amount_micro=3000000i,total_fees_micro=20000i,"
        f'tx="0x{"d" * 64}" 1767225605000151429',
    ),
    (
        RevenueRecord("revenue:x", BASE_MS + 10, "eip155:10", "premium", 250_000, "p1"),
        'revenue,kind=premium,network=eip155:10 amount_micro=250000i,payment_id="p1" '
        "1767225600010279650",
    ),
    (
        WebsocketRecord("websocket:y", BASE_MS + 20, 42),
        "websocket count=42i 1767225600020430321",
    ),
]
"""Records of every kind with the exact line InfluxDB must receive for each."""


async def commit_payments(committer: GroupCommitter, count: int, prefix: str = "p") -> None:
    """Commit ``count`` received payments, every third one settled too."""
    events = []
    for i in range(count):
        events.append(prepare(received(f"{prefix}{i}", BASE_MS + i)))
        if i % 3 == 0:
            events.append(prepare(settled(f"{prefix}{i}", BASE_MS + 2000 + i)))
    await committer.submit(Submission(events))


def point_key(record: StoreRecord) -> PointKey:
    """How InfluxDB identifies the point of ``record`` (series and timestamp)."""
    series, _, timestamp = split_point(to_line(record))
    return series, timestamp


async def until(condition: Callable[[], bool], what: str, within: float = 15.0) -> None:
    """Poll ``condition`` on the event loop until it holds (fails after ``within`` s)."""

    async def check() -> bool:
        return condition()

    await async_wait_until(check, within=within, what=what)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample's value, 0 when it was never set."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@dataclass
class FailingFirst:
    """Fault injection around a real store: the first ``failures`` writes raise.

    ``attempts_at`` holds the ``time.monotonic()`` of every write attempt.
    """

    inner: Store
    failures: int
    name: str = "duckdb"
    attempts_at: list[float] = field(default_factory=list)

    async def write(self, records: list[StoreRecord]) -> list[StoreRejection]:
        """Fail, then delegate."""
        self.attempts_at.append(time.monotonic())
        if len(self.attempts_at) <= self.failures:
            raise OSError("store unreachable")
        return await self.inner.write(records)

    async def close(self) -> None:
        """Close the real store."""
        await self.inner.close()


@contextlib.asynccontextmanager
async def fault_server() -> AsyncIterator[InfluxFaultServer]:
    """A fault server on a free loopback port, accepting everything until told otherwise."""
    server = InfluxFaultServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def influx_store(
    server: InfluxFaultServer, timeout_seconds: float = 0.5, api: InfluxApi = "v2"
) -> AsyncIterator[InfluxStore]:
    """An InfluxDB store aimed at ``server`` over ``api``, by default with a short (0.5 s)
    timeout; on v1 it authenticates with the server's user name and password when it has
    them, else with its token."""
    if api == "v1" and server.username is not None:
        store = InfluxStore(
            server.url, None, None, server.bucket, timeout_seconds=timeout_seconds, api="v1",
            username=server.username, password=server.password,
        )
    else:
        store = InfluxStore(
            server.url, server.token, server.org if api == "v2" else None, server.bucket,
            timeout_seconds=timeout_seconds, api=api,
        )
    try:
        yield store
    finally:
        await store.close()


def influx_env(server: InfluxFaultServer, **extra: str) -> dict[str, str]:
    """Environment for an exporter subprocess that uses ``server`` as its InfluxDB."""
    return clean_env(
        EXPORTER_INFLUX_URL=server.url,
        EXPORTER_INFLUX_TOKEN=server.token,
        EXPORTER_INFLUX_ORG=server.org,
        EXPORTER_INFLUX_TIMEOUT_SECONDS="2",
        **extra,
    )
