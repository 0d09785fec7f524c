"""Payment identity beyond EIP-3009: Permit2 and Solana payloads, and a ledger written
before identities carried the payer (proxy ids were ``network:nonce``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from conftest import AppClient
from facilitator_helpers import (
    NETWORK,
    PAY_TO,
    PAYER,
    ScriptedFacilitator,
    nonce,
    payment_id,
    start_proxy,
    through,
)
from prometheus_client import CollectorRegistry

from exporter.app import COMMITTER
from exporter.ingest.payments import parse_exchange
from exporter.networks import NetworkTable

TABLE = NetworkTable()
OTHER_PAYER = "0x1111111111111111111111111111111111111111"
PERMIT2_SIGNATURE = "0x" + "cd" * 65
SOLANA = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"


def permit2_body(payer: str, permit_nonce: str, signature: str = PERMIT2_SIGNATURE) -> bytes:
    """A v2 verify/settle body whose payload is a Permit2 authorization, as the SDK's
    ``ExactPermit2Payload.to_dict`` writes it (the nonce a decimal uint256)."""
    requirements = {
        "scheme": "exact",
        "network": "eip155:8453",
        "amount": "10000",
        "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"assetTransferMethod": "permit2"},
    }
    inner = {
        "permit2Authorization": {
            "from": payer,
            "permitted": {"token": requirements["asset"], "amount": "10000"},
            "spender": "0x4020615294c913F045dc10f0a5cdEbd86c280001",
            "nonce": permit_nonce,
            "deadline": "99999999999",
            "witness": {"to": PAY_TO, "validAfter": "0"},
        },
        "signature": signature,
    }
    body = {
        "x402Version": 2,
        "paymentPayload": {"x402Version": 2, "accepted": requirements, "payload": inner},
        "paymentRequirements": requirements,
    }
    return json.dumps(body).encode()


def solana_body(transaction: str) -> bytes:
    """A v2 verify/settle body of the exact SVM scheme: the payload is a signed transaction."""
    requirements = {
        "scheme": "exact",
        "network": SOLANA,
        "amount": "10000",
        "asset": "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
        "payTo": "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin",
        "maxTimeoutSeconds": 60,
        "extra": {"feePayer": "2wKupLR9q6wXYppw8Gr2NvWxKBUqm4PPJKkQfoxHDBg4"},
    }
    body = {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "accepted": requirements,
            "payload": {"transaction": transaction},
        },
        "paymentRequirements": requirements,
    }
    return json.dumps(body).encode()


def identity(raw: bytes) -> str:
    """The payment id the shared mapping gives ``raw``."""
    parsed = parse_exchange(raw, TABLE)
    assert parsed is not None and parsed.payment_id is not None
    return parsed.payment_id


def test_a_permit2_payment_is_keyed_by_network_payer_and_nonce() -> None:
    pid = identity(permit2_body(PAYER, "123456789"))
    assert pid.startswith(f"eip155:8453/permit2/{PAYER.lower()}/123456789/sig-")
    assert identity(permit2_body(PAYER, "123456789")) == pid, "verify and settle join"
    # Permit2 nonces are scoped per owner: another payer with the same nonce is another payment.
    assert identity(permit2_body(OTHER_PAYER, "123456789")) != pid
    assert identity(permit2_body(PAYER, "123456790")) != pid
    # A copy with another signature never attaches an event to the signed payment.
    assert identity(permit2_body(PAYER, "123456789", "0x" + "ef" * 65)) != pid
    parsed = parse_exchange(permit2_body(PAYER, "123456789"), TABLE)
    assert parsed is not None and parsed.payer == PAYER.lower()


def test_a_solana_payment_is_keyed_by_its_signed_transaction() -> None:
    pid = identity(solana_body("AQID"))
    assert pid.startswith(f"{SOLANA}:sha256-")
    assert identity(solana_body("AQID")) == pid, "verify and settle carry the same bytes"
    assert identity(solana_body("AQIE")) != pid


async def test_a_payment_recorded_under_an_old_proxy_id_does_not_count_its_settle_twice(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    data_dir: Path,
) -> None:
    """A payment verified through an earlier proxy (id ``network:nonce``) and settled after
    the upgrade: the settle is recorded once under the new id, with no conflict; the old
    record stays a received, never-ended payment, as after a client that went away."""
    facilitator = ScriptedFacilitator()
    server = await aiohttp_server(facilitator.app(), port=0)
    url = str(server.make_url("")).rstrip("/")
    registry = CollectorRegistry()
    client = await start_proxy(aiohttp_client, data_dir, url, registry)
    old_id = f"{NETWORK}:{nonce(5)}"
    written_before: list[dict[str, Any]] = [
        {
            "type": "payment:received",
            "data": {
                "paymentId": old_id,
                "payer": PAYER,
                "payee": PAY_TO,
                "amount": "0.01",
                "network": NETWORK,
                "timestamp": 1_764_900_000_000,
            },
        },
        {
            "type": "payment:verified",
            "data": {"paymentId": old_id, "verificationTime": 12.0, "timestamp": 1_764_900_000_100},
        },
    ]
    assert (await client.post("/v1/events", json=written_before)).status == 202

    assert await through(client, "/settle", 5) == 200
    assert await through(client, "/settle", 5) == 200  # the resource server retries

    ledger = client.app[COMMITTER].ledger
    stored = [json.loads(body) for _, _, body in ledger.iter_events()]
    assert [(e["type"], e["data"]["paymentId"]) for e in stored[2:]] == [
        ("payment:received", payment_id(5)),
        ("payment:settled", payment_id(5)),
    ]
    assert ledger.dead_letters() == []

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert value("facilitator_payments_total", network=NETWORK, status="success") == 1
    assert value("facilitator_payments_total", network=NETWORK, status="failed") == 0
    assert value("facilitator_volume_usd_total", network=NETWORK) == 0.01
    assert value("exporter_events_rejected_total", reason="conflict") == 0
    assert value("facilitator_pending_payments", network=NETWORK) == 1  # the old record
