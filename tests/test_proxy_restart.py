"""A proxy restarted between verify and settle records the settle against the payment the
ledger already holds, with no conflict."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestServer
from conftest import AppClient
from facilitator_helpers import NETWORK, ScriptedFacilitator, payment_id, start_proxy, through
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER


async def test_a_settle_after_a_restart_joins_the_verified_payment(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    data_dir: Path,
) -> None:
    facilitator = ScriptedFacilitator()
    server = await aiohttp_server(facilitator.app(), port=0)
    url = str(server.make_url("")).rstrip("/")
    before = await start_proxy(aiohttp_client, data_dir, url, CollectorRegistry())
    assert await through(before, "/verify", 3) == 200
    await before.close()

    registry = CollectorRegistry()
    after = await start_proxy(aiohttp_client, data_dir, url, registry)
    # Restored from the ledger: the verified payment is pending.
    pending = registry.get_sample_value("facilitator_pending_payments", {"network": NETWORK})
    assert pending == 1
    assert await through(after, "/settle", 3) == 200
    ledger = after.app[COMMITTER].ledger
    stored = [json.loads(body) for _, _, body in ledger.iter_events()]
    assert [e["type"] for e in stored] == [
        "payment:received",
        "payment:verified",
        "payment:settled",
    ]
    assert {e["data"]["paymentId"] for e in stored} == {payment_id(3)}
    assert ledger.dead_letters() == []
    success = {"network": NETWORK, "status": "success"}
    assert registry.get_sample_value("facilitator_payments_total", success) == 1
    assert registry.get_sample_value("facilitator_volume_usd_total", {"network": NETWORK}) == 0.01
    assert registry.get_sample_value("facilitator_pending_payments", {"network": NETWORK}) == 0
    assert registry.get_sample_value("exporter_events_rejected_total", {"reason": "conflict"}) == 0
    assert registry.get_sample_value("exporter_events_duplicate_total") == 1  # the receipt
