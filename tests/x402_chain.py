"""An in-memory EVM chain under the official x402 SDK's facilitator logic.

The SDK's exact-scheme facilitators (v1 and v2) talk to a chain only through its
``FacilitatorEvmSigner`` protocol: contract reads (including Multicall3 batches and
``transferWithAuthorization`` simulations), contract writes, receipt waits and ``eth_getCode``.
``InMemoryFacilitatorSigner`` implements that protocol over ``InMemoryEvmChain``, whose
EIP-3009 tokens behave like FiatToken v2: per-payer nonces (``authorizationState(authorizer,
nonce)``), the validity window, real ECDSA recovery of the EIP-712 signature through eth_account,
balances, ``Transfer``/``AuthorizationUsed`` logs, and the on-chain revert messages the SDK parses.

A real chain mines a broadcast transaction even when it reverts (the SDK's web3 signer sends
with a fixed gas limit, without estimating), so a transfer that fails on chain is mined with
status 0 and no state change. Faults a test needs are scripted on the chain: a broadcast that
fails before reaching the chain, and a transaction whose receipt waits time out a given number
of times (the facilitator answers ``settlement_pending``, a later wait succeeds).

``EvmChains`` holds one chain per network, seeded with the SDK's own default stablecoins;
``build_facilitator`` registers the SDK's exact EVM schemes, v2 under the CAIP-2 id and v1
under every legacy name the SDK maps to that chain id; ``build_client`` gives an SDK client
signing with an eth_account key. Two ``EvmChains`` built and funded alike are in the same state,
so one request can be answered on each and the answers compared.

Solana has its own module, ``x402_svm_chain``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_abi.abi import decode, encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from x402 import x402Client, x402Facilitator
from x402.mechanisms.evm.constants import MULTICALL3_ADDRESS
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.exact import (
    ExactEvmFacilitatorScheme,
    ExactEvmSchemeConfig,
    register_exact_evm_client,
)
from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1, ExactEvmSchemeV1Config
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import (
    ExactEIP3009Authorization,
    TransactionReceipt,
    TypedDataDomain,
    TypedDataField,
)
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS, V1_NETWORKS
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    SchemeNotFoundError,
    SettleResponse,
    VerifyResponse,
)
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

# FiatToken v2 revert strings; the SDK maps them to its error reasons.
REVERT_INVALID_SIGNATURE = "FiatTokenV2: invalid signature"
REVERT_NONCE_USED = "FiatTokenV2: authorization is used or canceled"
REVERT_NOT_YET_VALID = "FiatTokenV2: authorization is not yet valid"
REVERT_EXPIRED = "FiatTokenV2: authorization is expired"
REVERT_BALANCE = "ERC20: transfer amount exceeds balance"

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()

# Stand-in runtime code: anything non-empty tells the SDK "this address is a contract".
_TOKEN_CODE = bytes.fromhex("6080604052")

_EIP3009_TYPES: list[dict[str, str]] = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
_VRS_INPUTS = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8"]
_VRS_INPUTS += ["bytes32", "bytes32"]
_BYTES_INPUTS = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]


class ContractRevert(Exception):
    """An ``eth_call`` or simulation that reverted, worded like a node's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"execution reverted: {reason}")
        self.reason = reason


class BroadcastFailed(ConnectionError):
    """A scripted failure to send a transaction: nothing reached the chain."""


@dataclass(frozen=True)
class _Function:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def selector(self) -> bytes:
        return keccak(text=f"{self.name}({','.join(self.inputs)})")[:4]


_TOKEN_FUNCTIONS = (
    _Function("balanceOf", ("address",), ("uint256",)),
    _Function("name", (), ("string",)),
    _Function("version", (), ("string",)),
    _Function("decimals", (), ("uint8",)),
    _Function("authorizationState", ("address", "bytes32"), ("bool",)),
    _Function("transferWithAuthorization", tuple(_VRS_INPUTS), ()),
    _Function("transferWithAuthorization", tuple(_BYTES_INPUTS), ()),
)
_BY_SELECTOR = {function.selector: function for function in _TOKEN_FUNCTIONS}


