"""The ledger: the durable SQLite record of every acknowledged event (dedup, joins, outbox).

Other stages import from here; the modules inside are the ledger's own business.
"""

from .committer import CommitOutcome, GroupCommitter
from .files import (
    DataDirLock,
    check_no_pending_recovery,
    is_damage,
    make_file_private,
    read_only_uri,
    recovery_marker,
)
from .model import (
    BatchGas,
    DeadLetter,
    DeadLetterRow,
    Effect,
    GaugeSnapshot,
    JoinTimeout,
    LedgerStats,
    NewEvent,
    Outcome,
    PendingChange,
    PreparedEvent,
    Submission,
    SubmissionResult,
    TerminalPayment,
    WebsocketCount,
)
from .storage import Ledger, LedgerTuning

__all__ = [
    "BatchGas",
    "CommitOutcome",
    "DataDirLock",
    "DeadLetter",
    "DeadLetterRow",
    "Effect",
    "GaugeSnapshot",
    "GroupCommitter",
    "JoinTimeout",
    "Ledger",
    "LedgerStats",
    "LedgerTuning",
    "NewEvent",
    "Outcome",
    "PendingChange",
    "PreparedEvent",
    "Submission",
    "SubmissionResult",
    "TerminalPayment",
    "WebsocketCount",
    "check_no_pending_recovery",
    "is_damage",
    "make_file_private",
    "read_only_uri",
    "recovery_marker",
]
