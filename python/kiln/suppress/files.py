"""Suppression files in the daemon: import an export, verify an export is covered, export the
list (docs/suppression.md). The slow parts (reading, hashing, writing) run off the event loop;
an import writes all its events in one store transaction, or none.

A large import holds its events as columns, a batch of rows at a time (`ImportRead`, then
`ImportRows`): text joined into one string per batch, times and fingerprints in arrays, no
object per event. `ImportRows` is still a sequence of `SuppressionEvent` (made one by one
when asked), and gives the store its batches (`log_batches`) and the live set its fold
(`fold_columns`) without them.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, cast, overload

from kiln import _core
from kiln.records import SuppressionEvent
from kiln.store import Store
from kiln.storebatch import NONE_INT64, LogBatch
from kiln.suppress.formats import (
    EVENT_TYPES,
    EventBatch,
    EventType,
    ListedAddress,
    scan_batches,
    write,
)

__all__ = [
    "ExportIncomplete",
    "FoldColumns",
    "ImportRead",
    "ImportRows",
    "Scanned",
    "export_list",
    "hash_events",
    "read_file",
]

#: Problems named in a reply (the count says how many there were).
SHOWN_PROBLEMS = 50
#: How long an imported soft bounce (a provider's block or 4xx) holds from its time.
IMPORTED_SOFT_BOUNCE_MS = 3 * 86_400_000

#: Each event type's code in a batch's `events` bytes (its place in `EVENT_TYPES`).
_CODES: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}
_SOFT_CODE = _CODES["soft_bounce"]
#: `at_ms` of an event read without a time.
_NO_TIME = -(2**63)


@dataclass(slots=True)
class _Part:
    """Events of consecutive rows, compact: addresses joined by line breaks, evidence (JSON)
    by NULs (neither can hold one), event codes as bytes, times in an array, the scope once
    when every event has the same; after hashing, the fingerprints too."""

    n: int
    addresses: str
    events: bytes
    at_ms: array[int]
    scope: str | None
    scopes: list[str | None] | None
    evidence: str
    fingerprints: array[int] = field(default_factory=lambda: array("q"))

    @classmethod
    def of(cls, batch: EventBatch) -> _Part:
        """The events of a batch."""
        scopes: list[str | None] | None = batch.scopes
        first = batch.scopes[0] if batch.scopes else None
        if batch.scopes.count(first) == len(batch.scopes):
            scopes = None
        at = batch.at_ms
        times = array("q", cast("list[int]", at) if None not in at else _times(at))
        return cls(
            len(batch),
            "\n".join(batch.addresses),
            bytes(map(_CODES.__getitem__, batch.events)),
            times,
            first,
            scopes,
            "\0".join(batch.evidence),
        )

    def scope_texts(self) -> list[str]:
        """Each event's scope as the log keeps it ('' for the global list)."""
        if self.scopes is None:
            return [self.scope or ""] * self.n
        return [s or "" for s in self.scopes]

    def select(self, keep: Sequence[int], fingerprints: Sequence[int], now_ms: int) -> _Part:
        """The events `keep` marks, with their fingerprints, times without one made `now_ms`."""
        if all(keep):
            kept = self
        else:
            kept = _Part(
                sum(keep),
                "\n".join(compress(self.addresses.split("\n"), keep)),
                bytes(compress(self.events, keep)),
                array("q", compress(self.at_ms, keep)),
                self.scope,
                None if self.scopes is None else list(compress(self.scopes, keep)),
                "\0".join(compress(self.evidence.split("\0"), keep)),
            )
            fingerprints = list(compress(fingerprints, keep))
        at = kept.at_ms
        if _NO_TIME in at:
            at = array("q", (now_ms if t == _NO_TIME else t for t in at))
        return _Part(
            kept.n,
            kept.addresses,
            kept.events,
            at,
            kept.scope,
            kept.scopes,
            kept.evidence,
            array("q", fingerprints),
        )

    def expires(self) -> Sequence[int | None]:
        """Each event's expiry (`expiry_column` with None for none)."""
        column = self.expiry_column()
        if column is None:
            return [None] * self.n
        return [None if t == NONE_INT64 else t for t in column]

    def expiry_column(self) -> array[int] | None:
        """Each event's expiry as the log's batches keep it (`NONE_INT64`: none): an imported
        soft bounce holds `IMPORTED_SOFT_BOUNCE_MS`. None when no event is a soft bounce."""
        if _SOFT_CODE not in self.events:
            return None
        hold, soft = IMPORTED_SOFT_BOUNCE_MS, _SOFT_CODE
        pairs = zip(self.at_ms, self.events, strict=True)
        return array("q", [t + hold if c == soft else NONE_INT64 for t, c in pairs])

    def names(self) -> list[str]:
        """Each event's type."""
        return [EVENT_TYPES[c] for c in self.events]


