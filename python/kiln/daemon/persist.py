"""Persistence of the 1 Hz flush: what the engine handed over stays here until the store has it.

The loop takes tallies, reports and decisions from the engine (`Daemon.collect`) and adds them
as a batch; `Persister` writes batches on its own store thread, which never touches the engine,
and commits the engine's reservation once the snapshot that carries it is durable. A failed
write keeps every batch for the next try (consecutive batches of one day merged, only the
newest snapshot kept), so a full disk or a read-only database loses nothing while kiln runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar

from kiln import _core
from kiln.records import DayCounts, Held, LogEntry, PushbackKey
from kiln.store import Store, StoreError

__all__ = ["Batch", "Persister", "charge_stored_tallies"]

T = TypeVar("T")


@dataclass(slots=True)
class Batch:
    """What one flush took from the engine and the guard, kept until the store has it.

    The engine hands tallies and reports over once; if the write fails they stay here and go
    with the next write, so a full disk or a read-only database loses nothing while kiln runs.
    Only the newest snapshot matters: merging drops older ones.
    """

    now_ms: int
    day: date
    plan: str
    snapshot: bytes | None
    #: The engine's reservation token of `snapshot`: committed once the write succeeded.
    token: int | None
    counts: dict[tuple[str, str], DayCounts]
    entries: list[LogEntry]
    pushback: dict[date, dict[PushbackKey, int]]
    automations: list[dict[str, Any]]
    meta: dict[str, str]
    #: Postfix recipients held (or released: None) since the last flush, by queue id.
    held: dict[int, Held | None] = field(default_factory=dict)

    def absorb(self, later: Batch) -> None:
        """Take in a later batch of the same day and plan."""
        for key, c in later.counts.items():
            was = self.counts.get(key)
            self.counts[key] = c if was is None else was + c
        for pday, rows in later.pushback.items():
            mine = self.pushback.setdefault(pday, {})
            for reply, n in rows.items():
                mine[reply] = mine.get(reply, 0) + n
        self.entries += later.entries
        self.automations += later.automations
        self.meta |= later.meta
        self.held |= later.held
        if later.snapshot is not None:
            self.snapshot, self.token = later.snapshot, later.token
        self.now_ms = later.now_ms

    def write(self, store: Store) -> None:
        """One transaction (StoreError: nothing written)."""
        store.flush(
            snapshot=self.snapshot,
            now_ms=self.now_ms,
            day=self.day,
            counts=self.counts,
            entries=self.entries,
            pushback=self.pushback,
            plan=self.plan,
            automations=self.automations,
            meta=self.meta,
            held=self.held,
        )


def merged(batches: list[Batch]) -> list[Batch]:
    """Consecutive batches of one day and plan as one; only the last snapshot kept."""
    out: list[Batch] = []
    for b in batches:
        if out and out[-1].day == b.day and out[-1].plan == b.plan:
            out[-1].absorb(b)
        else:
            if out:
                out[-1].snapshot = out[-1].token = None
            out.append(b)
    return out


class Persister:
    """The store thread and the batches it has not written yet."""

    def __init__(
        self,
        store: Store,
        engine: _core.Engine,
        retry_ms: int,
        warn: Callable[..., None],
        log: Any,
    ) -> None:
        self.store = store
        self.engine = engine
        self.retry_ms = retry_ms
        self.warn = warn
        self.log = log
        #: Flushed but not yet written, oldest first.
        self.unsaved: list[Batch] = []
        self.error: str | None = None
        self._thread: ThreadPoolExecutor | None = None

    def start_thread(self) -> None:
        """From now on writes and `run` go to the store thread."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-store")

    def stop_thread(self) -> None:
        """Wait for the store thread's work and end it."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the store thread (in the calling thread when there is none)."""
        if self._thread is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def add(self, batch: Batch) -> None:
        """Queue a batch for the next write."""
        self.unsaved.append(batch)

    def write_now(self) -> StoreError | None:
        """Write what is unsaved in the calling thread; the error that stopped it, if any
        (logged; the batches wait for the next write)."""
        self.unsaved = merged(self.unsaved)
        written, error = self._write(list(self.unsaved))
        self._settled(written, error)
        return error

    async def write_async(self) -> None:
        """Write what is unsaved on the store thread (the loop goes on serving). A failure
        is logged and the batches wait for the next try."""
        if not self.unsaved:
            return
        self.unsaved = merged(self.unsaved)
        written, error = await self.run(self._write, list(self.unsaved))
        self._settled(written, error)

    def _write(self, batches: list[Batch]) -> tuple[int, StoreError | None]:
        """Write `batches` in order (any thread: touches only the store); how many went, and
        the error that stopped the rest."""
        for i, b in enumerate(batches):
            try:
                b.write(self.store)
            except StoreError as e:
                return i, e
        return len(batches), None

    def _settled(self, written: int, error: StoreError | None) -> None:
        """On the engine's thread: commit the reservation of the newest durable snapshot,
        forget what was written, warn (at most every few seconds) about what was not."""
        token = next((b.token for b in reversed(self.unsaved[:written]) if b.token), None)
        if token is not None:
            # The snapshot is durable: the engine may grant up to its reservations.
            self.engine.commit_reservation(token, self.retry_ms)
        del self.unsaved[:written]
        if error is None:
            if self.error is not None:
                self.log.warning("store_recovered", previous_error=self.error)
                self.error = None
            return
        self.error = str(error)
        self.warn(
            "store_write_failed",
            error=str(error),
            unsaved_batches=len(self.unsaved),
            hint="tallies, reports and decisions are kept in memory until a write succeeds",
        )


def charge_stored_tallies(
    engine: _core.Engine, store: Store, day: date, now_ms: int, log: Any
) -> None:
    """Without readable counters, count today's grants from the stored tallies (at most one
    flush behind), charged to the current hour as well as the day: conservative, it may
    under-send this hour rather than grant twice."""
    today = store.counts(day)
    # Roll the engine's windows to now first, or the first decision would roll them and drop
    # what is charged here (a plain snapshot's restore charges nothing else).
    engine.restore_bytes(engine.snapshot_bytes(), now_ms)
    snap = engine.snapshot()
    ips = [ip[0] for ip in snap["ips"]]
    providers = snap["providers"]
    keys = []
    ip_used: dict[int, int] = {}
    for ip, provider, limits, counters in snap["keys"]:
        granted = today.get((ips[ip], providers[provider]), DayCounts()).granted
        tat, hour_used, day_used, *rest = counters
        if granted:
            ip_used[ip] = ip_used.get(ip, 0) + granted
            counters = (tat, max(hour_used, granted), max(day_used, granted), *rest)
        keys.append((ip, provider, limits, counters))
    snap["keys"] = keys
    snap["ips"] = [
        (addr, hcap, dcap, max(hu, ip_used.get(i, 0)), max(du, ip_used.get(i, 0)))
        for i, (addr, hcap, dcap, hu, du) in enumerate(snap["ips"])
    ]
    engine.restore(snap)
    log.warning(
        "counters_from_tallies",
        keys=sum(1 for k in today.values() if k.granted),
        granted=sum(k.granted for k in today.values()),
    )
