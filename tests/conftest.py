"""Shared fixtures and helpers: settings on a temporary data dir, the app under test,
deadline polling, and tools that must run in CI."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app

T = TypeVar("T")

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
"""A fixed instant for event timestamps, so tests do not depend on the clock."""

AppClient = TestClient[Any, Any]


def in_ci() -> bool:
    """CI sets CI=true; there, tests that need a tool must not be skipped."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_DEBIAN_PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus"}


def require_tool(name: str) -> str:
    """The path of ``name``; skip when missing locally, fail when missing in CI."""
    path = shutil.which(name)
    if path is None:
        package = _DEBIAN_PACKAGES.get(name, name)
        message = f"{name} is not installed (Debian package '{package}' provides it)"
        if in_ci():
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], Awaitable[T | None]],
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Async :func:`wait_until` for conditions that await."""
    import asyncio

    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def received(
    pid: str,
    ts: int = BASE_MS,
    *,
    amount: str = "1.50",
    network: str = "eip155:8453",
    payer: str = "0x" + "a" * 40,
    payee: str = "0x" + "b" * 40,
) -> dict[str, Any]:
    """A ``payment:received`` event."""
    return {
        "type": "payment:received",
        "data": {
            "paymentId": pid,
            "payer": payer,
            "payee": payee,
            "amount": amount,
            "network": network,
            "timestamp": ts,
        },
    }


def verified(pid: str, ts: int = BASE_MS + 100, ms: float = 120) -> dict[str, Any]:
    """A ``payment:verified`` event."""
    return {
        "type": "payment:verified",
        "data": {"paymentId": pid, "verificationTime": ms, "timestamp": ts},
    }


def settled(
    pid: str, ts: int = BASE_MS + 2000, *, fee: str = "0.01", settlement_ms: float = 1500
) -> dict[str, Any]:
    """A ``payment:settled`` event."""
    return {
        "type": "payment:settled",
        "data": {
            "paymentId": pid,
            "transaction": "0x" + "c" * 64,
            "fee": fee,
            "settlementTime": settlement_ms,
            "timestamp": ts,
        },
    }


def failed(
    pid: str,
    ts: int = BASE_MS + 2000,
    *,
    error: str = "insufficient_funds",
    network: str | None = None,
) -> dict[str, Any]:
    """A ``payment:failed`` event."""
    data: dict[str, Any] = {"paymentId": pid, "error": error, "timestamp": ts}
    if network is not None:
        data["network"] = network
    return {"type": "payment:failed", "data": data}


def batch_created(
    bid: str,
    ts: int = BASE_MS,
    *,
    count: int = 2,
    total: str = "3.00",
    network: str = "eip155:8453",
) -> dict[str, Any]:
    """A ``batch:created`` event."""
    return {
        "type": "batch:created",
        "data": {
            "batchId": bid,
            "paymentCount": count,
            "totalAmount": total,
            "network": network,
            "timestamp": ts,
        },
    }


def batch_settled(bid: str, ts: int = BASE_MS + 5000, *, gas: str = "84000") -> dict[str, Any]:
    """A ``batch:settled`` event."""
    return {
        "type": "batch:settled",
        "data": {
            "batchId": bid,
            "transaction": "0x" + "d" * 64,
            "totalFees": "0.02",
            "gasUsed": gas,
            "timestamp": ts,
        },
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory."""
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """Settings on the test's own data directory, embedded store."""
    return Settings(data_dir=data_dir, listen="127.0.0.1:0")


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of the test's own."""
    return CollectorRegistry()


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings: Settings,
    registry: CollectorRegistry,
) -> AppClient:
    """The exporter app under test, started with all its resources."""
    return await aiohttp_client(create_app(settings, registry))


@pytest.fixture(autouse=True)
def env_clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No EXPORTER_* variable leaks in from the environment."""
    for name in list(os.environ):
        if name.startswith("EXPORTER_"):
            monkeypatch.delenv(name)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skipped test is a failure, except the InfluxDB integration suite."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and in_ci() and item.get_closest_marker("needs_influxdb") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"