def _times(at: list[int | None]) -> list[int]:
    """Times with `_NO_TIME` for none."""
    return [_NO_TIME if t is None else t for t in at]


@dataclass(slots=True)
class ImportRead:
    """The events of an export file as `read_file` read them, before hashing: batches of
    columns (no object per event)."""

    source: str = ""
    parts: list[_Part] = field(default_factory=list)

    def __len__(self) -> int:
        """How many events."""
        return sum(p.n for p in self.parts)


@dataclass(frozen=True, slots=True)
class FoldColumns:
    """Events as the live set folds them, in columns (`Engine.suppress_apply_column`):
    fingerprints, event codes (places in `EVENT_TYPES`), expiries (None: none has one)."""

    fingerprints: array[int]
    codes: bytes
    expires: Sequence[int | None] | None

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def of_events(cls, events: Sequence[SuppressionEvent]) -> FoldColumns:
        """The columns of `events` (listing events: no `remove`)."""
        expires = [e.expires_ms for e in events]
        return cls(
            array("q", [e.fingerprint for e in events]),
            bytes([_CODES[e.event] for e in events]),
            expires if any(t is not None for t in expires) else None,
        )

    def without(self, rows: Sequence[bool]) -> FoldColumns:
        """The events but those `rows` marks."""
        keep = [not r for r in rows]
        expires = self.expires
        return FoldColumns(
            array("q", compress(self.fingerprints, keep)),
            bytes(compress(self.codes, keep)),
            None if expires is None else list(compress(expires, keep)),
        )

    def apply(self, engine: _core.Engine) -> int:
        """Fold the events into `engine`'s live set; how many changed it."""
        return engine.suppress_apply_column(
            self.fingerprints.tobytes(),
            self.codes,
            list(EVENT_TYPES),
            None if self.expires is None else list(self.expires),
        )


