"""The ledger: the durable SQLite record of every acknowledged event (dedup, joins, outbox).

Other stages import from here; the modules inside are the ledger's own business.
"""

from .storage import (
    BatchGas,
    DataDirLock,
    DeadLetter,
    DeadLetterRow,
    Effect,
    GaugeSnapshot,
    GroupCommitter,
    Ledger,
    LedgerStats,
    NewEvent,
    Outcome,
    PendingChange,
    PreparedEvent,
    Submission,
    SubmissionResult,
    TerminalPayment,
    check_no_pending_recovery,
    is_damage,
    read_only_uri,
    recovery_marker,
)

__all__ = [
    "BatchGas",
    "DataDirLock",
    "DeadLetter",
    "DeadLetterRow",
    "Effect",
    "GaugeSnapshot",
    "GroupCommitter",
    "Ledger",
    "LedgerStats",
    "NewEvent",
    "Outcome",
    "PendingChange",
    "PreparedEvent",
    "Submission",
    "SubmissionResult",
    "TerminalPayment",
    "check_no_pending_recovery",
    "is_damage",
    "read_only_uri",
    "recovery_marker",
]
