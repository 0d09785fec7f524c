"""Hooks benchmark: what the exporter's hooks add to a facilitator's verify+settle pair.

Two of the x402 SDK's own ``x402Facilitator`` in this process, one with
``attach_x402_facilitator`` and one without, over the same scheme. Each verify+settle
pair is timed on both, alternately (the order swapped every pair), so both series see the
same machine state; the hooked one delivers to a real exporter (``serve`` subprocess,
embedded store), so the sender thread's work competes for this process as it would in a
facilitator. Every pair is a new payment (a fresh nonce), so it spools two answers and
yields three events. It prints p50/p99 of both series and the p50 difference (the target
is under 50 us), then how many events the exporter received.

``--scheme instant`` (default) answers verify and settle at once, so the difference is
the hooks' cost alone; ``--scheme evm`` uses the SDK's exact EVM scheme over the tests'
in-memory chain (real EIP-712 signatures and their recovery: milliseconds per pair, so the
hooks' share is within its noise).

Run: ``.venv/bin/python bench/hooks.py [--pairs N] [--warmup N] [--scheme instant|evm]``
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _servers  # noqa: E402
from _servers import write  # noqa: E402
from x402 import x402Facilitator  # noqa: E402
from x402.schemas import (  # noqa: E402
    PaymentPayload,
    PaymentRequirements,
    SettleResponse,
    VerifyResponse,
)

from exporter.hooks import attach_x402_facilitator  # noqa: E402

_NETWORK = "eip155:8453"
_USDC = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
_PAYER = "0x857b06519e91e3a54538791bdbb0e22373e36b66"
_PAY_TO = "0x209693bc6afc0c5328ba36faf03c514ef312287c"


class InstantScheme:
    """An exact-scheme facilitator that answers valid and settled at once."""

    scheme = "exact"
    caip_family = "eip155:*"

    def get_extra(self, network: str) -> dict[str, Any] | None:
        """No extra data."""
        return None

    def get_signers(self, network: str) -> list[str]:
        """No signers."""
        return []

    def verify(self, payload: Any, requirements: Any, context: Any = None) -> VerifyResponse:
        """Valid."""
        return VerifyResponse(is_valid=True, payer=_PAYER)

    def settle(self, payload: Any, requirements: Any, context: Any = None) -> SettleResponse:
        """Settled."""
        return SettleResponse(
            success=True, payer=_PAYER, transaction="0x" + "ab" * 32, network=_NETWORK
        )


def _instant_pairs(count: int) -> tuple[x402Facilitator, x402Facilitator, list[Any]]:
    plain, hooked = x402Facilitator(), x402Facilitator()
    for facilitator in (plain, hooked):
        facilitator.register([_NETWORK], InstantScheme())
    requirements = PaymentRequirements(
        scheme="exact",
        network=_NETWORK,
        asset=_USDC,
        amount="10000",
        pay_to=_PAY_TO,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )
    pairs = []
    for n in range(count):
        authorization = {
            "from": _PAYER,
            "to": _PAY_TO,
            "value": "10000",
            "validAfter": "0",
            "validBefore": "99999999999",
            "nonce": "0x" + f"{n:064x}",
        }
        payload = PaymentPayload(
            x402_version=2,
            payload={"signature": "0x" + "cd" * 65, "authorization": authorization},
            accepted=requirements,
        )
        pairs.append((payload, requirements))
    return plain, hooked, pairs


async def _evm_pairs(count: int) -> tuple[x402Facilitator, x402Facilitator, list[Any]]:
    from x402_chain import (
        EvmChains,
        build_client,
        build_facilitator,
        payer_account,
        requirements_v2,
        sign_payment,
    )

    chains = EvmChains([_NETWORK])
    token = chains.token(_NETWORK)
    plain, hooked = build_facilitator(chains), build_facilitator(chains)
    account = payer_account(0)
    chains[_NETWORK].fund(token, account.address, 10**15)
    client = build_client(account)
    requirements = requirements_v2(token, _PAY_TO, 10_000)
    # each pair is settled twice (plain and hooked): two payloads, two nonces
    pairs = []
    for _ in range(count):
        first = await sign_payment(client, requirements)
        second = await sign_payment(client, requirements)
        pairs.append(((first, requirements), (second, requirements)))
    return plain, hooked, pairs


def _metrics(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=10.0) as response:
        text: str = response.read().decode()
        return text


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _pair(facilitator: x402Facilitator, payload: Any, requirements: Any) -> float:
    started = time.perf_counter()
    await facilitator.verify(payload, requirements)
    await facilitator.settle(payload, requirements)
    return (time.perf_counter() - started) * 1e6


async def _measure(args: argparse.Namespace, url: str, spool: Path) -> tuple[Any, ...]:
    total = args.warmup + args.pairs
    if args.scheme == "instant":
        plain, hooked, made = _instant_pairs(total)
        pairs = [(p, p) for p in made]
    else:
        plain, hooked, pairs = await _evm_pairs(total)
    attachment = attach_x402_facilitator(hooked, url=url, spool_dir=spool)
    without: list[float] = []
    with_hooks: list[float] = []
    for n, (for_plain, for_hooked) in enumerate(pairs):
        order = [(plain, for_plain, without), (hooked, for_hooked, with_hooks)]
        for facilitator, (payload, requirements), sink in order[:: 1 if n % 2 else -1]:
            micros = await _pair(facilitator, payload, requirements)
            if n >= args.warmup:
                sink.append(micros)
    flushed = await attachment.aclose(60.0)
    delivered = attachment.registry.get_sample_value("x402_exporter_hook_delivered_events_total")
    return without, with_hooks, flushed, delivered


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="verify+settle pairs measured")
    parser.add_argument("--warmup", type=int, default=200, help="pairs run before measuring")
    parser.add_argument("--scheme", choices=("instant", "evm"), default="instant")
    args = parser.parse_args()
    env = dict(_servers.clean_env(), EXPORTER_LOG_LEVEL="warning")
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        workdir = Path(tmp)
        port = _servers.free_port()
        env["EXPORTER_DATA_DIR"] = str(workdir / "data")
        exporter = _servers.start("exporter", _servers.exporter_serve(port), port, workdir, env)
        try:
            without, with_hooks, flushed, delivered = asyncio.run(
                _measure(args, exporter.url, workdir / "spool")
            )
            metrics = _metrics(exporter.url)
        finally:
            exporter.stop()
    p50_without, p50_with = _percentile(without, 50), _percentile(with_hooks, 50)
    write(
        f"hooks benchmark: {args.pairs} verify+settle pairs, scheme {args.scheme}, "
        f"cpus {os.cpu_count()}"
    )
    write(f"{'':14} {'p50 us':>10} {'p99 us':>10}")
    write(f"{'without hooks':14} {p50_without:10.1f} {_percentile(without, 99):10.1f}")
    write(f"{'with hooks':14} {p50_with:10.1f} {_percentile(with_hooks, 99):10.1f}")
    write(f"added at p50: {p50_with - p50_without:.1f} us per pair (target < 50 us)")
    received = [
        line for line in metrics.splitlines() if line.startswith("exporter_events_received_total")
    ]
    write(f"spool flushed: {flushed}; events delivered: {delivered:.0f}")
    write("\n".join(received))
    return 0


if __name__ == "__main__":
    sys.exit(main())