@dataclass(frozen=True)
class Token:
    """An EIP-3009 token deployed on one network (its EIP-712 domain is name/version)."""

    network: str
    address: str
    name: str
    version: str
    decimals: int
    symbol: str

    def units(self, amount: str) -> int:
        """``amount`` in whole tokens ("0.01") as base units, exactly."""
        whole, _, fraction = amount.partition(".")
        return int(whole + fraction.ljust(self.decimals, "0")[: self.decimals])


def default_token(network: str) -> Token:
    """The SDK's own default stablecoin for ``network`` (first EIP-3009 entry)."""
    for entry in DEFAULT_ASSETS.get(network, []):
        if entry.get("asset_transfer_method", "eip3009") == "eip3009":
            return Token(
                network=network,
                address=to_checksum_address(entry["asset"]),
                name=entry["name"],
                version=entry["version"],
                decimals=entry["decimals"],
                symbol=entry["symbol"],
            )
    raise LookupError(f"the x402 SDK lists no EIP-3009 default asset for {network}")


@dataclass
class _TokenState:
    token: Token
    balances: dict[str, int] = field(default_factory=dict)
    used: set[tuple[str, bytes]] = field(default_factory=set)


@dataclass(frozen=True)
class ChainState:
    """A comparable picture of a chain: balances, used authorizations, transactions."""

    balances: dict[tuple[str, str], int]
    used_authorizations: frozenset[tuple[str, str, bytes]]
    transactions: frozenset[tuple[str, int]]
    """(hash, status) of every mined transaction, in no order."""


