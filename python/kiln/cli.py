"""The `kiln` command. `main(argv)` returns an exit code, so tests call it as a function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kiln import __version__

__all__ = ["build_parser", "console", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="kiln", description="IP warm-up scheduler and throttle daemon for email senders."
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    run = verbs.add_parser("run", help="run the daemon beside your MTAs")
    run.add_argument("--config", default="schedules/example.yaml", help="warm-up plan (YAML)")
    run.add_argument("--state-dir", default=".state", help="database and sockets go here")
    return parser


def _run(args: argparse.Namespace) -> int:
    sys.stdout.write(
        f"kiln {__version__}: daemon not yet available "
        f"(would run {args.config} with state in {args.state_dir})\n"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments) and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "run":
        return _run(args)
    parser.print_help()
    return 2


def console() -> None:
    """Entry point of the `kiln` console script."""
    sys.exit(main())
