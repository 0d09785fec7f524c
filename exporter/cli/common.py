"""What the commands share: settings from the flags, the data directory's lock, the
ledger's presence, and the instant parser of ``--since``/``--until``/``--at``."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import DataDirLockedError, OperatorError
from ..ledger import DataDirLock

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
    """The ``add_subparsers`` action each command module adds its parser to."""

DATA_DIR_HELP = "data directory holding the ledger and store (EXPORTER_DATA_DIR, data)"

REPLAY_BATCH_EVENTS = 5_000
"""Events committed to the ledger per transaction during replay and backfill."""


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings: ``EXPORTER_*`` variables, overridden by the command's flags."""
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "upstream_facilitator", None):
        overrides["upstream_facilitator"] = args.upstream_facilitator
    return Settings(**overrides)


def parse_instant(text: str, option: str) -> int:
    """Epoch milliseconds from ``text``: an integer (ms) or an RFC 3339 time with offset."""
    if re.fullmatch(r"-?[0-9]{1,19}", text):  # ASCII: isdigit() also admits "²"
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise OperatorError(
            f"{option}: expected epoch milliseconds or an RFC 3339 time, got {text!r}", 2
        ) from None
    if moment.tzinfo is None:
        raise OperatorError(f"{option}: {text!r} needs a UTC offset (e.g. Z)", 2)
    return int(moment.timestamp() * 1000)



@contextlib.contextmanager
def locked_data_dir(settings: Settings, command: str) -> Iterator[DataDirLock]:
    """Hold the data directory's lock, or refuse clearly when an exporter holds it."""
    try:
        lock = DataDirLock(settings.data_dir)
    except DataDirLockedError as error:
        raise OperatorError(
            f"{command}: {error}. {command} opens the ledger itself and cannot run beside "
            "an exporter on the same data directory"
        ) from None
    try:
        yield lock
    finally:
        lock.release()


def existing_ledger(settings: Settings, command: str) -> None:
    if not settings.ledger_path.exists():
        raise OperatorError(f"{command}: no ledger at {settings.ledger_path}")



def sqlite_files(path: Path) -> tuple[Path, ...]:
    """An SQLite database file and its WAL and shared-memory companions."""
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))