class ImportRows(Sequence[SuppressionEvent]):
    """The events an import writes, after hashing and deduplication: a sequence of
    `SuppressionEvent` made one at a time when asked, and the same events as log columns
    (`log_batches`, what `Store.suppress_bulk` writes) and as the live set's fold
    (`fold_columns`) made a batch at a time. A slice is a view of the same events."""

    def __init__(self, source: str, parts: Sequence[_Part], start: int = 0, stop: int = -1) -> None:
        self.source = source
        self._parts = list(parts)
        self._offsets = [0]
        for p in self._parts:
            self._offsets.append(self._offsets[-1] + p.n)
        self._start = start
        self._stop = self._offsets[-1] if stop < 0 else stop

    def __len__(self) -> int:
        """How many events."""
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> SuppressionEvent: ...

    @overload
    def __getitem__(self, index: slice) -> ImportRows: ...

    def __getitem__(self, index: int | slice) -> SuppressionEvent | ImportRows:
        """One event, or a view of a range of them."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ImportRows: a slice with a step")
            return ImportRows(
                self.source, self._parts, self._start + start, self._start + max(start, stop)
            )
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("ImportRows index out of range")
        at = self._start + index
        n = bisect.bisect_right(self._offsets, at) - 1
        return next(self._events(n, at - self._offsets[n], at - self._offsets[n] + 1))

    def __iter__(self) -> Iterator[SuppressionEvent]:
        """The events, made one at a time."""
        for n, first, last in self._ranges():
            yield from self._events(n, first, last)

    def _ranges(self) -> Iterator[tuple[int, int, int]]:
        """(part, first, last) of each part's events in this view."""
        for n, part in enumerate(self._parts):
            begin = self._offsets[n]
            first, last = max(self._start - begin, 0), min(self._stop - begin, part.n)
            if first < last:
                yield n, first, last

    def _events(self, n: int, first: int, last: int) -> Iterator[SuppressionEvent]:
        """Events first..last of part `n` (made by position, in `SuppressionEvent`'s field
        order: no keyword handling per event)."""
        part = self._parts[n]
        cut = slice(first, last)
        columns = (
            part.at_ms[cut],
            part.fingerprints[cut],
            part.addresses.split("\n")[cut],
            part.names()[cut],
            [self.source] * (last - first),
            part.scope_texts()[cut],
            part.expires()[cut],
            map(json.loads, part.evidence.split("\0")[cut]),
        )
        return map(SuppressionEvent, *columns)

    def log_batches(self) -> Iterator[LogBatch]:
        """The events as the log's import batches keep them, a part at a time (what
        `Store.suppress_bulk` writes)."""
        for n, first, last in self._ranges():
            part = self._parts[n]
            whole = first == 0 and last == part.n
            cut = slice(first, last)
            expires = part.expiry_column()
            yield LogBatch(
                source=self.source,
                at_ms=part.at_ms if whole else part.at_ms[cut],
                fingerprints=part.fingerprints if whole else part.fingerprints[cut],
                codes=part.events if whole else part.events[cut],
                names=EVENT_TYPES,
                expires_ms=expires if expires is None or whole else expires[cut],
                scope=(part.scope or "") if part.scopes is None else None,
                scopes="" if part.scopes is None else "\n".join(part.scope_texts()[cut]),
                addresses=part.addresses if whole else "\n".join(part.addresses.split("\n")[cut]),
                evidence=part.evidence if whole else "\0".join(part.evidence.split("\0")[cut]),
            )

    def fold_columns(self) -> Iterator[FoldColumns]:
        """The events as `Engine.suppress_apply_column` folds them, a batch at a time."""
        for n, first, last in self._ranges():
            part = self._parts[n]
            cut = slice(first, last)
            soft = _SOFT_CODE in part.events
            yield FoldColumns(
                part.fingerprints[cut], part.events[cut], part.expires()[cut] if soft else None
            )

    def addresses(self) -> Iterator[str]:
        """The events' addresses, in order."""
        for n, first, last in self._ranges():
            yield from self._parts[n].addresses.split("\n")[first:last]


@dataclass
class Scanned:
    """What one export file held, hashed and deduplicated (any thread)."""

    events: Sequence[SuppressionEvent] = field(default_factory=list)
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

    def problem(self, text: str) -> None:
        """Count a problem, and keep its text among the first `SHOWN_PROBLEMS`."""
        self.problem_count += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(text)


def read_file(
    source: str, path: Path, *, scope: str | None = None, fold_case: bool = False
) -> tuple[ImportRead, Scanned]:
    """Read `path` as `source`'s export (a worker thread: the engine is not touched): its
    events as columns, and the counts and problems so far."""
    out = Scanned()
    read = ImportRead(f"import:{source}")
    for batch in scan_batches(source, path, scope=scope, fold_case=fold_case):
        for problem in batch.problems:
            out.problem(str(problem))
        if len(batch):
            out.rows += len(batch)
            read.parts.append(_Part.of(batch))
    return read, out


