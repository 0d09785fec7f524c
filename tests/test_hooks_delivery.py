"""How the hooks' sender treats the exporter's answers (a scripted stand-in), what the
spool does at its bound, and a synchronous SDK facilitator on many threads delivering
with a token and signatures to a real exporter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _exporter_process import running_exporter
from conftest import free_port, wait_until
from hooks_helpers import (
    ScriptedExporter,
    accepted,
    chains_and_facilitator,
    expected_metrics,
    lines,
    run_case,
    signed,
    sync_facilitator,
)
from prometheus_client import CollectorRegistry
from x402_chain import EvmChains, build_facilitator, payer_account

from exporter.errors import ConfigError, SpoolError
from exporter.hooks import HookAttachment, SenderLimits, attach_x402_facilitator

FAST = SenderLimits(idle_seconds=0.05, backoff_base=0.05, backoff_cap=0.5, request_timeout=5.0)


def attach(facilitator: Any, url: str, spool: Path, **options: Any) -> HookAttachment:
    """The hooks on ``facilitator``, with fast retries and a registry of their own."""
    return attach_x402_facilitator(
        facilitator, url=url, spool_dir=spool, registry=CollectorRegistry(), limits=FAST, **options
    )


def value(attachment: HookAttachment, name: str, **labels: str) -> float:
    """A sample of the attachment's registry (0 when absent)."""
    return attachment.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def scripted() -> Iterator[list[ScriptedExporter]]:
    """Scripted exporters, closed at the end."""
    servers: list[ScriptedExporter] = []
    yield servers
    for server in servers:
        server.close()


async def test_refused_events_are_dead_lettered_and_conflicts_count_as_delivered(
    tmp_path: Path, scripted: list[ScriptedExporter]
) -> None:
    server = ScriptedExporter(
        lambda body, n: accepted(
            3,
            [
                {"index": 1, "error": "invalid: verificationTime must be a number"},
                {"index": 3, "error": "conflict: an event with the same id was stored"},
            ],
        )
    )
    scripted.append(server)
    server.hold.set()  # the five events gather into one batch
    chains, facilitator = chains_and_facilitator()
    attachment = attach(facilitator, server.url, tmp_path / "spool")
    await run_case(facilitator, chains, "v2_base", 0)
    await run_case(facilitator, chains, "bad_signature", 1)
    wait_until(lambda: attachment.sender.spool.exchanges(10) == [], what="derivation")
    server.hold.clear()
    assert await attachment.aclose(10.0)
    [(_, body)] = server.requests
    sent = lines(body)
    assert [e["type"] for e in sent] == [
        "payment:received",
        "payment:verified",
        "payment:settled",
        "payment:received",
        "payment:failed",
    ]
    [dead] = attachment.dead_letters()
    assert json.loads(dead.body) == sent[1]
    assert (dead.status, dead.error) == (202, "invalid: verificationTime must be a number")
    assert value(attachment, "x402_exporter_hook_delivered_events_total") == 4
    assert value(attachment, "x402_exporter_hook_dead_lettered_events_total") == 1
    assert value(attachment, "x402_exporter_hook_delivery_errors_total", **{"class": "server"}) > 0


async def test_a_refused_batch_is_halved_until_the_bad_event_is_alone(
    tmp_path: Path, scripted: list[ScriptedExporter]
) -> None:
    def answer(body: bytes, n: int) -> tuple[int, dict[str, str], bytes]:
        events = lines(body)
        if len(events) > 1:
            return 400, {}, b'{"error": "malformed NDJSON"}'
        if events[0]["type"] == "payment:verified":
            return 409, {}, b'{"error": "the event conflicts with a stored one"}'
        if events[0]["type"] == "payment:settled":
            return 400, {}, b'{"error": "line 1: not JSON"}'
        return accepted(1)

    server = ScriptedExporter(answer)
    scripted.append(server)
    server.hold.set()
    chains, facilitator = chains_and_facilitator()
    attachment = attach(facilitator, server.url, tmp_path / "spool")
    await run_case(facilitator, chains, "v2_base", 0)
    wait_until(lambda: attachment.sender.spool.exchanges(10) == [], what="derivation")
    server.hold.clear()
    assert await attachment.aclose(10.0)
    # halved on each refusal, doubled again after each success
    assert [len(lines(body)) for _, body in server.requests] == [3, 1, 2, 1, 1]
    [dead] = attachment.dead_letters()
    assert json.loads(dead.body)["type"] == "payment:settled"
    assert (dead.status, dead.error) == (400, "line 1: not JSON")
    assert value(attachment, "x402_exporter_hook_delivered_events_total") == 2


