"""The SDK-driven payment cases, as data: what to do on chain and what the exporter must count.

One table, ``CASES`` (EVM), and its Solana companion ``SVM_CASES`` drive every front the
exporter records from (proxy mode, the facilitator's SDK hooks). A case is a sequence of
steps: chain set-up (``Fund``, ``Drain``, ``DelayReceipt``, ``FailBroadcast``), payloads the
SDK client signs (``Sign``), and the facilitator exchanges (``Verify`` and ``Settle``
straight through the SDK's HTTP facilitator client, ``ServerVerify`` and ``ServerSettle``
through the SDK's resource server, which retries a ``settlement_pending`` settle once),
possibly run ``Concurrently``. Each exchange says the answer the SDK facilitator gives; the
case says what the exporter must record per network (``Counted``) and per payer
(``paid_by``), what proxy mode counts per request (``requests``) and which recordings it
must refuse (``recording_failures``).

``CaseRun`` executes the non-exchange steps on any number of twins built alike (``World``s
from ``build_world``, or bare EVM chains from ``build_chains`` for ``CASES`` alone), so a
driver can answer one signed payload on each twin and compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from eth_account.signers.local import LocalAccount
from solders.keypair import Keypair
from x402 import x402Facilitator
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.schemas import PaymentPayload, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1
from x402_chain import (
    EvmChains,
    Token,
    build_client,
    build_facilitator,
    default_token,
    payer_account,
    reauthorize,
    requirements_v1,
    requirements_v2,
    sign_payment,
    v1_names,
)
from x402_svm_chain import (
    InMemorySvmLedger,
    SplMint,
    default_mint,
    register_svm,
    sign_svm_payment,
    svm_keypair,
    svm_requirements_v1,
    svm_requirements_v2,
    svm_v1_name,
)

BASE = "eip155:8453"
BASE_SEPOLIA = "eip155:84532"
MONAD = "eip155:143"
LOCAL = "eip155:31337"
"""A chain the facilitator serves and the exporter has never heard of."""
UNSERVED = "eip155:999"
"""A chain no facilitator here serves."""

SDK_STABLECOIN_NETWORKS = tuple(
    network
    for network, entries in DEFAULT_ASSETS.items()
    if entries and entries[0].get("asset_transfer_method", "eip3009") == "eip3009"
)
"""Every network whose default stablecoin in the SDK is an EIP-3009 token (the Permit2
ones need the Permit2 contracts, which the in-memory chain does not have)."""

NETWORKS = (*SDK_STABLECOIN_NETWORKS, LOCAL)
"""The chains every twin set holds."""

FEE_BPS = 100
"""The proxy fee the drivers configure (1 %), so fees are not all zero."""

MICRO = Decimal("0.000001")
"""The exporter's unit of money."""

PAY_TO = payer_account(1000).address
"""The resource server's receiving address."""

UNLISTED = Token(BASE, "0x" + "5e" * 20, "Unlisted Dollar", "1", 6, "ULD")
"""A token on Base that the SDK and the exporter do not list."""

LOCAL_TOKEN = Token(LOCAL, "0x" + "10" * 20, "Local Dollar", "1", 6, "LCD")
GHOST_TOKEN = Token(UNSERVED, "0x" + "99" * 20, "Ghost Dollar", "1", 6, "GHD")

TOKENS: Mapping[tuple[str, str], Token] = {
    **{(network, "default"): default_token(network) for network in SDK_STABLECOIN_NETWORKS},
    (BASE, "unlisted"): UNLISTED,
    (LOCAL, "default"): LOCAL_TOKEN,
    (UNSERVED, "default"): GHOST_TOKEN,
}


SOLANA = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
SOLANA_DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
SVM_MINTS: Mapping[str, SplMint] = {
    network: default_mint(network) for network in (SOLANA, SOLANA_DEVNET)
}
"""The SDK's default USDC mint on each Solana network the ledger holds."""

SVM_PAY_TO = str(svm_keypair("x402 payee").pubkey())


