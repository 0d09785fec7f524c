"""What the commands share: settings from the flags and the environment, the data
directory (present, writable, locked), numeric option types, durable JSON files, and the
instant parser of ``--since``/``--until``/``--at``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..addresses import split_host_port
from ..analytics import InstantError
from ..analytics import parse_instant as analytics_instant
from ..config import Settings, load_settings
from ..errors import ConfigError, DataDirError, DataDirLockedError, OperatorError
from ..ledger import DataDirLock

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
    """The ``add_subparsers`` action each command module adds its parser to."""

DATA_DIR_HELP = "data directory holding the ledger and store (EXPORTER_DATA_DIR, data)"

REPLAY_BATCH_EVENTS = 5_000
"""Events committed to the ledger per transaction during replay and backfill."""

DRAIN_SECONDS = 60.0
"""How long replay, backfill and recover keep delivering after the last event by default."""

DATA_DIR_FLAG = "--data-dir or EXPORTER_DATA_DIR"
"""How an operator names another data directory, for the way out of a message."""


# --------------------------------------------------------------------------- settings


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings: ``EXPORTER_*`` variables, overridden by the command's flags.

    A wrong value is a :class:`~exporter.errors.ConfigError` naming the variable.
    """
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "upstream_facilitator", None):
        overrides["upstream_facilitator"] = args.upstream_facilitator
    return load_settings(**overrides)


def listen_from_environment() -> tuple[str, int]:
    """(host, port) of ``EXPORTER_LISTEN``, or of its default when it is unset."""
    listen = os.environ.get("EXPORTER_LISTEN") or str(Settings.model_fields["listen"].default)
    try:
        return split_host_port(listen)
    except ValueError as error:
        raise ConfigError(f"invalid configuration: EXPORTER_LISTEN: {error}") from None


def http_base_url(url: str, command: str) -> str:
    """``--url`` without its trailing slash, refused (exit 2) unless an http(s) URL with a
    host and a valid port."""
    parts = urllib.parse.urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        valid = False
    if not valid:
        raise OperatorError(f"{command}: --url must be an http:// or https:// URL, got {url!r}", 2)
    return url.rstrip("/")


def local_url(address: tuple[str, int]) -> str:
    """The base URL that reaches an exporter bound to ``address`` from this machine.

    An exporter bound to every address (``0.0.0.0``, ``::``) is reached on loopback.
    """
    host, port = address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


# --------------------------------------------------------------------------- option types


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number, 0 or above."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or above, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or above."""
    return _at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or above."""
    return _at_least(text, 0)


def _at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or above, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# --------------------------------------------------------------------------- instants


def parse_instant(text: str, option: str) -> int:
    """Epoch milliseconds from ``text`` by the analytics API's own rule (epoch ms or RFC 3339
    with an offset), refused with exit 2 naming ``option``."""
    try:
        return analytics_instant(text, option)
    except InstantError as error:
        raise OperatorError(str(error), 2) from None


# --------------------------------------------------------------------------- data directory


def existing_data_dir(settings: Settings, command: str) -> None:
    """Refuse a data directory that does not exist: commands that only read never create
    one, so a mistyped ``--data-dir`` is an error, not an empty new directory."""
    if not settings.data_dir.is_dir():
        what = "is not a directory" if settings.data_dir.exists() else "does not exist"
        raise DataDirError(
            f"{command}: data directory {settings.data_dir} {what}; "
            f"check {DATA_DIR_FLAG}",
            2,
        )


def existing_ledger(settings: Settings, command: str) -> None:
    """Refuse a data directory without a ledger (nothing is created)."""
    existing_data_dir(settings, command)
    if not settings.ledger_path.exists():
        raise DataDirError(
            f"{command}: no ledger at {settings.ledger_path}; check {DATA_DIR_FLAG}", 2
        )


def writable_data_dir(settings: Settings, command: str) -> None:
    """Create the data directory if needed (for the exporter's user alone) and check that
    it can be written, naming it and the way out when not."""
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise DataDirError(
            f"{command}: cannot create the data directory {data_dir}: "
            f"{error.strerror or error}; create it for this user or choose another with "
            f"{DATA_DIR_FLAG}"
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirError(
            f"{command}: the data directory {data_dir} is not writable by this user; "
            f"fix its permissions or choose another with {DATA_DIR_FLAG}"
        )


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
    except OSError as error:
        raise DataDirError(
            f"{command}: cannot lock the data directory {settings.data_dir}: "
            f"{error.strerror or error}; fix its permissions or choose another with "
            f"{DATA_DIR_FLAG}"
        ) from None
    try:
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------- files


def sqlite_files(path: Path) -> tuple[Path, ...]:
    """An SQLite database file and its WAL and shared-memory companions."""
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON to ``path`` atomically and durably: a reader sees the old
    file or the new one, and after a crash the new one is there once this returns."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