async def test_refused_credentials_and_throttling_are_retried_after_retry_after(
    tmp_path: Path, scripted: list[ScriptedExporter]
) -> None:
    def answer(body: bytes, n: int) -> tuple[int, dict[str, str], bytes]:
        if n == 1:
            return 401, {}, b'{"error": "missing or wrong bearer token"}'
        if n == 2:
            return 429, {"Retry-After": "0.3"}, b"{}"
        return accepted(len(lines(body)))

    server = ScriptedExporter(answer)
    scripted.append(server)
    chains, facilitator = chains_and_facilitator()
    attachment = attach(facilitator, server.url, tmp_path / "spool", token="t0ken")
    await run_case(facilitator, chains, "v2_base", 0)
    assert await attachment.aclose(10.0)
    times = [at for at, _ in server.requests]
    assert times[2] - times[1] >= 0.3
    assert value(attachment, "x402_exporter_hook_delivery_errors_total", **{"class": "auth"}) == 1
    assert (
        value(attachment, "x402_exporter_hook_delivery_errors_total", **{"class": "throttled"}) == 1
    )
    assert value(attachment, "x402_exporter_hook_delivered_events_total") == 3
    assert attachment.dead_letters() == []


async def test_the_spool_keeps_the_oldest_and_counts_new_answers_dropped(tmp_path: Path) -> None:
    chains, facilitator = chains_and_facilitator()
    port = free_port()  # nothing listens: every answer stays in the spool
    attachment = attach(
        facilitator, f"http://127.0.0.1:{port}", tmp_path / "spool", spool_max_bytes=4000
    )
    outcomes = [await run_case(facilitator, chains, "v2_base", i) for i in range(4)]
    assert {o.status for o in outcomes} == {"success"}  # the facilitator never noticed
    spooled = value(attachment, "x402_exporter_hook_spooled_total", endpoint="verify")
    spooled += value(attachment, "x402_exporter_hook_spooled_total", endpoint="settle")
    dropped = value(attachment, "x402_exporter_hook_dropped_total", reason="spool_full")
    assert spooled + dropped == 8 and spooled >= 2 and dropped >= 1
    assert attachment.spool.used_bytes <= 4000
    assert not attachment.close(0.2)  # undelivered: kept for the next attachment
    # a later attachment on the same spool delivers what was kept, oldest first
    chains, facilitator = chains_and_facilitator()
    scripted = ScriptedExporter(lambda body, n: accepted(len(lines(body))))
    try:
        again = attach(facilitator, scripted.url, tmp_path / "spool")
        assert await again.aclose(10.0)
        first = lines(scripted.requests[0][1])[0]
        assert first["type"] == "payment:received"
        assert first["data"]["paymentId"].split("/")[2] == payer_account(0).address.lower()
    finally:
        scripted.close()


async def test_after_close_and_over_the_size_bound_answers_are_dropped_not_raised(
    tmp_path: Path,
) -> None:
    chains, facilitator = chains_and_facilitator()
    port = free_port()
    attachment = attach(
        facilitator, f"http://127.0.0.1:{port}", tmp_path / "spool", max_exchange_bytes=100
    )
    await run_case(facilitator, chains, "v2_base", 0)
    assert value(attachment, "x402_exporter_hook_dropped_total", reason="too_large") == 2
    assert attachment.close(0.0)
    assert (await run_case(facilitator, chains, "v2_base", 1)).status == "success"
    assert value(attachment, "x402_exporter_hook_dropped_total", reason="closed") == 2