class InMemoryEvmChain:
    """One EVM chain: EIP-3009 tokens, mined transactions and scripted faults.

    Thread-safe: the SDK's facilitator is synchronous and may be driven from worker threads.
    """

    def __init__(
        self,
        network: str,
        *,
        facilitator_account: LocalAccount,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not network.startswith("eip155:"):
            raise ValueError(f"not an EVM CAIP-2 network: {network}")
        self.network = network
        self.chain_id = int(network.removeprefix("eip155:"))
        self.facilitator_account = facilitator_account
        self._clock = clock
        self._lock = threading.RLock()
        self._tokens: dict[str, _TokenState] = {}
        self._receipts: dict[str, TransactionReceipt] = {}
        self._order: list[str] = []
        self._sent: dict[bytes, int] = {}
        self._receipt_delays: dict[str, int] = {}
        self._next_receipt_delay = 0
        self._broadcast_failures: list[str] = []
        self._block = 1

    # -- setup ----------------------------------------------------------------------------

    def deploy(self, token: Token) -> Token:
        """Put ``token`` on this chain (its address then has code)."""
        if token.network != self.network:
            raise ValueError(f"{token.symbol} is on {token.network}, not {self.network}")
        with self._lock:
            self._tokens.setdefault(token.address.lower(), _TokenState(token))
        return token

    def tokens(self) -> list[Token]:
        """The tokens deployed here."""
        with self._lock:
            return [state.token for state in self._tokens.values()]

    def fund(self, token: Token, address: str, amount: int) -> None:
        """Credit ``amount`` base units of ``token`` to ``address``."""
        with self._lock:
            balances = self._token(token.address).balances
            balances[address.lower()] = balances.get(address.lower(), 0) + amount

    def set_balance(self, token: Token, address: str, amount: int) -> None:
        """Set ``address``'s balance, e.g. to spend it elsewhere between verify and settle."""
        with self._lock:
            self._token(token.address).balances[address.lower()] = amount

    def delay_receipts(self, waits: int = 1) -> None:
        """The next transaction mined here has its first ``waits`` receipt waits time out."""
        with self._lock:
            self._next_receipt_delay = waits

    def fail_broadcasts(self, count: int = 1, message: str = "connection reset by peer") -> None:
        """The next ``count`` transaction sends fail before reaching the chain."""
        with self._lock:
            self._broadcast_failures.extend([message] * count)

    # -- reads ----------------------------------------------------------------------------

    def balance_of(self, token: Token | str, address: str) -> int:
        """``balanceOf(address)`` of ``token`` (a Token or its address)."""
        token_address = token if isinstance(token, str) else token.address
        with self._lock:
            return self._token(token_address).balances.get(address.lower(), 0)

    def authorization_state(self, token: Token | str, authorizer: str, nonce: bytes) -> bool:
        """EIP-3009 ``authorizationState(authorizer, nonce)``: used or canceled."""
        token_address = token if isinstance(token, str) else token.address
        with self._lock:
            return (authorizer.lower(), nonce) in self._token(token_address).used

    def code_at(self, address: str) -> bytes:
        """Runtime code at ``address``: tokens and Multicall3 have some, accounts none."""
        with self._lock:
            if address.lower() in self._tokens or address.lower() == MULTICALL3_ADDRESS.lower():
                return _TOKEN_CODE
            return b""

    def receipt(self, tx_hash: str) -> TransactionReceipt | None:
        """The mined transaction's receipt, or None if it was never mined."""
        with self._lock:
            return self._receipts.get(tx_hash.lower())

    def state(self) -> ChainState:
        """Everything a payment changes, for comparing two chains run alike."""
        with self._lock:
            balances = {
                (state.token.address, holder): amount
                for state in self._tokens.values()
                for holder, amount in state.balances.items()
            }
            used = frozenset(
                (state.token.address, authorizer, nonce)
                for state in self._tokens.values()
                for authorizer, nonce in state.used
            )
            transactions = frozenset((h, self._receipts[h].status) for h in self._order)
            return ChainState(balances, used, transactions)

    # -- contract execution -----------------------------------------------------------------

    def call(self, address: str, function: str, args: Sequence[Any]) -> Any:
        """Run a token function without changing state (``eth_call``); raises ContractRevert."""
        with self._lock:
            if self.code_at(address) == b"":
                if function == "transferWithAuthorization":
                    return None  # a call to an account succeeds and returns nothing
                raise ValueError(
                    f"could not decode the result of {function} at {address}: "
                    "is the contract deployed?"
                )
            state = self._token(address)
            if function == "balanceOf":
                return state.balances.get(str(args[0]).lower(), 0)
            if function == "name":
                return state.token.name
            if function == "version":
                return state.token.version
            if function == "decimals":
                return state.token.decimals
            if function == "authorizationState":
                return (str(args[0]).lower(), bytes(args[1])) in state.used
            if function == "transferWithAuthorization":
                self._check_transfer(state, args)
                return None
            raise ContractRevert(f"unknown function {function}")

    def transact(self, address: str, function: str, args: Sequence[Any], calldata: bytes) -> str:
        """Broadcast a transaction; it is mined at once (status 0 if it reverts)."""
        with self._lock:
            if self._broadcast_failures:
                raise BroadcastFailed(self._broadcast_failures.pop(0))
            # The hash depends on what is sent, not on when: two chains given the same
            # transactions in another order (concurrent requests) name them alike.
            sent = self._sent.get(calldata, 0)
            self._sent[calldata] = sent + 1
            tx_hash = (
                "0x"
                + keccak(
                    self.chain_id.to_bytes(32, "big") + sent.to_bytes(32, "big") + calldata
                ).hex()
            )
            logs: list[dict[str, Any]] = []
            status = 1
            if function != "transferWithAuthorization":
                status = 0
            elif self.code_at(address) != b"":
                state = self._token(address)
                try:
                    sender, recipient, value, nonce = self._check_transfer(state, args)
                except ContractRevert:
                    status = 0
                else:
                    state.used.add((sender.lower(), nonce))
                    state.balances[sender.lower()] -= value
                    state.balances[recipient.lower()] = (
                        state.balances.get(recipient.lower(), 0) + value
                    )
                    logs = _transfer_logs(state.token.address, sender, recipient, value, nonce)
            self._block += 1
            self._receipts[tx_hash] = TransactionReceipt(
                status=status, block_number=self._block, tx_hash=tx_hash, logs=logs
            )
            self._order.append(tx_hash)
            if self._next_receipt_delay:
                self._receipt_delays[tx_hash] = self._next_receipt_delay
                self._next_receipt_delay = 0
            return tx_hash

    def wait_for_receipt(self, tx_hash: str) -> TransactionReceipt:
        """The receipt, or TimeoutError while a scripted delay lasts or if never mined."""
        with self._lock:
            key = tx_hash.lower()
            delay = self._receipt_delays.get(key, 0)
            if delay:
                self._receipt_delays[key] = delay - 1
                raise TimeoutError(f"transaction {tx_hash} is not in the chain after 120 seconds")
            receipt = self._receipts.get(key)
            if receipt is None:
                raise TimeoutError(f"transaction {tx_hash} is not in the chain after 120 seconds")
            return receipt

    def _token(self, address: str) -> _TokenState:
        state = self._tokens.get(address.lower())
        if state is None:
            raise ContractRevert(f"no contract at {address}")
        return state

    def _check_transfer(
        self, state: _TokenState, args: Sequence[Any]
    ) -> tuple[str, str, int, bytes]:
        """FiatToken v2's checks, in its order; returns (from, to, value, nonce)."""
        sender, recipient = str(args[0]), str(args[1])
        value, valid_after, valid_before = int(args[2]), int(args[3]), int(args[4])
        nonce = bytes(args[5])
        now = self._clock()
        if not now > valid_after:
            raise ContractRevert(REVERT_NOT_YET_VALID)
        if not now < valid_before:
            raise ContractRevert(REVERT_EXPIRED)
        if (sender.lower(), nonce) in state.used:
            raise ContractRevert(REVERT_NONCE_USED)
        signature = (
            bytes(args[7]) + bytes(args[8]) + bytes([int(args[6])])
            if len(args) == 9
            else bytes(args[6])
        )
        message = {
            "from": to_checksum_address(sender),
            "to": to_checksum_address(recipient),
            "value": value,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        }
        if _recover(state.token, self.chain_id, message, signature) != sender.lower():
            raise ContractRevert(REVERT_INVALID_SIGNATURE)
        if state.balances.get(sender.lower(), 0) < value:
            raise ContractRevert(REVERT_BALANCE)
        return sender, recipient, value, nonce


def _recover(token: Token, chain_id: int, message: dict[str, Any], signature: bytes) -> str:
    """The lowercase address that signed the EIP-3009 authorization, or "" if none."""
    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": _EIP3009_TYPES,
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": token.name,
            "version": token.version,
            "chainId": chain_id,
            "verifyingContract": token.address,
        },
        "message": message,
    }
    return _recover_typed(typed, signature)


