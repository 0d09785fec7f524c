"""The in-memory chains under the SDK's facilitators behave like real ones: FiatToken v2
tokens on EVM, SPL tokens on Solana.

The SDK-driven suites trust ``x402_chain`` and ``x402_svm_chain`` for balances, nonces,
signatures and receipts; these tests hold them to that, mostly through the SDK's own
facilitators.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer
from eth_abi.abi import encode
from eth_utils.crypto import keccak
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from x402 import x402Facilitator
from x402.mechanisms.evm.constants import MULTICALL3_ADDRESS
from x402.schemas import PaymentPayload
from x402_chain import (
    REVERT_EXPIRED,
    REVERT_INVALID_SIGNATURE,
    REVERT_NOT_YET_VALID,
    BroadcastFailed,
    ContractRevert,
    EvmChains,
    InMemoryFacilitatorSigner,
    build_client,
    build_facilitator,
    default_token,
    payer_account,
    reauthorize,
    requirements_v1,
    requirements_v2,
    sign_payment,
)
from x402_svm_chain import (
    SVM_CLIENT_WARNING,
    InMemorySvmLedger,
    SolanaRpc,
    register_svm,
    sign_svm_payment,
    svm_keypair,
    svm_requirements_v2,
)
from x402_svm_chain import default_mint as default_svm_mint

BASE = "eip155:8453"
PAY_TO = payer_account(1000).address


def _chains(funded: int = 1_000_000) -> EvmChains:
    chains = EvmChains([BASE, "eip155:143"])
    for network in (BASE, "eip155:143"):
        for payer in (0, 1):
            chains[network].fund(chains.token(network), payer_account(payer).address, funded)
    return chains


def _authorization(payload: object) -> dict[str, str]:
    assert isinstance(payload, PaymentPayload)
    authorization: dict[str, str] = payload.payload["authorization"]
    return authorization


async def test_a_payment_moves_the_balance_once_and_uses_its_payers_nonce() -> None:
    chains = _chains()
    token, chain = chains.token(BASE), chains[BASE]
    facilitator = build_facilitator(chains)
    requirements = requirements_v2(token, PAY_TO, 10_000)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    nonce = bytes.fromhex(_authorization(payload)["nonce"][2:])

    assert (await facilitator.verify(payload, requirements)).is_valid
    settled = await facilitator.settle(payload, requirements)
    assert settled.success
    assert chain.balance_of(token, payer_account(0).address) == 990_000
    assert chain.balance_of(token, PAY_TO) == 10_000
    assert chain.authorization_state(token, payer_account(0).address, nonce)
    assert not chain.authorization_state(token, payer_account(1).address, nonce)
    receipt = chain.receipt(settled.transaction)
    assert receipt is not None and receipt.status == 1

    replay = await facilitator.settle(payload, requirements)
    assert (replay.success, replay.error_reason) == (False, "transaction_failed")
    reverted = chain.receipt(replay.transaction)
    assert reverted is not None and (reverted.status, reverted.logs) == (0, [])
    assert chain.balance_of(token, PAY_TO) == 10_000

    other = reauthorize(
        await sign_payment(build_client(payer_account(1)), requirements),
        token,
        payer_account(1),
        nonce=_authorization(payload)["nonce"],
    )
    assert (await facilitator.settle(other, requirements)).success
    assert chain.balance_of(token, PAY_TO) == 20_000


async def test_signatures_are_recovered_not_trusted() -> None:
    chains = _chains()
    token = chains.token(BASE)
    facilitator = build_facilitator(chains)
    requirements = requirements_v2(token, PAY_TO, 10_000)
    honest = await sign_payment(build_client(payer_account(0)), requirements)
    forged = reauthorize(honest, token, payer_account(1))

    verdict = await facilitator.verify(forged, requirements)
    assert (verdict.is_valid, verdict.invalid_reason) == (
        False,
        "invalid_exact_evm_payload_signature",
    )
    authorization = _authorization(forged)
    signature = bytes.fromhex(forged.payload["signature"][2:])
    args = (
        authorization["from"],
        authorization["to"],
        int(authorization["value"]),
        int(authorization["validAfter"]),
        int(authorization["validBefore"]),
        bytes.fromhex(authorization["nonce"][2:]),
        signature,
    )
    with pytest.raises(ContractRevert, match=REVERT_INVALID_SIGNATURE):
        chains[BASE].call(token.address, "transferWithAuthorization", args)


async def test_the_validity_window_follows_the_chains_clock() -> None:
    now = [0.0]
    chains = EvmChains([BASE], clock=lambda: now[0])
    token = chains.token(BASE)
    chains[BASE].fund(token, payer_account(0).address, 10_000)
    requirements = requirements_v2(token, PAY_TO, 10_000, max_timeout_seconds=60)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    authorization = _authorization(payload)
    args = (
        authorization["from"],
        authorization["to"],
        10_000,
        int(authorization["validAfter"]),
        int(authorization["validBefore"]),
        bytes.fromhex(authorization["nonce"][2:]),
        bytes.fromhex(payload.payload["signature"][2:]),
    )
    now[0] = int(authorization["validAfter"])
    with pytest.raises(ContractRevert, match=REVERT_NOT_YET_VALID):
        chains[BASE].call(token.address, "transferWithAuthorization", args)
    now[0] = int(authorization["validBefore"])
    with pytest.raises(ContractRevert, match=REVERT_EXPIRED):
        chains[BASE].call(token.address, "transferWithAuthorization", args)
    now[0] -= 1
    chains[BASE].call(token.address, "transferWithAuthorization", args)


async def test_a_receipt_wait_times_out_then_the_retry_reconciles() -> None:
    chains = _chains()
    token = chains.token(BASE)
    facilitator = build_facilitator(chains)
    requirements = requirements_v2(token, PAY_TO, 10_000)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    chains[BASE].delay_receipts(1)

    first = await facilitator.settle(payload, requirements)
    assert (first.success, first.error_reason) == (False, "settlement_pending")
    assert chains[BASE].balance_of(token, PAY_TO) == 10_000  # mined, unconfirmed
    second = await facilitator.settle(payload, requirements)
    assert second.success
    assert second.transaction == first.transaction
    assert len(chains[BASE].state().transactions) == 1


async def test_a_failed_broadcast_mines_nothing() -> None:
    chains = _chains()
    token = chains.token(BASE)
    requirements = requirements_v2(token, PAY_TO, 10_000)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    chains[BASE].fail_broadcasts(1, "nonce too low")
    answer = await build_facilitator(chains).settle(payload, requirements)
    assert (answer.success, answer.transaction) == (False, "")
    assert answer.error_message == "nonce too low"
    assert chains[BASE].state().transactions == frozenset()
    with pytest.raises(BroadcastFailed):
        chains[BASE].fail_broadcasts(1)
        InMemoryFacilitatorSigner(chains[BASE]).send_transaction(PAY_TO, b"")


async def test_v1_names_reach_their_own_chain() -> None:
    chains = _chains()
    monad = default_token("eip155:143")
    facilitator = build_facilitator(chains)
    requirements = requirements_v1("monad", monad, PAY_TO, 500)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    answer = await facilitator.settle(payload, requirements)
    assert (answer.success, answer.network) == (True, "monad")
    assert chains["eip155:143"].balance_of(monad, PAY_TO) == 500
    assert chains[BASE].balance_of(chains.token(BASE), PAY_TO) == 0
    kinds = {(kind.x402_version, kind.network) for kind in facilitator.get_supported().kinds}
    assert {(2, BASE), (2, "eip155:143"), (1, "base"), (1, "monad")} <= kinds


def test_multicall_answers_each_call_or_its_revert() -> None:
    chains = _chains(funded=42)
    token = chains.token(BASE)
    signer = InMemoryFacilitatorSigner(chains[BASE])
    payer = payer_account(0).address

    def call(signature: str, types: list[str], args: list[object]) -> tuple[str, bytes]:
        return (token.address, keccak(text=signature)[:4] + encode(types, args))

    calls = [
        call("balanceOf(address)", ["address"], [payer]),
        call("authorizationState(address,bytes32)", ["address", "bytes32"], [payer, b"\0" * 32]),
        call("name()", [], []),
        (PAY_TO, keccak(text="name()")[:4]),
        (token.address, b"\xde\xad\xbe\xef"),
    ]
    results = signer.read_contract(MULTICALL3_ADDRESS, [], "tryAggregate", False, calls)
    assert results[0] == (True, encode(["uint256"], [42]))
    assert results[1] == (True, encode(["bool"], [False]))
    assert results[2] == (True, encode(["string"], [token.name]))
    assert results[3] == (True, b"")  # an account answers nothing
    assert results[4][0] is False


async def test_twin_chains_run_alike_end_alike() -> None:
    twins = [_chains(), _chains()]
    token = twins[0].token(BASE)
    requirements = requirements_v2(token, PAY_TO, 10_000)
    payload = await sign_payment(build_client(payer_account(0)), requirements)
    answers = [await build_facilitator(chains).settle(payload, requirements) for chains in twins]
    assert answers[0] == answers[1]
    assert twins[0].state() == twins[1].state()


@pytest.mark.filterwarnings(SVM_CLIENT_WARNING)
async def test_the_solana_ledger_checks_signatures_balances_and_replays(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    mint = default_svm_mint("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp")
    ledger = InMemorySvmLedger([mint])
    rpc = await aiohttp_server(SolanaRpc([mint]).app(), port=0)
    rpc_url = str(rpc.make_url("")).rstrip("/")
    facilitator = register_svm(x402Facilitator(), ledger)
    payer, pay_to = svm_keypair("payer"), str(svm_keypair("payee").pubkey())
    ledger.fund(mint, str(payer.pubkey()), 15_000)
    requirements = svm_requirements_v2(mint, pay_to, 10_000)
    payload = await sign_svm_payment(payer, rpc_url, requirements)

    tampered = VersionedTransaction.from_bytes(base64.b64decode(payload.payload["transaction"]))
    forged = VersionedTransaction.populate(tampered.message, [Signature.default()] * 2)
    with pytest.raises(RuntimeError, match="signature verification failure"):
        ledger.execute(forged, mint.network, apply=False)

    assert (await facilitator.verify(payload, requirements)).is_valid
    settled = await facilitator.settle(payload, requirements)
    assert settled.success
    assert (ledger.balance(mint, str(payer.pubkey())), ledger.balance(mint, pay_to)) == (
        5_000,
        10_000,
    )
    replay = await facilitator.settle(payload, requirements)
    assert (replay.success, replay.error_reason) == (False, "transaction_simulation_failed")
    again = await sign_svm_payment(payer, rpc_url, requirements)
    verdict = await facilitator.verify(again, requirements)
    assert (verdict.is_valid, verdict.invalid_reason) == (False, "transaction_simulation_failed")
