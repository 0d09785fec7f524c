"""An in-memory Solana ledger under the official x402 SDK's SVM facilitator, and its RPC.

The SDK's exact SVM facilitator (v1 and v2) parses and checks the client's transaction
itself (compute budget, ``TransferChecked``, memo, fee payer) and reaches the chain only
through its ``FacilitatorSvmSigner`` protocol: co-sign as fee payer, simulate, send, confirm.
``InMemorySvmSigner`` implements it over ``InMemorySvmLedger``: SPL token accounts (balances
by associated token account), the ed25519 signatures of every required signer checked with
solders, a transaction processed at most once, and scripted faults (a send that fails, a
confirmation that times out so the facilitator answers ``settlement_pending``).

The SDK's SVM client builds its transaction from two RPC reads, the mint account (for
decimals and token program) and the latest blockhash; ``SolanaRpc`` answers them over HTTP
(JSON-RPC, as a node does). The client is synchronous, so ``sign_svm_payment`` runs it on a
worker thread while the event loop serves the RPC.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import to_bytes_versioned
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from x402 import x402ClientSync, x402Facilitator
from x402.mechanisms.svm.constants import TOKEN_PROGRAM_ADDRESS, V1_TO_V2_NETWORK_MAP
from x402.mechanisms.svm.default_assets import DEFAULT_ASSETS as SVM_DEFAULT_ASSETS
from x402.mechanisms.svm.exact import register_exact_svm_client, register_exact_svm_facilitator
from x402.mechanisms.svm.signers import KeypairSigner
from x402.mechanisms.svm.utils import derive_ata, normalize_network
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

_TRANSFER_CHECKED = 12
SVM_CLIENT_WARNING = "ignore:Client is deprecated"
"""A ``pytest.mark.filterwarnings`` argument for tests that sign Solana payments."""
_BLOCKHASH = Hash.new_unique()


@dataclass(frozen=True)
class SplMint:
    """An SPL token mint on one Solana network."""

    network: str
    address: str
    decimals: int
    symbol: str


def default_mint(network: str) -> SplMint:
    """The SDK's default stablecoin mint for a Solana CAIP-2 ``network``."""
    entry = SVM_DEFAULT_ASSETS[network][0]
    return SplMint(network, entry["asset"], entry["decimals"], entry.get("symbol", "USDC"))


def svm_v1_name(network: str) -> str:
    """The SDK's v1 name of a Solana CAIP-2 ``network``."""
    for name, caip2 in V1_TO_V2_NETWORK_MAP.items():
        if caip2 == network:
            return name
    raise LookupError(f"the x402 SDK has no v1 name for {network}")


def svm_keypair(name: str) -> Keypair:
    """A deterministic keypair (the same name is the same address in every run)."""
    seed = name.encode().ljust(32, b".")[:32]
    return Keypair.from_seed(seed)