def _recover_typed(typed: dict[str, Any], signature: bytes) -> str:
    if len(signature) != 65:
        return ""
    try:
        signer: str = Account.recover_message(
            encode_typed_data(full_message=typed), signature=signature
        )
    except Exception:  # ecrecover yields address(0) for any malformed signature
        return ""
    return signer.lower()


def _transfer_logs(
    token: str, sender: str, recipient: str, value: int, nonce: bytes
) -> list[dict[str, Any]]:
    def topic(address: str) -> str:
        return "0x" + "00" * 12 + address.lower().removeprefix("0x")

    return [
        {
            "address": token,
            "topics": [AUTHORIZATION_USED_TOPIC, topic(sender), "0x" + nonce.hex()],
            "data": "0x",
        },
        {
            "address": token,
            "topics": [TRANSFER_TOPIC, topic(sender), topic(recipient)],
            "data": "0x" + value.to_bytes(32, "big").hex(),
        },
    ]


def _encode_revert(reason: str) -> bytes:
    return bytes.fromhex("08c379a0") + encode(["string"], [reason])


class InMemoryFacilitatorSigner:
    """The SDK's ``FacilitatorEvmSigner`` protocol over an ``InMemoryEvmChain``."""

    def __init__(self, chain: InMemoryEvmChain) -> None:
        self.chain = chain

    def get_addresses(self) -> list[str]:
        """The facilitator's settling account."""
        return [self.chain.facilitator_account.address]

    def read_contract(
        self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any
    ) -> Any:
        """``eth_call``: token functions directly, or a Multicall3 ``tryAggregate`` batch."""
        if address.lower() == MULTICALL3_ADDRESS.lower() and function_name == "tryAggregate":
            return [self._try_call(str(target), bytes(data)) for target, data in args[1]]
        return self.chain.call(address, function_name, args)

    def _try_call(self, target: str, calldata: bytes) -> tuple[bool, bytes]:
        function = _BY_SELECTOR.get(calldata[:4])
        if function is None:
            return (False, _encode_revert("unknown selector"))
        if self.chain.code_at(target) == b"":
            return (True, b"")  # a call to an account succeeds with no return data
        args = decode(list(function.inputs), calldata[4:])
        try:
            result = self.chain.call(target, function.name, args)
        except ContractRevert as revert:
            return (False, _encode_revert(revert.reason))
        if not function.outputs:
            return (True, b"")
        return (True, encode(list(function.outputs), [result]))

    def verify_typed_data(
        self,
        address: str,
        domain: TypedDataDomain,
        types: dict[str, list[TypedDataField]],
        primary_type: str,
        message: dict[str, Any],
        signature: bytes,
    ) -> bool:
        """ECDSA recovery of an EIP-712 signature (accounts here are all EOAs)."""
        domain_fields = {
            "name": ("string", domain.name),
            "version": ("string", domain.version),
            "chainId": ("uint256", domain.chain_id),
            "verifyingContract": ("address", domain.verifying_contract),
        }
        present = {name: spec for name, spec in domain_fields.items() if spec[1]}
        typed = {
            "types": {
                "EIP712Domain": [{"name": n, "type": t} for n, (t, _) in present.items()],
                **{
                    name: [{"name": f.name, "type": f.type} for f in fields]
                    for name, fields in types.items()
                },
            },
            "primaryType": primary_type,
            "domain": {name: value for name, (_, value) in present.items()},
            "message": message,
        }
        return _recover_typed(typed, signature) == address.lower()

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        """Send a transaction calling ``function_name``; returns its hash."""
        inputs = [str(item["type"]) for item in abi[0]["inputs"]]
        selector = keccak(text=f"{function_name}({','.join(inputs)})")[:4]
        calldata = selector + encode(inputs, list(args))
        if data_suffix:
            calldata += bytes.fromhex(data_suffix.removeprefix("0x"))
        return self.chain.transact(address, function_name, args, calldata)

    def send_transaction(self, to: str, data: bytes) -> str:
        """A raw transaction (smart-wallet deployment): no factories exist here, so it reverts."""
        return self.chain.transact(to, "", (), data)

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        """The receipt, or TimeoutError as a node's bounded wait would raise."""
        return self.chain.wait_for_receipt(tx_hash)

    def get_balance(self, address: str, token_address: str) -> int:
        """Token balance of ``address``."""
        return self.chain.balance_of(token_address, address)

    def get_chain_id(self) -> int:
        """The chain id."""
        return self.chain.chain_id

    def get_code(self, address: str) -> bytes:
        """Runtime code at ``address``."""
        return self.chain.code_at(address)


