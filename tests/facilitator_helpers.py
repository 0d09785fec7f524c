"""A scripted x402 facilitator for proxy tests, and a proxy exporter that can restart.

The facilitator answers ``/verify`` valid and ``/settle`` as :attr:`ScriptedFacilitator.settle`
says (``settled``, ``failed`` or ``pending``); payloads are version 2, exact EVM scheme.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from exporter import Settings, create_app
from exporter.ingest.payments import evm_payment_id
from exporter.ingest.proxy import PROXY

NETWORK = "eip155:84532"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
SIGNATURE = "0x" + "ab" * 65
TX = "0x" + "12" * 32

AppClient = TestClient[web.Request, web.Application]


def nonce(n: int) -> str:
    """A distinct 32-byte EIP-3009 nonce."""
    return "0x" + f"{n:064x}"


def payment_id(n: int) -> str:
    """The id the proxy gives the payment of :func:`exchange` ``n``."""
    return evm_payment_id(NETWORK, USDC, PAYER, nonce(n), SIGNATURE)


def exchange(n: int, amount: str = "10000") -> dict[str, Any]:
    """A version 2 /verify or /settle body of payment ``n`` (0.01 USDC by default)."""
    requirements = {
        "scheme": "exact",
        "network": NETWORK,
        "amount": amount,
        "asset": USDC,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    authorization = {
        "from": PAYER,
        "to": PAY_TO,
        "value": amount,
        "validAfter": "0",
        "validBefore": "99999999999",
        "nonce": nonce(n),
    }
    return {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "accepted": requirements,
            "payload": {"signature": SIGNATURE, "authorization": authorization},
        },
        "paymentRequirements": requirements,
    }


@dataclass
class ScriptedFacilitator:
    """Answers verify valid and settle as :attr:`settle` says; counts what it was sent."""

    settle: str = "settled"
    calls: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        """The facilitator's routes."""
        app = web.Application()
        app.router.add_post("/verify", self._verify)
        app.router.add_post("/settle", self._settle)
        return app

    async def _verify(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls.append("verify")
        return web.json_response({"isValid": True, "payer": PAYER})

    async def _settle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.calls.append("settle")
        network = body["paymentRequirements"]["network"]
        if self.settle == "pending":
            answer = {"success": False, "errorReason": "settlement_pending", "transaction": TX}
        elif self.settle == "failed":
            answer = {"success": False, "errorReason": "insufficient_funds", "transaction": ""}
        else:
            answer = {"success": True, "transaction": TX}
        return web.json_response({**answer, "payer": PAYER, "network": network})


ClientFactory = Callable[..., Awaitable[AppClient]]


async def start_proxy(
    aiohttp_client: ClientFactory,
    data_dir: Path,
    upstream_url: str,
    registry: CollectorRegistry,
    **overrides: Any,
) -> AppClient:
    """The exporter in proxy mode over ``data_dir``, in front of ``upstream_url``."""
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "listen": "127.0.0.1:0",
        "upstream_facilitator": upstream_url,
        "upstream_timeout_seconds": 5,
        "proxy_fee_bps": 100,
        **overrides,
    }
    return await aiohttp_client(create_app(Settings(**options), registry))


async def through(client: AppClient, path: str, n: int) -> int:
    """POST exchange ``n`` to ``path`` through the proxy; its status once recorded."""
    response = await client.post(path, json=exchange(n))
    await response.read()
    await client.app[PROXY].drain()
    return response.status