def svm_payer(index: int) -> Keypair:
    """Payer ``index``'s Solana keypair."""
    return svm_keypair(f"x402 payer {index}")


@dataclass
class World:
    """What one facilitator settles on: the EVM chains and, for ``SVM_CASES``, the Solana
    ledger."""

    evm: EvmChains
    svm: InMemorySvmLedger | None = None

    def facilitator(self) -> x402Facilitator:
        """The SDK's facilitator with its exact EVM (and SVM) schemes over this world."""
        facilitator = build_facilitator(self.evm)
        return facilitator if self.svm is None else register_svm(facilitator, self.svm)

    def state(self) -> tuple[object, object]:
        """Everything payments change, for comparing two worlds run alike."""
        return self.evm.state(), None if self.svm is None else self.svm.state()


def build_chains() -> EvmChains:
    """Fresh EVM chains for ``CASES``, like every other set this function builds."""
    chains = EvmChains(NETWORKS)
    chains.deploy(UNLISTED)
    chains.deploy(LOCAL_TOKEN)
    return chains


def build_world() -> World:
    """A fresh world for ``CASES`` and ``SVM_CASES``, like every other this function builds."""
    return World(build_chains(), InMemorySvmLedger(list(SVM_MINTS.values())))


# -- steps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fund:
    """Credit ``amount`` base units of a token to payer ``payer``."""

    payer: int
    network: str = BASE
    amount: int = 100_000_000
    token: str = "default"


@dataclass(frozen=True)
class Drain:
    """Payer ``payer`` spends its whole balance elsewhere (between verify and settle)."""

    payer: int
    network: str = BASE
    token: str = "default"


@dataclass(frozen=True)
class DelayReceipt:
    """The next transaction mined on ``network`` has its first ``waits`` receipt waits
    time out."""

    network: str = BASE
    waits: int = 1


@dataclass(frozen=True)
class FailBroadcast:
    """The next transaction sent on ``network`` never reaches the chain."""

    network: str = BASE


@dataclass(frozen=True)
class Sign:
    """The SDK client of payer ``payer`` signs a payment, remembered as ``label``.

    ``nonce_of`` reuses another payment's EIP-3009 nonce; ``forged_by`` signs with another
    payer's key while the authorization still names ``payer`` (an invalid signature).
    """

    label: str
    payer: int
    network: str = BASE
    amount: int = 10_000
    version: int = 2
    token: str = "default"
    nonce_of: str | None = None
    forged_by: int | None = None


@dataclass(frozen=True)
class Verify:
    """``POST /verify`` through the SDK's HTTP facilitator client.

    ``expect``: ``valid``, the ``invalidReason``, or ``http <status>`` when the facilitator
    answers with an error status (the client raises).
    """

    label: str
    expect: str = "valid"


@dataclass(frozen=True)
class Settle:
    """``POST /settle`` through the SDK's HTTP facilitator client.

    ``expect``: ``settled``, the ``errorReason``, or ``http <status>``.
    """

    label: str
    expect: str = "settled"


@dataclass(frozen=True)
class ServerVerify:
    """The SDK resource server's ``verify_payment``; ``expect`` as for ``Verify``."""

    label: str
    expect: str = "valid"


@dataclass(frozen=True)
class ServerSettle:
    """The SDK resource server's ``settle_payment`` (one retry on ``settlement_pending``);
    ``expect`` is the final answer, as for ``Settle``."""

    label: str
    expect: str = "settled"


@dataclass(frozen=True)
class Restart:
    """The recording process restarts: what it held in memory is gone, its ledger stays
    (proxy mode: the exporter; the hooks: the facilitator process they run in)."""


Exchange = Verify | Settle | ServerVerify | ServerSettle
ChainStep = Fund | Drain | DelayReceipt | FailBroadcast


@dataclass(frozen=True)
class Concurrently:
    """Run each group's steps in order, all groups at once."""

    groups: tuple[tuple[Sign | Exchange, ...], ...]


Step = ChainStep | Sign | Exchange | Concurrently | Restart


