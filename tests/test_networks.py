"""The network table against the official x402 Python SDK's own constants, so drift shows.

The SDK is a test dependency, imported outright: this module fails rather than skips
without it, so CI always compares the tables."""

from __future__ import annotations

import pytest
from x402.mechanisms.evm import default_assets as evm_assets
from x402.mechanisms.evm.v1 import constants as evm_v1
from x402.mechanisms.svm import constants as svm_constants
from x402.mechanisms.svm import default_assets as svm_assets

from exporter.networks import (
    BUILTIN_NETWORKS,
    BUILTIN_STABLECOINS,
    SDK_DISAGREEMENTS,
    NetworkTable,
    asset_key,
)


def test_every_v1_name_the_sdk_knows_maps_to_its_chain_or_a_documented_disagreement() -> None:
    table = NetworkTable()
    sdk = {name: f"eip155:{chain}" for name, chain in evm_v1.V1_NETWORK_CHAIN_IDS.items()}
    sdk.update(svm_constants.V1_TO_V2_NETWORK_MAP)
    assert set(evm_v1.V1_NETWORKS) <= set(sdk)
    for name, caip2 in sdk.items():
        if name in SDK_DISAGREEMENTS:
            ours, python_sdk = SDK_DISAGREEMENTS[name]
            assert (table.caip2(name), caip2) == (ours, python_sdk), name
        else:
            assert table.caip2(name) == caip2, name


def test_every_default_stablecoin_of_the_sdk_has_its_decimals() -> None:
    table = NetworkTable()
    for assets_module in (evm_assets, svm_assets):
        for network, assets in assets_module.DEFAULT_ASSETS.items():
            for asset in assets:
                assert table.decimals(network, asset["asset"]) == asset["decimals"], (
                    network,
                    asset["symbol"],
                )
    sdk_networks = set(evm_assets.DEFAULT_ASSETS) | set(svm_assets.DEFAULT_ASSETS)
    # Ours may name more (older USDC deployments the v1 reference listed), never fewer.
    assert sdk_networks <= set(BUILTIN_STABLECOINS)


def test_names_aliases_and_chain_names() -> None:
    table = NetworkTable(aliases={"my-l2": "eip155:999999"})
    assert table.caip2("base") == "eip155:8453"
    assert table.caip2("monad") == "eip155:143"
    assert table.caip2("eip155:8453") == "eip155:8453"
    assert table.caip2("my-l2") == "eip155:999999"
    assert table.caip2("not a network") is None
    assert table.chain_name("eip155:8453") == "Base"
    assert table.chain_name("eip155:999999") == "my-l2"  # the operator's name for it
    assert table.chain_name("eip155:424242") == "eip155:424242"  # nobody names it
    # An operator on the Python SDK's ids for a name the SDKs disagree on overrides ours.
    assert NetworkTable(aliases={"story": "eip155:1513"}).caip2("story") == "eip155:1513"
    with pytest.raises(ValueError, match="CAIP-2"):
        NetworkTable(aliases={"bad": "base"})


def test_operator_decimals_override_and_extend_the_built_ins() -> None:
    usdc = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    table = NetworkTable(asset_decimals={"eip155:56/0xABC": 18, "TokenX": 9})
    assert table.decimals("eip155:8453", usdc) == 6
    assert table.decimals("eip155:56", "0xabc") == 18
    assert table.decimals("eip155:1", "TokenX") == 9
    assert table.decimals("eip155:8453", "0xdead") is None


def test_every_builtin_network_has_one_row_and_evm_assets_are_lower_case() -> None:
    ids = [network.caip2 for network in BUILTIN_NETWORKS]
    assert len(ids) == len(set(ids))
    for assets in BUILTIN_STABLECOINS.values():
        assert all(asset == asset_key(asset) for asset in assets)