# -- networks, facilitator and clients -----------------------------------------------------

FACILITATOR_KEY = "0x" + keccak(text="x402 in-memory facilitator").hex()


def v1_names(network: str) -> list[str]:
    """The SDK's v1 network names for a CAIP-2 ``network`` (those its v1 scheme serves)."""
    chain_id = int(network.removeprefix("eip155:"))
    return [name for name in V1_NETWORKS if V1_NETWORK_CHAIN_IDS.get(name) == chain_id]


class EvmChains:
    """One ``InMemoryEvmChain`` per network, with the SDK's default stablecoin deployed
    where the SDK lists one (``deploy`` adds others)."""

    def __init__(self, networks: Sequence[str], *, clock: Callable[[], float] = time.time):
        account: LocalAccount = Account.from_key(FACILITATOR_KEY)
        self._chains = {
            network: InMemoryEvmChain(network, facilitator_account=account, clock=clock)
            for network in networks
        }
        for network, chain in self._chains.items():
            try:
                chain.deploy(default_token(network))
            except LookupError:
                continue  # the SDK lists no EIP-3009 stablecoin here

    def __iter__(self) -> Iterator[InMemoryEvmChain]:
        return iter(self._chains.values())

    def __getitem__(self, network: str) -> InMemoryEvmChain:
        return self._chains[network]

    def token(self, network: str) -> Token:
        """The first token deployed on ``network`` (its default stablecoin, if it has one)."""
        return self._chains[network].tokens()[0]

    def deploy(self, token: Token) -> Token:
        """Deploy ``token`` on its network's chain."""
        return self._chains[token.network].deploy(token)

    def state(self) -> dict[str, ChainState]:
        """Every chain's state, by network."""
        return {network: chain.state() for network, chain in self._chains.items()}


