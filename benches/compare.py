"""Ratios and targets from one `make bench` run.

    python benches/compare.py benches/results [--strict]

Reads `rust.json` (rust/benches/core.rs), `python.json` (pytest-benchmark) and `memory.json`
(benches/memory.py) from the directory, and `daemon.json` (benches/daemon_bench.py),
`postfix.json` (benches/postfix_bench.py) and `resp.json` (benches/resp_bench.py) if they
are there; prints the ratios per group (each implementation against kiln in the same run),
the daemon's modes, and every target with its measured figure, PASS or MISS, and writes
`report.json` next to them. With `--strict` the exit status is 1 if a target is missed.
Missing inputs show as n/a, never as a pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Which implementation each Python group's ratios are taken against.
REFERENCE = {
    "decide-granted": "kiln",
    "decide-denied": "kiln",
    "batch-64": "kiln-batch",
    "batch-1024": "kiln-batch",
    "scheduler-100k": "kiln",
}


@dataclass(frozen=True)
class Target:
    """One goal: a measured figure against a bound (`at_most` or at least)."""

    name: str
    measured: float | None
    bound: float
    unit: str
    at_most: bool = True
    note: str = ""

    @property
    def status(self) -> str:
        """PASS, MISS, or n/a when nothing was measured."""
        if self.measured is None or math.isnan(self.measured):
            return "n/a"
        ok = self.measured <= self.bound if self.at_most else self.measured >= self.bound
        return "PASS" if ok else "MISS"

    @property
    def off_by(self) -> str:
        """How far a miss is from its bound, as a factor."""
        if self.status != "MISS" or self.measured is None:
            return ""
        if self.at_most:
            return f"{self.measured / self.bound:.2f}x over" if self.bound else "over"
        return f"{self.bound / self.measured:.2f}x short" if self.measured else "short"


def _load(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing."""
    if not path.exists():
        print(f"compare: {path} is missing; its figures show as n/a", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def _num(data: Any, *keys: str) -> float | None:
    """`data[k1][k2]...` as a float, or None if absent."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) else None


def python_per_op(data: Any) -> dict[str, dict[str, float]]:
    """{group: {impl: median ns per operation}} from pytest-benchmark JSON."""
    out: dict[str, dict[str, float]] = {}
    if not isinstance(data, dict):
        return out
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = _num(bench, "stats", "median")
        if median is None:
            continue
        ops = float(info.get("ops_per_call", 1))
        group = str(bench.get("group"))
        out.setdefault(group, {})[str(info.get("impl", bench["name"]))] = median * 1e9 / ops
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def _worst_ratio(py: dict[str, dict[str, float]], prefix: str) -> float | None:
    """The smallest (competitor / kiln) ratio over the decide groups for impls named `prefix*`."""
    ratios = [
        t / py[g]["kiln"]
        for g in ("decide-granted", "decide-denied")
        if "kiln" in py.get(g, {})
        for impl, t in py[g].items()
        if impl.startswith(prefix)
    ]
    return min(ratios) if ratios else None


def targets(rust: Any, py: dict[str, dict[str, float]], mem: Any) -> list[Target]:
    """Every target of the engine, with the figure measured in this run."""

    def r(name: str, key: str = "ns_per_op") -> float | None:
        """A figure from rust.json."""
        return _num(rust, name, key)

    call = py.get("decide-granted", {}).get("kiln")
    return [
        Target("Rust hot key, ns/decision", r("hot_key_acquire"), 10, "ns"),
        Target(
            "Rust hot key, allocations in timed loop",
            r("hot_key_acquire", "allocations"),
            0,
            "allocs",
        ),
        Target("Rust 1M keys uniform random, ns/decision", r("uniform_1m_keys"), 40, "ns"),
        Target("Python one acquire call, ns", call, 150, "ns"),
        Target(
            "Python call vs limits (worst of granted/denied, fixed/moving)",
            _worst_ratio(py, "limits-"),
            10,
            "x",
            at_most=False,
        ),
        Target(
            "Python call vs pyrate-limiter (worst of granted/denied, buckets)",
            _worst_ratio(py, "pyrate-"),
            10,
            "x",
            at_most=False,
        ),
        *(
            Target(
                f"Python batch of {n}, per decision / Rust in-process batch of {n}",
                _ratio(py.get(f"batch-{n}", {}).get("kiln-batch"), r(f"batch_{n}")),
                1.3,
                "x",
                note=f"{py.get(f'batch-{n}', {}).get('kiln-batch', math.nan):.2f} ns vs "
                f"{r(f'batch_{n}') or math.nan:.2f} ns",
            )
            for n in (64, 1024)
        ),
        Target(
            "Memory, Rust allocator, bytes/key all-in",
            r("memory_1m_keys", "bytes_per_key"),
            48,
            "B",
        ),
        Target("Memory, Python RSS growth, bytes/key all-in", _num(mem, "bytes_per_key"), 48, "B"),
        Target(
            "Memory, per-key state only, bytes", r("memory_1m_keys", "key_state_bytes"), 32, "B"
        ),
        Target("Scheduler 1M queued, enqueue+release ns/msg", r("scheduler_1m"), 100, "ns"),
    ]


def info(rust: Any, py: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """Figures without a target that explain the ones with."""

    def r(name: str, key: str = "ns_per_op") -> float | None:
        """A figure from rust.json."""
        return _num(rust, name, key)

    call = py.get("decide-granted", {}).get("kiln")
    return {
        "rust hot key, rate+caps (ns)": r("hot_key_acquire_capped"),
        "rust hot key, denied (ns)": r("hot_key_denied"),
        "rust 1M keys, acquire_batch of 1024 (ns/decision)": r("batch_1024_random_1m"),
        "rust scheduler 1M, rate-limited keys (ns/msg)": r("scheduler_1m_rate_limited"),
        "python scheduler 100k, kiln (ns/msg)": py.get("scheduler-100k", {}).get("kiln"),
        "python call / rust hot key": _ratio(call, r("hot_key_acquire")),
        "python batch-64 / rust hot key": _ratio(
            py.get("batch-64", {}).get("kiln-batch"), r("hot_key_acquire")
        ),
        "naive HashMap / kiln, hot key (rust)": r("ratios", "baseline_over_kiln_hot_key"),
        "naive HashMap / kiln, 1M keys (rust)": r("ratios", "baseline_over_kiln_1m_keys"),
        "naive HashMap / kiln, bytes per key": r("ratios", "baseline_over_kiln_memory"),
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    """A number for the table, or n/a."""
    return "n/a" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def file_targets(data: Any) -> list[Target]:
    """The `targets` a bench script wrote into its JSON file."""
    return [
        Target(t["name"], t["measured"], t["bound"], t["unit"], bool(t["at_most"]))
        for t in data.get("targets", [])
    ]


def daemon_section(data: Any) -> list[Target]:
    """Print the daemon's modes from daemon.json, kiln beside the echo server; its targets."""
    print("\nDaemon on its socket (medians over rounds; k/e = kiln / echo server, same run)")
    print(
        f"  {'mode':<12} {'kiln/s':>11} {'k/e':>5} {'p50 us':>8} {'k/e':>5} {'p99 us':>8} "
        f"{'cpu us/decision':>15} {'errors':>6}"
    )
    for mode, k in data.get("kiln", {}).items():
        r = data.get("ratios", {}).get(mode, {})
        bad = sum(int(k.get(f, 0)) for f in ("errors", "out_of_order", "lost"))
        print(
            f"  {mode:<12} {_fmt(k.get('decisions_per_s'), 0):>11} "
            f"{_fmt(r.get('decisions_per_s_kiln_over_echo')):>5} {_fmt(k.get('p50_us'), 1):>8} "
            f"{_fmt(r.get('p50_kiln_over_echo')):>5} {_fmt(k.get('p99_us'), 1):>8} "
            f"{_fmt(k.get('daemon_cpu_us_per_decision')):>15} {bad:>6}"
        )
    return file_targets(data)


def postfix_section(data: Any) -> list[Target]:
    """Print postfix.json (benches/postfix_bench.py): the transport table beside its echo
    server, the release queue, Postfix with and without kiln; its targets."""
    look, rel, tp = data.get("lookup", {}), data.get("release", {}), data.get("throughput", {})
    print("\nPostfix (benches/postfix_bench.py, same run)")
    for name in ("echo", "kiln"):
        f = look.get(name, {})
        print(
            f"  lookup {name:<5} {_fmt(f.get('requests_per_s'), 0):>9}/s  "
            f"p50 {_fmt(f.get('p50_us'), 0)} us  p99 {_fmt(f.get('p99_us'), 0)} us"
        )
    print(f"  release at {_fmt(rel.get('held'), 0)} held: {_fmt(rel.get('releases_per_s'), 0)}/s")
    print(
        f"  messages/s without kiln {_fmt(tp.get('without_kiln_per_s'), 0)}, "
        f"with {_fmt(tp.get('with_kiln_per_s'), 0)} (ratio {_fmt(tp.get('ratio'))})"
    )
    return file_targets(data)


def resp_section(data: Any) -> list[Target]:
    """Print resp.json (benches/resp_bench.py): kiln's Redis-protocol socket beside Redis,
    both driven by redis-benchmark in one run; its targets."""
    print("\nRedis protocol (benches/resp_bench.py; redis-benchmark, 50 clients, same run)")
    for mode in ("P1", "P16"):
        for name, f in data.get(mode, {}).items():
            print(
                f"  {mode:<4} {name:<18} {_fmt(f.get('requests_per_s'), 0):>10}/s  "
                f"p50 {_fmt(f.get('p50_ms'), 3)} ms  p99 {_fmt(f.get('p99_ms'), 3)} ms"
            )
    return file_targets(data)


def report(results: Path) -> tuple[list[Target], dict[str, Any]]:
    """Read the three inputs, print the tables, and return the targets and the report."""
    rust = _load(results / "rust.json")
    py = python_per_op(_load(results / "python.json"))
    mem = _load(results / "memory.json")

    ratios: dict[str, dict[str, float]] = {}
    print("Python groups (median ns per operation; ratio = impl / kiln, same run)")
    for group, impls in sorted(py.items()):
        ref = impls.get(REFERENCE.get(group, "kiln"))
        print(f"  {group}")
        for impl, ns in sorted(impls.items(), key=lambda kv: kv[1]):
            ratio = ns / ref if ref else math.nan
            ratios.setdefault(group, {})[impl] = ratio
            print(f"    {impl:<24} {_fmt(ns):>12} ns   {_fmt(ratio):>8}x")

    found = targets(rust, py, mem)
    daemon = None
    if (results / "daemon.json").exists():
        daemon = _load(results / "daemon.json")
        found += daemon_section(daemon)
    if (results / "postfix.json").exists():
        found += postfix_section(_load(results / "postfix.json"))
    if (results / "resp.json").exists():
        found += resp_section(_load(results / "resp.json"))
    for name in (
        "simulate.json",
        "suppress-core.json",
        "suppress.json",
        "suppress_import.json",
        "suppress_restart.json",
    ):
        if (results / name).exists():
            found += file_targets(_load(results / name))
    print(f"\n{'target':<68} {'measured':>14} {'bound':>14}  result")
    for t in found:
        measured = f"{_fmt(t.measured)} {t.unit}".rstrip()
        bound = f"{'<=' if t.at_most else '>='} {t.bound:g} {t.unit}".rstrip()
        note = ", ".join(x for x in (t.off_by, t.note) if x)
        print(f"{t.name:<68} {measured:>14} {bound:>14}  {t.status}{f' ({note})' if note else ''}")

    extra = info(rust, py)
    print("\nfor context")
    for name, value in extra.items():
        print(f"  {name:<56} {_fmt(value):>10}")
    passed = sum(t.status == "PASS" for t in found)
    print(f"\n{passed}/{len(found)} targets met")
    doc = {
        "targets": [{**asdict(t), "status": t.status} for t in found],
        "ratios": ratios,
        "info": extra,
        "daemon": daemon.get("ratios") if isinstance(daemon, dict) else None,
    }
    return found, doc


def main(argv: list[str] | None = None) -> int:
    """Print the comparison and write report.json."""
    parser = argparse.ArgumentParser(description="kiln benchmark ratios and targets")
    parser.add_argument("results", type=Path, help="directory with rust/python/memory.json")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    found, doc = report(args.results)
    (args.results / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.results / 'report.json'}")
    return 1 if args.strict and any(t.status != "PASS" for t in found) else 0


if __name__ == "__main__":
    sys.exit(main())
