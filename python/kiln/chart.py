"""`kiln plan --png`: the ramp curves drawn so a person can see the plan."""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kiln.ramp import PlanRow
from kiln.schedule import Plan

__all__ = ["draw_plan"]


def draw_plan(plan: Plan, rows: list[PlanRow], path: Path) -> None:
    """Daily volume per IP (daily cap, or hourly cap over active hours) per batch x provider."""
    series: dict[str, list[tuple[date, float]]] = defaultdict(list)
    for r in rows:
        if r.state != "warming":
            continue
        hours = plan.schedules[plan.batches[r.batch].schedule].hourly.hours
        volume = r.daily_cap if r.daily_cap is not None else (r.hourly_cap or 0) * hours
        series[f"{r.batch} / {r.provider}"].append((date.fromisoformat(r.date), volume))
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    for label, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_title(f"kiln plan {plan.name!r}: messages per IP per day while warming")
    ax.set_xlabel(f"date ({plan.timezone})")
    ax.set_ylabel("messages per IP per day (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small", loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
