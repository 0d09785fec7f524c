"""A facilitator process for the kill -9 test: the SDK's facilitator over the in-memory
chain with the hooks attached, driven until it is killed, or draining its spool.

``python hooks_facilitator.py run URL SPOOL_DIR COUNT`` settles up to COUNT payments, one
for each line read on stdin (the test paces the run, so it is always killed mid-run),
printing ``done <i>`` once payment ``i``'s settle (and so its hooks) returned, then waits
to be killed. ``python hooks_facilitator.py drain URL SPOOL_DIR`` attaches to the same spool,
delivers it and prints ``flushed <True|False> delivered <events>``. Not a test module.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from hooks_helpers import chains_and_facilitator, run_case

from exporter.hooks import SenderLimits, attach_x402_facilitator

FAST = SenderLimits(idle_seconds=0.05, backoff_base=0.05, backoff_cap=0.5)


async def run(url: str, spool: Path, count: int) -> None:
    """Settle a payment per stdin line, up to ``count``, then wait to be killed."""
    chains, facilitator = chains_and_facilitator()
    attach_x402_facilitator(facilitator, url=url, spool_dir=spool, limits=FAST)
    for index in range(count):
        if not await asyncio.to_thread(sys.stdin.readline):
            break
        outcome = await run_case(facilitator, chains, "v2_base", index)
        sys.stdout.write(f"done {index} {outcome.status}\n")
        sys.stdout.flush()
    threading.Event().wait()


def drain(url: str, spool: Path) -> None:
    """Deliver what the spool holds."""
    _, facilitator = chains_and_facilitator()
    attachment = attach_x402_facilitator(facilitator, url=url, spool_dir=spool, limits=FAST)
    flushed = attachment.close(20.0)
    delivered = attachment.registry.get_sample_value("x402_exporter_hook_delivered_events_total")
    sys.stdout.write(f"flushed {flushed} delivered {delivered:.0f}\n")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        asyncio.run(run(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])))
    else:
        drain(sys.argv[2], Path(sys.argv[3]))
