"""Helpers for tests that feed the ledger directly, without the HTTP receiver."""

from __future__ import annotations

import json
from typing import Any

from exporter.events import canonical_json, dedup_key, parse_event
from exporter.ledger import PreparedEvent


def prepare(event: dict[str, Any], known_key_hash: int | None = None) -> PreparedEvent:
    """Validate an event dict the way the receiver does (``known_key_hash``: see
    :class:`PreparedEvent`)."""
    parsed = parse_event(event)
    body = canonical_json(parsed)
    raw = json.dumps(event).encode()
    return PreparedEvent(parsed, dedup_key(parsed, body), body, raw, known_key_hash)
