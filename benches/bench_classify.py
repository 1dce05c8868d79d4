"""SMTP reply classification: replies per second with the shipped rules, kiln next to a naive
Python `re` loop over the same rules.

The mix is responses.csv's 24 replies (each with its provider) plus 24 replies no rule knows,
so both the "matched" and the "scan everything, match nothing" paths are timed. Groups:

- `classify-call`: one Python call per reply. `kiln` is `Engine.classify`; `python-re` loops
  over the rules in Python, checks each rule's provider, code and enhanced filters and runs
  `re.search` (compiled, IGNORECASE) on the line from `kiln._core.normalise_reply` (the Rust
  normaliser, so the baseline does not pay for a Python one: the ratio is conservative).
- `classify-serve`: the native protocol's `classify` op, the whole mix as one buffer of JSON
  lines through `Engine.serve` (what the daemon pays per read).

Each benchmark first checks that its answers agree with the expected classes. Run alone for a
report with ratios (`--json PATH` writes it):

    python benches/bench_classify.py [--json benches/results/classify.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest

from benchkit import NOW_MS, Benchmark
from benchkit import frozen_gc as frozen_gc
from kiln import _core
from kiln.policyspec import PushbackClass
from kiln.rules import PROVIDER_GROUPS, Rule, RuleSet, load_rules

ROOT = Path(__file__).resolve().parent.parent
RESPONSES = ROOT / "tests" / "fixtures" / "warmup" / "responses.csv"
#: Target from the brief: replies classified per second, through either path.
TARGET_PER_S = 200_000

Reply = tuple[str | None, int, str | None, str]
"""(provider, code, enhanced, text) of one reply."""


def _mix() -> tuple[list[Reply], list[str | None]]:
    """The replies and, for each, the expected class (None: unclassified)."""
    replies: list[Reply] = []
    want: list[str | None] = []
    if RESPONSES.exists():
        with RESPONSES.open(newline="") as f:
            for row in csv.DictReader(f):
                p = row["provider"]
                provider = None if p == "any" else PROVIDER_GROUPS.get(p, (p,))[0]
                replies.append((provider, int(row["code"]), row["enhanced"] or None, row["text"]))
                want.append(row["expected_class"])
    n = max(len(replies), 24)
    for i in range(n):
        replies.append(
            (
                "google" if i % 2 else "yahoo",
                451 if i % 3 else 550,
                "4.3.0" if i % 3 else "5.4.1",
                f"Temporary local problem number {i} while handling your message - please "
                f"contact postmaster@example.net quoting reference Q{i:06d}",
            )
        )
        want.append(None)
    return replies, want


REPLIES, WANT = _mix()


@dataclass
class NaiveRule:
    """One rule as a plain Python loop would hold it."""

    rule: Rule
    pattern: re.Pattern[str]
    providers: frozenset[str] | None


_SEVERITY: list[str] = list(get_args(PushbackClass))


class NaiveClassifier:
    """Every rule's `re` pattern in turn: what a Python-only daemon would do."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = [
            NaiveRule(
                r,
                re.compile(r.text, re.IGNORECASE),
                None if r.provider_keys is None else frozenset(r.provider_keys),
            )
            for r in rules.rules
        ]

    def classify(
        self, provider: str | None, code: int, enhanced: str | None, text: str
    ) -> str | None:
        """The winning class, or None (internal replies are not modelled: the mix has none)."""
        line = _core.normalise_reply(code, enhanced, text)
        if enhanced is None:
            m = re.match(r"[0-9]{3} ([245]\.[0-9]{1,3}\.[0-9]{1,3})\b", line)
            enhanced = m.group(1) if m else None
        best: tuple[bool, int, int] | None = None
        for i, nr in enumerate(self.rules):
            r = nr.rule
            if provider is not None and nr.providers is not None and provider not in nr.providers:
                continue
            codes = r.codes
            if codes is not None and not any(
                c == code or (isinstance(c, str) and str(code)[0] == c[0]) for c in codes
            ):
                continue
            enh = r.enhanced_codes
            if enh is not None and enhanced not in enh:
                continue
            if nr.pattern.search(line) is None:
                continue
            key = (r.fallback, _SEVERITY.index(r.class_), i)
            if best is None or key < best:
                best = key
        return None if best is None else self.rules[best[2]].rule.class_