class _ExactByNetwork:
    """An SDK scheme facilitator that hands each payload to the scheme of its own chain.

    The SDK registers a scheme under a pattern derived from its networks (one EVM network
    gives ``eip155:*``), so per-chain schemes registered one by one would all be found by the
    first one's pattern; this router is registered once and picks the chain by the payload's
    network. A network no chain serves raises the SDK's ``SchemeNotFoundError``, as the SDK
    does for a network nothing is registered for.
    """

    scheme = "exact"
    caip_family = "eip155:*"

    def __init__(self, schemes: Mapping[str, ExactEvmFacilitatorScheme | ExactEvmSchemeV1]):
        self._schemes = dict(schemes)

    @property
    def networks(self) -> list[str]:
        """The networks routed."""
        return list(self._schemes)

    def get_extra(self, network: str) -> dict[str, Any] | None:
        """EVM kinds carry no extra."""
        return None

    def get_signers(self, network: str) -> list[str]:
        """The facilitator addresses of ``network``'s chain."""
        return self._schemes[network].get_signers(network)

    def verify(self, payload: Any, requirements: Any, context: Any = None) -> VerifyResponse:
        """Verify on the payload's chain."""
        result: VerifyResponse = self._scheme_of(payload).verify(payload, requirements, context)
        return result

    def settle(self, payload: Any, requirements: Any, context: Any = None) -> SettleResponse:
        """Settle on the payload's chain."""
        result: SettleResponse = self._scheme_of(payload).settle(payload, requirements, context)
        return result

    def _scheme_of(self, payload: Any) -> Any:
        network = str(payload.get_network())
        scheme = self._schemes.get(network)
        if scheme is None:
            raise SchemeNotFoundError(self.scheme, network)
        return scheme


def build_facilitator(chains: EvmChains, *, simulate_in_settle: bool = False) -> x402Facilitator:
    """The SDK's async facilitator with its exact EVM schemes over ``chains``.

    Each chain gets its own scheme instances (v2 under its CAIP-2 id, v1 under its legacy
    names), so a payload is verified and settled on the chain its network names.
    """
    v2: dict[str, ExactEvmFacilitatorScheme | ExactEvmSchemeV1] = {}
    v1: dict[str, ExactEvmFacilitatorScheme | ExactEvmSchemeV1] = {}
    for chain in chains:
        signer = InMemoryFacilitatorSigner(chain)
        v2[chain.network] = ExactEvmFacilitatorScheme(
            signer, ExactEvmSchemeConfig(simulate_in_settle=simulate_in_settle)
        )
        scheme_v1 = ExactEvmSchemeV1(
            signer, ExactEvmSchemeV1Config(simulate_in_settle=simulate_in_settle)
        )
        v1.update((name, scheme_v1) for name in v1_names(chain.network))
    facilitator = x402Facilitator()
    router = _ExactByNetwork(v2)
    facilitator.register(router.networks, router)
    if v1:
        router_v1 = _ExactByNetwork(v1)
        facilitator.register_v1(router_v1.networks, router_v1)
    return facilitator


