"""The one progress line of the long commands (replay, backfill, recover, simulate) on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO

BAR_WIDTH = 24
"""Characters of the ``[####----]`` bar."""


class Progress:
    """A progress line on a stream: a bar with ETA when the total is known, items done,
    their rate per second, and whatever the command adds (``detail``).

    On a terminal the line redraws in place every 0.2 s at most; elsewhere (a log file) a
    line is written every 5 s at most, so that a long run does not flood the log.
    """

    def __init__(
        self,
        stream: IO[str],
        unit: str,
        total: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Report ``unit`` counts on ``stream``; ``done`` out of ``total`` gives the bar and
        the ETA (bytes read, events, seconds run...); ``clock`` is read for rate and ETA."""
        self.stream = stream
        self.unit = unit
        self.total = total
        self.clock = clock
        self.tty = stream.isatty()
        self.started = clock()
        self._last = float("-inf")
        self.items = 0
        self.done = 0.0
        self.detail = ""
        self._drawn: tuple[int, float, str] | None = None

    def update(
        self, items: int, done: float | None = None, detail: str = "", force: bool = False
    ) -> None:
        """Record ``items`` processed (and ``done`` of the total so far); maybe redraw."""
        self.items = items
        if done is not None:
            self.done = done
        self.detail = detail
        now = self.clock()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        self._drawn = (items, self.done, detail)
        line = self.render(now)
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def render(self, now: float | None = None) -> str:
        """The progress line as of ``now`` (default: the clock)."""
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        rate = self.items / elapsed
        parts = [f"{self.items:,} {self.unit}", f"{rate:,.0f} {self.unit}/s"]
        if self.total:
            fraction = min(max(self.done / self.total, 0.0), 1.0)
            filled = int(fraction * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            parts.insert(0, f"[{bar}] {fraction * 100:5.1f}%")
            if 0 < fraction < 1:
                eta = elapsed * (1 - fraction) / fraction
                parts.append(f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)

    def finish(self) -> None:
        """Draw the final state (unless already drawn) and end the line."""
        if self._drawn != (self.items, self.done, self.detail):
            self.update(self.items, detail=self.detail, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