def _requests(replies: list[Reply]) -> bytes:
    """The mix as `classify` request lines."""
    lines = []
    for provider, code, enhanced, text in replies:
        req: dict[str, object] = {"op": "classify", "text": text, "code": code}
        if enhanced is not None:
            req["enhanced"] = enhanced
        if provider is not None:
            req["provider"] = provider
        lines.append(json.dumps(req, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Impl:
    """One way to classify the whole mix; `run()` returns the classes in order."""

    name: str
    group: str
    run: Callable[[], object]


def make_impls() -> list[Impl]:
    """kiln per call, kiln through serve, and the naive Python loop."""
    rules = load_rules()
    engine = rules.engine()
    naive = NaiveClassifier(rules)
    classify = engine.classify

    def kiln_call() -> list[str | None]:
        """One `Engine.classify` per reply."""
        out: list[str | None] = []
        for p, c, e, t in REPLIES:
            got = classify(p, c, e, t)
            out.append(None if got is None else got[0])
        return out

    def naive_call() -> list[str | None]:
        """One naive Python classification per reply."""
        return [naive.classify(p, c, e, t) for p, c, e, t in REPLIES]

    wire = rules.engine()
    wire.set_default_provider("default")
    data = _requests(REPLIES)

    def kiln_serve() -> list[str | None]:
        """The whole mix as one `serve` buffer."""
        served = wire.serve(data, NOW_MS)
        out: list[str | None] = []
        for line in served.reply.splitlines():
            cls = json.loads(line)["class"]
            out.append(None if cls == "unclassified" else cls)
        return out

    def kiln_serve_raw() -> bytes:
        """The serve call alone (what the daemon pays; replies go back as bytes)."""
        return wire.serve(data, NOW_MS).reply

    impls = [
        Impl("kiln", "classify-call", kiln_call),
        Impl("python-re", "classify-call", naive_call),
        Impl("kiln-serve", "classify-serve", kiln_serve),
    ]
    impls.append(Impl("kiln-serve-raw", "classify-serve", kiln_serve_raw))
    return impls


IMPLS = {i.name: i for i in make_impls()}


@pytest.mark.parametrize("name", ["kiln", "python-re"])
def test_classify_call(benchmark: Benchmark, name: str) -> None:
    """One Python call per reply over the mix: kiln and the naive loop agree, then are timed."""
    impl = IMPLS[name]
    assert impl.run() == WANT
    benchmark.group = impl.group
    benchmark.extra_info.update(impl=name, ops_per_call=len(REPLIES))
    benchmark(impl.run)


def test_classify_serve(benchmark: Benchmark) -> None:
    """The mix through the protocol op, one buffer per call."""
    assert IMPLS["kiln-serve"].run() == WANT
    benchmark.group = "classify-serve"
    benchmark.extra_info.update(impl="kiln-serve", ops_per_call=len(REPLIES))
    benchmark(IMPLS["kiln-serve-raw"].run)


def _rate(fn: Callable[[], object], per_call: int, seconds: float = 1.0) -> float:
    """Replies per second: the best of 5 timed rounds of about `seconds`/5 each."""
    fn()
    rounds = []
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > seconds / 5:
            break
        n *= 2
    rounds.append(n * per_call / dt)
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append(n * per_call / (time.perf_counter() - t0))
    return max(rounds)


def main(argv: list[str] | None = None) -> int:
    """Print replies/s per implementation, the ratio to the naive loop, and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    for name in ("kiln", "python-re", "kiln-serve"):
        assert IMPLS[name].run() == WANT, name
    n = len(REPLIES)
    rates = {
        "kiln": _rate(IMPLS["kiln"].run, n),
        "python-re": _rate(IMPLS["python-re"].run, n),
        "kiln-serve": _rate(IMPLS["kiln-serve-raw"].run, n),
    }
    report = {
        "replies": n,
        "rules": len(load_rules().rules),
        "replies_per_s": {k: round(v) for k, v in rates.items()},
        "ratio_vs_python_re": {
            k: round(v / rates["python-re"], 1) for k, v in rates.items() if k != "python-re"
        },
        "target_per_s": TARGET_PER_S,
        "targets": {
            k: "PASS" if rates[k] >= TARGET_PER_S else "MISS" for k in ("kiln", "kiln-serve")
        },
    }
    for k, v in rates.items():
        ratio = "" if k == "python-re" else f"  {v / rates['python-re']:.1f}x python-re"
        print(f"{k:<12} {v:>12,.0f} replies/s{ratio}")
    for k, status in report["targets"].items():  # type: ignore[attr-defined]
        print(f"target {k} >= {TARGET_PER_S:,}/s: {status}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
