"""``export``: the ledger's events as NDJSON that ``replay`` ingests again."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..config import Settings
from ..errors import OperatorError
from ..ledger import Ledger
from .common import (
    DATA_DIR_HELP,
    existing_ledger,
    locked_data_dir,
    parse_instant,
    settings_from_args,
)

if TYPE_CHECKING:
    from .common import Commands


def _open_output(output: Path | None, stdout: IO[bytes]) -> contextlib.AbstractContextManager[Any]:
    """The sink: ``stdout``, or ``output`` (gzip when it ends in .gz), refused in one line
    naming the file when it cannot be created."""
    if output is None:
        return contextlib.nullcontext(stdout)
    try:
        if output.name.endswith(".gz"):
            return gzip.open(output, "wb")
        return open(output, "wb")
    except OSError as error:
        raise OperatorError(
            f"export: cannot write --output {output}: {error.strerror or error}; "
            "choose a file in an existing, writable directory",
            2,
        ) from None


def export(
    settings: Settings,
    since_ms: int | None,
    until_ms: int | None,
    output: Path | None,
    stdout: IO[bytes],
) -> int:
    """Write the ledger's events in commit order as NDJSON; returns how many.

    ``since_ms`` (inclusive) and ``until_ms`` (exclusive) select by the event's own
    timestamp. Each line is the event's canonical JSON, which ``replay`` ingests with the
    same dedup key.
    """
    existing_ledger(settings, "export")
    written = 0
    with locked_data_dir(settings, "export"), _open_output(output, stdout) as sink:
        ledger = Ledger(settings.ledger_path, settings.durability)
        try:
            for _seq, _key, body in ledger.iter_events():
                blob = bytes(body)
                if since_ms is not None or until_ms is not None:
                    ts = int(json.loads(blob)["data"]["timestamp"])
                    if since_ms is not None and ts < since_ms:
                        continue
                    if until_ms is not None and ts >= until_ms:
                        continue
                sink.write(blob + b"\n")
                written += 1
            sink.flush()
        finally:
            ledger.close()
    return written



def _export(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    since = parse_instant(args.since, "--since") if args.since else None
    until = parse_instant(args.until, "--until") if args.until else None
    output = Path(args.output) if args.output else None
    count = export(settings, since, until, output, sys.stdout.buffer)
    sys.stderr.write(f"export: {count} events written to {output or 'stdout'}\n")
    return 0


def add_parser(commands: Commands) -> None:
    """Add ``export`` to the command line."""
    export = commands.add_parser(
        "export",
        help="write the ledger's events as NDJSON that replay can ingest",
        description="Write the ledger's events in commit order, one canonical JSON event per "
        "line, re-ingestible by `replay`. Needs the data directory to itself.",
    )
    export.add_argument(
        "--since", help="first event timestamp to include (epoch ms or RFC 3339, inclusive)"
    )
    export.add_argument(
        "--until", help="event timestamp to stop before (epoch ms or RFC 3339, exclusive)"
    )
    export.add_argument(
        "--output", help="file to write; gzip when it ends in .gz (default stdout)"
    )
    export.add_argument("--data-dir", help=DATA_DIR_HELP)
    export.set_defaults(run=_export)
