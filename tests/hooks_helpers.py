"""Helpers for the facilitator-hooks tests: an SDK facilitator over the in-memory chain,
a table of payment cases driven through its own verify/settle, and what each case must
add to the exporter's totals. Not a test module."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _exporter_process import ExporterProcess, clean_env, spawn, try_get
from conftest import wait_until
from x402 import x402Facilitator, x402FacilitatorSync
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmSchemeConfig
from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1, ExactEvmSchemeV1Config
from x402_chain import (
    EvmChains,
    InMemoryFacilitatorSigner,
    build_client,
    build_facilitator,
    payer_account,
    requirements_v1,
    requirements_v2,
    sign_payment,
    v1_names,
)

BASE = "eip155:8453"
BASE_SEPOLIA = "eip155:84532"
NETWORKS = (BASE, BASE_SEPOLIA)
PAYEE = "0x" + "b" * 40

CASES = (
    "v2_base",
    "v2_base_sepolia",
    "v1_base",
    "bad_signature",
    "insufficient_balance",
    "settle_fails_after_verify",
    "pending_then_settled",
    "replayed_settle",
)
"""Every case :func:`run_case` knows."""


@dataclass(frozen=True)
class Outcome:
    """What one case should add to the exporter: a payment on ``network`` ending as
    ``status`` (success/failed) with ``amount`` settled (zero when it failed), told in
    ``events`` events (received, verified when valid, then settled or failed)."""

    network: str
    status: str
    amount: Decimal
    events: int


def sync_facilitator(chains: EvmChains) -> x402FacilitatorSync:
    """The SDK's synchronous facilitator with its exact EVM schemes over ``chains``."""
    facilitator = x402FacilitatorSync()
    for chain in chains:
        signer = InMemoryFacilitatorSigner(chain)
        facilitator.register(
            [chain.network], ExactEvmFacilitatorScheme(signer, ExactEvmSchemeConfig())
        )
        names = v1_names(chain.network)
        if names:
            facilitator.register_v1(names, ExactEvmSchemeV1(signer, ExactEvmSchemeV1Config()))
    return facilitator


def chains_and_facilitator() -> tuple[EvmChains, x402Facilitator]:
    """Fresh chains for :data:`NETWORKS` and the SDK's async facilitator over them."""
    chains = EvmChains(NETWORKS)
    return chains, build_facilitator(chains)


async def signed(chains: EvmChains, case: str, index: int, amount: int) -> tuple[Any, Any, str]:
    """A payload and requirements for ``case`` signed by payer ``index``, and its network."""
    network = BASE_SEPOLIA if case == "v2_base_sepolia" else BASE
    token = chains.token(network)
    account = payer_account(index)
    if case != "insufficient_balance":
        chains[network].fund(token, account.address, amount)
    requirements: Any = (
        requirements_v1("base", token, PAYEE, amount)
        if case == "v1_base"
        else requirements_v2(token, PAYEE, amount)
    )
    payload: Any = await sign_payment(build_client(account), requirements)
    if case == "bad_signature":
        inner = dict(payload.payload)
        signature = inner["signature"]
        inner["signature"] = signature[:-4] + ("00" if signature[-4:-2] != "00" else "11")
        inner["signature"] += signature[-2:]
        payload = payload.model_copy(update={"payload": inner})
    return payload, requirements, network


async def run_case(
    facilitator: Any, chains: EvmChains, case: str, index: int, amount: int = 10_000
) -> Outcome:
    """Drive ``case`` through the facilitator's own verify and settle (awaited when the
    facilitator is the async one); the outcome follows the facilitator's answers."""
    payload, requirements, network = await signed(chains, case, index, amount)

    async def call(method: str) -> Any:
        result = getattr(facilitator, method)(payload, requirements)
        return await result if isinstance(facilitator, x402Facilitator) else result

    token = chains.token(network)
    verified = await call("verify")
    if not verified.is_valid:
        return Outcome(network, "failed", Decimal(0), 2)
    if case == "settle_fails_after_verify":
        chains[network].set_balance(token, payload.payload["authorization"]["from"], 0)
    if case == "pending_then_settled":
        chains[network].delay_receipts(1)
    answer = await call("settle")
    if case == "pending_then_settled":
        assert answer.error_reason == "settlement_pending", answer
        answer = await call("settle")
    if case == "replayed_settle":
        replay = await call("settle")
        assert not replay.success, replay
    if not answer.success:
        return Outcome(network, "failed", Decimal(0), 3)
    return Outcome(network, "success", Decimal(amount).scaleb(-token.decimals), 3)


def expected_metrics(
    outcomes: list[Outcome],
) -> tuple[dict[tuple[str, str], float], dict[str, Decimal]]:
    """``facilitator_payments_total`` by (network, status) and the settled volume by
    network that ``outcomes`` must produce."""
    payments: dict[tuple[str, str], float] = {}
    volume: dict[str, Decimal] = {}
    for outcome in outcomes:
        key = (outcome.network, outcome.status)
        payments[key] = payments.get(key, 0) + 1
        if outcome.status == "success":
            volume[outcome.network] = volume.get(outcome.network, Decimal(0)) + outcome.amount
    return payments, volume


Answer = tuple[int, dict[str, str], bytes]
"""A scripted answer: status, headers, body."""


class ScriptedExporter:
    """A stand-in for ``POST /v1/events`` whose answers a test scripts, recording each
    request (time, body); answers 503 while :attr:`hold` is set, so that a test can let
    events gather into one batch."""

    def __init__(self, answer: Callable[[bytes, int], Answer]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, bytes]] = []
        self.hold = threading.Event()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if scripted.hold.is_set():
                    status, headers, text = 503, {"Retry-After": "0.05"}, b"{}"
                else:
                    scripted.requests.append((time.monotonic(), body))
                    status, headers, text = scripted.answer(body, len(scripted.requests))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The base URL the hooks deliver to."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def lines(body: bytes) -> list[dict[str, Any]]:
    """The events of an NDJSON body."""
    return [json.loads(line) for line in body.splitlines() if line]


def accepted(count: int, rejected: list[dict[str, Any]] | None = None) -> Answer:
    """A 202 answer as the exporter gives it."""
    document = {"accepted": count, "duplicates": 0, "rejected": rejected or []}
    return 202, {"Content-Type": "application/json"}, json.dumps(document).encode()


def start_on(port: int, data_dir: Path, log_path: Path, **env: str) -> ExporterProcess:
    """``serve`` on ``port`` (the hooks' URL stays the same across restarts), healthy."""
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    process = ExporterProcess(spawn(args, log_path, clean_env(**env)), port, data_dir, log_path)

    def healthy() -> bool:
        assert process.proc.poll() is None, process.log()
        answer = try_get(process.url + "/healthz")
        return answer is not None and answer[0] == 200

    wait_until(healthy, 20.0, 0.05, "the exporter to serve")
    return process
