"""The ledger's files on disk: header checks, recovery markers, the data-dir lock.

What is checked here is checked outside SQLite, before the ledger opens or after it
failed to: each problem names the file at fault and the command that repairs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import urllib.parse
from pathlib import Path

from ..errors import (
    DataDirLockedError,
    LedgerCorruptError,
    LedgerError,
    LedgerUnavailableError,
    RecoveryPendingError,
)


def recovery_command(data_dir: Path) -> str:
    """The command that moves a damaged ledger or store aside and rebuilds it."""
    return f"facilitator-exporter recover --data-dir {data_dir}"


def recovery_marker(path: Path) -> Path:
    """The file ``recover`` keeps beside ``path`` while it rebuilds it.

    It exists from before the damaged file is moved aside until the rebuilt file is in
    place; while it does, the exporter and the other commands refuse to open ``path``.
    """
    return path.with_name(path.name + ".recover-pending")


def check_no_pending_recovery(path: Path) -> None:
    """Raise :class:`RecoveryPendingError` while a recovery of ``path`` is unfinished."""
    marker = recovery_marker(path)
    if marker.exists():
        raise RecoveryPendingError(
            f"a recovery of {path} was interrupted before it finished ({marker} exists): "
            "what is there may be only part of what the damaged file held. Run "
            f"`{recovery_command(path.parent)}` again to finish it"
        )


# SQLite's primary result codes that mean the file's bytes are not a sound database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_OPEN_ERROR_HINTS = {
    3: "permission denied: the exporter's user must be able to read and write the file",
    5: "another process holds the file's lock: stop it and start again",
    6: "another connection holds the file's lock: stop it and start again",
    8: "the file or its directory is read-only: the exporter must be able to write both",
    10: "an I/O error: check the disk and the kernel log",
    13: "the disk is full: free space and start again",
    14: "the file, its -wal/-shm or its directory cannot be opened: check that they exist "
    "and that the exporter's user may read and write them",
    23: "access denied: check the file's permissions",
}


def is_damage(error: sqlite3.Error) -> bool:
    """Whether an SQLite error says the file is damaged (not full, locked or unreadable)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def open_error(path: Path, error: sqlite3.Error) -> LedgerError:
    """The ledger error for an SQLite error met while opening ``path``."""
    if is_damage(error):
        return LedgerCorruptError(damaged_ledger_message(path, str(error)))
    code = getattr(error, "sqlite_errorcode", None)
    hint = _OPEN_ERROR_HINTS.get(code & 0xFF) if code is not None else None
    return LedgerUnavailableError(
        f"cannot open ledger file {path}: {str(error).rstrip('.')}"
        + (f" ({hint})" if hint else "")
        + ". The file is not damaged: `recover` does not apply"
    )


def damaged_ledger_message(path: Path, problem: str) -> str:
    """One paragraph for the operator: which file, what is wrong, what to run."""
    return (
        f"ledger file {path} is damaged: {problem}. The exporter does not start on a "
        "damaged ledger (it would lose acknowledged events). Stop every process using "
        f"{path.parent}, then run `{recovery_command(path.parent)}` to move it aside (it "
        f"is kept as {path.name}.damaged-<UTC time>) and commit every event that can "
        "still be read from it to a new ledger"
    )


SQLITE_MAGIC = b"SQLite format 3\x00"
"""The first bytes of every SQLite database file."""
SQLITE_HEADER_BYTES = 100
"""The length of an SQLite database file's header (part of its first page)."""
WAL_HEADER_BYTES = 32
"""The length of an SQLite WAL file's header, before its first frame."""


def header_page_size(header: bytes) -> int:
    """The page size an SQLite file header names (bytes 16-17; 1 stands for 65,536)."""
    page_size = int.from_bytes(header[16:18], "big")
    return 65536 if page_size == 1 else page_size


def is_valid_page_size(page_size: int) -> bool:
    """Whether SQLite could have written pages of ``page_size`` bytes (a power of two from 512)."""
    return page_size >= 512 and not page_size & (page_size - 1)


