"""The suppression log's import batches (docs/suppression.md, "The log"): how many events
become one row of `kiln_suppression_batch` and come back out of it.

An import of millions of events is not written as one `kiln_suppression` row each: that is
two index entries and a row header per event, and at 10M events the store's floor was 100 s.
Instead the import takes a range of log ids, and its events are written as rows of up to
`BATCH_EVENTS` events each, as columns: integers packed little-endian, text joined and
compressed. One row of its own in `kiln_suppression`, event `import`, follows the range, so
the log's ids stay one sequence (the next event gets the id after it) and the range is
accounted for. Readers (`Store.suppress_events`, `Store.suppress_fold_chunks`) walk both
tables in id order; a batch event's id is its batch's first id plus its place.

Nothing here touches the database: `LogBatch.packed` makes a row's values, `LogBatch.unpacked`
reads them back.
"""

from __future__ import annotations

import json
import sys
import zlib
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from kiln.records import SuppressionEvent

__all__ = ["BATCH_EVENTS", "IMPORT_EVENT", "NONE_INT64", "LogBatch", "batches_of", "packed_rows"]

#: The most events one row of `kiln_suppression_batch` holds.
BATCH_EVENTS: Final = 65_536
#: The event of the row that follows an import's range of ids in `kiln_suppression`: kept
#: for the record (its evidence counts the events), folded into nothing.
IMPORT_EVENT: Final = "import"
#: An int64 column's None (no time this far back is real).
NONE_INT64: Final = -(2**63)
#: Threads that pack an import's batches (compression is most of a write's time).
PACKING_THREADS: Final = 2
#: zlib's level for the text columns: the fastest; bounce replies still shrink 20 times.
_ZLIB_LEVEL: Final = 1


