"""`kiln simulate`'s outputs from its report: a text table, a PNG and a self-contained HTML
page (inline SVG, no external assets). The report itself is `kiln.simulate`'s plain data."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["render_table", "write_html", "write_png"]

#: Ramp moves the table lists one by one (advances and finished days are only counted).
_NOTABLE = frozenset({"hold", "step_down", "pause", "paused", "restart", "flag"})
#: Daily columns: report field, heading.
_COLUMNS = (
    ("offered", "offered"),
    ("warming", "warming"),
    ("overflowed", "overflowed"),
    ("waited", "waited"),
    ("delivered", "delivered"),
    ("bounced", "bounced"),
    ("deferred", "deferred"),
    ("complaints", "complaints"),
)
_BAR_PARTS = (("warming", "#2e7d32"), ("overflowed", "#f9a825"), ("waited", "#c62828"))


def _title(report: dict[str, Any]) -> str:
    """One line naming the run."""
    return (
        f"kiln simulate: plan {report['plan']!r}, {report['days']} days from "
        f"{report['start']} ({report['timezone']}), seed {report['seed']}"
    )


def _full_volume(r: dict[str, Any]) -> str:
    """`day 13 (2026-12-13)` or `not within the run`."""
    if r["full_volume_day"] is None:
        return "not within the run"
    return f"day {r['full_volume_day']} ({r['full_volume_date']})"


def render_table(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    out = [_title(report)]
    if report.get("description"):
        out.append(str(report["description"]))
    out += ["", "Ramps (batch/provider: when it reached full volume)"]
    out.append(f"  {'ramp':<36} {'steps':>5} {'final':>5}  {'full volume':<22} moves")
    for r in report["ramps"]:
        moves = ", ".join(f"{k} {v}" for k, v in r["moves"].items())
        out.append(
            f"  {r['batch'] + '/' + r['provider']:<36} {r['steps']:>5} {r['final_step']:>5}  "
            f"{_full_volume(r):<22} {moves}"
        )
    out += ["", "Days (messages; overflowed: to warm and overflow IPs; waited: denied)"]
    out.append(f"  {'day':>4} {'date':<10} " + " ".join(f"{h:>11}" for _, h in _COLUMNS))
    for d in report["daily"]:
        out.append(
            f"  {d['day']:>4} {d['date']:<10} " + " ".join(f"{d[k]:>11,}" for k, _ in _COLUMNS)
        )
    out += ["", "Automations (from the decision log)"]
    if not report["automations"]:
        out.append("  none")
    for a in report["automations"]:
        out.append(
            f"  day {a['day']:>3} {a['time']}  {a['id'] or '-':<5} {a['kind']}:{a['event']:<9} "
            f"{a['scope']}  [{a['rule']}] {a['reason']}"
        )
    notable = [m for m in report["ramp_moves"] if m["action"] in _NOTABLE]
    out += ["", "Ramp moves other than advances (by the day rolled)"]
    if not notable:
        out.append("  none")
    for m in notable:
        out.append(
            f"  day {m['day']:>3} {m['batch']}/{m['provider']}  {m['action']} "
            f"{m['from_step']}->{m['to_step']}: {m['reason']}"
        )
    return "\n".join(out) + "\n"


def _step_series(report: dict[str, Any]) -> dict[str, list[int]]:
    """Ramp -> its step at the start of each simulated day."""
    series: dict[str, list[int]] = {}
    for d in report["daily"]:
        for ramp, step in d["steps"].items():
            series.setdefault(ramp, []).append(step)
    return series


def write_png(report: dict[str, Any], path: Path) -> None:
    """Steps per ramp by day above, and the day's traffic by where it went below."""
    days = [d["day"] for d in report["daily"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), dpi=100, sharex=True)
    for ramp, steps in sorted(_step_series(report).items()):
        top.step(days, steps, where="post", label=ramp)
    top.set_title(_title(report))
    top.set_ylabel("step at the start of the day")
    top.grid(True, alpha=0.3)
    if len(report["ramps"]) <= 16:
        top.legend(fontsize="small", loc="upper left")
    base = [0] * len(days)
    for name, colour in _BAR_PARTS:
        values = [d[name] for d in report["daily"]]
        bottom.bar(days, values, bottom=base, color=colour, label=name)
        base = [b + v for b, v in zip(base, values, strict=True)]
    bottom.set_xlabel("simulated day")
    bottom.set_ylabel("messages")
    bottom.legend(fontsize="small", loc="upper left")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----- HTML -----

_W, _H, _PAD = 900, 280, 40
_PALETTE = ("#1565c0", "#2e7d32", "#c62828", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037")


def _svg_steps(report: dict[str, Any]) -> str:
    """Inline SVG: step per ramp by day."""
    series = _step_series(report)
    n = max(len(report["daily"]), 1)
    top = max((max(s) for s in series.values()), default=1)
    parts = []
    for i, (ramp, steps) in enumerate(sorted(series.items())):
        points = " ".join(
            f"{_PAD + (_W - 2 * _PAD) * j / max(n - 1, 1):.1f},"
            f"{_H - _PAD - (_H - 2 * _PAD) * s / top:.1f}"
            for j, s in enumerate(steps)
        )
        colour = _PALETTE[i % len(_PALETTE)]
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}">'
            f"<title>{html.escape(ramp)}</title></polyline>"
        )
    return _frame("step at the start of each day (hover a line for its ramp)", parts, top)


def _svg_traffic(report: dict[str, Any]) -> str:
    """Inline SVG: each day's traffic stacked by where it went."""
    daily = report["daily"]
    n = max(len(daily), 1)
    top = max((sum(d[k] for k, _ in _BAR_PARTS) for d in daily), default=1) or 1
    width = (_W - 2 * _PAD) / n
    parts = []
    for j, d in enumerate(daily):
        y = _H - _PAD
        for name, colour in _BAR_PARTS:
            h = (_H - 2 * _PAD) * d[name] / top
            y -= h
            parts.append(
                f'<rect x="{_PAD + j * width:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>day {d["day"]}: {name} '
                f"{d[name]:,}</title></rect>"
            )
    legend = " ".join(f'<tspan fill="{c}">■ {n}</tspan>' for n, c in _BAR_PARTS)
    parts.append(f'<text x="{_PAD}" y="{_H - 8}" font-size="12">{legend}</text>')
    return _frame("messages per day by where they went", parts, top)


def _frame(title: str, parts: list[str], top: float) -> str:
    """An SVG chart with axes, a title and the top value."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img"><title>{html.escape(title)}</title>'
        f'<text x="{_PAD}" y="20" font-size="14">{html.escape(title)}</text>'
        f'<text x="4" y="{_PAD + 4}" font-size="11">{top:,.0f}</text>'
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#555"/>'
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#555"/>'
        + "".join(parts)
        + "</svg>"
    )


def write_html(report: dict[str, Any], path: Path) -> None:
    """One self-contained page: the charts as inline SVG and the table."""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(_title(report))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}pre{{font-size:12px}}</style>
</head><body>
<h1>{html.escape(_title(report))}</h1>
{_svg_steps(report)}
{_svg_traffic(report)}
<pre>{html.escape(render_table(report))}</pre>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