def _ledger_file_problem(path: Path) -> str | None:
    """What is wrong with the ledger file's size and header, or None when it looks whole.

    SQLite trusts the page count in the header (offset 28) and never reads the bytes
    after it, nor notices that pages before it are missing until a query reaches them,
    so truncation and appended bytes are only visible by comparing that count with the
    file's size. A checkpoint cut short by a crash may leave the file shorter than the
    header says while the WAL still holds the missing pages: that is normal, and SQLite
    completes it from the WAL. It never leaves the file longer, nor a partial page.
    """
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as handle:
        header = handle.read(SQLITE_HEADER_BYTES)
    if len(header) < SQLITE_HEADER_BYTES or not header.startswith(SQLITE_MAGIC):
        return f"the file ({size} bytes) does not start with an SQLite header"
    page_size = header_page_size(header)
    if not is_valid_page_size(page_size):
        return f"the header names an invalid page size ({page_size})"
    if size % page_size:
        return f"its size ({size} bytes) is not a whole number of {page_size}-byte pages"
    # The page count is valid only when "version-valid-for" equals the change counter.
    if header[92:96] != header[24:28]:
        return None
    expected = int.from_bytes(header[28:32], "big") * page_size
    if size > expected:
        return (
            f"it is {size - expected} bytes longer than the {expected} bytes its header "
            "describes (bytes were appended)"
        )
    wal = path.with_name(path.name + "-wal")
    hot_wal = wal.exists() and wal.stat().st_size > WAL_HEADER_BYTES
    if size < expected and not hot_wal:
        return (
            f"it is {size} bytes long but its header describes {expected} bytes "
            "(the file was truncated)"
        )
    return None


def check_ledger_file(path: Path) -> None:
    """Raise :class:`LedgerCorruptError` when an existing ledger file is cut or extended.

    Also raises :class:`RecoveryPendingError` while an interrupted ``recover`` of it is
    unfinished, and :class:`LedgerUnavailableError` when the file cannot be read.
    """
    check_no_pending_recovery(path)
    if not path.exists():
        return
    try:
        problem = _ledger_file_problem(path)
    except OSError as error:
        raise LedgerUnavailableError(
            f"cannot read ledger file {path}: {error}. The file is not damaged: "
            "`recover` does not apply"
        ) from error
    if problem is not None:
        raise LedgerCorruptError(damaged_ledger_message(path, problem))


def make_private(data_dir: Path) -> None:
    """Make ``data_dir`` mode 0700 and every file directly in it 0600, also when the
    directory existed before with wider modes (a Docker volume, a directory made by hand).

    The data holds payer addresses and the raw bytes of refused bodies: it is the
    exporter's user's alone. Files the exporter's own user does not own are left as they are.
    """
    info = data_dir.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        data_dir.chmod(0o700)
    for entry in data_dir.iterdir():
        make_file_private(entry)


def make_file_private(path: Path) -> None:
    """Make ``path`` mode 0600 when it is a regular file of this user with a wider mode
    (a link, another user's file or a missing one is left alone)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
        path.chmod(0o600)


class DataDirLock:
    """An exclusive advisory lock on the data directory, held while the exporter runs.

    Two exporters on one data directory would share a ledger but not their metrics or
    store; the second one is refused before it touches anything.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_private(data_dir)
        self.path = data_dir / ".lock"
        self._file = open(self.path, "a+")  # held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise DataDirLockedError(
                f"data directory {data_dir} is in use by another exporter process "
                f"(pid {holder}, lock file {self.path}); stop it or use another "
                "EXPORTER_DATA_DIR"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        """Release the lock."""
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def close_without_checkpoint(path: Path, conns: list[sqlite3.Connection]) -> None:
    """Close ``conns`` without letting the last close checkpoint the WAL into ``path``.

    Closing the last connection to a WAL database copies the WAL into the file and
    deletes it; a ledger that failed to open may be damaged, and is never written in
    place. A read-only connection that stays open across the closes keeps its shared
    lock, so no close is the last one, and a read-only connection never checkpoints.
    """
    if not conns:
        return
    guard: sqlite3.Connection | None = None
    with contextlib.suppress(sqlite3.Error):
        guard = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
        guard.execute("PRAGMA schema_version").fetchone()
    try:
        for conn in reversed(conns):
            conn.close()
    finally:
        if guard is not None:
            guard.close()


def read_only_uri(path: Path) -> str:
    """An SQLite URI that opens ``path`` read-only (it still reads the file's WAL)."""
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
