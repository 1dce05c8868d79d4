"""kiln simulate: 90 days x 21 IPs x 10 providers with hourly traffic, timed end to end.

    python benches/simulate_bench.py [--json benches/results/simulate.json] [--days N]

Runs the real daemon core over the days (`kiln.simulate.simulate`) with traffic enough to
fill every cap, and states the target of issue 13: at most 10 s on the 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchkit import at_most, publish
from kiln.planfile import load_plan
from kiln.simscenario import Scenario
from kiln.simulate import simulate

PLAN = Path(__file__).resolve().parent / "simulate-plan.yaml"
#: Issue 13's bound for 90 days x 21 IPs x 10 providers.
BOUND_S = 10.0


def main() -> int:
    """Time one run and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--days", type=int, default=90, help="simulated days (default 90)")
    args = parser.parse_args()
    started_s = time.perf_counter()
    report = simulate(PLAN, Scenario(), args.days)
    elapsed_s = time.perf_counter() - started_s
    ips = sum(len(b.ips) for b in load_plan(PLAN).batches.values())
    result: dict[str, Any] = {
        "days": args.days,
        "ips": ips,
        "providers": len(report["providers"]),
        "hours": args.days * 24,
        "elapsed_s": round(elapsed_s, 3),
        "granted": sum(d["warming"] + d["overflowed"] for d in report["daily"]),
        "targets": [
            at_most(
                f"kiln simulate, {args.days} days x {ips} IPs x "
                f"{len(report['providers'])} providers",
                round(elapsed_s, 3),
                BOUND_S,
                "s",
            )
        ],
    }
    publish(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
