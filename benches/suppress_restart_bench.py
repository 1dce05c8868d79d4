"""A daemon's restart with 10M addresses on the suppression list (issue 14: ready in at most
10 s), from a real SQLite store, measured as the daemon does it (`SuppressionList.open`).

    python benches/suppress_restart_bench.py [--json benches/results/suppress_restart.json]
                                             [--rows N]

The store's log is filled with N `unsubscribe` events (raw inserts of rows as kiln writes
them, hashed with the store's key by the core; writing them is the import bench's business).
Then, each on a fresh engine:

- `after_sigkill_with_periodic_snapshot`: the daemon's snapshot of the first N - 10,000 events
  (what the 10-minute snapshot leaves) plus folding the 10,000 after it from the log;
- `after_clean_stop`: the snapshot of all N, nothing to fold;
- `without_snapshot`: the whole log folded (a lost or foreign snapshot: the slow case, the
  baseline the others are compared with).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import at_most, publish
from kiln import _core
from kiln.store import Store
from kiln.suppress.live import SNAPSHOT_FILE, SuppressionList

TAIL = 10_000
CHUNK = 200_000


def fill(db: Path, engine: _core.Engine, first: int, last: int, event: str) -> None:
    """Events `first` to `last` - 1 in the log, as kiln's writers leave them (one address
    each, hashed with the store's key, which `engine` holds)."""
    con = sqlite3.connect(db)
    try:
        for start in range(first, last, CHUNK):
            addresses = [
                f"user{i}@example{i % 1000}.com" for i in range(start, min(start + CHUNK, last))
            ]
            hashed = engine.suppress_fingerprints([(a, "") for a in addresses])
            con.executemany(
                "INSERT INTO kiln_suppression (at_ms, fingerprint, address, scope, event,"
                " expires_ms, source, evidence) VALUES (?, ?, ?, '', ?, NULL, 'bench', '{}')",
                [(1_800_000_000_000, fp, a, event) for a, fp, _ in hashed],
            )
            con.commit()
    finally:
        con.close()


def restart(state: Path, url: str) -> tuple[float, SuppressionList]:
    """Seconds until a fresh engine holds the list, as `Daemon` opens it; the list (its
    store still open)."""
    engine = _core.Engine()
    t = time.perf_counter()
    listed = SuppressionList(engine, Store(url), state)
    listed.open()
    return time.perf_counter() - t, listed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rows", type=int, default=10_000_000, help="events in the log")
    args = parser.parse_args()
    n = args.rows
    with tempfile.TemporaryDirectory(prefix="kiln-restart-bench-") as tmp:
        state = Path(tmp)
        db = state / "kiln.db"
        url = f"sqlite:///{db}"
        t = time.perf_counter()
        _, keyed = restart(state, url)  # the first start makes the key
        keyed.store.close()  # the store holds its database while open
        fill(db, keyed.engine, 0, n - TAIL, "unsubscribe")
        _, before = restart(state, url)
        before.save_snapshot()  # the periodic snapshot, before the last TAIL events came
        before.store.close()
        fill(db, keyed.engine, n - TAIL, n, "manual")
        fill_s = time.perf_counter() - t

        sigkill_s, after_kill = restart(state, url)
        assert after_kill.engine.suppress_stats()[0] == n
        assert after_kill.unsnapshotted == TAIL  # only the tail was folded
        after_kill.save_snapshot()  # as the clean stop does
        after_kill.store.close()
        clean_s, after_stop = restart(state, url)
        assert after_stop.unsnapshotted == 0 and after_stop.engine.suppress_stats()[0] == n
        after_stop.store.close()
        (state / SNAPSHOT_FILE).unlink()
        unsnapped_s, folded = restart(state, url)
        assert folded.unsnapshotted == n and folded.engine.suppress_stats()[0] == n
        folded.store.close()
    result: dict[str, Any] = {
        "rows": n,
        "tail_rows_after_snapshot": TAIL,
        "fill_s": round(fill_s, 1),
        "after_sigkill_with_periodic_snapshot_s": round(sigkill_s, 2),
        "after_clean_stop_s": round(clean_s, 2),
        "without_snapshot_s": round(unsnapped_s, 2),
        "snapshot_speedup_vs_full_fold": round(unsnapped_s / max(sigkill_s, 1e-9), 1),
    }
    result["targets"] = [
        at_most(
            f"suppression: restart with {n:,} addresses ready, after a SIGKILL",
            result["after_sigkill_with_periodic_snapshot_s"],
            10,
            "s",
        ),
        at_most(
            f"suppression: restart with {n:,} addresses ready, no snapshot at all",
            result["without_snapshot_s"],
            10,
            "s",
        ),
    ]
    publish(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