class InMemorySvmLedger:
    """SPL balances per network and mint, processed transactions and scripted faults."""

    def __init__(self, mints: list[SplMint]) -> None:
        self.mints = {(mint.network, mint.address): mint for mint in mints}
        self._balances: dict[tuple[str, str], int] = {}
        self._processed: set[tuple[str, str]] = set()
        self._confirm_delays: dict[str, int] = {}
        self._next_confirm_delay = 0
        self._send_failures: list[str] = []
        self._lock = threading.RLock()

    def fund(self, mint: SplMint, owner: str, amount: int) -> None:
        """Credit ``amount`` base units to ``owner``'s associated token account."""
        with self._lock:
            key = (mint.network, derive_ata(owner, mint.address, TOKEN_PROGRAM_ADDRESS))
            self._balances[key] = self._balances.get(key, 0) + amount

    def set_balance(self, mint: SplMint, owner: str, amount: int) -> None:
        """Set ``owner``'s balance, e.g. to spend it elsewhere between verify and settle."""
        with self._lock:
            key = (mint.network, derive_ata(owner, mint.address, TOKEN_PROGRAM_ADDRESS))
            self._balances[key] = amount

    def balance(self, mint: SplMint, owner: str) -> int:
        """``owner``'s balance of ``mint``."""
        ata = derive_ata(owner, mint.address, TOKEN_PROGRAM_ADDRESS)
        with self._lock:
            return self._balances.get((mint.network, ata), 0)

    def delay_confirmations(self, waits: int = 1) -> None:
        """The next transaction sent has its first ``waits`` confirmation waits time out."""
        with self._lock:
            self._next_confirm_delay = waits

    def fail_sends(self, count: int = 1, message: str = "blockhash not found") -> None:
        """The next ``count`` sends fail before reaching the network."""
        with self._lock:
            self._send_failures.extend([message] * count)

    def state(self) -> tuple[frozenset[tuple[tuple[str, str], int]], frozenset[tuple[str, str]]]:
        """(balances, processed transactions), for comparing two ledgers run alike."""
        with self._lock:
            return frozenset(self._balances.items()), frozenset(self._processed)

    def execute(self, tx: VersionedTransaction, network: str, *, apply: bool) -> str:
        """Check (and with ``apply`` process) ``tx``; its id, or RuntimeError as a node says."""
        network = normalize_network(network)
        message = tx.message
        keys = list(message.account_keys)
        signed = to_bytes_versioned(message)
        required = message.header.num_required_signatures
        for index in range(required):
            if not tx.signatures[index].verify(keys[index], signed):
                raise RuntimeError("Transaction signature verification failure")
        tx_id = str(tx.signatures[0])
        with self._lock:
            if (network, tx_id) in self._processed:
                raise RuntimeError("This transaction has already been processed")
            moves = [self._transfer(network, keys, ix) for ix in message.instructions]
            for source, destination, amount in (m for m in moves if m is not None):
                if self._balances.get((network, source), 0) < amount:
                    raise RuntimeError(
                        "Transaction simulation failed: Error processing Instruction 2: "
                        "custom program error: 0x1"
                    )
                if apply:
                    self._balances[(network, source)] -= amount
                    key = (network, destination)
                    self._balances[key] = self._balances.get(key, 0) + amount
            if apply:
                self._processed.add((network, tx_id))
                if self._next_confirm_delay:
                    self._confirm_delays[tx_id] = self._next_confirm_delay
                    self._next_confirm_delay = 0
        return tx_id

    def _transfer(self, network: str, keys: list[Pubkey], ix: Any) -> tuple[str, str, int] | None:
        """(source, destination, amount) of a TransferChecked; None for other instructions."""
        if str(keys[ix.program_id_index]) != TOKEN_PROGRAM_ADDRESS:
            return None
        data = bytes(ix.data)
        accounts = [str(keys[i]) for i in bytes(ix.accounts)]
        if len(data) < 10 or data[0] != _TRANSFER_CHECKED or len(accounts) < 4:
            raise RuntimeError("Transaction simulation failed: invalid instruction data")
        mint = self.mints.get((network, accounts[1]))
        if mint is None or data[9] != mint.decimals:
            raise RuntimeError("Transaction simulation failed: invalid account data")
        owner = accounts[3]
        if derive_ata(owner, mint.address, TOKEN_PROGRAM_ADDRESS) != accounts[0]:
            raise RuntimeError("Transaction simulation failed: owner does not match")
        return accounts[0], accounts[2], int.from_bytes(data[1:9], "little")

    def send(self, tx: VersionedTransaction, network: str) -> str:
        """Send ``tx``: processed at once, unless a scripted failure comes first."""
        with self._lock:
            if self._send_failures:
                raise RuntimeError(self._send_failures.pop(0))
            return self.execute(tx, network, apply=True)

    def confirm(self, tx_id: str, network: str) -> None:
        """Return once ``tx_id`` is confirmed; TimeoutError while a scripted delay lasts."""
        with self._lock:
            delay = self._confirm_delays.get(tx_id, 0)
            if delay:
                self._confirm_delays[tx_id] = delay - 1
                raise TimeoutError(f"transaction {tx_id} was not confirmed in 60 seconds")
            if (normalize_network(network), tx_id) not in self._processed:
                raise TimeoutError(f"transaction {tx_id} was never processed")


class InMemorySvmSigner:
    """The SDK's ``FacilitatorSvmSigner`` protocol over an ``InMemorySvmLedger``."""

    def __init__(self, ledger: InMemorySvmLedger, fee_payer: Keypair) -> None:
        self.ledger = ledger
        self.fee_payer = fee_payer

    def get_addresses(self) -> list[str]:
        """The fee payer's address."""
        return [str(self.fee_payer.pubkey())]

    def sign_transaction(self, tx_base64: str, fee_payer: str, network: str) -> str:
        """Co-sign ``tx_base64`` as its fee payer (signature slot 0)."""
        if fee_payer != str(self.fee_payer.pubkey()):
            raise ValueError(f"no signer for fee payer {fee_payer}")
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        signature = self.fee_payer.sign_message(to_bytes_versioned(tx.message))
        signed = VersionedTransaction.populate(tx.message, [signature, *tx.signatures[1:]])
        return base64.b64encode(bytes(signed)).decode()

    def simulate_transaction(self, tx_base64: str, network: str) -> None:
        """Run ``tx_base64`` without effect; RuntimeError if it would fail."""
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        self.ledger.execute(tx, network, apply=False)

    def send_transaction(self, tx_base64: str, network: str) -> str:
        """Send ``tx_base64``; its signature."""
        return self.ledger.send(
            VersionedTransaction.from_bytes(base64.b64decode(tx_base64)), network
        )

    def confirm_transaction(self, signature: str, network: str) -> None:
        """Wait for confirmation (TimeoutError while a scripted delay lasts)."""
        self.ledger.confirm(signature, network)


