"""Refused input kept within bounds (docs/security.md, "Bounded").

Every refusal is answered and counted, but what it adds to the ledger is bounded twice:
a dead letter keeps at most the head of its body (the size as received is recorded and
the rest counted), and the bytes refusals may add are a budget refilled per minute, past
which a refusal is counted as unstored instead of kept. A sender that only sends garbage
then grows the ledger by at most the budget per minute, and dead-letter retention
deletes what it left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..ledger import DeadLetter
from ..metrics import Metrics

DEFAULT_DEAD_LETTER_MAX_BYTES = 64 * 1024
DEFAULT_DEAD_LETTER_MAX_BYTES_PER_MINUTE = 1024 * 1024
LETTER_OVERHEAD_BYTES = 128
"""What a stored dead letter costs beyond its body and error text (row id, time, reason,
index entry), so that a flood of empty refusals spends the budget too."""


@dataclass(frozen=True, slots=True)
class DeadLetterLimits:
    """How much of a refused body is kept, and how many bytes refusals may store per minute."""

    max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES
    max_bytes_per_minute: int = DEFAULT_DEAD_LETTER_MAX_BYTES_PER_MINUTE


def letter_cost(letter: DeadLetter) -> int:
    """The bytes a dead letter adds to the ledger, as the budget counts them."""
    return len(letter.raw) + len(letter.error.encode()) + LETTER_OVERHEAD_BYTES


class DeadLetterGate:
    """Caps dead letters' bodies and admits them within a per-minute byte budget.

    The budget is a token bucket holding at most one minute's bytes and refilled
    continuously, so a burst may spend a whole minute's worth at once but no more.
    """

    def __init__(
        self,
        limits: DeadLetterLimits,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._clock = clock
        self._tokens = float(limits.max_bytes_per_minute)
        self._refilled_at = clock()

    def capped(self, letter: DeadLetter) -> DeadLetter:
        """``letter`` with its body cut to ``max_bytes``, the size as received recorded."""
        size = len(letter.raw) if letter.raw_size is None else letter.raw_size
        if len(letter.raw) <= self.limits.max_bytes and size == len(letter.raw):
            return letter
        raw = letter.raw[: self.limits.max_bytes]
        return replace(letter, raw=bytes(raw), raw_size=max(size, len(letter.raw)))

    def admit(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """The letters to store, capped; those past the budget are counted, not returned."""
        self._refill()
        kept: list[DeadLetter] = []
        for letter in letters:
            capped = self.capped(letter)
            cost = letter_cost(capped)
            if cost > self._tokens:
                self._metrics.dead_letters_unstored.labels(letter.reason).inc()
                continue
            self._tokens -= cost
            if capped.raw_size is not None:
                self._metrics.dead_letter_truncated_bytes.inc(capped.raw_size - len(capped.raw))
            kept.append(capped)
        return kept

    def _refill(self) -> None:
        now = self._clock()
        per_second = self.limits.max_bytes_per_minute / 60.0
        self._tokens = min(
            float(self.limits.max_bytes_per_minute),
            self._tokens + (now - self._refilled_at) * per_second,
        )
        self._refilled_at = now