async def hash_events(
    engine: _core.Engine,
    path: Path,
    events: ImportRead,
    out: Scanned,
    now_ms: int,
    *,
    yield_to_loop: bool = True,
) -> Scanned:
    """Hash `events` with the core (on its thread, a batch at a time; with `yield_to_loop`
    the loop serves others between batches) and leave out each event that would change
    nothing: one whose address (in its scope) had the same event in an earlier row of the
    file, or, at its first row, is listed already for that reason. Folding what is kept gives
    the live set that folding every row in file order would (each address's last row holds).
    `out.events` becomes the kept ones (`ImportRows`)."""
    latest = _core.LatestRows()  # each fingerprint's event code in its latest row so far
    anything_listed = engine.suppress_stats()[0] > 0
    kept: list[_Part] = []
    for part in events.parts:
        column, refused = engine.suppress_fingerprint_column(
            part.addresses, part.scope or "", None if part.scopes is None else part.scope_texts()
        )
        fingerprints = array("q")
        fingerprints.frombytes(column)
        for _, problem in refused:  # addresses the core refuses (kiln's reading is stricter)
            out.problem(f"{path}: {problem}")
        # keep: the row changes something; first: the file names its address the first time
        marks, first, duplicates = latest.rows(column, part.events, [row for row, _ in refused])
        out.duplicates += duplicates
        keep: Sequence[int] = marks
        codes = bytes(compress(part.events, keep))
        for code in set(codes):
            out.per_type[EVENT_TYPES[code]] += codes.count(code)
        if anything_listed:
            addresses = part.addresses.split("\n")
            candidates = [bool(k and f) for k, f in zip(keep, first, strict=True)]
            _leave_out_listed(engine, part, addresses, part.scope_texts(), candidates, now_ms, out)
            keep = [k and (c or not f) for k, c, f in zip(keep, candidates, first, strict=True)]
        if any(keep):
            kept.append(part.select(keep, fingerprints, now_ms))
        if yield_to_loop:
            await asyncio.sleep(0)
    out.events = ImportRows(events.source, kept)
    return out


def _leave_out_listed(
    engine: _core.Engine,
    part: _Part,
    addresses: list[str],
    scopes: Sequence[str],
    keep: list[bool],
    now_ms: int,
    out: Scanned,
) -> None:
    """Mark in `keep` the events whose address is listed already for that event, in their
    scope (or the global list); counted in `out.already`."""
    rows_of: dict[str, list[int]] = {}
    for row, scope in enumerate(scopes):
        if keep[row]:
            rows_of.setdefault(scope, []).append(row)
    for scope, rows in rows_of.items():
        listed = engine.suppress_check([addresses[r] for r in rows], now_ms, scope)
        for row, current in zip(rows, listed, strict=True):
            if current is not None and _CODES.get(current) == part.events[row]:
                keep[row] = False
                out.already += 1


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


class ExportIncomplete(Exception):
    """Listed addresses the log keeps only as keyed hashes (written in hashed-only mode),
    which an export cannot write: nothing was written."""

    def __init__(self, hashed: int, listed: int) -> None:
        super().__init__(
            f"{hashed:,} of the {listed:,} listed addresses were recorded in hashed-only mode "
            "and the log keeps only their keyed hashes, so an export would leave them out "
            "and pass for the whole list; nothing was exported (ask for a partial export to "
            "write the others)"
        )
        self.hashed = hashed
        self.listed = listed


def export_list(
    store: Store, fmt: str, path: Path, now_ms: int, *, partial: bool = False
) -> tuple[int, int]:
    """Write the list to `path` in `fmt` (written beside it, then renamed): (written, left
    out). Listed addresses kept only as hashes are left out with `partial`; without it they
    raise ExportIncomplete before anything is written."""
    listed = list(_listed(store))
    hashed = sum(1 for e in listed if not e.address)
    if hashed and not partial:
        raise ExportIncomplete(hashed, len(listed))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        n = write(fmt, (e for e in listed if e.address), f, now_ms=now_ms)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n, hashed
