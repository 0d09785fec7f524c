"""The exporter's one error family.

Every failure the exporter reports on purpose is an :class:`ExporterError`; its message is
one line for the operator that names the file, address or setting at fault and the way out.
The CLI prints ``str(error)`` and exits with :attr:`ExporterError.exit_code`; nothing below
this family reaches an operator as a traceback. Subclasses say which stage failed, so a
handler catches exactly the causes it can name and never misnames another.
"""

from __future__ import annotations


class ExporterError(Exception):
    """A failure the exporter can explain in one line; ``str()`` is that line."""

    exit_code: int = 1
    """The process exit status when this error ends a command."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ExporterError):
    """A setting, environment variable or command-line value is wrong; nothing was started."""

    exit_code = 2


class OperatorError(ExporterError):
    """An operator command cannot do what was asked; ``str()`` tells the operator why."""


# ----------------------------------------------------------------------------- ledger


class LedgerError(ExporterError):
    """The ledger cannot be opened or written."""


class LedgerCorruptError(LedgerError):
    """The ledger file is damaged; the message names the file and what to do."""


class LedgerUnavailableError(LedgerError):
    """The ledger cannot be read or written now (disk full, I/O error, locked file,
    permissions); the file is not damaged. A failed commit stored nothing."""


class DataDirLockedError(LedgerError):
    """Another process holds the data directory."""


class DataDirError(LedgerError):
    """The data directory cannot be created, read or written; the message names it."""


class RecoveryPendingError(ExporterError):
    """A ``recover`` of a ledger or store file was interrupted; the file must not be used
    until a ``recover`` finishes it."""


# ----------------------------------------------------------------------------- store


class StoreError(ExporterError):
    """A store write failed; the records stay in the outbox and are retried."""


class StoreRetryAfterError(StoreError):
    """The store asked to be left alone for ``retry_after`` seconds (429/503)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreAuthError(StoreError):
    """The store refused the exporter's credentials; retrying cannot help until fixed."""


class StoreTimeoutError(StoreError):
    """The store did not answer in time; retried with backoff."""


class StoreServerError(StoreError):
    """The store failed on its side (5xx) or could not be reached; retried with backoff."""


class StoreClientError(StoreError):
    """The store refused the request for a reason other than credentials or bad records."""


class StoreLockedError(StoreError):
    """The store file is held by another process (DuckDB allows one writer process)."""


class StoreCorruptError(StoreError):
    """The store file exists but is not a readable DuckDB database."""


class StoreInvalidatedError(StoreError):
    """DuckDB invalidated the database after a fatal error; retried by reopening the file."""


# ----------------------------------------------------------------------------- hooks


class SpoolError(ExporterError):
    """The facilitator hooks' spool cannot be opened or is held by another process; the
    message names the directory and the way out. Nothing was attached."""
