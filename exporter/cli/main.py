"""The ``facilitator-exporter`` command: parser, dispatch, and the one handler that turns
every failure the exporter explains into one line on stderr and its exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

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


def _config_error(error: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for detail in error.errors(include_url=False):
        name = "EXPORTER_" + "_".join(str(p) for p in detail["loc"]).upper()
        message = str(detail["msg"]).removeprefix("Value error, ")
        lines.append(f"  {name}: {message}" if detail["loc"] else f"  {message}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="facilitator-exporter",
        description="Monitoring and analytics back end for x402 payment facilitators. "
        "Settings come from EXPORTER_* environment variables; flags override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (serve, check_config, simulate_live, replay, export, dead_letters, query,
                    backfill, recover):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``facilitator-exporter`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ValidationError as error:
        sys.stderr.write(_config_error(error) + "\n")
        return 2
    except ExporterError as error:
        sys.stderr.write(f"facilitator-exporter: {error}\n")
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return code