# -- expectations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Counted:
    """What the exporter records on one network (CAIP-2) during a case.

    ``received``/``verified``/``settled``/``failed``: payment events committed; ``pending``:
    payments received and not ended when the case ends; ``volume``: USD settled.
    """

    network: str
    received: int = 0
    verified: int = 0
    settled: int = 0
    failed: int = 0
    pending: int = 0
    volume: str = "0"

    @property
    def fees(self) -> Decimal:
        """The fees of the settled volume at ``FEE_BPS``, in whole micro-units (the
        exporter keeps money as integer micro-units, rounded half to even)."""
        fee = Decimal(self.volume) * FEE_BPS / 10_000
        return fee.quantize(MICRO, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Case:
    """One scenario: its steps and everything it must change in the exporter."""

    name: str
    steps: tuple[Step, ...]
    counted: tuple[Counted, ...] = ()
    requests: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """Proxy mode: x402_facilitator_requests_total{endpoint, outcome, network} deltas
    (scheme ``exact``)."""
    recording_failures: Mapping[str, int] = field(default_factory=dict)
    """Proxy mode: x402_proxy_recording_failures_total{reason} deltas."""
    paid_by: Mapping[int, tuple[int, str]] | None = None
    """Settled payments and USD by payer index; by default all of them are payer 0's."""
    proxy_duplicates: int = 0
    """Proxy mode: events derived again after a restart (its memory of the payment is gone)
    that the ledger already holds, acknowledged as duplicates and counted nowhere else."""
    conflicts: int = 0
    """Events refused as conflicts (exporter_events_rejected_total{reason="conflict"}):
    each is kept as a dead letter."""


def payer_address(index: int, network: str) -> str:
    """Payer ``index``'s address on ``network`` as the exporter records it (EVM lower case,
    Solana base58)."""
    if network in SVM_MINTS:
        return str(svm_payer(index).pubkey())
    return payer_account(index).address.lower()


def settled_by_payer(case: Case) -> dict[str, tuple[int, Decimal]]:
    """The case's settled payments and USD by payer address."""
    settled = sum(counted.settled for counted in case.counted)
    if not settled:
        return {}
    volume = sum((Decimal(counted.volume) for counted in case.counted), Decimal(0))
    paid_by = case.paid_by if case.paid_by is not None else {0: (settled, str(volume))}
    network = case.counted[0].network
    return {
        payer_address(index, network): (count, Decimal(usd))
        for index, (count, usd) in paid_by.items()
    }


def _pair(label: str, payer: int, network: str = BASE) -> tuple[Sign | Exchange, ...]:
    return (Sign(label, payer, network), Verify(label), Settle(label))


def _every_sdk_stablecoin() -> Case:
    """One v2 payment per SDK stablecoin network, and one v1 payment where it has a v1 name."""
    steps: list[Step] = []
    counted: list[Counted] = []
    requests: dict[tuple[str, str, str], int] = {}
    for network in SDK_STABLECOIN_NETWORKS:
        steps += [Fund(0, network), Sign(f"v2 {network}", 0, network)]
        steps += [Verify(f"v2 {network}"), Settle(f"v2 {network}")]
        payments = 1
        if v1_names(network):
            steps += [Sign(f"v1 {network}", 0, network, version=1)]
            steps += [Verify(f"v1 {network}"), Settle(f"v1 {network}")]
            payments = 2
        volume = str(Decimal("0.01") * payments)
        counted.append(Counted(network, payments, payments, payments, volume=volume))
        requests[("verify", "valid", network)] = payments
        requests[("settle", "settled", network)] = payments
    return Case("every-sdk-stablecoin-network", tuple(steps), tuple(counted), requests)


CONCURRENT_PAIRS = 6

CASES: tuple[Case, ...] = (
    Case(
        "v2-base-settled",
        (Fund(0), Sign("a", 0), Verify("a"), Settle("a")),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", BASE): 1, ("settle", "settled", BASE): 1},
    ),
    Case(
        "v2-base-sepolia-settled",
        (
            Fund(0, BASE_SEPOLIA),
            Sign("a", 0, BASE_SEPOLIA, amount=2_500_000),
            Verify("a"),
            Settle("a"),
        ),
        (Counted(BASE_SEPOLIA, received=1, verified=1, settled=1, volume="2.5"),),
        {("verify", "valid", BASE_SEPOLIA): 1, ("settle", "settled", BASE_SEPOLIA): 1},
    ),
    Case(
        "v1-base-settled",
        (Fund(0), Sign("a", 0, version=1), ServerVerify("a"), ServerSettle("a")),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", BASE): 1, ("settle", "settled", BASE): 1},
    ),
    Case(
        "v1-base-sepolia-settled",
        (Fund(0, BASE_SEPOLIA), Sign("a", 0, BASE_SEPOLIA, version=1), Verify("a"), Settle("a")),
        (Counted(BASE_SEPOLIA, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", BASE_SEPOLIA): 1, ("settle", "settled", BASE_SEPOLIA): 1},
    ),
    Case(
        "v1-only-name-monad-settled",
        (
            Fund(0, MONAD),
            Sign("a", 0, MONAD, amount=1_234_567, version=1),
            ServerVerify("a"),
            ServerSettle("a"),
        ),
        (Counted(MONAD, received=1, verified=1, settled=1, volume="1.234567"),),
        {("verify", "valid", MONAD): 1, ("settle", "settled", MONAD): 1},
    ),
    Case(
        "unknown-network-and-asset",
        (Fund(0, LOCAL), Sign("a", 0, LOCAL), Verify("a"), Settle("a")),
        (),
        {("verify", "valid", "other"): 1, ("settle", "settled", "other"): 1},
        {"unknown_asset": 2},
    ),
    Case(
        "unknown-asset-on-base",
        (Fund(0, token="unlisted"), Sign("a", 0, token="unlisted"), Verify("a"), Settle("a")),
        (),
        {("verify", "valid", BASE): 1, ("settle", "settled", BASE): 1},
        {"unknown_asset": 2},
    ),
    Case(
        "network-no-facilitator-serves",
        (Sign("a", 0, UNSERVED), Verify("a", "http 500"), Settle("a", "http 500")),
        (),
        {("verify", "upstream_error", "other"): 1, ("settle", "upstream_error", "other"): 1},
    ),
    Case(
        "bad-signature",
        (
            Fund(0),
            Sign("a", 0, forged_by=1),
            ServerVerify("a", "invalid_exact_evm_payload_signature"),
        ),
        (Counted(BASE, received=1, failed=1),),
        {("verify", "invalid", BASE): 1},
    ),
    Case(
        "insufficient-balance",
        (
            Fund(0, amount=9_999),
            Sign("a", 0),
            ServerVerify("a", "invalid_exact_evm_insufficient_balance"),
        ),
        (Counted(BASE, received=1, failed=1),),
        {("verify", "invalid", BASE): 1},
    ),
    Case(
        "settle-fails-after-valid-verify",
        (Fund(0), Sign("a", 0), Verify("a"), FailBroadcast(), Settle("a", "transaction_failed")),
        (Counted(BASE, received=1, verified=1, failed=1),),
        {("verify", "valid", BASE): 1, ("settle", "failed", BASE): 1},
    ),
    Case(
        "reverted-transaction",
        (Fund(0), Sign("a", 0), Verify("a"), Drain(0), Settle("a", "transaction_failed")),
        (Counted(BASE, received=1, verified=1, failed=1),),
        {("verify", "valid", BASE): 1, ("settle", "failed", BASE): 1},
    ),
    Case(
        "replayed-settle",
        (
            Fund(0),
            Sign("a", 0),
            Verify("a"),
            Settle("a"),
            Settle("a", "transaction_failed"),
        ),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {
            ("verify", "valid", BASE): 1,
            ("settle", "settled", BASE): 1,
            ("settle", "failed", BASE): 1,
        },
    ),
    Case(
        "settle-without-verify",
        (Fund(0), Sign("a", 0, amount=70_000), Settle("a")),
        (Counted(BASE, received=1, settled=1, volume="0.07"),),
        {("settle", "settled", BASE): 1},
    ),
    Case(
        "v2-monad-settled",
        (Fund(0, MONAD), Sign("a", 0, MONAD), ServerVerify("a"), ServerSettle("a")),
        (Counted(MONAD, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", MONAD): 1, ("settle", "settled", MONAD): 1},
    ),
    Case(
        "restart-between-verify-and-settle",
        (Fund(0), Sign("a", 0), Verify("a"), Restart(), Settle("a")),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", BASE): 1, ("settle", "settled", BASE): 1},
        proxy_duplicates=1,
    ),
    Case(
        "replayed-settle-after-restart",
        (
            Fund(0),
            Sign("a", 0),
            Verify("a"),
            Settle("a"),
            Restart(),
            Settle("a", "transaction_failed"),
        ),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {
            ("verify", "valid", BASE): 1,
            ("settle", "settled", BASE): 1,
            ("settle", "failed", BASE): 1,
        },
        proxy_duplicates=2,  # its receipt, and its failure: the payment ended settled
    ),
    Case(
        "settlement-pending-then-success",
        (Fund(0), Sign("a", 0), ServerVerify("a"), DelayReceipt(), ServerSettle("a")),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {
            ("verify", "valid", BASE): 1,
            ("settle", "pending", BASE): 1,
            ("settle", "settled", BASE): 1,
        },
    ),
    Case(
        "settlement-pending-twice-then-settled",
        (
            Fund(0),
            Sign("a", 0),
            ServerVerify("a"),
            DelayReceipt(waits=2),
            ServerSettle("a", "settlement_pending"),
            ServerSettle("a"),
        ),
        (Counted(BASE, received=1, verified=1, settled=1, volume="0.01"),),
        {
            ("verify", "valid", BASE): 1,
            ("settle", "pending", BASE): 2,
            ("settle", "settled", BASE): 1,
        },
    ),
    Case(
        "settle-without-verify-left-pending",
        (Fund(0), Sign("a", 0), DelayReceipt(), Settle("a", "settlement_pending")),
        (Counted(BASE, received=1, pending=1),),
        {("settle", "pending", BASE): 1},
    ),
    Case(
        "settlement-pending-left-pending",
        (Fund(0), Sign("a", 0), Verify("a"), DelayReceipt(), Settle("a", "settlement_pending")),
        (Counted(BASE, received=1, verified=1, pending=1),),
        {("verify", "valid", BASE): 1, ("settle", "pending", BASE): 1},
    ),
    Case(
        "two-payers-one-nonce",
        (
            Fund(0),
            Fund(1),
            Sign("a", 0),
            Sign("b", 1, amount=20_000, nonce_of="a"),
            Verify("a"),
            Verify("b"),
            Settle("a"),
            Settle("b"),
        ),
        (Counted(BASE, received=2, verified=2, settled=2, volume="0.03"),),
        {("verify", "valid", BASE): 2, ("settle", "settled", BASE): 2},
        paid_by={0: (1, "0.01"), 1: (1, "0.02")},
    ),
    Case(
        "forged-copy-of-a-pending-payment",
        (
            Fund(0),
            Sign("a", 0),
            Verify("a"),
            Sign("forged", 0, nonce_of="a", forged_by=2),
            Verify("forged", "invalid_exact_evm_payload_signature"),
            Settle("a"),
        ),
        (Counted(BASE, received=2, verified=1, settled=1, failed=1, volume="0.01"),),
        {
            ("verify", "valid", BASE): 1,
            ("verify", "invalid", BASE): 1,
            ("settle", "settled", BASE): 1,
        },
    ),
    Case(
        "concurrent-pairs",
        (
            *(Fund(payer) for payer in range(CONCURRENT_PAIRS)),
            Concurrently(tuple(_pair(f"p{payer}", payer) for payer in range(CONCURRENT_PAIRS))),
        ),
        (
            Counted(
                BASE,
                received=CONCURRENT_PAIRS,
                verified=CONCURRENT_PAIRS,
                settled=CONCURRENT_PAIRS,
                volume=str(Decimal("0.01") * CONCURRENT_PAIRS),
            ),
        ),
        {
            ("verify", "valid", BASE): CONCURRENT_PAIRS,
            ("settle", "settled", BASE): CONCURRENT_PAIRS,
        },
        paid_by={payer: (1, "0.01") for payer in range(CONCURRENT_PAIRS)},
    ),
    _every_sdk_stablecoin(),
    Case(
        "invalid-verify-then-topped-up-and-settled",
        (
            Fund(0, amount=5_000),
            Sign("a", 0),
            Verify("a", "invalid_exact_evm_insufficient_balance"),
            Fund(0),
            Verify("a"),
            Settle("a"),
        ),
        # The first ending stands: the payment failed at its verify. The settlement of the
        # same authorization after it contradicts that record and is kept as a conflict
        # dead letter for the operator to see (docs/architecture.md section 2).
        (Counted(BASE, received=1, failed=1),),
        {
            ("verify", "invalid", BASE): 1,
            ("verify", "valid", BASE): 1,
            ("settle", "settled", BASE): 1,
        },
        {"conflict": 1},
        conflicts=1,
    ),
)
"""The EVM cases, by name unique (a ``World`` or bare ``EvmChains`` runs them)."""

SVM_CASES: tuple[Case, ...] = (
    Case(
        "v2-solana-settled",
        (Fund(0, SOLANA), Sign("a", 0, SOLANA), ServerVerify("a"), ServerSettle("a")),
        (Counted(SOLANA, received=1, verified=1, settled=1, volume="0.01"),),
        {("verify", "valid", SOLANA): 1, ("settle", "settled", SOLANA): 1},
    ),
    Case(
        "v1-solana-devnet-settled",
        (
            Fund(0, SOLANA_DEVNET),
            Sign("a", 0, SOLANA_DEVNET, amount=420_000, version=1),
            Verify("a"),
            Settle("a"),
        ),
        (Counted(SOLANA_DEVNET, received=1, verified=1, settled=1, volume="0.42"),),
        {("verify", "valid", SOLANA_DEVNET): 1, ("settle", "settled", SOLANA_DEVNET): 1},
    ),
    Case(
        "solana-insufficient-balance",
        (
            Fund(0, SOLANA, amount=9_999),
            Sign("a", 0, SOLANA),
            ServerVerify("a", "transaction_simulation_failed"),
        ),
        (Counted(SOLANA, received=1, failed=1),),
        {("verify", "invalid", SOLANA): 1},
    ),
    Case(
        "solana-settlement-pending-then-success",
        (
            Fund(0, SOLANA),
            Sign("a", 0, SOLANA),
            ServerVerify("a"),
            DelayReceipt(SOLANA),
            ServerSettle("a"),
        ),
        (Counted(SOLANA, received=1, verified=1, settled=1, volume="0.01"),),
        {
            ("verify", "valid", SOLANA): 1,
            ("settle", "pending", SOLANA): 1,
            ("settle", "settled", SOLANA): 1,
        },
    ),
    Case(
        "solana-replayed-settle",
        (
            Fund(0, SOLANA),
            Sign("a", 0, SOLANA),
            Settle("a"),
            Settle("a", "transaction_simulation_failed"),
        ),
        (Counted(SOLANA, received=1, settled=1, volume="0.01"),),
        {("settle", "settled", SOLANA): 1, ("settle", "failed", SOLANA): 1},
    ),
    Case(
        "solana-payer-spends-before-settle",
        (
            Fund(0, SOLANA),
            Sign("a", 0, SOLANA),
            Verify("a"),
            Drain(0, SOLANA),
            Settle("a", "transaction_simulation_failed"),
        ),
        (Counted(SOLANA, received=1, verified=1, failed=1),),
        {("verify", "valid", SOLANA): 1, ("settle", "failed", SOLANA): 1},
    ),
)
"""The Solana cases: they need a ``World`` with a Solana ledger and a ``SolanaRpc``."""


# -- running the non-exchange steps -------------------------------------------------------


@dataclass
class Payment:
    """A signed payment and the requirements it answers."""

    payload: PaymentPayload | PaymentPayloadV1
    requirements: PaymentRequirements | PaymentRequirementsV1


class CaseRun:
    """Applies a case's chain steps to every twin world and signs its payments once.

    Solana payments are built by the SDK's SVM client, which reads the mint and a blockhash
    from the ``SolanaRpc`` at ``svm_rpc_url``.
    """

    def __init__(self, twins: Sequence[World | EvmChains], svm_rpc_url: str | None = None) -> None:
        self.twins = [twin if isinstance(twin, World) else World(twin) for twin in twins]
        self.svm_rpc_url = svm_rpc_url
        self.payments: dict[str, Payment] = {}

    def apply(self, step: ChainStep) -> None:
        """Apply a chain step to every twin."""
        for world in self.twins:
            if step.network in SVM_MINTS:
                if world.svm is None:
                    raise ValueError(f"{step}: this world has no Solana ledger")
                self._apply_svm(step, world.svm)
                continue
            chain = world.evm[step.network]
            if isinstance(step, Fund):
                token = TOKENS[(step.network, step.token)]
                chain.fund(token, payer_account(step.payer).address, step.amount)
            elif isinstance(step, Drain):
                token = TOKENS[(step.network, step.token)]
                chain.set_balance(token, payer_account(step.payer).address, 0)
            elif isinstance(step, DelayReceipt):
                chain.delay_receipts(step.waits)
            else:
                chain.fail_broadcasts(1)

    @staticmethod
    def _apply_svm(step: ChainStep, ledger: InMemorySvmLedger) -> None:
        mint = SVM_MINTS[step.network]
        if isinstance(step, Fund):
            ledger.fund(mint, str(svm_payer(step.payer).pubkey()), step.amount)
        elif isinstance(step, Drain):
            ledger.set_balance(mint, str(svm_payer(step.payer).pubkey()), 0)
        elif isinstance(step, DelayReceipt):
            ledger.delay_confirmations(step.waits)
        else:
            ledger.fail_sends(1)

    async def sign(self, step: Sign) -> Payment:
        """The payment ``step`` describes, signed by the SDK client (remembered by label)."""
        if step.network in SVM_MINTS:
            return await self._sign_svm(step)
        token = TOKENS[(step.network, step.token)]
        account: LocalAccount = payer_account(step.payer)
        requirements: PaymentRequirements | PaymentRequirementsV1
        if step.version == 1:
            name = v1_names(step.network)[0]
            requirements = requirements_v1(name, token, PAY_TO, step.amount)
        else:
            requirements = requirements_v2(token, PAY_TO, step.amount)
        payload = await sign_payment(build_client(account), requirements)
        if step.nonce_of is not None or step.forged_by is not None:
            nonce = None
            if step.nonce_of is not None:
                nonce = self.payments[step.nonce_of].payload.payload["authorization"]["nonce"]
            signer = account if step.forged_by is None else payer_account(step.forged_by)
            payload = reauthorize(payload, token, signer, nonce=nonce)
        payment = Payment(payload, requirements)
        self.payments[step.label] = payment
        return payment

    async def _sign_svm(self, step: Sign) -> Payment:
        if self.svm_rpc_url is None:
            raise ValueError("a Solana payment needs the SolanaRpc's URL (svm_rpc_url)")
        if step.nonce_of is not None or step.forged_by is not None:
            raise ValueError("nonce_of and forged_by are EIP-3009 notions")
        mint = SVM_MINTS[step.network]
        requirements: PaymentRequirements | PaymentRequirementsV1
        if step.version == 1:
            name = svm_v1_name(step.network)
            requirements = svm_requirements_v1(name, mint, SVM_PAY_TO, step.amount)
        else:
            requirements = svm_requirements_v2(mint, SVM_PAY_TO, step.amount)
        payload = await sign_svm_payment(svm_payer(step.payer), self.svm_rpc_url, requirements)
        payment = Payment(payload, requirements)
        self.payments[step.label] = payment
        return payment