FEE_PAYER = svm_keypair("x402 in-memory svm facilitator")


def register_svm(facilitator: x402Facilitator, ledger: InMemorySvmLedger) -> x402Facilitator:
    """Register the SDK's exact SVM schemes (v2 for the ledger's networks, v1 for every SVM
    name) on ``facilitator``, over ``ledger``."""
    networks = sorted({mint.network for mint in ledger.mints.values()})
    register_exact_svm_facilitator(facilitator, InMemorySvmSigner(ledger, FEE_PAYER), networks)
    return facilitator


class SolanaRpc:
    """The two JSON-RPC reads the SDK's SVM client makes: a mint account, a blockhash."""

    def __init__(self, mints: list[SplMint]) -> None:
        self.mints = {mint.address: mint for mint in mints}

    def app(self) -> web.Application:
        """The RPC's aiohttp application (serve on port 0)."""
        app = web.Application()
        app.router.add_post("/", self._rpc)
        return app

    async def _rpc(self, request: web.Request) -> web.Response:
        call = await request.json()
        method, params = call["method"], call.get("params", [])
        context = {"slot": 1, "apiVersion": "2.0.0"}
        if method == "getLatestBlockhash":
            value: Any = {"blockhash": str(_BLOCKHASH), "lastValidBlockHeight": 1_000_000}
        elif method == "getAccountInfo" and params and params[0] in self.mints:
            data = bytes(44) + bytes([self.mints[params[0]].decimals]) + b"\x01" + bytes(36)
            value = {
                "data": [base64.b64encode(data).decode(), "base64"],
                "executable": False,
                "lamports": 1_461_600,
                "owner": TOKEN_PROGRAM_ADDRESS,
                "rentEpoch": 0,
                "space": len(data),
            }
        else:
            value = None
        # Connection: close, so the SDK's synchronous client, which is never closed, holds
        # no open socket once it has its answer.
        return web.json_response(
            {"jsonrpc": "2.0", "result": {"context": context, "value": value}, "id": call["id"]},
            headers={"Connection": "close"},
        )


def svm_requirements_v2(mint: SplMint, pay_to: str, amount: int) -> PaymentRequirements:
    """v2 exact SVM requirements, the facilitator's fee payer named in ``extra``."""
    return PaymentRequirements(
        scheme="exact",
        network=mint.network,
        asset=mint.address,
        amount=str(amount),
        pay_to=pay_to,
        max_timeout_seconds=300,
        extra={"feePayer": str(FEE_PAYER.pubkey())},
    )


def svm_requirements_v1(
    name: str, mint: SplMint, pay_to: str, amount: int
) -> PaymentRequirementsV1:
    """v1 exact SVM requirements under the legacy network ``name``."""
    return PaymentRequirementsV1(
        scheme="exact",
        network=name,
        max_amount_required=str(amount),
        resource="https://api.example.com/resource",
        pay_to=pay_to,
        max_timeout_seconds=300,
        asset=mint.address,
        extra={"feePayer": str(FEE_PAYER.pubkey())},
    )


async def sign_svm_payment(
    payer: Keypair, rpc_url: str, requirements: PaymentRequirements | PaymentRequirementsV1
) -> PaymentPayload | PaymentPayloadV1:
    """The SDK SVM client's signed payload for ``requirements`` (its RPC at ``rpc_url``).

    The client is the SDK's synchronous one, run on a worker thread; it builds solana-py's
    deprecated synchronous RPC client, whose deprecation warning a test under
    ``filterwarnings = error`` has to ignore (``SVM_CLIENT_WARNING``).
    """
    client = x402ClientSync()
    register_exact_svm_client(client, KeypairSigner(payer), rpc_url=rpc_url)
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    required: PaymentRequired | PaymentRequiredV1
    if isinstance(requirements, PaymentRequirementsV1):
        required = PaymentRequiredV1(x402_version=1, accepts=[requirements])
    else:
        required = PaymentRequired(x402_version=2, accepts=[requirements])
    return await asyncio.to_thread(client.create_payment_payload, required)
