"""Suppression files in the daemon: import an export, verify an export is covered, export the
list (docs/suppression.md). The slow parts (reading, hashing, writing) run off the event loop;
an import writes all its events in one store transaction, or none."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kiln import _core
from kiln.records import SuppressionEvent
from kiln.store import Store
from kiln.suppress.formats import (
    EventType,
    ImportedEvent,
    ImportProblem,
    ListedAddress,
    scan,
    write,
)

__all__ = ["Scanned", "export_list", "hash_events", "read_file"]

#: Problems named in a reply (the count says how many there were).
SHOWN_PROBLEMS = 50
#: How long an imported soft bounce (a provider's block or 4xx) holds from its time.
IMPORTED_SOFT_BOUNCE_MS = 3 * 86_400_000


@dataclass
class Scanned:
    """What one export file held, hashed and deduplicated (any thread)."""

    events: list[SuppressionEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    rows: int = 0
    per_type: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    already: int = 0

    def summary(self) -> dict[str, Any]:
        """The counts a reply carries."""
        return {
            "rows": self.rows,
            "per_type": dict(sorted(self.per_type.items())),
            "duplicates_in_file": self.duplicates,
            "already_listed": self.already,
            "problem_count": self.problem_count,
            "problems": self.problems,
        }


def read_file(
    source: str, path: Path, *, scope: str | None = None, fold_case: bool = False
) -> tuple[list[ImportedEvent], Scanned]:
    """Read `path` as `source`'s export (a worker thread: the engine is not touched): its
    events, and the counts and problems so far."""
    out = Scanned()
    events: list[ImportedEvent] = []
    for item in scan(source, path, scope=scope, fold_case=fold_case):
        if isinstance(item, ImportProblem):
            out.problem_count += 1
            if len(out.problems) < SHOWN_PROBLEMS:
                out.problems.append(str(item))
            continue
        out.rows += 1
        events.append(item)
    return events, out


async def hash_events(
    engine: _core.Engine,
    path: Path,
    events: list[ImportedEvent],
    out: Scanned,
    now_ms: int,
    *,
    yield_to_loop: bool = True,
) -> Scanned:
    """Hash `events` with the core (on its thread, a chunk at a time; with `yield_to_loop`
    the loop serves others between chunks) and keep those not repeated in the file nor
    listed already for that reason."""
    seen: set[tuple[int, str]] = set()
    for start in range(0, len(events), 10_000):
        chunk = events[start : start + 10_000]
        hashed = engine.suppress_fingerprints([(e.address, e.scope or "") for e in chunk])
        fresh: list[tuple[ImportedEvent, str, int]] = []
        for e, (address, fp, problem) in zip(chunk, hashed, strict=True):
            if address is None:
                out.problem_count += 1
                if len(out.problems) < SHOWN_PROBLEMS:
                    out.problems.append(f"{path}: {problem}")
                continue
            if (fp, e.event) in seen:
                out.duplicates += 1
                continue
            seen.add((fp, e.event))
            out.per_type[e.event] += 1
            fresh.append((e, address, fp))
        listed = engine.suppress_check([a for _, a, _ in fresh], now_ms) if fresh else []
        for (e, address, fp), current in zip(fresh, listed, strict=True):
            if current == e.event:
                out.already += 1
                continue
            at_ms = e.at_ms if e.at_ms is not None else now_ms
            soft = e.event == "soft_bounce"
            out.events.append(
                SuppressionEvent(
                    at_ms=at_ms,
                    fingerprint=fp,
                    address=address,
                    event=e.event,
                    source=e.source,
                    scope=e.scope or "",
                    expires_ms=at_ms + IMPORTED_SOFT_BOUNCE_MS if soft else None,
                    evidence=dict(e.evidence),
                )
            )
        if yield_to_loop:
            await asyncio.sleep(0)
    return out


def _listed(store: Store) -> Iterator[ListedAddress]:
    """The list as the log folds it: each (scope, address) with its latest event, in the
    order it was first listed; removed ones left out (one pass over the log)."""
    latest: dict[int, SuppressionEvent] = {}
    after = 0
    while True:
        page = store.suppress_events(after_id=after, limit=50_000)
        if not page:
            break
        for e in page:
            if e.event == "remove":
                latest.pop(e.fingerprint, None)
            else:
                latest[e.fingerprint] = e
        after = page[-1].id or after
    for e in latest.values():
        event = cast(EventType, e.event)  # the log holds only listed events besides remove
        yield ListedAddress(e.address, event, e.at_ms, e.expires_ms, e.scope or None)


def export_list(store: Store, fmt: str, path: Path, now_ms: int) -> int:
    """Write the list to `path` in `fmt` (written beside it, then renamed); how many."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        n = write(fmt, (e for e in _listed(store) if e.address), f, now_ms=now_ms)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n
