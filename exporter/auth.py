"""Bearer-token authentication, shared by ingest and the analytics API."""

from __future__ import annotations

import hmac


def bearer_token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer`` header against ``token``."""
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())
