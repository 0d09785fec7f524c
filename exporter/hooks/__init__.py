"""Facilitator hooks: report the payments of an x402 SDK facilitator to the exporter.

::

    from exporter.hooks import attach_x402_facilitator
    attachment = attach_x402_facilitator(facilitator, url="http://exporter:9402",
                                         token=..., spool_dir="/var/lib/x402-spool")

Importing this package loads no server, scheduler or database (an import-linter contract
and a test hold it to that), and needs no x402 SDK: the facilitator passed in brings it.
See docs/hooks.md.
"""

from .attach import (
    DEFAULT_SPOOL_MAX_BYTES,
    HookableFacilitator,
    HookAttachment,
    attach_x402_facilitator,
)
from .metrics import HookMetrics
from .sender import SenderLimits
from .spool import DeadLetter, read_dead_letters

__all__ = [
    "DEFAULT_SPOOL_MAX_BYTES",
    "DeadLetter",
    "HookAttachment",
    "HookMetrics",
    "HookableFacilitator",
    "SenderLimits",
    "attach_x402_facilitator",
    "read_dead_letters",
]
