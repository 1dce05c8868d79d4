"""`kiln run`: the daemon beside the MTAs.

Python acts, Rust decides. This module owns the process: it loads the plan, restores the
engine's counters from the store, listens on the native socket, moves bytes between clients
and `Engine.serve`, and runs the jobs (1 Hz flush, hour and day roll-over). Where each
decision is made:

| decision | where |
|---|---|
| may this request go, which IP carries it | `Engine.serve` (rust/src/protocol.rs) |
| caps in force this hour | `ramp.compile_limits`, pushed by `Daemon.apply_plan` |
| does a ramp advance at the day roll | `rampday.roll_day`, run by `Daemon.roll_days` |
| domain -> provider | plan domain table, then `mx.MxResolver`, pushed as engine routes |
| what a push-back reply is | `Engine.classify` against the reply rules (rust/src/classify.rs) |
| what evidence does (suspend, slow, hold, step down, pause) | `kiln.policy`, run by `kiln.guard` |
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import grp
import json
import os
import resource
import signal
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.resolver
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from kiln import _core
from kiln.automation import Automation
from kiln.clock import Clock, SystemClock
from kiln.errors import KilnError, ScheduleError
from kiln.feedback import FeedbackReader
from kiln.guard import Guard
from kiln.log import get_logger
from kiln.mx import NULL_MX, MxLookups, MxResolver, ProviderTable, parse_nameservers
from kiln.policy import RuleInfo, SignalBook
from kiln.provider import DEFAULT_PROVIDER
from kiln.ramp import HOUR_MS, apply, calendar, caps_at, compile_limits, plan_providers, steps_for
from kiln.rampday import DayEvidence, RampMove, RampState, day_cap, roll_day
from kiln.rate import RateSpec
from kiln.rules import RuleSet, known_providers, load_rules
from kiln.schedule import Plan, load_plan
from kiln.signals.poller import Poller, feedback_reader, report_line
from kiln.store import DayCounts, LogEntry, PushbackKey, Store, StoredPosition, StoreError
from kiln.watchdog import LoopMonitor, Notifier

__all__ = ["Daemon", "DaemonConfig", "NativeProtocol", "run"]

#: Operations Python answers; every other op is decided in the core.
UPCALL_OPS = ("status", "limits", "reload", "stats", "automations", "cancel", "explain")
#: The upcalls the MTA socket answers too (read-only, about one key or the process); the
#: rest steer kiln and are answered on the operator socket only.
MTA_UPCALL_OPS = frozenset({"limits", "stats"})
#: Push-back reports kept in memory for `status` (the policy issue reads them).
RECENT_REPORTS = 1_000
#: Last local day whose ramps were rolled (store meta key, per plan name).
_ROLLED_KEY = "last_rolled_day:{plan}"
#: What the signal sources last said, and their health (store meta key, per plan name).
_SIGNALS_KEY = "signals:{plan}"
#: Where each MTA log reader got to (store meta key, per plan and node).
_FEEDBACK_KEY = "feedback:{plan}:{node}"
#: Write no more than this many bytes ahead of a slow reader before pausing its reads.
_HIGH_WATER_BYTES = 1 << 20
#: Open files kept free for the store, logs, signal sources and MTA-log readers when the
#: connection limit is derived from the open-files limit.
_RESERVED_FDS = 256
#: A reservation covers this many snapshot intervals of each key's rate: the next snapshot
#: and its write have that long before the key is held back (reason `reservation`).
_RESERVE_INTERVALS = 2
#: Repeated warnings (connection limit, accept failures, store failures) at most this often.
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `kiln run` needs; paths are resolved by `from_args`."""

    plan_path: Path
    state_dir: Path
    database_url: str | None = None
    socket_path: Path | None = None
    socket_mode: int = 0o660
    socket_group: str | None = None
    snapshot_interval_ms: int = 1_000
    node: str = field(default_factory=socket.gethostname)
    #: DNS servers for MX lookups as "host" or "host:port"; empty: /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    #: The operator socket (reload, cancel, explain, status, ...): owner only by default.
    operator_socket_path: Path | None = None
    operator_socket_mode: int = 0o600
    #: Open client connections at most, over both sockets; 0: the open-files limit less
    #: what the daemon needs for itself.
    max_connections: int = 0
    #: Start afresh when the state folder lost its database (see docs/state.md).
    reinitialise: bool = False

    @property
    def socket(self) -> Path:
        """Where the native (MTA) socket listens."""
        return self.socket_path or self.state_dir / "kiln.sock"

    @property
    def operator_socket(self) -> Path:
        """Where the operator socket listens."""
        return self.operator_socket_path or self.state_dir / "operator.sock"

    @property
    def store_url(self) -> str:
        """The database: `--database-url`, else SQLite in the state folder."""
        return self.database_url or f"sqlite:///{(self.state_dir / 'kiln.db').resolve()}"


def _local_day(plan: Plan, now_ms: int) -> date:
    """The plan-zone calendar date at `now_ms`."""
    return datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(plan.zone).date()


def _state(p: StoredPosition | RampState) -> RampState:
    """A store row as the ramp module's state."""
    return RampState(**{f.name: getattr(p, f.name) for f in dataclasses.fields(RampState)})


def _stored(s: RampState) -> StoredPosition:
    """A ramp state as a store row."""
    return StoredPosition(
        **{f.name: getattr(s, f.name) for f in dataclasses.fields(StoredPosition)}
    )


@dataclass(slots=True)
class _Unsaved:
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

    def absorb(self, later: _Unsaved) -> None:
        """Take in a later batch of the same day and plan."""
        for key, c in later.counts.items():
            was = self.counts.get(key)
            self.counts[key] = c if was is None else _added(was, c)
        for pday, rows in later.pushback.items():
            mine = self.pushback.setdefault(pday, {})
            for reply, n in rows.items():
                mine[reply] = mine.get(reply, 0) + n
        self.entries += later.entries
        self.automations += later.automations
        self.meta |= later.meta
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
        )


def _added(a: DayCounts, b: DayCounts) -> DayCounts:
    """Two days' worth of counts of one key, added field by field."""
    return DayCounts(
        *(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True))
    )


def _merged(batches: list[_Unsaved]) -> list[_Unsaved]:
    """Consecutive batches of one day and plan as one; only the last snapshot kept."""
    out: list[_Unsaved] = []
    for b in batches:
        if out and out[-1].day == b.day and out[-1].plan == b.plan:
            out[-1].absorb(b)
        else:
            if out:
                out[-1].snapshot = out[-1].token = None
            out.append(b)
    return out


