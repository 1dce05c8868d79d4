"""A suppression import of 10M addresses through the daemon's own steps, beside Python's csv
module reading the same file in the same run (issue 14: at most 60 s).

    python benches/suppress_import_bench.py [--json benches/results/suppress_import.json]
        [--rows 10000000] [--kind bounces|unsubscribes|csv] [--keep DIR]

Writes an export of `--rows` distinct addresses in a temporary folder (`--keep DIR` keeps it
there and reuses it on the next run): SendGrid bounces (`created,email,reason,status`, the
reasons as providers write them, half with a per-message token), SendGrid unsubscribes
(`created,email`) or kiln's CSV (`address,event,at,expires_at,scope`). Then imports it into a
fresh SQLite store as the daemon's `suppress_file` op does, each step timed: `read_file` (a
worker thread in the daemon), `hash_events` (the engine's thread), `Store.suppress_bulk` and
`suppress_last_id` (the store's thread, one transaction: the log's import batches), and the
fold into the live set, both as ops.py does it (`ImportRows.fold_columns` into
`SuppressionList.imported_columns`, no object per event). Then how long a restart without a
snapshot takes to fold the whole log back (`refold_from_log_s`). The baseline is
`csv.reader` over the same file (every row read, nothing kept). Reports rows a second, the
total against 60 s, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from benchkit import at_most, publish
from kiln import _core
from kiln.store import Store
from kiln.suppress.files import ImportRows, hash_events, read_file
from kiln.suppress.live import SuppressionList

NOW_MS = 1_800_000_000_000
TARGET_S = 60.0
_T = TypeVar("_T")

#: (reason, status) of the bounces export; `{token}` is a per-message token, `{address}`
#: the recipient, as providers write them.
REASONS = (
    (
        "550 5.1.1 The email account that you tried to reach does not exist. Please try"
        " double-checking the recipient's email address for typos or unnecessary spaces."
        " https://support.google.com/mail/?p=NoSuchUser {token} - gsmtp",
        "5.1.1",
    ),
    ("550 5.1.1 <{address}>: Recipient address rejected: User unknown", "5.1.1"),
    ("550 Requested action not taken: mailbox unavailable", "5.0.0"),
    ("552 5.2.2 The email account that you tried to reach is over quota {token} - gsmtp", "5.2.2"),
    ("421 4.7.0 Try again later, closing connection. {token} - gsmtp", "4.7.0"),
    ("550 5.7.1 Service unavailable; client host blocked using Spamhaus", "5.7.1"),
)
EVENTS = ("hard_bounce", "complaint", "unsubscribe", "manual")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def peak_rss_bytes() -> int:
    """The most resident memory this process has had (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def write_export(path: Path, kind: str, rows: int) -> None:
    """An export of `rows` distinct addresses (1,000 domains), times 3 s apart."""
    rng = random.Random(14)  # noqa: S311 (a fixed file, not a secret)
    start = 1_700_000_000
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(
            {
                "bounces": "created,email,reason,status\n",
                "unsubscribes": "created,email\n",
                "csv": "address,event,at,expires_at,scope\n",
            }[kind]
        )
        for first in range(0, rows, 100_000):
            lines = []
            for i in range(first, min(rows, first + 100_000)):
                address = f"user{i}@example{i % 1000}.com"
                if kind == "bounces":
                    reason, status = REASONS[i % len(REASONS)]
                    text = reason.format(token=f"{rng.getrandbits(40):x}", address=address)
                    lines.append(f'{start + 3 * i},{address},"{text}",{status}\n')
                elif kind == "unsubscribes":
                    lines.append(f"{start + 3 * i},{address}\n")
                else:
                    at = datetime.fromtimestamp(start + 3 * i, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    lines.append(f"{address},{EVENTS[i % len(EVENTS)]},{at},,\n")
            out.write("".join(lines))


def timed(what: Callable[[], _T]) -> tuple[_T, float]:
    """`what()` and the seconds it took."""
    start = time.perf_counter()
    result = what()
    return result, time.perf_counter() - start


def csv_baseline(path: Path) -> tuple[int, float]:
    """Rows `csv.reader` reads from the file (nothing kept), and the seconds it took."""

    def read() -> int:
        with path.open(encoding="utf-8", newline="") as f:
            return sum(1 for _ in csv.reader(f)) - 1

    return timed(read)


def refold_s(folder: Path, listed: int) -> float:
    """Seconds a restart without a snapshot takes to fold the whole log into a fresh live
    set (`SuppressionList.open`: every import batch and log row read back)."""
    store = Store.sqlite(folder / "kiln.db")
    try:
        engine = _core.Engine()
        again = SuppressionList(engine, store, folder / "no-snapshot")
        (folder / "no-snapshot").mkdir()
        found, took = timed(again.open)
        assert found == listed, (found, listed)
        return took
    finally:
        store.close()


def run_import(path: Path, source: str, folder: Path) -> dict[str, Any]:
    """Import `path` into a fresh store in `folder` through the daemon's steps, timed."""
    store = Store.sqlite(folder / "kiln.db")
    engine = _core.Engine()
    suppression = SuppressionList(engine, store, folder)
    suppression.open()
    rss: dict[str, int] = {"start": rss_bytes()}
    (read, scanned), read_s = timed(lambda: read_file(source, path))
    rss["after_read"] = rss_bytes()
    scanned, hash_s = timed(
        lambda: asyncio.run(hash_events(engine, path, read, scanned, NOW_MS, yield_to_loop=False))
    )
    rss["after_hash"] = rss_bytes()
    events = scanned.events
    assert isinstance(events, ImportRows)
    (written, last_id), store_s = timed(
        lambda: (store.suppress_bulk(events), store.suppress_last_id())
    )
    rss["after_store"] = rss_bytes()

    def fold() -> None:  # as ops.py folds an import
        for columns in events.fold_columns():
            suppression.imported_columns(columns, last_id)

    _, fold_s = timed(fold)
    listed = engine.suppress_stats()[0]
    store.close()
    refold = refold_s(folder, listed)
    return {
        "rows_read": scanned.rows,
        "imported": written,
        "listed": listed,
        "problems": scanned.problem_count,
        "duplicates_in_file": scanned.duplicates,
        "read_s": round(read_s, 2),
        "hash_s": round(hash_s, 2),
        "store_s": round(store_s, 2),
        "fold_s": round(fold_s, 2),
        "refold_from_log_s": round(refold, 2),
        "rss_bytes": rss,
        "database_bytes": (folder / "kiln.db").stat().st_size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rows", type=int, default=10_000_000, help="addresses in the export")
    parser.add_argument(
        "--kind",
        choices=("bounces", "unsubscribes", "csv"),
        default="bounces",
        help="which export (default: SendGrid bounces)",
    )
    parser.add_argument("--keep", type=Path, help="write (or reuse) the export in this folder")
    args = parser.parse_args()
    source = "csv" if args.kind == "csv" else "sendgrid"
    with tempfile.TemporaryDirectory(prefix="kiln-import-bench-") as tmp:
        folder = Path(tmp)
        where = args.keep or folder
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"{args.kind}-{args.rows}.csv"
        if not path.exists():
            write_export(path, args.kind, args.rows)
        baseline_rows, baseline_s = csv_baseline(path)
        assert baseline_rows == args.rows, baseline_rows
        state = folder / "state"
        state.mkdir()
        found = run_import(path, source, state)
        file_bytes = path.stat().st_size
    assert found["imported"] == found["listed"] == args.rows, found
    total_s = found["read_s"] + found["hash_s"] + found["store_s"] + found["fold_s"]
    peak = peak_rss_bytes()
    result: dict[str, Any] = {
        "rows": args.rows,
        "kind": args.kind,
        "file_bytes": file_bytes,
        **found,
        "total_s": round(total_s, 2),
        "rows_per_s": round(args.rows / total_s),
        "csv_reader_s": round(baseline_s, 2),
        "csv_reader_rows_per_s": round(args.rows / baseline_s),
        "total_over_csv_reader": round(total_s / baseline_s, 2),
        "peak_rss_bytes": peak,
        "peak_rss_bytes_per_row": round(peak / args.rows, 1),
    }
    scale = 10_000_000 / args.rows
    result["targets"] = [
        at_most(
            f"suppression: import of 10M addresses ({args.kind})",
            round(total_s * scale, 1),
            TARGET_S,
            "s",
        )
    ]
    publish(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
