"""``export``: the ledger's events as NDJSON that ``replay`` ingests again."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import json
import os
import sys
from collections.abc import Iterator
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


def _open_output(
    output: Path | None, stdout: IO[bytes], force: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """The sink: ``stdout``, or ``output`` (gzip when it ends in .gz), created mode 0600.

    The file must not exist (``force`` replaces a regular file), and a symbolic link is never
    followed: an export holds every payer and payee, and must not overwrite what a link
    points at. A file that cannot be created is refused in one line naming it.
    """
    if output is None:
        return contextlib.nullcontext(stdout)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        descriptor = os.open(output, flags, 0o600)
    except FileExistsError:
        if output.is_symlink():
            raise OperatorError(
                f"export: cannot write --output {output}: it is a symbolic link, which export "
                "never follows; choose a new file",
                2,
            ) from None
        raise OperatorError(
            f"export: --output {output} exists; choose a new file or add --force to replace it",
            2,
        ) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            reason = "it is a symbolic link, which export never follows"
        else:
            reason = error.strerror or str(error)
        raise OperatorError(
            f"export: cannot write --output {output}: {reason}; "
            "choose a file in an existing, writable directory",
            2,
        ) from None
    os.fchmod(descriptor, 0o600)  # a replaced file keeps no wider mode
    return _file_sink(descriptor, output.name)


@contextlib.contextmanager
def _file_sink(descriptor: int, name: str) -> Iterator[IO[bytes] | gzip.GzipFile]:
    """The open file ``descriptor``, gzip-compressed when ``name`` ends in .gz; closed after."""
    with os.fdopen(descriptor, "wb") as raw:
        if not name.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(filename=name, mode="wb", fileobj=raw) as zipped:
            yield zipped


def export(
    settings: Settings,
    since_ms: int | None,
    until_ms: int | None,
    output: Path | None,
    stdout: IO[bytes],
    force: bool = False,
) -> int:
    """Write the ledger's events in commit order as NDJSON; returns how many.

    ``since_ms`` (inclusive) and ``until_ms`` (exclusive) select by the event's own
    timestamp. Each line is the event's canonical JSON, which ``replay`` ingests with the
    same dedup key.
    """
    existing_ledger(settings, "export")
    written = 0
    with locked_data_dir(settings, "export"), _open_output(output, stdout, force) as sink:
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
    count = export(settings, since, until, output, sys.stdout.buffer, args.force)
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
    export.add_argument(
        "--force",
        action="store_true",
        help="replace --output if it exists (a symbolic link is refused all the same)",
    )
    export.add_argument("--data-dir", help=DATA_DIR_HELP)
    export.set_defaults(run=_export)
