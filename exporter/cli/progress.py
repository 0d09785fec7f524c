"""Progress lines on stderr for the long commands (replay, backfill, recover, simulate)."""

from __future__ import annotations

import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .simulate_live import SimulationProgress


class Progress:
    """A progress line on a stream: done/total, rate per second and ETA.

    On a terminal the line redraws in place; elsewhere a line is written every few seconds.
    """

    def __init__(self, stream: IO[str], unit: str, total: float | None = None) -> None:
        """Report on ``stream``; ``total`` (same unit as ``advance``) gives the ETA."""
        self.stream = stream
        self.unit = unit
        self.total = total
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0
        self.items = 0
        self.done = 0.0
        self._drawn: tuple[int, float] | None = None

    def update(self, items: int, done: float | None = None, force: bool = False) -> None:
        """Record ``items`` processed (and ``done`` of the total so far); maybe redraw."""
        self.items = items
        if done is not None:
            self.done = done
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        self._drawn = (items, self.done)
        line = self.render(now)
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def render(self, now: float | None = None) -> str:
        """The progress line."""
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.items / elapsed
        parts = [f"{self.items} {self.unit}", f"{rate:,.0f} {self.unit}/s"]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            width = 24
            filled = int(fraction * width)
            bar = "#" * filled + "-" * (width - filled)
            parts.insert(0, f"[{bar}] {fraction * 100:5.1f}%")
            if 0 < fraction < 1:
                eta = elapsed * (1 - fraction) / fraction
                parts.append(f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}")
        return "  ".join(parts)

    def finish(self) -> None:
        """Draw the final state (unless already drawn) and end the line."""
        if self._drawn != (self.items, self.done):
            self.update(self.items, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()



def render_progress(p: SimulationProgress, total_seconds: float | None) -> str:
    """One status line (bar, elapsed/ETA, rate, counters) for the CLI to redraw with ``\\r``."""
    width = 24
    if total_seconds:
        done = min(max(p.elapsed_s / total_seconds, 0.0), 1.0)
        filled = int(done * width)
        bar = "#" * filled + "-" * (width - filled)
        left = max(total_seconds - p.elapsed_s, 0.0)
        timing = f"{done * 100:3.0f}% {p.elapsed_s:6.1f}s/{total_seconds:.0f}s ETA {left:5.1f}s"
    else:
        pos = int(p.elapsed_s * 4) % (2 * (width - 3))
        pos = pos if pos <= width - 3 else 2 * (width - 3) - pos
        bar = " " * pos + "<=>" + " " * (width - 3 - pos)
        timing = f"{p.elapsed_s:6.1f}s (until stopped)"
    return (
        f"[{bar}] {timing} | {p.events_per_s:8,.0f} ev/s | payments {p.payments:,} "
        f"| accepted {p.accepted:,} dup {p.duplicates:,} rejected {p.rejected:,} "
        f"errors {p.errors:,}"
    )