def test_mistakes_are_one_line_errors_before_anything_is_attached(tmp_path: Path) -> None:
    chains, facilitator = chains_and_facilitator()
    with pytest.raises(ConfigError, match="must be http:// or https://"):
        attach(facilitator, "exporter:9402", tmp_path / "spool")
    with pytest.raises(ConfigError, match="not an x402 SDK facilitator"):
        attach(object(), "http://exporter:9402", tmp_path / "spool")
    with pytest.raises(ConfigError, match="signing_secret must not start or end"):
        attach(facilitator, "http://exporter:9402", tmp_path / "spool", signing_secret="s\n")
    first = attach(facilitator, "http://127.0.0.1:1", tmp_path / "spool")
    try:
        with pytest.raises(SpoolError, match="held by another process"):
            attach(facilitator, "http://127.0.0.1:1", tmp_path / "spool")
    finally:
        first.close(0.0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spool.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(SpoolError, match="move it aside"):
        attach(facilitator, "http://127.0.0.1:1", tmp_path / "bad")


@pytest.mark.slow
def test_a_sync_facilitator_on_many_threads_delivers_signed_with_a_token(
    tmp_path: Path,
) -> None:
    chains = EvmChains(("eip155:8453", "eip155:84532"))
    facilitator = sync_facilitator(chains)
    env = {"EXPORTER_INGEST_TOKEN": "t0ken", "EXPORTER_INGEST_SIGNING_SECRET": "s3cret"}
    with running_exporter(tmp_path / "data", tmp_path / "exporter.log", env=env) as exporter:
        cases = ["v2_base", "bad_signature", "settle_fails_after_verify", "v1_base"] * 5
        spool = tmp_path / "spool"
        with attach(facilitator, exporter.url, spool, token="t0ken", signing_secret="s3cret") as (
            attachment
        ):
            with ThreadPoolExecutor(4) as pool:
                outcomes = list(
                    pool.map(
                        lambda item: asyncio.run(run_case(facilitator, chains, item[1], item[0])),
                        enumerate(cases),
                    )
                )
        assert attachment.spool_empty
        payments, _ = expected_metrics(outcomes)
        got = exporter.metric("facilitator_payments_total")
        assert {(dict(k)["network"], dict(k)["status"]): v for k, v in got.items() if v} == payments
        assert value(attachment, "x402_exporter_hook_delivered_events_total") == sum(
            o.events for o in outcomes
        )
        rejected = exporter.metric("exporter_events_rejected_total")
        assert sum(rejected.values()) == 0


async def test_a_restarted_attachment_derives_no_event_twice(
    tmp_path: Path, scripted: list[ScriptedExporter]
) -> None:
    server = ScriptedExporter(lambda body, n: accepted(len(lines(body))))
    scripted.append(server)
    chains, facilitator = chains_and_facilitator()
    payload, requirements, _ = await signed(chains, "v2_base", 0, 10_000)
    first = attach(facilitator, server.url, tmp_path / "spool")
    assert (await facilitator.verify(payload, requirements)).is_valid
    assert await first.aclose(10.0)
    # the process restarts: a new facilitator and attachment on the same spool
    again = build_facilitator(chains)
    async with attach(again, server.url, tmp_path / "spool") as second:
        assert (await again.settle(payload, requirements)).success
    assert second.spool_empty  # leaving "async with" delivered it
    sent = [event["type"] for _, body in server.requests for event in lines(body)]
    assert sent == ["payment:received", "payment:verified", "payment:settled"]


async def test_a_failing_spool_is_counted_and_never_raised_into_the_facilitator(
    tmp_path: Path,
) -> None:
    chains, facilitator = chains_and_facilitator()
    attachment = attach(facilitator, "http://127.0.0.1:1", tmp_path / "spool")
    attachment.sender.stop(0.0)
    attachment.spool.close()  # every append now fails inside SQLite
    assert (await run_case(facilitator, chains, "v2_base", 0)).status == "success"
    assert (await run_case(facilitator, chains, "bad_signature", 1)).status == "failed"
    assert value(attachment, "x402_exporter_hook_dropped_total", reason="error") == 3
