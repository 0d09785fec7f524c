"""The WAL checkpointer: copies the ledger's WAL into its file from a thread of its own."""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger(__name__)


class Checkpointer:
    """Checkpoints the WAL every ``interval_seconds`` from its own connection.

    A PASSIVE checkpoint never blocks the writer, but under continuous writes it never
    finds every frame copied, and SQLite only rewinds a WAL whose every frame was
    checkpointed: the file would grow without bound (about 4 KiB per event). So once
    the WAL holds ``restart_frames`` frames (pages), a second PASSIVE checkpoint runs
    while holding the ledger's write lock: it copies only the frames written since the
    first, and the next transaction then writes from the start of the file.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        write_lock: threading.Lock,
        interval_seconds: float = 1.0,
        restart_frames: int = 8192,
    ) -> None:
        self._conn = conn
        self._write_lock = write_lock
        self._interval = interval_seconds
        self._restart_frames = restart_frames
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.checkpoint()
            except sqlite3.Error as error:
                log.warning("ledger checkpoint failed", extra={"error": str(error)})

    def checkpoint(self) -> None:
        """Copy the WAL into the database file; let the WAL rewind once it is large."""
        _, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= self._restart_frames:
            with self._write_lock:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def stop(self) -> None:
        """Stop the thread and close the checkpointer's connection."""
        self._stop.set()
        self._thread.join()
        self._conn.close()
