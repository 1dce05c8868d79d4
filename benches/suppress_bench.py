"""The suppression list at 10M addresses from Python, beside a Python `set` of the same
addresses in the same run (issue 14).

    python benches/suppress_bench.py [--json benches/results/suppress.json] [--quick]

Measures: building the core's live set (hash and fold, as a restart from the log does), its
memory per address against the set's (RSS growth), a check from Python one address per call
and in batches of 1,000, `address in set` for comparison, and a restart from the snapshot
bytes. The core's in-process figures come from `cargo bench --bench suppress`.
Targets: at most 32 bytes an address; a check from Python at most 200 ns an address; a
restart with 10M addresses ready in at most 10 s.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path
from typing import Any

from benchkit import at_most, publish
from kiln import _core

NOW_MS = 1_800_000_000_000


def rss_bytes() -> int:
    """Resident memory of this process now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="1M addresses (a smoke run)")
    args = parser.parse_args()
    n = 1_000_000 if args.quick else 10_000_000
    addresses = [f"user{i}@example{i % 1000}.com" for i in range(n)]
    gc.collect()

    engine = _core.Engine()
    engine.suppress_set_key(0x1234, 0x5678)
    before = rss_bytes()
    t = time.perf_counter()
    for start in range(0, n, 100_000):
        chunk = addresses[start : start + 100_000]
        hashed = engine.suppress_fingerprints([(a, "") for a in chunk])
        engine.suppress_apply([(fp, "unsubscribe", None) for _, fp, _ in hashed])
    build_s = time.perf_counter() - t
    core_rss = rss_bytes() - before
    listed, core_bytes = engine.suppress_stats()
    assert listed == n

    before = rss_bytes()
    as_set = set(addresses)
    set_rss = rss_bytes() - before  # the set's table; the strings exist already

    rng = random.Random(7)  # noqa: S311 (a fixed sample, not a secret)
    picked = [addresses[rng.randrange(n)] for _ in range(200_000)]
    # An MTA's recipient reaches the check as a string just made from the request line, so
    # it is in the CPU's cache: the sample is new strings, made one after another. Checking
    # the 10M list's own strings in random order would add a cache miss per string before
    # the call (`check_single_picked_from_python_ns` shows it).
    sample = [(a + "\n")[:-1] for a in picked]
    suppressed = engine.suppressed
    t = time.perf_counter()
    for a in sample:
        suppressed(a, NOW_MS)
    single_ns = (time.perf_counter() - t) / len(sample) * 1e9
    t = time.perf_counter()
    for a in picked:
        suppressed(a, NOW_MS)
    single_picked_ns = (time.perf_counter() - t) / len(picked) * 1e9
    t = time.perf_counter()
    for a in sample:
        engine.suppress_check([a], NOW_MS)
    single_list_ns = (time.perf_counter() - t) / len(sample) * 1e9
    t = time.perf_counter()
    for start in range(0, len(sample), 1000):
        engine.suppress_check(sample[start : start + 1000], NOW_MS)
    batch_ns = (time.perf_counter() - t) / len(sample) * 1e9
    t = time.perf_counter()
    hits = sum(1 for a in sample if a in as_set)
    set_ns = (time.perf_counter() - t) / len(sample) * 1e9
    assert hits == len(sample)

    snapshot = engine.suppress_snapshot()
    fresh = _core.Engine()
    fresh.suppress_set_key(0x1234, 0x5678)
    t = time.perf_counter()
    fresh.suppress_restore(snapshot)
    restore_s = time.perf_counter() - t

    result: dict[str, Any] = {
        "addresses": n,
        "build_s": round(build_s, 2),
        "core_bytes_per_address": round(core_bytes / n, 2),
        "core_rss_bytes_per_address": round(core_rss / n, 2),
        "python_set_rss_bytes_per_address": round(set_rss / n, 2),
        "python_set_with_strings_bytes_per_address": round(
            (set_rss + sum(map(len, addresses[:1000])) / 1000 * n + 49 * n) / n, 2
        ),
        "check_single_from_python_ns": round(single_ns, 1),
        "check_single_picked_from_python_ns": round(single_picked_ns, 1),
        "check_single_as_a_list_from_python_ns": round(single_list_ns, 1),
        "check_batch_1000_from_python_ns": round(batch_ns, 1),
        "python_set_in_ns": round(set_ns, 1),
        "restore_from_snapshot_s": round(restore_s, 2),
        "snapshot_bytes": len(snapshot),
    }
    # The same run's Python set as the baseline (the machine's speed cancels out).
    set_bytes = result["python_set_with_strings_bytes_per_address"]
    result["core_bytes_over_python_set_with_strings"] = round(core_bytes / n / set_bytes, 3)
    result["check_single_over_python_set_in"] = round(single_ns / set_ns, 3)
    result["check_batch_1000_over_python_set_in"] = round(batch_ns / set_ns, 3)
    result["targets"] = [
        at_most(
            "suppression: core bytes per address (10M)", result["core_bytes_per_address"], 32, "B"
        ),
        at_most(
            "suppression: check from Python, batches of 1000, per address",
            result["check_batch_1000_from_python_ns"],
            200,
            "ns",
        ),
        at_most(
            "suppression: check from Python, one address a call (Engine.suppressed)",
            result["check_single_from_python_ns"],
            200,
            "ns",
        ),
        at_most(
            "suppression: restart from the snapshot (10M)",
            result["restore_from_snapshot_s"],
            10,
            "s",
        ),
    ]
    publish(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
