"""The one network table: x402 v1 names, CAIP-2 ids, chain names and default stablecoins.

x402 version 1 names networks (``base``, ``monad``, ``solana-devnet``); version 2 uses
CAIP-2 ids (``eip155:8453``). Ingest, proxy mode and the SDK hooks all normalise through
:class:`NetworkTable`, so a label, a stored point and an analytic always carry CAIP-2, and
the analytics' ``chainName`` comes from the same rows. The built-in rows follow the x402
SDKs' own constants (a test compares them); an operator adds names with
``EXPORTER_NETWORK_ALIASES`` and asset decimals with ``EXPORTER_PROXY_ASSET_DECIMALS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
"""A CAIP-2 chain id: namespace and reference."""

UNKNOWN_NETWORK = "unknown"
"""The network of an event that names none and joined nothing that does."""

OTHER_NETWORK = "other"
"""The metric label of networks beyond the label bound, and of unknown names in proxy mode."""

SOLANA = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
SOLANA_DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
SOLANA_TESTNET = "solana:4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z"


@dataclass(frozen=True, slots=True)
class Network:
    """One chain: its CAIP-2 id, the name people call it, and its x402 v1 names."""

    caip2: str
    name: str | None
    v1_names: tuple[str, ...] = ()


def _evm(chain_id: int, name: str | None, *v1_names: str) -> Network:
    return Network(f"eip155:{chain_id}", name, v1_names)


BUILTIN_NETWORKS: tuple[Network, ...] = (
    _evm(1, "Ethereum", "ethereum"),
    _evm(11155111, "Sepolia", "sepolia"),
    _evm(8453, "Base", "base"),
    _evm(84532, "Base Sepolia", "base-sepolia"),
    _evm(10, "Optimism"),
    _evm(42161, "Arbitrum"),
    _evm(421614, "Arbitrum Sepolia"),
    _evm(137, "Polygon", "polygon"),
    _evm(80002, "Polygon Amoy", "polygon-amoy"),
    _evm(43114, "Avalanche", "avalanche"),
    _evm(43113, "Avalanche Fuji", "avalanche-fuji"),
    _evm(2741, "Abstract", "abstract"),
    _evm(11124, "Abstract Testnet", "abstract-testnet"),
    _evm(4689, "IoTeX", "iotex"),
    _evm(1329, "Sei", "sei"),
    _evm(1328, "Sei Testnet", "sei-testnet"),
    _evm(3338, "peaq", "peaq"),
    _evm(1514, "Story", "story"),
    _evm(41923, "EDU Chain", "educhain"),
    _evm(324705682, "SKALE Base Sepolia", "skale-base-sepolia"),
    _evm(4326, "MegaETH", "megaeth"),
    _evm(143, "Monad", "monad"),
    _evm(10143, "Monad Testnet", "monad-testnet"),
    _evm(988, "Stable", "stable"),
    _evm(2201, "Stable Testnet", "stable-testnet"),
    _evm(42220, "Celo", "celo"),
    _evm(11142220, "Celo Sepolia"),
    _evm(14, "Flare", "flare"),
    _evm(50, "XDC Network"),
    _evm(51, "XDC Apothem"),
    Network(SOLANA, "Solana", ("solana",)),
    Network(SOLANA_DEVNET, "Solana Devnet", ("solana-devnet",)),
    Network(SOLANA_TESTNET, "Solana Testnet", ("solana-testnet",)),
)
"""Every network the x402 SDKs name, with the names the exporter shows for them."""

SDK_DISAGREEMENTS: dict[str, tuple[str, str]] = {
    "story": ("eip155:1514", "eip155:1513"),
    "educhain": ("eip155:41923", "eip155:656476"),
    "skale-base-sepolia": ("eip155:324705682", "eip155:1444673419"),
}
"""v1 names the TypeScript SDK (first) and the Python SDK (second) map to different chains.

