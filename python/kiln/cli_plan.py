"""The offline plan verbs: `kiln check`, `kiln plan` and `kiln schema` (no daemon needed)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from kiln.errors import ScheduleError
from kiln.planfile import load_plan
from kiln.ramp import PlanRow, PoolRow, nominal_plan
from kiln.schedule import Plan

__all__ = [
    "PLAN_JSON_VERSION",
    "add_plan_verbs",
    "check_main",
    "load_one",
    "plan_document",
    "plan_main",
    "plural",
    "schema_main",
]

#: Version of `kiln plan --format json`'s shape (documented in schedules/README.md). 2: `day`
#: counts warm-up days from 1 (the start date), as `warmup_day` and `step` do; 1 counted from 0.
PLAN_JSON_VERSION = 2

_ROW_COLUMNS = [f.name for f in dataclasses.fields(PlanRow)]


def add_plan_verbs(verbs: Any) -> None:
    """The verbs' arguments, on the `kiln` parser's subparsers."""
    check = verbs.add_parser("check", help="check plan files; print every mistake")
    check.add_argument("files", nargs="+", metavar="FILE", type=Path, help="plan files (YAML)")
    plan = verbs.add_parser("plan", help="show what a plan allows, day by day")
    plan.add_argument("file", metavar="FILE", type=Path, help="plan file (YAML)")
    plan.add_argument("--batch", help="only this batch")
    plan.add_argument("--provider", help="only this provider")
    plan.add_argument("--days", type=int, help="how many days (default: until every ramp ends)")
    plan.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="table (default, for people), json (stable and versioned) or csv",
    )
    plan.add_argument("--png", type=Path, metavar="PATH", help="also draw the ramp curves")
    verbs.add_parser("schema", help="print the JSON Schema of plan files")


def _say(text: str, stream: TextIO | None = None) -> None:
    """A line on standard output (or `stream`)."""
    (stream or sys.stdout).write(text if text.endswith("\n") else text + "\n")


def plural(n: int, word: str) -> str:
    """`1 batch`, `2 batches`, `3 pools`."""
    if n == 1:
        return f"1 {word}"
    return f"{n:,} {word}{'es' if word.endswith(('s', 'ch', 'sh', 'x')) else 's'}"


def check_main(args: argparse.Namespace) -> int:
    """`kiln check FILE...`: 0 if every file is valid, else 1 with every problem printed."""
    failed = False
    for path in args.files:
        try:
            plan = load_plan(path)
        except ScheduleError as e:
            failed = True
            for p in e.problems:
                _say(str(p), sys.stderr)
            continue
        for w in plan.warnings:
            _say(str(w), sys.stderr)
        batches, pools = plural(len(plan.batches), "batch"), plural(len(plan.pools), "pool")
        _say(f"{path}: ok ({batches}, {pools})")
    return 1 if failed else 0


def load_one(path: Path) -> Plan | None:
    """A plan, or None after printing its problems."""
    try:
        return load_plan(path)
    except ScheduleError as e:
        for p in e.problems:
            _say(str(p), sys.stderr)
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


def plan_main(args: argparse.Namespace) -> int:
    """`kiln plan FILE`: the caps day by day, as a table, JSON or CSV, and optionally a PNG."""
    plan = load_one(args.file)
    if plan is None:
        return 1
    if args.batch is not None and args.batch not in plan.batches:
        _say(
            f"kiln plan: unknown batch {args.batch!r} (batches: {', '.join(plan.batches)})",
            sys.stderr,
        )
        return 1
    if args.provider is not None and args.provider not in plan.provider_names():
        hint = plan.provider_hint(args.provider)
        known = ", ".join(sorted(plan.provider_names()))
        _say(f"kiln plan: unknown provider {args.provider!r}{hint} (known: {known})", sys.stderr)
        return 1
    if args.days is not None and not 1 <= args.days <= 3660:
        _say(f"kiln plan: --days must be in 1..3660, got {args.days}", sys.stderr)
        return 1
    rows, pools = nominal_plan(plan, args.days, args.batch, args.provider)
    if args.format == "json":
        _say(json.dumps(plan_document(plan, rows, pools), indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_ROW_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
        _say(buf.getvalue())
    else:
        _say(_table(rows, pools))
    if args.png is not None:
        from kiln.chart import draw_plan  # matplotlib loads only when a chart is asked for

        draw_plan(plan, rows, args.png)
        _say(f"wrote {args.png}", sys.stderr)
    return 0


def schema_main(_args: argparse.Namespace) -> int:
    """`kiln schema`: the JSON Schema of plan files, for editors."""
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kiln warm-up plan"
    _say(json.dumps(schema, indent=2))
    return 0