def payer_account(index: int) -> LocalAccount:
    """A deterministic payer key (the same index is the same address in every run)."""
    account: LocalAccount = Account.from_key(keccak(text=f"x402 in-memory payer {index}"))
    return account


def build_client(account: LocalAccount) -> x402Client:
    """The SDK's client signing EIP-3009 authorizations (v1 and v2) with ``account``.

    It pays any amount in any asset (not only the SDK's default stablecoins, not only up to
    its default cap of $1), so a test can offer a token of its own and larger payments.
    """
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(account))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    return client


def requirements_v2(
    token: Token, pay_to: str, amount: int, *, max_timeout_seconds: int = 300
) -> PaymentRequirements:
    """v2 exact requirements for ``amount`` base units of ``token``."""
    return PaymentRequirements(
        scheme="exact",
        network=token.network,
        asset=token.address,
        amount=str(amount),
        pay_to=pay_to,
        max_timeout_seconds=max_timeout_seconds,
        extra={"name": token.name, "version": token.version},
    )


def requirements_v1(
    network_name: str,
    token: Token,
    pay_to: str,
    amount: int,
    *,
    resource: str = "https://api.example.com/resource",
    max_timeout_seconds: int = 300,
) -> PaymentRequirementsV1:
    """v1 exact requirements (legacy ``network_name``) for ``amount`` base units of ``token``."""
    return PaymentRequirementsV1(
        scheme="exact",
        network=network_name,
        max_amount_required=str(amount),
        resource=resource,
        pay_to=pay_to,
        max_timeout_seconds=max_timeout_seconds,
        asset=token.address,
        extra={"name": token.name, "version": token.version},
    )


async def sign_payment(
    client: x402Client, requirements: PaymentRequirements | PaymentRequirementsV1
) -> PaymentPayload | PaymentPayloadV1:
    """The SDK client's signed payload answering a 402 that offers only ``requirements``."""
    if isinstance(requirements, PaymentRequirementsV1):
        return await client.create_payment_payload(
            PaymentRequiredV1(x402_version=1, accepts=[requirements])
        )
    return await client.create_payment_payload(
        PaymentRequired(x402_version=2, accepts=[requirements])
    )


def reauthorize(
    payment: PaymentPayload | PaymentPayloadV1,
    token: Token,
    signer: LocalAccount,
    *,
    nonce: str | None = None,
) -> PaymentPayload | PaymentPayloadV1:
    """``payment`` with its EIP-3009 authorization re-signed by ``signer``, optionally with
    another ``nonce``; the authorization's ``from`` is kept, so a ``signer`` other than the
    payer makes a forged payload (the SDK's own EIP-712 encoding and signer)."""
    document = payment.model_dump(by_alias=True)
    authorization = document["payload"]["authorization"]
    if nonce is not None:
        authorization["nonce"] = nonce
    typed = build_typed_data_for_signing(
        ExactEIP3009Authorization(
            from_address=authorization["from"],
            to=authorization["to"],
            value=authorization["value"],
            valid_after=authorization["validAfter"],
            valid_before=authorization["validBefore"],
            nonce=authorization["nonce"],
        ),
        int(token.network.removeprefix("eip155:")),
        token.address,
        token.name,
        token.version,
    )
    domain, types, primary_type, message = typed
    fields = {name: [TypedDataField(**f) for f in entries] for name, entries in types.items()}
    signature = EthAccountSigner(signer).sign_typed_data(domain, fields, primary_type, message)
    document["payload"]["signature"] = "0x" + signature.hex()
    return type(payment).model_validate(document)
