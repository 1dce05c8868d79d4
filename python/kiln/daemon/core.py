"""The daemon's composition root: one `Daemon` holds the engine, the plan, the store and the
policy state, and wires the parts that each do one job:

| part | module |
|---|---|
| sockets, the asyncio protocol, socket files | `kiln.daemon.listener` |
| operator operations (one registry) | `kiln.daemon.ops` |
| jobs and apscheduler | `kiln.daemon.jobs` |
| serving, liveness, clean stop | `kiln.daemon.serving` |
| writing flushed batches on the store thread | `kiln.daemon.persist` |
| the day roll | `kiln.daemon.roll` |
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Coroutine
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dns.resolver

from kiln import _core
from kiln.automation import Automation
from kiln.clock import Clock, SystemClock
from kiln.daemon import ops, reload, serving
from kiln.daemon.config import DaemonConfig
from kiln.daemon.listener import connection_limit, raise_open_files_limit, refuse_if_answered
from kiln.daemon.mta import RustMtaSocket
from kiln.daemon.persist import Batch, Persister, charge_stored_tallies
from kiln.daemon.postfix import PostfixGate
from kiln.daemon.roll import ROLLED_KEY, roll_days
from kiln.daemon.runner import HERE, OFF_LOOP, Now, Runner, complete
from kiln.errors import KilnError, ScheduleError
from kiln.feedback import FeedbackEvent, FeedbackReader
from kiln.feedback.wiring import checkpoints_json, feedback_reader, read_reports
from kiln.guard import Guard
from kiln.log import get_logger
from kiln.mx import NULL_MX, MxLookups, MxResolver, ProviderTable, parse_nameservers
from kiln.planfile import load_plan
from kiln.policy import RuleInfo
from kiln.provider import DEFAULT_PROVIDER
from kiln.ramp import HOUR_MS, apply, calendar, compile_limits, hours_of_day, plan_providers
from kiln.rampday import RampMove
from kiln.records import DayCounts, LogEntry, RampState, SignalBook
from kiln.rules import RuleFiles, RuleSet, known_providers
from kiln.schedule import Plan
from kiln.signals.poller import Poller
from kiln.signals.thread import SignalLoop
from kiln.store import Store, StoreError
from kiln.suppress.live import SuppressionList
from kiln.watchdog import LoopMonitor, Notifier

__all__ = ["Daemon", "run"]

#: What the signal sources last said, and their health (store meta key, per plan name).
_SIGNALS_KEY = "signals:{plan}"
#: Where each MTA log reader got to (store meta key, per plan and node).
_FEEDBACK_KEY = "feedback:{plan}:{node}"
#: How often at most the suppression list's snapshot is written while events come.
SUPPRESSION_SNAPSHOT_MS = 10 * 60_000
#: A reservation covers this many snapshot intervals of each key's rate: the next snapshot
#: and its write have that long before the key is held back (reason `reservation`).
_RESERVE_INTERVALS = 2
#: Repeated warnings (connection limit, accept failures, store failures) at most this often.
_WARN_EVERY_S = 10.0


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
            refuse_if_answered(path)  # before the store: a second daemon says why it stops
        # A folder that lost its database refuses to start (StateLostError) unless told to
        # reinitialise: a fresh database would re-grant the day and restart every ramp.
        self.store = Store.open_state(
            config.store_url, config.state_dir, node=config.node, reinitialise=config.reinitialise
        )
        self.states: dict[tuple[str, str], RampState] = {}
        self.pending_log: list[LogEntry] = []
        self.servers: list[asyncio.AbstractServer] = []
        # The MTA socket when the Rust core serves it (`--mta-listener rust`), while serving.
        self.mta: RustMtaSocket | None = None
        #: Postfix's transport table (served by `postfix_server`) and its held recipients.
        self.postfix = PostfixGate(self, config.postfix) if config.postfix else None
        self.postfix_server: _core.MtaServer | None = None
        #: The Redis-protocol socket (rust/src/resp), served by the core.
        self.resp_server: _core.MtaServer | None = None
        #: The same on loopback TCP (`--resp-tcp`), while serving.
        self.resp_tcp_server: _core.MtaServer | None = None
        #: The HTTP API (kiln.web), while serving.
        self.http: Any = None
        #: Since the start, for metrics: (ip, provider, result) -> messages (granted,
        #: delivered, deferred, bounced, complaint), and (provider, class) -> replies seen.
        self.outcome_totals: Counter[tuple[str, str, str]] = Counter()
        self.reply_classes: Counter[tuple[str, str]] = Counter()
        self.scheduler: Any = None  # apscheduler's, while serving (kiln.daemon.jobs)
        self._next_snapshot_ms = 0
        self.stopping: asyncio.Event | None = None
        self.next_hour_ms = 0
        self.started_ms = self.clock.now_ms()
        # Background MX lookups (bounded; None without a nameserver), made when serving.
        self.lookups: MxLookups | None = None
        self._warned: dict[str, tuple[float, int]] = {}
        # Flushed but not yet written, and the store thread that writes it.
        self.persist = Persister(
            self.store, self.engine, config.snapshot_interval_ms, self.warn_repeated, self.log
        )
        # Jobs that change state (flush, hour roll, reload, cancel) run one at a time.
        self.job_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.monitor = LoopMonitor()
        self.notifier = Notifier()
        self.connections = 0  # on the asyncio sockets; `open_connections` adds the Rust one
        self.max_connections = config.max_connections or connection_limit()
        self.rule_files = RuleFiles()
        self._calendar_made: tuple[ZoneInfo, list[int], list[int], list[int]] | None = None
        rules = self.compile_rules(self.read_rules(self.plan))  # ScheduleError: nothing started
        self.guard = Guard(self.plan, rules)
        self.poller = Poller(self.plan, now_ms=self.clock.now_ms)
        # Where the sources fetch and parse while serving (kiln.signals.thread).
        self.signal_loop = SignalLoop()
        #: The suppression list: the store's log folded into the core's live set.
        self.suppression = SuppressionList(
            self.engine,
            self.store,
            config.state_dir,
            self.plan.suppression,
            base=Path(self.plan.source).parent if self.plan.source else Path(),
        )
        self.feedback: FeedbackReader | None = None
        self._feedback_saved = ""
        #: The readers' checkpoints as of the last events fed to the engine (what is saved).
        self._feedback_marks = ""
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
        listed = self.suppression.open()
        self.log.info("suppression list loaded", addresses=listed, log_id=self.suppression.last_id)
        self.poller.prepare()  # the HTTP client's TLS set-up, before serving
        self.engine.set_default_provider(DEFAULT_PROVIDER)
        self.engine.set_upcall_ops(list(ops.UPCALL_OPS))
        self.states = self.store.load_positions(self.plan.name)
        self.load_guard(now_ms)
        self.mark_start(now_ms)
        self.roll_days(now_ms)
        self.apply_plan(now_ms, hour_rolled=True)
        self.push_routes()
        if self.postfix is not None:
            self.postfix.restore(self.store.load_held())
        if lost_snapshot:
            charge_stored_tallies(self.engine, self.store, self.plan_day(now_ms), now_ms, self.log)
        self.record(
            now_ms,
            "start",
            "daemon",
            "start",
            f"kiln started with plan {self.plan.name!r}",
            {"plan": str(self.config.plan_path), "restored": saved is not None},
        )
        self.flush(now_ms)

    def read_rules(self, plan: Plan) -> RuleSet:
        """The shipped and the plan's reply rules, read, checked and compiled (ScheduleError);
        touches no engine, so it may run off the loop. Unchanged rule files are not re-read."""
        base = Path(plan.source).parent
        return self.rule_files.load([base / f for f in plan.policy.rules], known_providers(plan))

    def compile_rules(self, rules: RuleSet) -> dict[str, RuleInfo]:
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

    def load_guard(self, now_ms: int) -> None:
        """Automations and signal readings of this plan, back from the store."""
        kept = self.store.load_automations(self.plan.name, since_ms=now_ms - 3 * 86_400_000)
        self.guard.book.load(Automation.from_json(a) for a in kept)
        saved = self.store.get_meta(_SIGNALS_KEY.format(plan=self.plan.name))
        self.guard.signals = SignalBook.from_json(json.loads(saved)) if saved else SignalBook()
        self._signals_saved = saved or ""
        self.load_feedback()

    def load_feedback(self) -> None:
        """(Re)open the MTA-log readers where they got to."""
        if self.feedback is not None:
            self.collect(self.clock.now_ms())  # their checkpoints go with the next write
            self.feedback.close()
        key = _FEEDBACK_KEY.format(plan=self.plan.name, node=self.config.node)
        self._feedback_saved = self.store.get_meta(key) or ""
        self.feedback = feedback_reader(
            self.plan, json.loads(self._feedback_saved) if self._feedback_saved else None
        )
        self._feedback_marks = "" if self.feedback is None else checkpoints_json(self.feedback)

    def mark_start(self, now_ms: int) -> None:
        """A plan seen for the first time starts counting today: earlier days had no data."""
        key = ROLLED_KEY.format(plan=self.plan.name)
        if self.store.get_meta(key) is None:
            yesterday = self.plan_day(now_ms) - timedelta(days=1)
            self.store.set_meta(key, yesterday.isoformat())

    def apply_plan(self, now_ms: int, *, hour_rolled: bool = False) -> None:
        """Push this hour's limits, the pools and the calendar.

        Only a start or an hour roll (`hour_rolled`) moves the next hour boundary forward: a
        reload or cancel that lands after a boundary but before the tick that rolls it must
        not push the roll (and a midnight's day roll) an hour later."""
        apply(self.engine, self.plan, compile_limits(self.plan, self.states, now_ms))
        self.guard.enforce(self.engine, self.states, now_ms)
        if self.postfix is not None:
            self.postfix.configure(self.plan)
        hours, days, local_hours = self._calendar(now_ms)
        self.engine.set_calendar(hours, days, local_hours)
        boundary = next((h for h in hours if h > now_ms), now_ms + HOUR_MS)
        if hour_rolled or not self.next_hour_ms:
            self.next_hour_ms = boundary
        else:
            self.next_hour_ms = min(self.next_hour_ms, boundary)

    def _calendar(self, now_ms: int) -> tuple[list[int], list[int], list[int]]:
        """`calendar` and the local hour each hour start begins (what active hours are read
        against), reused within the hour it was made for (a few ms of datetime work)."""
        zone = self.plan.zone
        made = self._calendar_made
        if made is not None and made[0] == zone and made[1][0] <= now_ms < made[1][1]:
            return made[1], made[2], made[3]
        hours, days = calendar(zone, now_ms)
        local_hours = hours_of_day(zone, hours)
        self._calendar_made = (zone, hours, days, local_hours)
        return hours, days, local_hours

    def push_routes(self) -> None:
        """The plan's domain table as routes that never expire. Learned (MX) routes are
        dropped too, since the table may map their suffixes differently: call at start and on
        reload only, not at every hour (learned routes would be looked up again)."""
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

    def plan_day(self, now_ms: int) -> date:
        """The plan-zone calendar date at `now_ms`."""
        return self.plan.local_date(now_ms)

    # ----- jobs (time is an argument; the scheduler only says when) -----

    def tick(self, now_ms: int) -> None:
        """The 1 Hz job in the calling thread (tests); StoreError if a write failed."""
        complete(self.tick_with(HERE, lambda: now_ms))

    async def tick_with(self, run: Runner, now: Now) -> None:
        """The 1 Hz job: roll hours and days when due, read the MTA logs, then write. Each
        step reads the clock afresh (the serving daemon's reads before it take time)."""
        await self.on_hour_with(run, now())
        await self.ingest_with(run, now)
        self.collect(now())
        await run.write(self.persist)
        await self.snapshot_suppression(run, now())

    async def snapshot_suppression(self, run: Runner, now_ms: int) -> None:
        """At most every `SUPPRESSION_SNAPSHOT_MS`, when events came since the last: the live
        set's snapshot, taken on the engine's thread and written by a worker, so a restart
        after a SIGKILL folds only the log after it (seconds, not minutes, at 10M)."""
        if not self.suppression.unsnapshotted or now_ms < self._next_snapshot_ms:
            return
        self._next_snapshot_ms = now_ms + SUPPRESSION_SNAPSHOT_MS
        taken = self.suppression.unsnapshotted
        last_id, data = self.suppression.take_snapshot()
        try:
            await run.worker(self.suppression.write_snapshot, last_id, data)
        except OSError as e:
            self.warn_repeated("suppression_snapshot_failed", error=str(e))
            return
        self.suppression.unsnapshotted -= taken

    def ingest(self, now_ms: int) -> int:
        """`ingest_with` in the calling thread (start-up, tests)."""
        return complete(self.ingest_with(HERE, lambda: now_ms))

    async def ingest_with(self, run: Runner, now: Now) -> int:
        """Feed new MTA-log and complaint events to the engine as `report`s; how many went.
        The logs are read and parsed by `run.worker` (a busy MTA writes thousands of lines a
        second); only feeding the engine happens on its thread. The serving daemon runs it
        under `job_lock`, so no reload replaces the readers meanwhile."""
        if self.feedback is None:
            return 0
        lines, held, marks, said_no = await run.worker(read_reports, self.feedback, now())
        self._feedback_marks = marks  # the readers' checkpoints go with the next write
        if held and self.postfix is not None:
            self.postfix.hold(held)
        data = b"".join(lines)
        now_ms = now()  # time moved on meanwhile
        while data:
            served = self.engine.serve(data, now_ms)
            data = data[served.consumed :]
            if served.consumed == 0:
                break
        if said_no:
            await self.suppress_from_feedback(said_no, run, now_ms)
        return len(lines)

    async def suppress_from_feedback(
        self, events: list[FeedbackEvent], run: Runner, now_ms: int
    ) -> None:
        """Put on the suppression list the recipients that said no or keep failing, as
        `SuppressionList.verdict` decides. Written to the store before the live set changes;
        a failed write is logged and retried with the next events (the log readers'
        checkpoints are not held back for it)."""
        good = []
        for e in events:
            try:
                reply = (e.code, e.enhanced, e.text or "")
                address = e.recipient or ""
                verdict = self.suppression.verdict(address, "", e.result, reply, e.at_ms)
                if verdict is None:
                    continue
                request = verdict.request(address, "", f"mta log ({e.source})", e.ip, reply)
                good.extend(self.suppression.events([request], now_ms))
            except ValueError as err:
                self.warn_repeated("suppression_address_unreadable", error=str(err))
        if not good:
            return
        try:
            ids = await run.store(self.persist, self.store.suppress_append, good)
        except StoreError as err:
            self.warn_repeated("store_write_failed", error=str(err), during="suppression")
            return
        self.suppression.written(good, ids)

    def on_hour(self, now_ms: int) -> None:
        """`on_hour_with` in the calling thread (tests)."""
        complete(self.on_hour_with(HERE, now_ms))

    async def on_hour_with(self, run: Runner, now_ms: int) -> None:
        """An hour began: ramps whose day ended roll, then this hour's limits are pushed.
        Idempotent: a second call for the same hour does nothing. When the ended hour's
        tallies cannot be written, the roll waits for the next tick (it must read them)."""
        if now_ms < self.next_hour_ms:
            return
        self.collect(now_ms)
        await run.write(self.persist)
        if self.persist.unsaved:
            return
        await roll_days(self, run, now_ms)
        self.apply_plan(now_ms, hour_rolled=True)

    def collect(self, now_ms: int, *, final: bool = False) -> None:
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
            for result, n in (
                ("granted", granted),
                ("delivered", delivered),
                ("deferred", deferred),
                ("bounced", bounced),
                ("complaint", complaints),
            ):
                if n:
                    self.outcome_totals[(ip, provider, result)] += n
        reports = self.engine.take_reports()
        acted = self.guard.on_reports(reports, self._classify, now_ms)
        acted += self.guard.expire(now_ms)
        for e in acted:
            self.log_entry(e, "warning")
        if acted:
            self.guard.enforce(self.engine, self.states, now_ms)
        entries, self.pending_log = self.pending_log + acted, []
        pushback, self.guard.pending_pushback = self.guard.pending_pushback, {}
        meta = {}
        signals = json.dumps(self.guard.signals.to_json(), sort_keys=True)
        if signals != self._signals_saved:
            meta[_SIGNALS_KEY.format(plan=self.plan.name)] = self._signals_saved = signals
        if self.feedback is not None and self._feedback_marks != self._feedback_saved:
            key = _FEEDBACK_KEY.format(plan=self.plan.name, node=self.config.node)
            meta[key] = self._feedback_saved = self._feedback_marks
        # Reserve ahead: until this snapshot is durable and the next one too, no key may be
        # granted past what the store will say it used (docs/core.md, "Reservations").
        token: int | None = None
        if final:
            snapshot = self.engine.snapshot_bytes()
        else:
            snapshot, token = self.engine.reservation_snapshot(
                now_ms, _RESERVE_INTERVALS * self.config.snapshot_interval_ms
            )
        self.persist.unsaved.append(
            Batch(
                now_ms=now_ms,
                day=self.plan_day(min(now_ms, self.next_hour_ms - 1)),
                plan=self.plan.name,
                snapshot=snapshot,
                token=token,
                counts=counts,
                entries=entries,
                pushback=pushback,
                automations=self.guard.dirty(),
                meta=meta,
                held=self.postfix.take_changes() if self.postfix is not None else {},
            )
        )

    def flush(self, now_ms: int, *, final: bool = False) -> None:
        """Take what the engine and the guard hold and write it, in the calling thread
        (start-up, shutdown, tests). StoreError: nothing is lost; it stays for the next write.

        `final`: nothing will be granted after this (the sockets are closed), so the snapshot
        holds the exact counters, with no reservation for a restart to charge."""
        self.collect(now_ms, final=final)
        complete(HERE.write(self.persist))

    @property
    def open_connections(self) -> int:
        """Client connections open now, over both sockets."""
        return self.connections + (self.mta.connections if self.mta is not None else 0)

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
        good = await self.poller.poll(
            name, self.guard.signals, self.clock.now_ms(), on=self.signal_loop
        )
        now_ms = self.clock.now_ms()
        acted = self.guard.on_signals(now_ms)
        for e in acted:
            self.log_entry(e, "warning")
        self.pending_log += acted
        if acted:
            self.guard.enforce(self.engine, self.states, now_ms)
            if self.scheduler is not None:  # serving: save the pause or resume at once
                async with self.job_lock:
                    self.collect(self.clock.now_ms())
                    await self.persist.write_async()
        return good

    def _classify(
        self, provider: str, code: int | None, enhanced: str | None, text: str
    ) -> tuple[str, str, str] | None:
        """(class, scope, rule) of a remote reply; None for unclassified and MTA-internal ones."""
        # `default` stands for every provider without its own plan row (Yahoo, Apple, ...):
        # every rule may apply, or their provider rules would never fire.
        who = None if provider == DEFAULT_PROVIDER else provider
        found = self.engine.classify(who, code, enhanced, text)
        self.reply_classes[(provider, "unclassified" if found is None else found[0])] += 1
        if found is None or found[0] == "internal" or found[1] is None or found[2] is None:
            return None
        return found[0], found[1], found[2]

    def roll_days(self, now_ms: int) -> list[RampMove]:
        """Roll every local day that ended since the last roll, in the calling thread."""
        return complete(roll_days(self, HERE, now_ms))

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
        self.log_entry(entry, level)
        self.pending_log.append(entry)

    def log_entry(self, e: LogEntry, level: str = "info") -> None:
        """Write a decision-log entry to the process log too, with its evidence."""
        fields = {
            k if k not in {"event", "level", "kind", "subject", "action"} else f"evidence_{k}": v
            for k, v in e.evidence.items()
        }
        getattr(self.log, level)(
            e.reason, kind=e.kind, subject=e.subject, action=e.action, **fields
        )

    # ----- reload (kiln.daemon.reload) and operator requests (kiln.daemon.ops) -----

    def reload(self, now_ms: int) -> dict[str, Any]:
        """Re-read the plan in the calling thread, swap it in only if valid (tests)."""
        return complete(reload.reload(self, HERE, lambda: now_ms))

    async def reload_async(self) -> dict[str, Any]:
        """Re-read the plan off the loop and swap it in only if valid (SIGHUP, `reload`)."""
        return await reload.reload(self, OFF_LOOP, self.clock.now_ms)

    def upcall(self, line: bytes, now_ms: int) -> dict[str, Any]:
        """Answer an operator request the core handed back, in the calling thread."""
        return complete(ops.upcall(self, line, HERE, lambda: now_ms))

    async def upcall_async(self, line: bytes) -> dict[str, Any]:
        """Answer an operator request as the serving daemon does (slow work off the loop)."""
        return await ops.upcall(self, line, OFF_LOOP, self.clock.now_ms)

    async def serve_forever(self) -> None:
        """Listen, run the jobs, and stop cleanly on SIGTERM/SIGINT; SIGHUP reloads."""
        await serving.serve(self)

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

    def make_lookups(self) -> MxLookups | None:
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

    def reload_on_signal(self) -> None:
        """SIGHUP: reload as a task (the reply goes to the log and the decision log)."""
        _ = self.spawn(self.reload_async())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task on the loop, kept until it ends; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished task; log how it failed, if it did."""
        self.tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            self.log.error("task_failed", task=task.get_name(), error=repr(e))

    def stop(self) -> None:
        """Ask `serve_forever` to return (from the loop's thread)."""
        if self.stopping is not None:
            self.stopping.set()


def run(config: DaemonConfig, clock: Clock | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code."""
    log = get_logger(component="daemon")
    # State files: owner read-write, group read at most (sockets get their mode explicitly).
    os.umask(0o027)
    raise_open_files_limit(log)
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
