"""The ``facilitator-exporter`` command: parser, dispatch, and the one handler that turns
every failure the exporter explains into one line on stderr and its exit code.

Exit codes: 0 done, 1 the command failed (a dependency is unavailable, data could not
be delivered or salvaged), 2 a mistake in the command line or the configuration,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import ExporterError
from . import (
    backfill,
    check_config,
    dead_letters,
    export,
    query,
    recover,
    replay,
    serve,
    simulate_live,
)

PROG = "facilitator-exporter"

USAGE_EXIT_CODE = 2
"""The exit status of a mistake in the command line (argparse's own)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line naming the mistake and ``--help``."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG COMMAND: MESSAGE (see PROG COMMAND --help)`` and exit 2."""
        self.exit(USAGE_EXIT_CODE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog=PROG,
        description="Monitoring and analytics back end for x402 payment facilitators. "
        "Settings come from EXPORTER_* environment variables; flags override them. "
        "Exit codes: 0 done, 1 failed, 2 a mistake in the command line or configuration.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (
        serve,
        check_config,
        simulate_live,
        replay,
        export,
        dead_letters,
        query,
        backfill,
        recover,
    ):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``facilitator-exporter`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ExporterError as error:
        sys.stderr.write(f"{PROG}: {error}\n")
        return error.exit_code
    except OSError as error:
        # A file or connection the command itself opened; the OS names which and why.
        sys.stderr.write(f"{PROG} {args.command}: {error}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return code
