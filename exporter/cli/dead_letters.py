"""``dead-letters``: the ledger's refused and conflicting input, read beside a running
exporter through a read-only SQLite connection."""

from __future__ import annotations

import argparse
import datetime
import json
import sqlite3
import sys
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import OperatorError
from ..ledger import read_only_uri
from ..metrics import REJECT_REASONS
from .common import (
    DATA_DIR_HELP,
    existing_ledger,
    non_negative_int,
    positive_int,
    settings_from_args,
)
from .render import clip, render_table

if TYPE_CHECKING:
    from .common import Commands


DEAD_LETTER_REASONS = (*REJECT_REASONS, "store")
"""Why input became a dead letter: refused at ingest (the reasons of
``exporter_events_rejected_total``), or refused for good by the store (``store``)."""


def _iso(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")



def dead_letters(settings: Settings, reason: str | None, limit: int) -> list[dict[str, Any]]:
    """Stored dead letters, newest first, read without disturbing a running exporter."""
    existing_ledger(settings, "dead-letters")
    uri = read_only_uri(settings.ledger_path)
    params: list[object] = []
    where = ""
    if reason is not None:
        where = " WHERE reason = ?"
        params.append(reason)
    params.append(limit)
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            # A ledger last written by an older exporter has no raw_size: its letters are whole.
            columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
            raw_size = "raw_size" if "raw_size" in columns else "NULL"
            sql = (
                f"SELECT id, received_at, reason, error, key, raw, {raw_size} FROM dead_letters"
                f"{where} ORDER BY id DESC LIMIT ?"
            )
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise OperatorError(f"dead-letters: cannot read {settings.ledger_path}: {error}") from None
    return [
        {
            "id": row[0],
            "receivedAt": _iso(int(row[1])),
            "reason": row[2],
            "error": row[3],
            "key": row[4],
            "raw": bytes(row[5]).decode("utf-8", errors="replace"),
            "rawBytes": len(row[5]),
            "rawSize": len(row[5]) if row[6] is None else int(row[6]),
            "truncated": row[6] is not None,
        }
        for row in rows
    ]



def _size(letter: dict[str, Any]) -> str:
    """The body's size; for a truncated one, how much of it was kept."""
    if letter["truncated"]:
        return f"{letter['rawSize']} (head {letter['rawBytes']} kept)"
    return str(letter["rawSize"])


def _dead_letters(args: argparse.Namespace) -> int:
    letters = dead_letters(settings_from_args(args), args.reason, args.limit)
    if args.format == "json":
        sys.stdout.write(json.dumps(letters, indent=2) + "\n")
        return 0
    if not letters:
        sys.stderr.write("dead-letters: none\n")
        return 0
    width = args.width
    rows = [
        [
            d["id"],
            d["receivedAt"],
            d["reason"],
            d["key"],
            _size(d),
            clip(d["error"], width),
            clip(d["raw"], width),
        ]
        for d in letters
    ]
    columns = ["id", "received_at", "reason", "key", "size", "error", "raw"]
    sys.stdout.write(render_table(columns, rows))
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``dead-letters`` to the command line."""
    letters = commands.add_parser(
        "dead-letters",
        help="list rejected and conflicting events with their reasons",
        description="List the ledger's dead letters, newest first. Reads the ledger "
        "read-only, so it also works while an exporter runs.",
    )
    letters.add_argument(
        "--reason",
        choices=DEAD_LETTER_REASONS,
        help=f"only this reason: {', '.join(DEAD_LETTER_REASONS)}",
    )
    letters.add_argument(
        "--format", choices=("table", "json"), default="table", help="output (default table)"
    )
    letters.add_argument(
        "--limit", type=positive_int, default=100, help="most dead letters to show (default 100)"
    )
    letters.add_argument(
        "--width",
        type=non_negative_int,
        default=60,
        help="clip error and raw columns of the table to this width; 0 keeps them whole "
        "(default 60)",
    )
    letters.add_argument("--data-dir", help=DATA_DIR_HELP)
    letters.set_defaults(run=_dead_letters)
