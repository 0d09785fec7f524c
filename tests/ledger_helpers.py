"""Helpers for tests that feed the ledger directly, without the HTTP receiver."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from exporter.events import parse_event
from exporter.ledger import PreparedEvent


def prepare(event: dict[str, Any], known_key_hash: int | None = None) -> PreparedEvent:
    """Validate an event dict the way the receiver does; ``known_key_hash`` stands in for
    the hash of its key (to make keys collide)."""
    prepared = PreparedEvent.of(parse_event(event), json.dumps(event).encode())
    return prepared if known_key_hash is None else replace(prepared, key_hash=known_key_hash)