The table follows the TypeScript SDK, the reference implementation, whose ids are the
chains' published ones (Story and EDU Chain mainnet); a facilitator built on the Python SDK
maps these names elsewhere, and its operator can say so in ``EXPORTER_NETWORK_ALIASES``."""

BUILTIN_STABLECOINS: dict[str, dict[str, int]] = {
    "eip155:1": {"0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48": 6},
    "eip155:8453": {"0x833589fcd6edb6e08f4c7c32d4f71b54bda02913": 6},
    "eip155:84532": {"0x036cbd53842c5426634e7929541ec2318f3dcf7e": 6},
    "eip155:42161": {"0xaf88d065e77c8cc2239327c5edb3a432268e5831": 6},
    "eip155:421614": {"0x75faf114eafb1bdbe2f0316df893fd58ce46aa4d": 6},
    "eip155:137": {"0x3c499c542cef5e3811e1192ce70d8cc03d5c3359": 6},
    "eip155:80002": {"0x41e94eb019c0762f9bfcf9fb1e58725bfb0e7582": 6},
    "eip155:43114": {"0xb97ef9ef8734c71904d8002f8b6bc66dd9c48a6e": 6},
    "eip155:43113": {"0x5425890298aed601595a70ab815c96711a31bc65": 6},
    "eip155:4689": {"0xcdf79194c6c285077a58da47641d4dbe51f63542": 6},
    "eip155:1329": {"0xe15fc38f6d8c56af07bbcbe3baf5708a2bf42392": 6},
    "eip155:1328": {"0x4fcf1784b31630811181f670aea7a7bef803eaed": 6},
    "eip155:3338": {"0xbba60da06c2c5424f03f7434542280fcad453d10": 6},
    "eip155:4326": {"0xfafddbb3fc7688494971a79cc65dca3ef82079e7": 18},
    "eip155:143": {"0x754704bc059f8c67012fed69bc8a327a5aafb603": 6},
    "eip155:10143": {"0x534b2f3a21130d7a60830c2df862319e593943a3": 6},
    "eip155:988": {"0x779ded0c9e1022225f8e0630b35a9b54be713736": 6},
    "eip155:2201": {"0x78cf24370174180738c5b8e352b6d14c83a6c9a9": 6},
    "eip155:42220": {
        "0xceba9300f2b948710d2653dd7b07f33a8b32118c": 6,
        "0x48065fbbe25f71c9282ddf5e1cd6d6a887483d5e": 6,
        "0xd2ab3c9a02dbbab236bfec45d1d755df4267f771": 6,
    },
    "eip155:11142220": {"0x01c5c0122039549ad1493b8220cabedd739bc44e": 6},
    "eip155:14": {"0xe7cd86e13ac4309349f30b3435a9d337750fc82d": 6},
    "eip155:50": {"0xfa2958cb79b0491cc627c1557f441ef849ca8eb1": 6},
    "eip155:51": {"0xb5ab69f7bbada22b28e79c8ffaece55ef1c771d4": 6},
    "eip155:31612": {"0xdd468a1ddc392dcdbef6db6e34e89aa338f9f186": 18},
    "eip155:31611": {"0x118917a40faf1cd7a13db0ef56c86de7973ac503": 18},
    "eip155:723487": {"0x33ad9e4bd16b69b5bfded37d8b5d9ff9aba014fb": 6},
    "eip155:72344": {"0x33ad9e4bd16b69b5bfded37d8b5d9ff9aba014fb": 6},
    "eip155:36900": {"0x9cb8142aebbcdc60af7c97af897a67a8f3ca71c2": 6},
    "eip155:190415": {"0x401ecb1d350407f13ba348573e5630b83638e30d": 6},
    "eip155:181228": {"0x401ecb1d350407f13ba348573e5630b83638e30d": 6},
    "eip155:38833": {"0xa5b8bf902b2844da17d4506cc827f7f1681735e7": 6},
    "eip155:5042": {"0x3600000000000000000000000000000000000000": 6},
    "eip155:5042002": {"0x3600000000000000000000000000000000000000": 6},
    SOLANA: {
        "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v": 6,
        "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB": 6,
        "2u1tszSeqZ3qBWF3uNGPFc8TzMk2tdiwknnRMWGWjGWH": 6,
        "2b1kV6DkPAnxd5ixfnxCpjxmKwqjjaYmCZfHsFu24GXo": 6,
        "CASHx9KJUStyftLFWGvEVf59SGeG9sh5FfcnZMVPCASH": 6,
    },
    SOLANA_DEVNET: {
        "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU": 6,
        "4F6PM96JJxngmHnZLBh9n58RH4aTVNWvDs2nuwrT5BP7": 6,
        "CXk2AMBfi3TwaEL2468s6zP8xq9NxTXjp9gjMgzeUynM": 6,
    },
    SOLANA_TESTNET: {
        "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU": 6,
        "4F6PM96JJxngmHnZLBh9n58RH4aTVNWvDs2nuwrT5BP7": 6,
        "CXk2AMBfi3TwaEL2468s6zP8xq9NxTXjp9gjMgzeUynM": 6,
    },
}
"""Decimals of the default USD stablecoins per CAIP-2 network (EVM addresses lower case)."""


def asset_key(asset: str) -> str:
    """An asset address as the tables key it: EVM addresses lower case, others as given."""
    return asset.lower() if asset.startswith("0x") else asset


class NetworkTable:
    """Names to CAIP-2 ids, chain names and asset decimals: built-ins plus the operator's."""

    def __init__(
        self,
        aliases: Mapping[str, str] | None = None,
        asset_decimals: Mapping[str, int] | None = None,
    ) -> None:
        """``aliases``: extra name -> CAIP-2 (``EXPORTER_NETWORK_ALIASES``); ``asset_decimals``:
        decimals by ``asset`` or ``network/asset`` (``EXPORTER_PROXY_ASSET_DECIMALS``)."""
        self._names: dict[str, str] = {}
        self._chain_names: dict[str, str] = {}
        for network in BUILTIN_NETWORKS:
            if network.name is not None:
                self._chain_names[network.caip2] = network.name
            for v1_name in network.v1_names:
                self._names[v1_name] = network.caip2
        for name, caip2 in (aliases or {}).items():
            if not CAIP2.fullmatch(caip2):
                raise ValueError(f"alias {name!r} must name a CAIP-2 chain id, got {caip2!r}")
            self._names[name] = caip2
            # A chain the built-ins do not name is shown by the operator's name for it.
            self._chain_names.setdefault(caip2, name)
        self._decimals: dict[str, dict[str, int]] = {
            network: dict(assets) for network, assets in BUILTIN_STABLECOINS.items()
        }
        self._any_network_decimals: dict[str, int] = {}
        for key, decimals in (asset_decimals or {}).items():
            scope, slash, asset = key.rpartition("/")
            if slash:
                self._decimals.setdefault(scope, {})[asset_key(asset)] = decimals
            else:
                self._any_network_decimals[asset_key(asset)] = decimals

    def caip2(self, network: str) -> str | None:
        """The CAIP-2 id ``network`` stands for (a v1 name, an alias or CAIP-2 itself);
        None when it is neither a known name nor shaped like CAIP-2."""
        named = self._names.get(network)
        if named is not None:
            return named
        return network if CAIP2.fullmatch(network) else None

    def is_known(self, caip2: str) -> bool:
        """Whether the table names ``caip2``: built in, by an alias, or with asset decimals."""
        return (
            caip2 in self._chain_names or caip2 in self._names.values() or caip2 in self._decimals
        )

    def chain_name(self, caip2: str) -> str:
        """The chain's human name; its id when the table has none."""
        return self._chain_names.get(caip2, caip2)

    def decimals(self, network: str, asset: str) -> int | None:
        """The decimals of ``asset`` on ``network`` (CAIP-2), or None when unknown."""
        key = asset_key(asset)
        on_network = self._decimals.get(network, {}).get(key)
        return on_network if on_network is not None else self._any_network_decimals.get(key)

    @property
    def v1_names(self) -> dict[str, str]:
        """Every name the table maps, to its CAIP-2 id."""
        return dict(self._names)


BUILTIN_TABLE = NetworkTable()
"""The table of built-in names alone, for code that has no settings (event parsing, chain
names, the OpenAPI document); built once."""
