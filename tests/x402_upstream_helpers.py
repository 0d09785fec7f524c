"""An x402 facilitator over HTTP: the SDK's own facilitator logic behind aiohttp.

``SdkFacilitatorServer`` serves an SDK ``x402Facilitator`` (see ``x402_chain``) at
``POST /verify``, ``POST /settle`` and ``GET /supported``, in the contract the SDK's
``HTTPFacilitatorClient`` speaks: a JSON body ``{x402Version, paymentPayload,
paymentRequirements}`` in, ``200`` with the ``VerifyResponse``/``SettleResponse``/
``SupportedResponse`` (camelCase, nulls left out) out. As in the SDK's example facilitator, a
request the facilitator cannot serve (no scheme for its network, an aborting hook, any error)
answers ``500`` with ``{"detail": message}``; a body that is not a payment request ``400``.

``resource_server`` builds the SDK's resource server on an ``HTTPFacilitatorClient`` (the
one that retries a ``settlement_pending`` settle once); its ``initialize`` fetches
``/supported`` with a blocking client, so it runs on a worker thread while the event loop
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from x402 import x402Facilitator
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mechanisms.evm.exact import register_exact_evm_server
from x402.mechanisms.svm.exact import register_exact_svm_server
from x402.schemas import parse_payment_payload, parse_payment_requirements
from x402.server import x402ResourceServer


class SdkFacilitatorServer:
    """The routes of an HTTP facilitator around an SDK ``x402Facilitator``."""

    def __init__(self, facilitator: x402Facilitator) -> None:
        self.facilitator = facilitator
        self.requests: list[tuple[str, bytes]] = []
        """(path, body) of every request served, in arrival order."""

    def app(self) -> web.Application:
        """The aiohttp application to serve (e.g. with ``aiohttp_server(app, port=0)``)."""
        app = web.Application()
        app.router.add_post("/verify", self._verify)
        app.router.add_post("/settle", self._settle)
        app.router.add_get("/supported", self._supported)
        return app

    async def _verify(self, request: web.Request) -> web.Response:
        return await self._serve(request, "verify")

    async def _settle(self, request: web.Request) -> web.Response:
        return await self._serve(request, "settle")

    async def _serve(self, request: web.Request, endpoint: str) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, body))
        try:
            document = json.loads(body)
            payload = parse_payment_payload(document["paymentPayload"])
            requirements = parse_payment_requirements(
                payload.x402_version, document["paymentRequirements"]
            )
        except (ValueError, KeyError, TypeError, ValidationError) as error:
            return web.json_response({"error": f"not a payment request: {error}"}, status=400)
        try:
            if endpoint == "verify":
                result: Any = await self.facilitator.verify(payload, requirements)
            else:
                result = await self.facilitator.settle(payload, requirements)
        except Exception as error:  # the SDK example's answer to anything it cannot serve
            return web.json_response({"detail": str(error)}, status=500)
        return web.json_response(result.model_dump(by_alias=True, exclude_none=True))

    async def _supported(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, b""))
        supported = self.facilitator.get_supported()
        return web.json_response(supported.model_dump(by_alias=True, exclude_none=True))


def facilitator_client(url: str) -> HTTPFacilitatorClient:
    """The SDK's async HTTP facilitator client for the facilitator at ``url``."""
    return HTTPFacilitatorClient(FacilitatorConfig(url=url, timeout=10.0))


async def resource_server(client: HTTPFacilitatorClient) -> x402ResourceServer:
    """The SDK's async resource server over ``client``, with the exact EVM and SVM schemes,
    initialised."""
    server = x402ResourceServer(client)
    register_exact_evm_server(server)
    register_exact_svm_server(server)
    await asyncio.to_thread(server.initialize)
    return server
