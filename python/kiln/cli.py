"""The `kiln` command. `main(argv)` returns an exit code, so tests call it as a function."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from kiln import __version__
from kiln.errors import ScheduleError
from kiln.ramp import PlanRow, PoolRow, nominal_plan
from kiln.schedule import Plan, load_plan

__all__ = ["PLAN_JSON_VERSION", "build_parser", "console", "main"]

#: Version of `kiln plan --format json`'s shape (documented in schedules/README.md).
PLAN_JSON_VERSION = 1

_ROW_COLUMNS = [f.name for f in dataclasses.fields(PlanRow)]


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
    check = verbs.add_parser("check", help="check plan files; print every mistake")
    check.add_argument("files", nargs="+", metavar="FILE", type=Path)
    plan = verbs.add_parser("plan", help="show what a plan allows, day by day")
    plan.add_argument("file", metavar="FILE", type=Path)
    plan.add_argument("--batch", help="only this batch")
    plan.add_argument("--provider", help="only this provider")
    plan.add_argument("--days", type=int, help="how many days (default: until every ramp ends)")
    plan.add_argument("--format", choices=["table", "json", "csv"], default="table")
    plan.add_argument("--png", type=Path, metavar="PATH", help="also draw the ramp curves")
    verbs.add_parser("schema", help="print the JSON Schema of plan files")
    return parser


def _out(text: str, stream: TextIO | None = None) -> None:
    """Write a line to stdout (or `stream`)."""
    (stream or sys.stdout).write(text if text.endswith("\n") else text + "\n")


def _run(args: argparse.Namespace) -> int:
    """`kiln run`: validates the plan first; the daemon itself arrives with its own issue."""
    plan = _load_one(Path(args.config))
    if plan is None:
        return 1
    _out(
        f"kiln {__version__}: plan {plan.name!r} is valid; daemon not yet available "
        f"(would run {args.config} with state in {args.state_dir})"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    """`kiln check FILE...`: 0 if every file is valid, else 1 with every problem printed."""
    failed = False
    for path in args.files:
        try:
            plan = load_plan(path)
        except ScheduleError as e:
            failed = True
            for p in e.problems:
                _out(str(p), sys.stderr)
            continue
        for w in plan.warnings:
            _out(str(w), sys.stderr)
        _out(f"{path}: ok ({len(plan.batches)} batches, {len(plan.pools)} pools)")
    return 1 if failed else 0


def _load_one(path: Path) -> Plan | None:
    """A plan, or None after printing its problems."""
    try:
        return load_plan(path)
    except ScheduleError as e:
        for p in e.problems:
            _out(str(p), sys.stderr)
        return None


def plan_document(plan: Plan, rows: list[PlanRow], pools: list[PoolRow]) -> dict[str, Any]:
    """The stable JSON form of `kiln plan` (schedules/README.md, "kiln plan --format json")."""
    return {
        "version": PLAN_JSON_VERSION,
        "plan": plan.name,
        "timezone": plan.timezone,
        "rows": [dataclasses.asdict(r) for r in rows],
        "pools": [dataclasses.asdict(p) for p in pools],
    }


def _table(rows: list[PlanRow], pools: list[PoolRow]) -> str:
    """A fixed-width table: one line per day x batch x provider, then pool capacity."""

    def cell(v: object) -> str:
        """Blank for None, digits grouped."""
        if v is None:
            return "-"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    head = ["date", "day", "batch", "provider", "state", "step", "daily_cap", "hourly_cap"]
    lines = [head] + [
        [cell(getattr(r, c)) for c in ("date", "day", "batch", "provider", "state", "step")]
        + [cell(r.daily_cap if r.share_percent is None else f"{r.share_percent:g}%")]
        + [cell(r.hourly_cap)]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = io.StringIO()
    for line in lines:
        out.write("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
    if pools:
        out.write("\nnew-IP daily capacity per pool and provider:\n")
        for p in pools:
            out.write(
                f"  {p.date}  {p.pool:<16} {p.provider:<20} {cell(p.new_ip_daily_capacity)}\n"
            )
    return out.getvalue()


def _plan(args: argparse.Namespace) -> int:
    """`kiln plan FILE`: the caps day by day, as a table, JSON or CSV, and optionally a PNG."""
    plan = _load_one(args.file)
    if plan is None:
        return 1
    if args.batch is not None and args.batch not in plan.batches:
        _out(
            f"kiln plan: unknown batch {args.batch!r} (batches: {', '.join(plan.batches)})",
            sys.stderr,
        )
        return 1
    if args.days is not None and not 1 <= args.days <= 3660:
        _out(f"kiln plan: --days must be in 1..3660, got {args.days}", sys.stderr)
        return 1
    rows, pools = nominal_plan(plan, args.days, args.batch, args.provider)
    if args.format == "json":
        _out(json.dumps(plan_document(plan, rows, pools), indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_ROW_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
        _out(buf.getvalue())
    else:
        _out(_table(rows, pools))
    if args.png is not None:
        from kiln.chart import draw_plan  # matplotlib loads only when a chart is asked for

        draw_plan(plan, rows, args.png)
        _out(f"wrote {args.png}", sys.stderr)
    return 0


def _schema(_args: argparse.Namespace) -> int:
    """`kiln schema`: the JSON Schema of plan files, for editors."""
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kiln warm-up plan"
    _out(json.dumps(schema, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments) and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbs = {"run": _run, "check": _check, "plan": _plan, "schema": _schema}
    if args.verb in verbs:
        return verbs[args.verb](args)
    parser.print_help()
    return 2


def console() -> None:
    """Entry point of the `kiln` console script."""
    sys.exit(main())