class Daemon:
    """One `kiln run` process: engine, plan, store, sockets and jobs.

    Threads: every engine call happens on the thread that ran `start` (the engine is pinned
    to it), which is the event loop's thread once serving. Store writes of the 1 Hz flush and
    store reads of operator requests run on one store thread that never touches the engine.
    """

    def __init__(self, config: DaemonConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.log = get_logger(component="daemon")
        self.engine = _core.Engine()
        self.plan: Plan = load_plan(config.plan_path)  # ScheduleError: nothing started
        config.state_dir.mkdir(parents=True, exist_ok=True)
        for path in (config.socket, config.operator_socket):
            _refuse_if_answered(path)  # before the store: a second daemon says why it stops
        # A folder that lost its database refuses to start (StateLostError) unless told to
        # reinitialise: a fresh database would re-grant the day and restart every ramp.
        self.store = Store.open_state(
            config.store_url, config.state_dir, node=config.node, reinitialise=config.reinitialise
        )
        self.states: dict[tuple[str, str], RampState] = {}
        self.recent_reports: deque[_core.Report] = deque(maxlen=RECENT_REPORTS)
        self._pending_log: list[LogEntry] = []
        self._server: asyncio.AbstractServer | None = None
        self._operator_server: asyncio.AbstractServer | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._stopping: asyncio.Event | None = None
        self._next_hour_ms = 0
        self.started_ms = self.clock.now_ms()
        # Background MX lookups (bounded; None without a nameserver), made when serving.
        self.lookups: MxLookups | None = None
        # Flushed but not yet written, oldest first (see _Unsaved).
        self._unsaved: list[_Unsaved] = []
        self._store_error: str | None = None
        self._store_thread: ThreadPoolExecutor | None = None
        # Jobs that change state (flush, hour roll, reload, cancel) run one at a time.
        self._job_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.monitor = LoopMonitor()
        self.notifier = Notifier()
        self.connections = 0
        self.max_connections = config.max_connections or _connection_limit()
        self._warned: dict[str, tuple[float, int]] = {}
        rules = self._compile_rules(self._read_rules(self.plan))  # ScheduleError: nothing started
        self.guard = Guard(self.plan, rules)
        self.poller = Poller(self.plan, now_ms=self.clock.now_ms)
        self.feedback: FeedbackReader | None = None
        self._feedback_saved = ""
        self._signals_saved = ""

    # ----- start-up -----

    def start(self) -> None:
        """Restore counters, load ramp positions, push the plan into the engine.

        Pins the engine to the calling thread, which must be the one that runs the loop."""
        self.engine.pin_thread()
        now_ms = self.clock.now_ms()
        saved = self.store.load_snapshot()
        lost_snapshot = False
        if saved is not None:
            data, saved_ms = saved
            try:
                self.engine.restore_bytes(data, now_ms)
            except _core.CoreError as e:
                lost_snapshot = True
                self.record(
                    now_ms,
                    "start",
                    "engine",
                    "snapshot_unreadable",
                    "the saved counters cannot be read; today's use is taken from the stored "
                    f"tallies instead: {e}",
                    {"saved_ms": saved_ms},
                    level="warning",
                )
            else:
                self.log.info("counters restored", saved_ms=saved_ms, age_ms=now_ms - saved_ms)
        self.engine.set_default_provider(DEFAULT_PROVIDER)
        self.engine.set_upcall_ops(list(UPCALL_OPS))
        self.states = {k: _state(p) for k, p in self.store.load_positions(self.plan.name).items()}
        self._load_guard(now_ms)
        self._mark_start(now_ms)
        self.roll_days(now_ms)
        self.apply_plan(now_ms)
        if lost_snapshot:
            self._charge_stored_tallies(now_ms)
        self.record(
            now_ms,
            "start",
            "daemon",
            "start",
            f"kiln started with plan {self.plan.name!r}",
            {"plan": str(self.config.plan_path), "restored": saved is not None},
        )
        self.flush(now_ms)

    def _charge_stored_tallies(self, now_ms: int) -> None:
        """Without readable counters, count today's grants from the stored tallies (at most one
        flush behind), charged to the current hour as well as the day: conservative, it may
        under-send this hour rather than grant twice."""
        today = self.store.counts(_local_day(self.plan, now_ms))
        snap = self.engine.snapshot()
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
        self.engine.restore(snap)
        self.log.warning(
            "counters_from_tallies",
            keys=sum(1 for k in today.values() if k.granted),
            granted=sum(k.granted for k in today.values()),
        )

    @staticmethod
    def _read_rules(plan: Plan) -> RuleSet:
        """The shipped and the plan's reply rules, read and checked (ScheduleError); touches
        no engine, so it may run off the loop."""
        base = Path(plan.source).parent
        return load_rules([base / f for f in plan.policy.rules], known_providers(plan))

    def _compile_rules(self, rules: RuleSet) -> dict[str, RuleInfo]:
        """Compile reply rules into the engine (ScheduleError: the rules in force stay), and
        what policy needs of each rule."""
        rules.compile_into(self.engine)
        return {
            r.id: RuleInfo(
                threshold_count=r.threshold.count,
                threshold_period_ms=r.threshold.period_ms or HOUR_MS,
                action="default" if r.action is None else r.action,
            )
            for r in rules.rules
        }

    def _load_guard(self, now_ms: int) -> None:
        """Automations and signal readings of this plan, back from the store."""
        kept = self.store.load_automations(self.plan.name, since_ms=now_ms - 3 * 86_400_000)
        self.guard.book.load(Automation.from_json(a) for a in kept)
        saved = self.store.get_meta(_SIGNALS_KEY.format(plan=self.plan.name))
        self.guard.signals = SignalBook.from_json(json.loads(saved)) if saved else SignalBook()
        self._signals_saved = saved or ""
        self._load_feedback()

    def _load_feedback(self) -> None:
        """(Re)open the MTA-log readers where they got to."""
        if self.feedback is not None:
            self._collect(self.clock.now_ms())  # their checkpoints go with the next write
            self.feedback.close()
        key = _FEEDBACK_KEY.format(plan=self.plan.name, node=self.config.node)
        self._feedback_saved = self.store.get_meta(key) or ""
        self.feedback = feedback_reader(
            self.plan, json.loads(self._feedback_saved) if self._feedback_saved else None
        )

    def _mark_start(self, now_ms: int) -> None:
        """A plan seen for the first time starts counting today: earlier days had no data."""
        key = _ROLLED_KEY.format(plan=self.plan.name)
        if self.store.get_meta(key) is None:
            yesterday = _local_day(self.plan, now_ms) - timedelta(days=1)
            self.store.set_meta(key, yesterday.isoformat())

    def apply_plan(self, now_ms: int) -> None:
        """Push this hour's limits, the pools, the calendar and the domain table."""
        positions = {k: s.position for k, s in self.states.items()}
        apply(self.engine, self.plan, compile_limits(self.plan, positions, now_ms))
        self.guard.enforce(self.engine, self.states, now_ms)
        hours, days = calendar(self.plan.zone, now_ms)
        self.engine.set_calendar(hours, days)
        self._next_hour_ms = next((h for h in hours if h > now_ms), now_ms + HOUR_MS)
        self.engine.clear_routes()
        own = set(plan_providers(self.plan))
        forever = _core.MAX_NOW_MS
        for name, spec in self.plan.provider_table().items():
            for domain in spec.domains:
                self.engine.set_route(domain, self.fold(name, own), forever)

    @staticmethod
    def fold(provider: str, own: set[str]) -> str:
        """A provider without its own row in the plan counts as `default`."""
        return provider if provider in own else DEFAULT_PROVIDER

    # ----- jobs (time is an argument; the scheduler only says when) -----

    def tick(self, now_ms: int) -> None:
        """The 1 Hz job, run in the calling thread (tests): roll hours and days when due, read
        the MTA logs, then flush."""
        if now_ms >= self._next_hour_ms:
            self.on_hour(now_ms)
        self.ingest(now_ms)
        self.flush(now_ms)

    async def tick_job(self) -> None:
        """The 1 Hz job as the daemon runs it, on the loop: what `tick` does, with the store
        written on the store thread. Never raises: a failure is logged and the next run
        tries again (an hour roll that could not read or write the store included)."""
        assert self._job_lock is not None
        async with self._job_lock:
            try:
                now_ms = self.clock.now_ms()
                if now_ms >= self._next_hour_ms:
                    # The ended hour's tallies must be in the store before the roll reads them.
                    self._collect(now_ms)
                    await self.flush_async()
                    if not self._unsaved:
                        self.on_hour(now_ms)
                self.ingest(now_ms)
                self._collect(now_ms)
                await self.flush_async()
            except StoreError as e:
                self.warn_repeated("job_store_failed", job="tick", error=str(e))
            except Exception:
                self.log.exception("job_failed", job="tick")

    def ingest(self, now_ms: int) -> int:
        """Feed new MTA-log and complaint events to the engine as `report`s; how many went."""
        if self.feedback is None:
            return 0
        lines = [line for e in self.feedback.poll(now_ms) if (line := report_line(e))]
        data = b"".join(lines)
        while data:
            served = self.engine.serve(data, now_ms)
            data = data[served.consumed :]
            if served.consumed == 0:
                break
        return len(lines)

    def on_hour(self, now_ms: int) -> None:
        """An hour began: ramps whose day ended roll, then this hour's limits are pushed.
        Idempotent: a second call for the same hour does nothing."""
        if now_ms < self._next_hour_ms:
            return
        self.flush(now_ms)
        self.roll_days(now_ms)
        self.apply_plan(now_ms)

    def flush(self, now_ms: int, *, final: bool = False) -> None:
        """Take what the engine and the guard hold and write it, in the calling thread
        (start-up, shutdown, tests). StoreError: nothing is lost; it stays for the next write.

        `final`: nothing will be granted after this (the sockets are closed), so the snapshot
        holds the exact counters, with no reservation for a restart to charge."""
        self._collect(now_ms, final=final)
        error = self._write_now()
        if error is not None:
            raise error

    def _write_now(self) -> StoreError | None:
        """Write what is unsaved in the calling thread; the error that stopped it, if any
        (logged; the batches wait for the next write)."""
        self._unsaved = _merged(self._unsaved)
        written, error = self._write(list(self._unsaved))
        self._settled(written, error)
        return error

    async def flush_async(self) -> None:
        """Write what earlier flushes took, on the store thread (the loop goes on serving).
        A failure is logged and the batches wait for the next try."""
        if not self._unsaved:
            return
        self._unsaved = _merged(self._unsaved)
        batches = list(self._unsaved)
        loop = asyncio.get_running_loop()
        if self._store_thread is None:
            written, error = self._write(batches)
        else:
            written, error = await loop.run_in_executor(self._store_thread, self._write, batches)
        self._settled(written, error)

    def _write(self, batches: list[_Unsaved]) -> tuple[int, StoreError | None]:
        """Write `batches` in order (any thread: touches only the store); how many went, and
        the error that stopped the rest."""
        for i, b in enumerate(batches):
            try:
                b.write(self.store)
            except StoreError as e:
                return i, e
        return len(batches), None

    def _settled(self, written: int, error: StoreError | None) -> None:
        """Forget what was written; warn (at most every few seconds) about what was not."""
        token = next((b.token for b in reversed(self._unsaved[:written]) if b.token), None)
        if token is not None:
            # The snapshot is durable: the engine may grant up to its reservations.
            self.engine.commit_reservation(token, self.config.snapshot_interval_ms)
        del self._unsaved[:written]
        if error is None:
            if self._store_error is not None:
                self.log.warning("store_recovered", previous_error=self._store_error)
                self._store_error = None
            return
        self._store_error = str(error)
        self.warn_repeated(
            "store_write_failed",
            error=str(error),
            unsaved_batches=len(self._unsaved),
            hint="tallies, reports and decisions are kept in memory until a write succeeds",
        )

    def _collect(self, now_ms: int, *, final: bool = False) -> None:
        """Take tallies, reports and decisions from the engine and the guard, and queue them
        with a counter snapshot for the store (on the engine's thread).

        Tallies since the last flush belong to the hour the daemon has not rolled yet, so
        traffic before midnight counts for the day that ended even if this runs after it.
        """
        counts: dict[tuple[str, str], DayCounts] = {}
        for (
            ip,
            provider,
            granted,
            delivered,
            deferred,
            bounced,
            complaints,
        ) in self.engine.take_tallies():
            counts[(ip, provider)] = DayCounts(granted, delivered, deferred, bounced, complaints)
        reports = self.engine.take_reports()
        self.recent_reports.extend(reports)
        acted = self.guard.on_reports(reports, self._classify, now_ms)
        acted += self.guard.expire(now_ms)
        for e in acted:
            self._log_entry(e, "warning")
        if acted:
            self.guard.enforce(self.engine, self.states, now_ms)
        entries, self._pending_log = self._pending_log + acted, []
        pushback, self.guard.pending_pushback = self.guard.pending_pushback, {}
        meta = {}
        signals = json.dumps(self.guard.signals.to_json(), sort_keys=True)
        if signals != self._signals_saved:
            meta[_SIGNALS_KEY.format(plan=self.plan.name)] = self._signals_saved = signals
        if self.feedback is not None:
            marks = json.dumps(
                {k: v.to_dict() for k, v in self.feedback.checkpoints().items() if v is not None},
                sort_keys=True,
            )
            if marks != self._feedback_saved:
                key = _FEEDBACK_KEY.format(plan=self.plan.name, node=self.config.node)
                meta[key] = self._feedback_saved = marks
        # Reserve ahead: until this snapshot is durable and the next one too, no key may be
        # granted past what the store will say it used (docs/core.md, "Reservations").
        token: int | None = None
        if final:
            snapshot = self.engine.snapshot_bytes()
        else:
            snapshot, token = self.engine.reservation_snapshot(
                now_ms, _RESERVE_INTERVALS * self.config.snapshot_interval_ms
            )
        self._unsaved.append(
            _Unsaved(
                now_ms=now_ms,
                day=_local_day(self.plan, min(now_ms, self._next_hour_ms - 1)),
                plan=self.plan.name,
                snapshot=snapshot,
                token=token,
                counts=counts,
                entries=entries,
                pushback=pushback,
                automations=self.guard.dirty(),
                meta=meta,
            )
        )

    def warn_repeated(self, event: str, **fields: Any) -> None:
        """Log `event` at most once every few seconds, with how often it happened since."""
        now = self.clock.now_ms() / 1000
        last, count = self._warned.get(event, (-_WARN_EVERY_S, 0))
        if now - last >= _WARN_EVERY_S:
            self.log.warning(event, times=count + 1, **fields)
            self._warned[event] = (now, 0)
        else:
            self._warned[event] = (last, count + 1)

    async def poll_source(self, name: str) -> bool:
        """Poll one signal source; pause or resume IPs on what it says. True: a good reading."""
        good = await self.poller.poll(name, self.guard.signals, self.clock.now_ms())
        now_ms = self.clock.now_ms()
        acted = self.guard.on_signals(now_ms)
        for e in acted:
            self._log_entry(e, "warning")
        self._pending_log += acted
        if acted:
            self.guard.enforce(self.engine, self.states, now_ms)
            if self._job_lock is not None:  # serving: save the pause or resume at once
                async with self._job_lock:
                    self._collect(self.clock.now_ms())
                    await self.flush_async()
        return good

    def _classify(
        self, provider: str, code: int | None, enhanced: str | None, text: str
    ) -> tuple[str, str, str] | None:
        """(class, scope, rule) of a remote reply; None for unclassified and MTA-internal ones."""
        # `default` stands for every provider without its own plan row (Yahoo, Apple, ...):
        # every rule may apply, or their provider rules would never fire.
        who = None if provider == DEFAULT_PROVIDER else provider
        found = self.engine.classify(who, code, enhanced, text)
        if found is None or found[0] == "internal" or found[1] is None or found[2] is None:
            return None
        return found[0], found[1], found[2]

    def roll_days(self, now_ms: int) -> list[RampMove]:
        """Roll every local day that ended since the last roll (idempotent; catches up).
        The caller pushes the new positions' limits with `apply_plan`."""
        key = _ROLLED_KEY.format(plan=self.plan.name)
        last = date.fromisoformat(self.store.get_meta(key) or "1970-01-01")
        today = _local_day(self.plan, now_ms)
        moves: list[RampMove] = []
        day = last + timedelta(days=1)
        while day < today:
            moves += self._roll(day, now_ms, {key: day.isoformat()})
            day += timedelta(days=1)
        return moves

    def _roll(self, day: date, now_ms: int, meta: dict[str, str]) -> list[RampMove]:
        """Decide one finished day for every ramp; save positions, `meta` and the moves'
        log entries in one transaction, so a crash never rolls a day twice."""
        counts = self.store.counts(day)
        evidence: dict[tuple[str, str], DayEvidence] = {}
        for name, batch in self.plan.batches.items():
            for provider in plan_providers(self.plan):
                rows = [counts.get((ip, provider), DayCounts()) for ip in batch.ips]
                evidence[(name, provider)] = DayEvidence(
                    granted=sum(r.granted for r in rows),
                    delivered=sum(r.delivered for r in rows),
                    deferred=sum(r.deferred for r in rows),
                    bounced=sum(r.bounced for r in rows),
                    complaints=sum(r.complaints for r in rows),
                )
        verdicts = self.guard.verdicts(day, evidence, self.store.pushback(day), now_ms)
        states, moves = roll_day(
            self.plan,
            day,
            self.states,
            evidence,
            holds={k: v.hold for k, v in verdicts.items()},
            step_downs={k: v.step_down for k, v in verdicts.items()},
            pauses={k: v.pause for k, v in verdicts.items()},
        )
        acted = self.guard.after_roll(verdicts, moves, now_ms)
        entries = [
            LogEntry(
                now_ms,
                "ramp",
                f"{m.batch}/{m.provider}",
                m.action,
                m.reason,
                {"day": day.isoformat(), "from_step": m.from_step, "to_step": m.to_step}
                | m.evidence,
            )
            for m in moves
        ] + acted
        self.store.save_positions(
            self.plan.name,
            {k: _stored(s) for k, s in states.items()},
            now_ms,
            meta=meta,
            entries=entries,
            automations=self.guard.dirty(),
        )
        self.states = states
        for e in entries:
            level = (
                "warning"
                if e.action in ("step_down", "pause") or e.kind == "automation"
                else "info"
            )
            self._log_entry(e, level)
        return moves

    def record(
        self,
        now_ms: int,
        kind: str,
        subject: str,
        action: str,
        reason: str,
        evidence: dict[str, Any],
        level: str = "info",
    ) -> None:
        """Log a state-changing decision and queue it for the decision log."""
        entry = LogEntry(now_ms, kind, subject, action, reason, evidence)
        self._log_entry(entry, level)
        self._pending_log.append(entry)

    def _log_entry(self, e: LogEntry, level: str = "info") -> None:
        """Write a decision-log entry to the process log too, with its evidence."""
        fields = {
            k if k not in {"event", "level", "kind", "subject", "action"} else f"evidence_{k}": v
            for k, v in e.evidence.items()
        }
        getattr(self.log, level)(
            e.reason, kind=e.kind, subject=e.subject, action=e.action, **fields
        )

    # ----- reload -----

    def _read_plan(self) -> tuple[Plan, RuleSet]:
        """The plan file and its rule files, read and checked; touches no engine, so it runs
        off the loop (ScheduleError, OSError)."""
        plan = load_plan(self.config.plan_path)
        return plan, self._read_rules(plan)

    def reload(self, now_ms: int) -> dict[str, Any]:
        """Re-read the plan in the calling thread, swap it in only if valid, and write the
        result (tests; the serving daemon uses `reload_async`)."""
        try:
            plan, rules = self._read_plan()
        except _PLAN_ERRORS as e:
            reply = self._reload_failed(e, now_ms)
        else:
            reply = self._swap(plan, rules, now_ms)
        self._write_now()
        return reply

    async def reload_async(self) -> dict[str, Any]:
        """Re-read the plan on a worker thread, swap it in on the loop only if valid, write
        the result on the store thread. Returns the reply for `kiln reload`."""
        assert self._job_lock is not None
        async with self._job_lock:
            try:
                plan, rules = await asyncio.to_thread(self._read_plan)
            except _PLAN_ERRORS as e:
                reply = self._reload_failed(e, self.clock.now_ms())
            else:
                reply = self._swap(plan, rules, self.clock.now_ms())
            await self.flush_async()
            return reply

    def _reload_failed(self, e: BaseException, now_ms: int) -> dict[str, Any]:
        """Keep the running plan; log and answer the problems."""
        problems = [str(p) for p in e.problems] if isinstance(e, ScheduleError) else [str(e)]
        if isinstance(e, RecursionError):
            problems = [f"{self.config.plan_path}: nested too deeply to read"]
        self.record(
            now_ms,
            "reload",
            "plan",
            "reload_failed",
            "the plan has errors; the running plan stays",
            {"problems": problems},
            level="error",
        )
        self._collect(now_ms)
        return {
            "ok": False,
            "error": "the plan has errors; the running plan stays",
            "problems": problems,
        }

    def _swap(self, plan: Plan, rules_read: RuleSet, now_ms: int) -> dict[str, Any]:
        """Put a read and checked plan in force (on the engine's thread)."""
        try:
            rules = self._compile_rules(rules_read)
        except ScheduleError as e:
            return self._reload_failed(e, now_ms)
        self._collect(now_ms)  # what was counted under the old plan goes under its name
        old = self.plan.name
        old_sources = {n: self.poller.interval_ms(n) for n in self.poller.configured()}
        self.plan = plan
        self.guard.replan(plan, rules)
        self.poller.replan(plan)
        if plan.name != old:
            loaded = self.store.load_positions(plan.name)
            self.states = {k: _state(p) for k, p in loaded.items()}
            self.guard = Guard(plan, rules)
            self._load_guard(now_ms)
            self._mark_start(now_ms)
        else:
            self._load_feedback()
        self.apply_plan(now_ms)
        if self.lookups is not None:  # the provider table may have changed
            self.lookups.close()
            self.lookups = self._make_lookups()
        self._schedule_signals(keep=old_sources)
        self.record(
            now_ms,
            "reload",
            "plan",
            "reloaded",
            f"plan {plan.name!r} is in force",
            {"plan": str(self.config.plan_path), "previous": old},
        )
        self._collect(now_ms)
        return {"ok": True, "plan": plan.name}

    # ----- upcalls: operator requests answered in Python -----

    def upcall(self, line: bytes, now_ms: int) -> dict[str, Any]:
        """Answer a request the core handed back (`status`, `limits`, `reload`, `stats`)."""
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "invalid JSON"}
        op = req.get("op")
        handlers: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
            "status": lambda _r, t: self.status(t),
            "limits": self.limits,
            "reload": lambda _r, t: self.reload(t),
            "stats": lambda _r, t: self.stats(t),
            "automations": self.automations,
            "cancel": self.cancel,
            "explain": self.explain,
        }
        try:
            reply = handlers[op](req, now_ms)
        except _RequestError as e:
            reply = {"ok": False, "error": str(e)}
        if "id" in req:
            reply = {"id": req["id"], **reply}
        return reply

    async def upcall_async(self, line: bytes) -> dict[str, Any]:
        """Answer an upcall as the serving daemon does: store reads on the store thread, the
        plan read on a worker thread, state changes one job at a time; the loop goes on
        answering every other client meanwhile."""
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "invalid JSON"}
        op = req.get("op")
        try:
            if op == "reload":
                return await self.reload_async()
            if op == "cancel":
                assert self._job_lock is not None
                async with self._job_lock:
                    reply = self.cancel(req, self.clock.now_ms())
                    await self.flush_async()
                    return reply
            if op == "explain":
                return await self.explain_async(req)
        except _RequestError as e:
            return {"ok": False, "error": str(e)}
        return self.upcall(line, self.clock.now_ms())

    def status(self, now_ms: int) -> dict[str, Any]:
        """Every batch x provider: step, state, caps per IP and what was used."""
        ramps = []
        today = _local_day(self.plan, now_ms)
        for name, batch in self.plan.batches.items():
            schedule = self.plan.schedules[batch.schedule]
            for provider in plan_providers(self.plan):
                s = self.states.get((name, provider), RampState())
                caps, state = caps_at(self.plan, name, provider, s.step)
                usage = [self.engine.usage(self.engine.key(ip, provider)) for ip in batch.ips]
                started = batch.start_date <= today
                ramps.append(
                    {
                        "batch": name,
                        "pool": batch.pool,
                        "provider": provider,
                        "state": "paused" if s.paused else (state if started else "not_started"),
                        "step": s.step,
                        "steps": len(steps_for(schedule, provider)),
                        "ips": list(batch.ips),
                        "daily_cap": caps.daily_cap,
                        "hourly_cap": usage[0]["hourly_cap"] if usage else None,
                        "day_cap_total": day_cap(self.plan, name, provider, s.step),
                        "day_used": sum(u["day_used"] for u in usage),
                        "hour_used": sum(u["hour_used"] for u in usage),
                        "idle_days": s.idle_days,
                        "days_without_advance": s.days_without_advance,
                    }
                )
        return {
            "ok": True,
            "plan": self.plan.name,
            "now_ms": now_ms,
            "timezone": self.plan.timezone,
            "ramps": ramps,
            "daemon": self.health(),
        }

    def health(self) -> dict[str, Any]:
        """The process's own state: loop stalls, connections, unsaved store batches."""
        try:
            loop_time = asyncio.get_running_loop().time()
        except RuntimeError:
            loop_time = 0.0
        return {
            "loop": self.monitor.figures(loop_time).to_json(),
            "connections": self.connections,
            "max_connections": self.max_connections,
            "unsaved_batches": len(self._unsaved),
            "store_error": self._store_error,
            "watchdog": self.notifier.watchdog_s is not None,
        }

    def limits(self, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """The caps in force for one (IP, provider or domain), what is used, and its ramp."""
        ip = req.get("ip")
        if not isinstance(ip, str):
            raise _RequestError("ip: missing or not a string")
        provider = req.get("provider")
        domain = req.get("domain")
        if (provider is None) == (domain is None):
            raise _RequestError("give domain or provider (one of them)")
        if domain is not None:
            if not isinstance(domain, str):
                raise _RequestError("domain: must be a string")
            try:
                provider = self.engine.route(domain, now_ms)
            except _core.CoreError as e:
                raise _RequestError(str(e)) from None
            if provider is None:
                return {"ok": True, "ip": ip, "provider": None, "reason": "null_mx"}
        if not isinstance(provider, str) or provider not in plan_providers(self.plan):
            raise _RequestError(
                f"provider: unknown provider {provider!r}, expected one of "
                + ", ".join(plan_providers(self.plan))
            )
        batch = next((n for n, b in self.plan.batches.items() if ip in b.ips), None)
        try:
            u = self.engine.usage(self.engine.key(ip, provider))
        except _core.CoreError as e:
            raise _RequestError(str(e)) from None
        rate = (
            str(RateSpec(u["rate_count"], u["rate_period_ms"], u["max_burst"]))
            if u["rate_count"]
            else None
        )
        out: dict[str, Any] = {
            "ok": True,
            "ip": ip,
            "provider": provider,
            "batch": batch,
            "hourly_cap": u["hourly_cap"],
            "daily_cap": u["daily_cap"],
            "rate": rate,
            "hour_used": u["hour_used"],
            "day_used": u["day_used"],
            "paused": u["paused"],
            "multiplier": u["multiplier"],
            "suspended_until_ms": u["suspended_until_ms"] or None,
        }
        if batch is not None:
            s = self.states.get((batch, provider), RampState())
            _, state = caps_at(self.plan, batch, provider, s.step)
            if self.plan.batches[batch].start_date > _local_day(self.plan, now_ms):
                state = "not_started"
            out |= {"step": s.step, "state": "paused" if s.paused else state}
        else:
            out |= {"step": None, "state": "warm"}
        return out

    def automations(self, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """Live automations (`"all": true`: also those ended in the last three days)."""
        everything = req.get("all", False)
        if not isinstance(everything, bool):
            raise _RequestError("all: must be true or false")
        return {"ok": True, "automations": self.guard.listing(now_ms, everything)}

    def cancel(self, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """End an automation early; a cancelled step-down gives its steps back."""
        automation_id = req.get("automation")
        if not isinstance(automation_id, str):
            raise _RequestError("automation: missing or not a string (an id such as A12)")
        who = req.get("by", "an operator")
        if not isinstance(who, str) or len(who) > 200:
            raise _RequestError("by: must be a short string")
        try:
            a, entry = self.guard.cancel(automation_id, now_ms, who)
        except (KeyError, ValueError) as e:
            raise _RequestError(str(e.args[0])) from None
        entries = [entry]
        if a.kind == "step_down" and a.batch is not None and a.provider is not None:
            key = (a.batch, a.provider)
            s = self.states.get(key, RampState())
            if a.from_step is not None and s.step == a.to_step:
                self.states[key] = dataclasses.replace(s, step=a.from_step)
                try:
                    self.store.save_positions(
                        self.plan.name, {key: _stored(self.states[key])}, now_ms
                    )
                except StoreError as e:
                    # The cancel holds in memory; the position is saved at the next roll.
                    self.warn_repeated("store_write_failed", error=str(e), during="cancel")
        self._pending_log += entries
        self._log_entry(entry, "warning")
        self.apply_plan(now_ms)
        self._collect(now_ms)
        return {"ok": True, "automation": a.to_json()}

    def _explain_key(self, req: dict[str, Any]) -> tuple[str, str, str | None]:
        """(ip, provider, batch) of an `explain` request, checked."""
        ip = req.get("ip")
        provider = req.get("provider")
        if not isinstance(ip, str):
            raise _RequestError("ip: missing or not a string")
        if not isinstance(provider, str) or provider not in plan_providers(self.plan):
            raise _RequestError(
                f"provider: unknown provider {provider!r}, expected one of "
                + ", ".join(plan_providers(self.plan))
            )
        try:
            self.engine.key(ip, provider)
        except _core.CoreError as e:
            raise _RequestError(str(e)) from None
        return ip, provider, self.guard.policy.batch_of(ip)

    def _ramp_moves(self, batch: str | None, provider: str, now_ms: int) -> list[Any]:
        """The ramp's moves of the last three days, from the store (any thread)."""
        if batch is None:
            return []
        return self.store.decisions(
            kind="ramp", subject=f"{batch}/{provider}", since_ms=now_ms - 3 * 86_400_000
        )

    def explain(self, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """Why one (IP, provider) key has the limit it has right now."""
        ip, provider, batch = self._explain_key(req)
        moves = self._ramp_moves(batch, provider, now_ms)
        return self.guard.explain(
            self.engine, self.states, ip, provider, now_ms, _local_day(self.plan, now_ms), moves
        )

    async def explain_async(self, req: dict[str, Any]) -> dict[str, Any]:
        """`explain` with the store read on the store thread."""
        now_ms = self.clock.now_ms()
        ip, provider, batch = self._explain_key(req)
        loop = asyncio.get_running_loop()
        moves = await loop.run_in_executor(
            self._store_thread, self._ramp_moves, batch, provider, now_ms
        )
        now_ms = self.clock.now_ms()
        return self.guard.explain(
            self.engine, self.states, ip, provider, now_ms, _local_day(self.plan, now_ms), moves
        )

    def stats(self, now_ms: int) -> dict[str, Any]:
        """Protocol counters and process facts."""
        return {
            "ok": True,
            "uptime_ms": now_ms - self.started_ms,
            "keys": self.engine.key_count(),
            "routes": self.engine.route_count(),
            **self.engine.wire_stats(),
            **(self.lookups.stats() if self.lookups is not None else MxLookups.idle_stats()),
        }

    # ----- domains -----

    def _make_resolver(self) -> MxResolver | None:
        """An MX resolver for the plan's provider table, or None without any nameserver."""
        table = ProviderTable.from_plan(self.plan)
        try:
            hosts, port = parse_nameservers(self.config.nameservers)
        except dns.resolver.NoResolverConfiguration:
            self.log.warning("no nameserver configured: unknown domains count as default")
            return None
        # The engine's route table caches answers; the resolver's cache only saves repeat queries.
        return MxResolver(table, hosts, port=port, max_entries=20_000)

    def _make_lookups(self) -> MxLookups | None:
        """Bounded background lookups through a fresh resolver, or None without one."""
        resolver = self._make_resolver()
        if resolver is None:
            return None
        own = set(plan_providers(self.plan))

        def on_route(domain: str, provider: str | None, expires_ms: int) -> None:
            """An answer becomes a route until its TTL runs out (on the loop). A CoreError
            goes to MxLookups, which counts it and logs it once per domain, rate-limited."""
            route = None if provider is None or provider == NULL_MX else self.fold(provider, own)
            self.engine.set_route(domain, route, expires_ms)

        return MxLookups(resolver, on_route, self.clock.now_ms)

    async def resolve_pending(self) -> None:
        """Queue MX lookups of domains the engine saw without a route (never blocks serving;
        at most a bounded number wait or run, see `MxLookups`)."""
        domains = self.engine.take_unresolved()  # drained even without a nameserver
        if self.lookups is not None:
            self.lookups.feed(domains)

    # ----- serving -----

    async def serve_forever(self) -> None:
        """Listen, run the jobs, and stop cleanly on SIGTERM/SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._job_lock = asyncio.Lock()
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-store")
        loop.set_exception_handler(self._loop_exception)
        self.lookups = self._make_lookups()
        backlog = _listen_backlog()
        self._server = await self._listen(self.config.socket, operator=False, backlog=backlog)
        _set_socket_access(self.config.socket, self.config.socket_mode, self.config.socket_group)
        self._operator_server = await self._listen(
            self.config.operator_socket, operator=True, backlog=backlog
        )
        _set_socket_access(self.config.operator_socket, self.config.operator_socket_mode, None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        # Every job is a coroutine: apscheduler runs those on the loop, never on a worker
        # thread (the engine is pinned to the loop's thread and would refuse one).
        self._scheduler = AsyncIOScheduler(event_loop=loop, timezone=self.plan.zone)
        self._scheduler.add_job(
            self.tick_job,
            IntervalTrigger(seconds=self.config.snapshot_interval_ms / 1000),
            id="flush",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self.resolve_pending,
            IntervalTrigger(seconds=0.2),
            id="mx",
            max_instances=1,
            coalesce=True,
        )
        self._schedule_signals()
        self._scheduler.start()
        _ = self.spawn(self.monitor.run())
        _ = self.spawn(self.notifier.feed(self._engine_answers))
        self.log.info(
            "listening",
            socket=str(self.config.socket),
            operator_socket=str(self.config.operator_socket),
            database=self.store.target,
            plan=self.plan.name,
            backlog=backlog,
            max_connections=self.max_connections,
            watchdog_s=self.notifier.watchdog_s,
        )
        # What start-up built lives as long as the process: keep it out of the cyclic
        # collector's full passes, whose pause grows with every object they walk (a full
        # pass over a started daemon took ~30 ms on a 2-core VM). Done once: objects frozen
        # and later dropped in cycles would never be freed.
        gc.freeze()
        self.notifier.notify("READY=1")
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    async def _listen(self, path: Path, *, operator: bool, backlog: int) -> asyncio.AbstractServer:
        """A Unix socket server at `path` (a stale socket file is replaced)."""
        _prepare_socket_path(path)
        return await asyncio.get_running_loop().create_unix_server(
            lambda: NativeProtocol(self, operator=operator), str(path), backlog=backlog
        )

    def _reload_on_signal(self) -> None:
        """SIGHUP: reload as a task (the reply goes to the log and the decision log)."""
        _ = self.spawn(self.reload_async())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task on the loop, kept until it ends; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished task; log how it failed, if it did."""
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            self.log.error("task_failed", task=task.get_name(), error=repr(e))

    def _engine_answers(self) -> bool:
        """A real engine call on the loop (a `ping` through the wire protocol): the watchdog
        is fed only when it answers."""
        try:
            served = self.engine.serve(b'{"op":"ping"}\n', self.clock.now_ms())
        except _core.CoreError:
            return False
        return served.reply == b'{"ok":true}\n'

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors the loop reports (accept failures at the open-files limit among them) go to
        kiln's log, repeated ones at most every few seconds."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            self.warn_repeated(
                "accept_failed",
                error=str(exc),
                hint="out of file descriptors or memory; open connections are still served",
            )
            return
        self.log.error(
            "loop_error", message=str(context.get("message")), error=repr(exc) if exc else None
        )

    def _schedule_signals(self, keep: dict[str, int] | None = None) -> None:
        """One polling job per configured signal source. A reload keeps the schedule of every
        source whose interval did not change (`keep`: name -> interval before); new or changed
        sources poll now."""
        if self._scheduler is None:
            return
        wanted = {f"signal:{n}": n for n in self.poller.configured()}
        kept = set()
        for job in self._scheduler.get_jobs():
            if not job.id.startswith("signal:"):
                continue
            name = wanted.get(job.id)
            if (
                keep is not None
                and name is not None
                and keep.get(name) == self.poller.interval_ms(name)
            ):
                kept.add(job.id)
            else:
                job.remove()
        for job_id, name in wanted.items():
            if job_id in kept:
                continue
            self._scheduler.add_job(
                self.poll_source,
                IntervalTrigger(seconds=self.poller.interval_ms(name) / 1000),
                args=[name],
                id=job_id,
                max_instances=1,
                coalesce=True,
                next_run_time=datetime.now(tz=UTC),
            )

    async def shutdown(self) -> None:
        """Stop listening, write a final snapshot, remove the sockets."""
        self.notifier.notify("STOPPING=1")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for task in list(self._tasks):
            task.cancel()
        await self.poller.aclose()
        for server in (self._server, self._operator_server):
            if server is not None:
                server.close()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 2)
        self._server = self._operator_server = None
        if self.lookups is not None:
            await self.lookups.aclose()
            self.lookups = None
        now_ms = self.clock.now_ms()
        if self.feedback is not None:
            self._collect(now_ms)  # keep where the log readers got to
            self.feedback.close()
            self.feedback = None
        self.record(now_ms, "stop", "daemon", "stop", "kiln stopped cleanly", {})
        try:
            self.flush(now_ms, final=True)
        except StoreError as e:
            self.log.error("final_flush_failed", error=str(e), unsaved_batches=len(self._unsaved))
        if self._store_thread is not None:
            self._store_thread.shutdown(wait=True)
            self._store_thread = None
        self.store.close()
        self.notifier.close()
        for path in (self.config.socket, self.config.operator_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.log.info("stopped")

    def stop(self) -> None:
        """Ask `serve_forever` to return (from the loop's thread)."""
        if self._stopping is not None:
            self._stopping.set()


#: What reading a plan may raise; every one keeps the running plan.
_PLAN_ERRORS = (ScheduleError, OSError, RecursionError, UnicodeError, ValueError, MemoryError)


class _RequestError(Exception):
    """A bad operator request: becomes `{"ok": false, "error": ...}`."""


class NativeProtocol(asyncio.Protocol):
    """One client of a native socket. Python moves bytes; `Engine.serve` answers them.

    Input is scanned once: a read without a newline is only appended, so a client dripping
    a long line costs O(n), not a rescan per read. An operator request (an upcall) is answered
    as a task: this connection's later requests wait for it (replies stay in order), every
    other connection goes on being served. On the MTA socket (`operator=False`) operator
    requests are refused with an error reply.
    """

    def __init__(self, daemon: Daemon, *, operator: bool = True) -> None:
        self.daemon = daemon
        self.operator = operator
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # an upcall is being answered; input waits in `buffer`
        self.write_paused = False
        self.eof = False
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and bound its write buffer; refuse past the connection limit."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        d = self.daemon
        if d.connections >= d.max_connections:
            d.warn_repeated(
                "connection_refused",
                limit=d.max_connections,
                hint="at the connection limit (--max-connections); open ones are still served",
            )
            transport.write(b'{"ok":false,"error":"too many connections; try again"}\n')
            transport.close()
            return
        d.connections += 1
        self.counted = True
        transport.set_write_buffer_limits(high=_HIGH_WATER_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        """Count the connection out."""
        if self.counted:
            self.daemon.connections -= 1
            self.counted = False

    def data_received(self, data: bytes) -> None:
        """Answer every complete line; keep a partial one for the next read."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.busy or b"\n" not in data:
            self.buffer += data
            if not self.busy and len(self.buffer) > _core.MAX_LINE_BYTES:
                self._too_long(transport)
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
            self.buffer = bytearray()
        self._serve(data)

    def _serve(self, buf: bytes) -> None:
        """Answer what `buf` holds, up to the first upcall (answered as a task)."""
        transport = self.transport
        assert transport is not None
        engine = self.daemon.engine
        clock = self.daemon.clock
        while True:
            served = engine.serve(buf, clock.now_ms())
            if served.reply:
                transport.write(served.reply)
            if served.too_long:
                self._too_long(transport)
                return
            buf = buf[served.consumed :]
            if served.upcall is None:
                break
            if not self.operator and _op_of(served.upcall) not in MTA_UPCALL_OPS:
                transport.write(_refusal(served.upcall))
                continue
            self.busy = True
            self.buffer = bytearray(buf)
            transport.pause_reading()
            _ = self.daemon.spawn(self._answer(served.upcall))
            return
        if len(buf) > _core.MAX_LINE_BYTES:
            self._too_long(transport)
            return
        self.buffer = bytearray(buf)

    def _too_long(self, transport: asyncio.Transport) -> None:
        """A line past the limit: say so and close."""
        transport.write(b'{"ok":false,"error":"request line longer than 65536 bytes; closing"}\n')
        transport.close()
        self.buffer = bytearray()

    async def _answer(self, line: bytes) -> None:
        """Answer one upcall, then go on with what this client sent meanwhile."""
        try:
            out = await self.upcall_async(line)
        except Exception:
            self.daemon.log.exception("upcall_failed")
            out = b'{"ok":false,"error":"internal error; see the daemon log"}\n'
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out)
        self.busy = False
        rest = bytes(self.buffer)
        self.buffer = bytearray()
        if rest:
            self._serve(rest)
        if self.busy or transport.is_closing():
            return
        if self.eof:
            transport.close()
        elif not self.write_paused:
            transport.resume_reading()

    async def upcall_async(self, line: bytes) -> bytes:
        """The reply line to an upcall as the serving daemon answers it, `id` echoed."""
        raw_id, rest = _split_id(line)
        try:
            reply = await self.daemon.upcall_async(rest)
        except RecursionError:
            reply = {"ok": False, "error": "request nested too deeply"}
        return _with_id(raw_id, reply)

    def upcall(self, line: bytes, now_ms: int) -> bytes:
        """The reply line to a request the core handed back, its `id` echoed as written,
        answered in the calling thread (tests).

        `Daemon.upcall` never sees the `id`: Python's JSON would turn `1e999` into
        `Infinity` and `1E2` into `100.0`, and a deeply nested id would not parse at all.
        """
        raw_id, rest = _split_id(line)
        try:
            reply = self.daemon.upcall(rest, now_ms)
        except RecursionError:
            reply = {"ok": False, "error": "request nested too deeply"}
        return _with_id(raw_id, reply)

    def eof_received(self) -> bool:
        """A client that closed its side gets the rest of its replies, then we close."""
        if self.busy:
            self.eof = True
            return True  # `_answer` closes once the pending reply is written
        return False

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading until it catches up."""
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again (unless an upcall is still pending)."""
        self.write_paused = False
        if self.transport is not None and not self.busy:
            self.transport.resume_reading()


def _with_id(raw_id: bytes | None, reply: dict[str, Any]) -> bytes:
    """A reply line with the request's `id` as the client wrote it, first."""
    body = json.dumps(reply, separators=(",", ":")).encode()
    if raw_id is None:
        return body + b"\n"
    return b'{"id":' + raw_id + b"," + body[1:] + b"\n"


def _op_of(line: bytes) -> str | None:
    """The `op` of a request line the core checked and handed back."""
    try:
        op = json.loads(_split_id(line)[1]).get("op")
    except (ValueError, RecursionError):
        return None
    return op if isinstance(op, str) else None


def _refusal(line: bytes) -> bytes:
    """The MTA socket's reply to an operator request."""
    raw_id, _ = _split_id(line)
    op = _op_of(line)
    return _with_id(
        raw_id,
        {
            "ok": False,
            "error": f"op {op}: an operator operation, answered on the operator socket only "
            "(STATE_DIR/operator.sock)",
        },
    )


def _string_end(line: bytes, start: int) -> int:
    """Just past the JSON string whose opening quote is at `start`."""
    i = start + 1
    while True:
        quote = line.index(b'"', i)
        backslashes = quote
        while line[backslashes - 1] == 0x5C:  # a quote after an odd run of \\ is escaped
            backslashes -= 1
        if (quote - backslashes) % 2 == 0:
            return quote + 1
        i = quote + 1


def _value_end(line: bytes, start: int) -> int:
    """Just past the JSON value at `start` (iterative: any depth)."""
    i, depth = start, 0
    while True:
        c = line[i]
        if c == 0x22:  # "
            i = _string_end(line, i)
        elif c in b"[{":
            depth += 1
            i += 1
            continue
        elif c in b"]}":
            depth -= 1
            i += 1
        elif c in b" \t\r\n,:":  # only met inside a container
            i += 1
            continue
        else:  # a number, true, false or null
            while i < len(line) and line[i] not in b" \t\r\n,]}":
                i += 1
        if depth == 0:
            return i


def _space_end(line: bytes, i: int) -> int:
    """The first index at or after `i` that is not JSON whitespace."""
    while i < len(line) and line[i] in b" \t\r\n":
        i += 1
    return i


def _split_id(line: bytes) -> tuple[bytes | None, bytes]:
    """(the `id` value as written or None, the line without it) of a request line the core
    has checked: one JSON object with no repeated field."""
    members: list[bytes] = []
    raw_id = None
    i = _space_end(line, line.index(b"{") + 1)
    while line[i] != 0x7D:  # }
        key_end = _string_end(line, i)
        value_start = _space_end(line, _space_end(line, key_end) + 1)  # past the colon
        value_end = _value_end(line, value_start)
        if json.loads(line[i:key_end]) == "id":
            raw_id = line[value_start:value_end]
        else:
            members.append(line[i:value_end])
        i = _space_end(line, value_end)
        if line[i] == 0x2C:  # ,
            i = _space_end(line, i + 1)
    return raw_id, b"{" + b",".join(members) + b"}"


def _raise_open_files_limit(log: Any) -> None:
    """Raise the soft limit on open files to the hard one (at most 65,536): each client
    connection holds one, and the usual soft default of 1,024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open_files_limit_raised", soft_before=soft, soft=target, hard=hard)


#: accept() failures that mean "out of descriptors or memory", not a bad client.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _listen_backlog(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int:
    """The kernel's listen backlog limit (asyncio's default of 100 makes a burst of clients
    see EAGAIN); 4,096 where it cannot be read."""
    try:
        return max(128, int(path.read_text().strip()))
    except (OSError, ValueError):
        return 4_096


def _connection_limit() -> int:
    """Connections at most: the open-files limit less what the daemon needs itself."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65_536
    return max(16, soft - _RESERVED_FDS)


def _refuse_if_answered(path: Path) -> bool:
    """KilnError if a daemon answers on the socket at `path`; True if a stale socket file is
    there (left by a daemon that was killed)."""
    if len(str(path).encode()) > 107:
        raise KilnError(f"socket path is too long for a Unix socket (max 107 bytes): {path}")
    if not (path.exists() or path.is_symlink()):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return True
    else:
        raise KilnError(f"another kiln daemon is listening on {path}")
    finally:
        probe.close()


def _prepare_socket_path(path: Path) -> None:
    """Make the folder; remove a stale socket, refuse if another daemon answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _refuse_if_answered(path):
        path.unlink()


def _set_socket_access(path: Path, mode: int, group: str | None) -> None:
    """Apply the configured mode and group to the socket file."""
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KilnError(f"socket group {group!r} does not exist") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def run(config: DaemonConfig, clock: Clock | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code."""
    log = get_logger(component="daemon")
    # State files: owner read-write, group read at most (sockets get their mode explicitly).
    os.umask(0o027)
    _raise_open_files_limit(log)
    try:
        daemon = Daemon(config, clock)
        daemon.start()
    except ScheduleError as e:
        for p in e.problems:
            log.error("plan error", problem=str(p))
        return 1
    except KilnError as e:
        log.error("cannot start", error=str(e))
        return 1
    try:
        asyncio.run(daemon.serve_forever())
    except KilnError as e:
        log.error("cannot serve", error=str(e))
        daemon.store.close()
        return 1
    return 0