def _packed(values: array[int]) -> bytes:
    """An int64 array as little-endian bytes."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


def _unpacked(data: bytes) -> array[int]:
    """Little-endian bytes as an int64 array."""
    values = array("q")
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Consecutive events of one source as columns: what one batch row holds.

    `codes` has one byte per event, its event's place in `names`. Text columns are joined:
    addresses and scopes by line breaks, evidence (JSON) by NULs; none can hold its
    separator."""

    source: str
    at_ms: array[int]
    fingerprints: array[int]
    codes: bytes
    names: tuple[str, ...]
    #: Each event's expiry, `NONE_INT64` for none; None when no event has one.
    expires_ms: array[int] | None
    #: Every event's scope when they are all the same, else None (`scopes` then holds them).
    scope: str | None
    scopes: str
    addresses: str
    evidence: str

    def __len__(self) -> int:
        """How many events."""
        return len(self.codes)

    def keeps_addresses(self) -> bool:
        """Whether any event has its address (not only its keyed hash)."""
        return bool(self.addresses.strip("\n"))

    @classmethod
    def of_events(cls, events: Sequence[SuppressionEvent]) -> LogBatch:
        """Events (of one source) as a batch."""
        names = tuple(dict.fromkeys(e.event for e in events))
        code = {name: n for n, name in enumerate(names)}
        expires = [e.expires_ms for e in events]
        scopes = [e.scope for e in events]
        same = bool(scopes) and scopes.count(scopes[0]) == len(scopes)
        return cls(
            source=events[0].source if events else "",
            at_ms=array("q", [e.at_ms for e in events]),
            fingerprints=array("q", [e.fingerprint for e in events]),
            codes=bytes([code[e.event] for e in events]),
            names=names,
            expires_ms=(
                array("q", [NONE_INT64 if t is None else t for t in expires])
                if any(t is not None for t in expires)
                else None
            ),
            scope=scopes[0] if same else None,
            scopes="" if same else "\n".join(scopes),
            addresses="\n".join(e.address for e in events),
            evidence="\0".join(json.dumps(e.evidence, sort_keys=True, default=str) for e in events),
        )

    @classmethod
    def joined(cls, batches: Sequence[LogBatch]) -> LogBatch:
        """Consecutive batches of one source as one."""
        if len(batches) == 1:
            return batches[0]
        names = tuple(dict.fromkeys(name for b in batches for name in b.names))
        codes = bytearray()
        for b in batches:
            if b.names == names:
                codes += b.codes
            else:
                table = bytes(names.index(name) for name in b.names).ljust(256, b"\0")
                codes += b.codes.translate(table)
        expires: array[int] | None = None
        if any(b.expires_ms is not None for b in batches):
            expires = array("q")
            for b in batches:
                expires.extend(b.expires_ms if b.expires_ms is not None else [NONE_INT64] * len(b))
        scope = batches[0].scope
        same = scope is not None and all(b.scope == scope for b in batches)
        at_ms, fingerprints = array("q"), array("q")
        for b in batches:
            at_ms.extend(b.at_ms)
            fingerprints.extend(b.fingerprints)
        return cls(
            source=batches[0].source,
            at_ms=at_ms,
            fingerprints=fingerprints,
            codes=bytes(codes),
            names=names,
            expires_ms=expires,
            scope=scope if same else None,
            scopes="" if same else "\n".join("\n".join(b.scope_texts()) for b in batches),
            addresses="\n".join(b.addresses for b in batches),
            evidence="\0".join(b.evidence for b in batches),
        )

    def cut(self, start: int, stop: int) -> LogBatch:
        """Events `start` to `stop` as a batch of their own."""
        part = slice(start, stop)
        return LogBatch(
            source=self.source,
            at_ms=self.at_ms[part],
            fingerprints=self.fingerprints[part],
            codes=self.codes[part],
            names=self.names,
            expires_ms=None if self.expires_ms is None else self.expires_ms[part],
            scope=self.scope,
            scopes="" if self.scope is not None else "\n".join(self.scopes.split("\n")[part]),
            addresses="\n".join(self.addresses.split("\n")[part]),
            evidence="\0".join(self.evidence.split("\0")[part]),
        )

    def scope_texts(self) -> list[str]:
        """Each event's scope."""
        if self.scope is not None:
            return [self.scope] * len(self)
        return self.scopes.split("\n")

    def packed(self, first_id: int) -> dict[str, object]:
        """The batch row's values, its events taking ids from `first_id` on."""
        return {
            "first_id": first_id,
            "last_id": first_id + len(self) - 1,
            "source": self.source,
            "names": ",".join(self.names),
            "at_ms": _packed(self.at_ms),
            "fingerprint": _packed(self.fingerprints),
            "event": self.codes,
            "expires_ms": None if self.expires_ms is None else _packed(self.expires_ms),
            "scope": self.scope,
            "scopes": None if self.scope is not None else _compressed(self.scopes),
            "address": _compressed(self.addresses),
            "evidence": _compressed(self.evidence),
        }

    @classmethod
    def unpacked(cls, row: Mapping[str, object], *, text: bool = True) -> LogBatch:
        """A batch row's events (the values `packed` made); without `text`, their numbers
        only (what the live set's fold reads: times, scopes, addresses and evidence left
        empty, and need not be in `row`)."""
        expires = row["expires_ms"]
        scope = row["scope"]

        def joined(name: str) -> str:
            return _decompressed(row[name]) if text else ""

        return cls(
            source=str(row["source"]),
            at_ms=_unpacked(_bytes(row["at_ms"])) if text else array("q"),
            fingerprints=_unpacked(_bytes(row["fingerprint"])),
            codes=_bytes(row["event"]),
            names=tuple(str(row["names"]).split(",")),
            expires_ms=None if expires is None else _unpacked(_bytes(expires)),
            scope=None if scope is None else str(scope),
            scopes="" if scope is not None else joined("scopes"),
            addresses=joined("address"),
            evidence=joined("evidence"),
        )

    def positions(
        self, fingerprints: Sequence[int] | None, event: str | None, *, after: int = -1
    ) -> list[int]:
        """The places after `after` of the events of these fingerprints (None: any), of this
        type (None: any), in order."""
        if event is not None and event not in self.names:
            return []
        if fingerprints is None:
            places: Sequence[int] = range(max(after + 1, 0), len(self))
        else:
            column = _packed(self.fingerprints)
            found: set[int] = set()
            for fp in set(fingerprints):
                if 0 <= fp < 2**63:
                    found.update(_aligned_finds(column, fp.to_bytes(8, "little")))
            places = sorted(p for p in found if p > after)
        if event is None:
            return list(places)
        code = self.names.index(event)
        return [p for p in places if self.codes[p] == code]

    def events(self, first_id: int, places: Sequence[int]) -> list[SuppressionEvent]:
        """The events at `places`, with their log ids (`first_id` plus the place)."""
        addresses = self.addresses.split("\n")
        evidence = self.evidence.split("\0")
        scopes = self.scope_texts()
        expires = self.expires_ms
        return [
            SuppressionEvent(
                at_ms=self.at_ms[p],
                fingerprint=self.fingerprints[p],
                address=addresses[p],
                event=self.names[self.codes[p]],
                source=self.source,
                scope=scopes[p],
                expires_ms=None if expires is None or expires[p] == NONE_INT64 else expires[p],
                evidence=json.loads(evidence[p]),
                id=first_id + p,
            )
            for p in places
        ]

    def fold_expires(self) -> list[int | None] | None:
        """Each event's expiry as the live set's fold takes it (None: none has one)."""
        if self.expires_ms is None:
            return None
        return [None if t == NONE_INT64 else t for t in self.expires_ms]


