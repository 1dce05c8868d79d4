"""`kiln simulate`: run the real engine, policy and ramps over simulated days (docs/simulate.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, ScheduleError
from kiln.planfile import load_plan
from kiln.simscenario import Scenario, check_scenario, load_scenario, parse_traffic

__all__ = ["add_simulate_verb", "simulate_main"]


def add_simulate_verb(verbs: Any) -> None:
    """`simulate` on the `kiln` parser's verbs."""
    p = verbs.add_parser(
        "simulate", help="run the real engine and policy over simulated days of a warm-up"
    )
    p.add_argument("--config", type=Path, metavar="PLAN", help="warm-up plan (YAML)")
    p.add_argument("--days", type=int, metavar="N", help="how many days to simulate")
    p.add_argument(
        "--traffic",
        metavar="SPEC",
        help="google=50_000,default=20_000[;profile=business][;pools=A+B], fill[=FACTOR], "
        "or a YAML file (default: enough to fill every cap)",
    )
    p.add_argument("--events", type=Path, metavar="FILE", help="scenario file (YAML)")
    p.add_argument("--out", type=Path, metavar="FOLDER", help="write report.json, PNG and HTML")
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table (default, for people) or json (stable and versioned: docs/simulate.md)",
    )


def _fail(text: str) -> int:
    """Print an error for `kiln simulate` and return the exit code."""
    sys.stderr.write(f"kiln simulate: {text}\n")
    return 1


def simulate_main(args: argparse.Namespace) -> int:
    """Check the inputs, run, print the report, write the charts."""
    from kiln import log

    log.configure(stream=sys.stderr, level=logging.ERROR)
    from kiln.simreport import render_table, write_html, write_png
    from kiln.simulate import report_json, simulate

    scenario, data, source = Scenario(), None, None
    try:
        if args.events is not None:
            scenario, data, source = load_scenario(args.events)
        plan_path = args.config
        if plan_path is None and scenario.plan is not None and args.events is not None:
            plan_path = args.events.parent / scenario.plan
        if plan_path is None:
            return _fail("give --config PLAN (or a scenario file whose `plan` names one)")
        days = args.days or scenario.days
        if days is None or not 1 <= days <= 3660:
            return _fail("give --days N (1 to 3660), or `days` in the scenario file")
        plan = load_plan(plan_path)
        if data is not None and source is not None:
            check_scenario(scenario, data, source, plan, days)
        traffic = parse_traffic(args.traffic, plan) if args.traffic else None
    except ScheduleError as e:
        for p in e.problems:
            sys.stderr.write(f"{p}\n")
        return 1
    except (KilnError, ValueError) as e:
        return _fail(str(e))
    report = simulate(plan_path, scenario, days, traffic=traffic)
    text = report_json(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(text)
        write_png(report, args.out / "simulate.png")
        write_html(report, args.out / "simulate.html")
    sys.stdout.write(text if args.format == "json" else render_table(report))
    return 0