def packed_rows(
    batches: Iterable[LogBatch], first_id: int
) -> Iterator[tuple[int, dict[str, object]]]:
    """Each batch's row values (`LogBatch.packed`), its events taking ids on from
    `first_id`, in order, with its size: packed `PACKING_THREADS` at a time (zlib lets go of
    the GIL), at most twice that many ahead of the caller."""
    with ThreadPoolExecutor(PACKING_THREADS, thread_name_prefix="kiln-pack") as pool:
        ahead: deque[tuple[int, Future[dict[str, object]]]] = deque()
        for batch in batches:
            ahead.append((len(batch), pool.submit(batch.packed, first_id)))
            first_id += len(batch)
            if len(ahead) >= 2 * PACKING_THREADS:
                size, row = ahead.popleft()
                yield size, row.result()
        while ahead:
            size, row = ahead.popleft()
            yield size, row.result()


def batches_of(events: Iterable[SuppressionEvent | LogBatch]) -> Iterator[LogBatch]:
    """Events or batches as batch rows' worth: at most `BATCH_EVENTS` events of one source
    each, in order."""
    pending: list[LogBatch] = []
    size = 0
    for batch in _small_batches(events):
        if pending and (size + len(batch) > BATCH_EVENTS or batch.source != pending[0].source):
            yield LogBatch.joined(pending)
            pending, size = [], 0
        pending.append(batch)
        size += len(batch)
    if pending:
        yield LogBatch.joined(pending)


def _small_batches(events: Iterable[SuppressionEvent | LogBatch]) -> Iterator[LogBatch]:
    """Batches as given (one larger than `BATCH_EVENTS` cut), or runs of events of one
    source made batches (each at most `BATCH_EVENTS`); empty ones left out."""
    run: list[SuppressionEvent] = []
    for item in events:
        if isinstance(item, LogBatch):
            for start in range(0, len(item), BATCH_EVENTS):
                yield item if len(item) <= BATCH_EVENTS else item.cut(start, start + BATCH_EVENTS)
            continue
        if run and (item.source != run[0].source or len(run) >= BATCH_EVENTS):
            yield LogBatch.of_events(run)
            run = []
        run.append(item)
    if run:
        yield LogBatch.of_events(run)


def _aligned_finds(column: bytes, needle: bytes) -> Iterator[int]:
    """The places of `needle` (8 bytes) in `column` at whole 8-byte steps."""
    at = column.find(needle)
    while at >= 0:
        if at % 8 == 0:
            yield at // 8
            at = column.find(needle, at + 8)
        else:
            at = column.find(needle, at + 1)


def _compressed(text: str) -> bytes:
    return zlib.compress(text.encode(), _ZLIB_LEVEL)


def _decompressed(data: object) -> str:
    return zlib.decompress(_bytes(data)).decode()


def _bytes(data: object) -> bytes:
    """A binary column's value as bytes (drivers give bytes or memoryview)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview | bytearray):
        return bytes(data)
    raise TypeError(f"a batch column holds {type(data).__name__}, not bytes")
