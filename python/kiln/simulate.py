"""`kiln simulate`: the real daemon core driven hour by hour over simulated days.

A `Simulation` starts an in-process `kiln.daemon.Daemon` (engine, plan, store in a temporary
state folder, guard and policy) on an injected clock, exactly as the tests drive it, and for
every simulated hour:

1. polls the signal sources that are due, through the daemon's own `poll_source` (a
   `ScriptedPoller` answers from the scenario's timelines instead of the network; the real
   `Poller` writes the readings into the `SignalBook`, the guard pauses and resumes);
2. reports the scenario's push-back replies of that hour through the native protocol, so the
   core's reply rules classify them and policy acts on them;
3. lets the daemon take what the engine holds (`collect`: automations start and end, effects
   reach the engine);
4. offers the hour's traffic with `pick` on each traffic pool (warming IPs first, then warm
   IPs and the overflow chain, as in production) and reports what was granted as delivered,
   bounced, deferred or complained about (a seeded pseudo-random draw; deferred mail is
   offered again the next hour);

and at each local midnight runs the daemon's 1 Hz job (`tick`), which writes the day and
rolls every ramp through policy. What is simplified, and why, is in docs/simulate.md.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import structlog

from kiln.daemon import Daemon, DaemonConfig
from kiln.daemon.runner import complete
from kiln.policyspec import DnsblSpec, PostmasterSpec, SndsSpec
from kiln.ramp import HOUR_MS, plan_providers, steps_for
from kiln.rampday import day_cap, ramp_view
from kiln.rate import RateSpec
from kiln.records import LogEntry
from kiln.schedule import Plan, SteadyState
from kiln.signals import SourceError
from kiln.signals.dnsbl import DnsblReading, DnsblResult
from kiln.signals.poller import Poller
from kiln.signals.postmaster import DomainDay, PostmasterReading
from kiln.signals.snds import SndsIpData, SndsReading
from kiln.simscenario import Scenario, Traffic

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "SIM_RATE",
    "ScriptedPoller",
    "Simulation",
    "report_json",
    "sim_plan",
    "simulate",
]

#: The report's format name and version (docs/simulate.md, "Report"); bump on any change.
REPORT_FORMAT = "kiln-simulate"
REPORT_VERSION = 1

#: Per-second pacing lifted: hourly and daily caps hold, a chunk of an hour goes at once.
SIM_RATE = RateSpec(1_000_000_000, 1_000, 1_000_000_000)
#: Commits of the engine's reservations come once a simulated day (see docs/simulate.md).
_SNAPSHOT_INTERVAL_MS = 86_400_000
#: Traffic of an hour is offered at this minute; events before it come first.
_TRAFFIC_AT_MS = 30 * 60_000
#: Default outcomes when the scenario gives none.
_BOUNCE_PERCENT = 0.5
_COMPLAINT_PERCENT = 0.02
_DEFERRED_PERCENT = 1.0
#: Halvings tried for traffic nothing could take whole (the rest waits).
_SPLITS = 24


class _Clock:
    """The simulation's clock: the time the simulation sets."""

    def __init__(self, now_ms: int) -> None:
        self.t_ms = now_ms

    def now_ms(self) -> int:
        """The time set last."""
        return self.t_ms


def _quiet() -> Any:
    """A logger that writes nothing (the report says what happened)."""
    return structlog.wrap_logger(
        structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(50)
    )


# ----- the plan as simulated -----


def sim_plan(plan: Plan, scenario: Scenario) -> Plan:
    """`plan` with per-second pacing lifted, MTA log readers off, and a source for every
    signal timeline of `scenario` (settings as shipped when the plan has none)."""
    schedules = {}
    for name, s in plan.schedules.items():
        update: dict[str, Any] = {"max_message_rate": SIM_RATE}
        after = s.after_last_step
        if isinstance(after, SteadyState):
            update["after_last_step"] = after.model_copy(update={"max_message_rate": SIM_RATE})
        schedules[name] = s.model_copy(update=update)
    sig = plan.signals
    t = scenario.signals
    update_signals: dict[str, Any] = {"feedback": None}
    if t.postmaster is not None and sig.postmaster is None:
        domains = t.postmaster.domains or ["example.com"]
        update_signals["postmaster"] = PostmasterSpec.model_validate(
            {"credentials": "simulated", "domains": domains}
        )
    if t.snds is not None and sig.snds is None:
        update_signals["snds"] = SndsSpec.model_validate({"key_file": "simulated"})
    if t.dnsbl is not None and sig.dnsbl is None:
        zones = sorted({x.zone for x in t.dnsbl.listings}) or ["zen.spamhaus.org"]
        update_signals["dnsbl"] = DnsblSpec.model_validate({"zones": zones})
    return plan.model_copy(
        update={"schedules": schedules, "signals": sig.model_copy(update=update_signals)}
    )


# ----- signals -----


class ScriptedPoller(Poller):
    """The daemon's `Poller` with the network replaced by the scenario's timelines: each
    fetch builds the reading objects the real sources return (or fails, in an outage), and
    the real `Poller.poll` writes them into the book. `day_of` maps a date to its 1-based
    simulated day."""

    def __init__(
        self, plan: Plan, scenario: Scenario, day_of: Callable[[date], int], now_ms: Any
    ) -> None:
        super().__init__(plan, now_ms=now_ms)
        self.scenario = scenario
        self.day_of = day_of
        self.log = _quiet()

    def prepare(self) -> None:
        """No HTTP client: nothing is fetched."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def _fetch(self, name: str, now_ms: int) -> Any:
        """What source `name` says at `now_ms`, from the timeline."""
        today = self.day_of(self.plan.local_date(now_ms))
        t = self.scenario.signals
        timeline = getattr(t, name)
        if timeline is not None and any(o.covers(today) for o in timeline.outages):
            raise SourceError(name, "unavailable", f"simulated outage on day {today}")
        spec = getattr(self.plan.signals, name)
        if name == "dnsbl":
            return self._dnsbl(spec, today)
        days = self.days(now_ms, spec.days_back)
        if name == "postmaster":
            return [(d, self._postmaster(spec, d)) for d in days]
        return [(d, self._snds(d)) for d in days]

    def _postmaster(self, spec: Any, day: date) -> PostmasterReading:
        """Postmaster's day `day` (visible from the next simulated day on)."""
        rates = self.scenario.signals.postmaster
        seen = self.day_of(day) + 1
        rate = None
        for r in rates.spam_rate if rates is not None else []:
            if r.from_day <= seen:
                rate = r.percent / 100
        domains = {
            d: DomainDay(d, day, spam_rate=rate, v2_metrics={"spam_rate": rate or 0.0})
            for d in spec.domains
        }
        return PostmasterReading(day, domains, {})

    def _snds(self, day: date) -> SndsReading:
        """SNDS rows of day `day`: GREEN unless a colour of the timeline says otherwise."""
        seen = self.day_of(day) + 1
        colours = dict.fromkeys(self.plan.all_ips(), "GREEN")
        timeline = self.scenario.signals.snds
        batch_ips = [ip for b in self.plan.batches.values() for ip in b.ips]
        for c in timeline.colours if timeline is not None else []:
            if c.covers(seen):
                for ip in c.ips or batch_ips:
                    colours[ip] = c.colour
        rows = {ip: _snds_row(ip, colour) for ip, colour in colours.items()}
        return SndsReading(day, rows, {}, ())

    def _dnsbl(self, spec: Any, today: int) -> DnsblReading:
        """Every IP on every zone: listed while a listing of the timeline covers today."""
        timeline = self.scenario.signals.dnsbl
        listed: set[tuple[str, str]] = set()
        batch_ips = [ip for b in self.plan.batches.values() for ip in b.ips]
        for x in timeline.listings if timeline is not None else []:
            if x.covers(today):
                listed |= {(ip, x.zone) for ip in x.ips or batch_ips}
        return DnsblReading(
            tuple(
                DnsblResult(ip, zone, "listed" if (ip, zone) in listed else "clean")
                for ip in self.plan.all_ips()
                for zone in spec.zones
            )
        )


def _snds_row(ip: str, colour: str) -> SndsIpData:
    """An SNDS row with only the filter result known."""
    return SndsIpData(
        ip, None, None, None, None, None, colour, None, False, None, None, None, None, None, None
    )


# ----- traffic and outcomes -----


@dataclass
class _DayFigures:
    """What happened to traffic on one simulated day, per provider."""

    offered: dict[str, int] = field(default_factory=dict)
    warming: dict[str, int] = field(default_factory=dict)
    warm: dict[str, int] = field(default_factory=dict)
    overflow: dict[str, int] = field(default_factory=dict)
    waited: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    bounced: dict[str, int] = field(default_factory=dict)
    deferred: dict[str, int] = field(default_factory=dict)
    complaints: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, provider: str, n: int) -> None:
        """Count `n` under `what` for `provider`."""
        if n:
            table: dict[str, int] = getattr(self, what)
            table[provider] = table.get(provider, 0) + n


_RESULTS = ("delivered", "bounced", "deferred", "complaint")
_RESULT_FIGURE = {
    "delivered": "delivered",
    "bounced": "bounced",
    "deferred": "deferred",
    "complaint": "complaints",
}
_FIGURES = (
    "offered",
    "warming",
    "warm",
    "overflow",
    "waited",
    "delivered",
    "bounced",
    "deferred",
    "complaints",
)


def _draw(rng: random.Random, n: int, percent: float) -> int:
    """About `percent`% of `n`: the whole part, plus one with the fraction's chance."""
    x = n * percent / 100
    k = int(x)
    return min(n, k + (1 if rng.random() < x - k else 0))


@dataclass(frozen=True, slots=True)
class _Rates:
    """Outcome percentages in force for one provider on one day."""

    bounce: float
    complaint: float
    deferred: float


class Simulation:
    """One run; see the module docstring. `state_dir` holds the daemon's store."""

    def __init__(
        self,
        plan_path: Path,
        scenario: Scenario,
        days: int,
        state_dir: Path,
        *,
        traffic: Traffic | None = None,
        start: date | None = None,
    ) -> None:
        self.scenario = scenario
        self.days = days
        self.traffic = traffic or scenario.traffic
        self.clock = _Clock(0)
        d = Daemon(
            DaemonConfig(
                plan_path=plan_path,
                state_dir=state_dir,
                node="sim",
                snapshot_interval_ms=_SNAPSHOT_INTERVAL_MS,
            ),
            self.clock,
        )
        self.d = d
        self.source_plan = d.plan
        plan = sim_plan(d.plan, scenario)
        self.plan = plan
        self.start = (
            start
            or scenario.start
            or min((b.start_date for b in plan.batches.values()), default=date(2027, 1, 1))
        )
        self.clock.t_ms = plan.day_bounds_ms(self.start)[0] + 1_000
        d.log = d.persist.log = _quiet()
        d.plan = plan
        d.guard.replan(plan, d.guard.rules)
        d.poller = ScriptedPoller(plan, scenario, self.day_of, self.clock.now_ms)
        # A seeded draw of outcomes (not for secrets): the same seed, the same report.
        self.rng = random.Random(scenario.seed)  # noqa: S311
        self.providers = plan_providers(plan)
        own = set(self.providers)
        self.pools = self.traffic.pools or sorted({b.pool for b in plan.batches.values()})
        self.weights = self.traffic.weights()
        total = sum(self.weights) or 1.0
        self.shares = [w / total for w in self.weights]
        self.daily = self._daily_traffic(own)
        self.backlog: dict[tuple[str, str], int] = {}
        #: (ip, provider) -> [delivered, bounced, deferred, complaints] of the day so far.
        self.outcomes: dict[tuple[str, str], list[int]] = {}
        self.figures: list[_DayFigures] = []
        self.full_volume: dict[tuple[str, str], int | None] = {}
        self.steps_by_day: list[dict[str, int]] = []
        self.last_poll_ms: dict[str, int] = {}
        self.replies = sorted(scenario.replies, key=lambda r: (r.day, r.hour, r.minute))
        self._pool_ips = {
            pool: [ip for b in plan.batches.values() if b.pool == pool for ip in b.ips]
            for pool in self.pools
        }
        self._fold = {p: Daemon.fold(p, own) for p in plan.provider_names()}
        self._keys: dict[tuple[str, str], int] = {}

    def day_of(self, day: date) -> int:
        """The 1-based simulated day of a date."""
        return (day - self.start).days + 1

    # ----- inputs -----

    def _daily_traffic(self, own: set[str]) -> dict[tuple[str, str], int]:
        """Messages offered per day per (pool, provider row)."""
        out: dict[tuple[str, str], int] = {}
        if self.traffic.daily is not None:
            for pool in self.pools:
                for name, n in self.traffic.daily.items():
                    key = (pool, Daemon.fold(name, own))
                    out[key] = out.get(key, 0) + n
            return out
        peak = max(self.shares) if self.shares else 1.0
        for pool in self.pools:
            for provider in self.providers:
                most = 0
                for batch, b in self.plan.batches.items():
                    if b.pool != pool:
                        continue
                    hours = self.plan.schedules[b.schedule].hourly.hours
                    steps = len(steps_for(self.plan.schedules[b.schedule], provider))
                    caps = [day_cap(self.plan, batch, provider, s) for s in range(1, steps + 1)]
                    per_hour = max((c for c in caps if c is not None), default=0) / hours
                    most += math.ceil(per_hour)
                # The busiest hour of the profile must bring what every IP may take.
                out[(pool, provider)] = math.ceil(most * self.traffic.fill / peak)
        return out

    def _rates(self, provider: str, day: int) -> _Rates:
        """Outcome percentages for `provider` on simulated `day`."""
        rates = {
            "bounce": _BOUNCE_PERCENT,
            "complaint": _COMPLAINT_PERCENT,
            "deferred": _DEFERRED_PERCENT,
        }
        for o in self.scenario.outcomes:
            if not o.covers(day):
                continue
            if o.provider is not None and self._fold[o.provider] != provider:
                continue
            for what in rates:
                value = getattr(o, f"{what}_percent")
                if value is not None:
                    rates[what] = value
        return _Rates(rates["bounce"], rates["complaint"], rates["deferred"])

    # ----- the run -----

    def run(self) -> dict[str, Any]:
        """Simulate every day, roll the last one, and build the report."""
        d = self.d
        d.start()
        try:
            for day in range(1, self.days + 1):
                self._day(day)
            end = self.start + timedelta(days=self.days)
            self.clock.t_ms = self.plan.day_bounds_ms(end)[0] + 1_000
            d.tick(self.clock.t_ms)
            self._note_states(self.days + 1)
            d.flush(self.clock.t_ms, final=True)
            return self._report()
        finally:
            d.store.close()

    def _day(self, day: int) -> None:
        """One simulated local day: its roll at midnight, then its hours."""
        d = self.d
        today = self.start + timedelta(days=day - 1)
        start_ms, end_ms = self.plan.day_bounds_ms(today)
        self.clock.t_ms = start_ms + 1_000
        d.tick(self.clock.t_ms)  # rolls yesterday; commits today's reservations
        self._note_states(day)
        figures = _DayFigures()
        self.figures.append(figures)
        rates = {p: self._rates(p, day) for p in self.providers}
        for hour_ms in range(start_ms, end_ms, HOUR_MS):
            local_hour = self.plan.local_time(hour_ms).hour
            self._poll(hour_ms)
            self._replies(day, local_hour, hour_ms, before=True)
            at_ms = hour_ms + _TRAFFIC_AT_MS
            self.clock.t_ms = at_ms
            if self._expiring(at_ms):
                d.collect(at_ms)  # what the 1 Hz flush does when an automation runs out
            d.engine.due(at_ms, 0)  # the engine's hour and day windows roll to now
            self._offer(figures, rates, local_hour, at_ms)
            self._replies(day, local_hour, hour_ms, before=False)
        self._report_outcomes()

    def _expiring(self, now_ms: int) -> bool:
        """Whether an active automation's time ran out by `now_ms` (the guard ends it at the
        next `collect`)."""
        return any(
            a.state == "active" and a.expires_ms is not None and a.expires_ms <= now_ms
            for a in self.d.guard.book
        )

    def _note_states(self, day: int) -> None:
        """Each ramp's step as `day` begins, and the first day each is done."""
        today = self.start + timedelta(days=day - 1)
        steps: dict[str, int] = {}
        for batch in self.plan.batches:
            for provider in self.providers:
                v = ramp_view(self.plan, self.d.states, batch, provider, today)
                steps[f"{batch}/{provider}"] = v.step
                if v.state == "done" and self.full_volume.get((batch, provider)) is None:
                    self.full_volume[(batch, provider)] = day
        if day <= self.days:
            self.steps_by_day.append(steps)

    def _poll(self, hour_ms: int) -> None:
        """Poll every source that is due at this hour (at most hourly)."""
        d = self.d
        for name in d.poller.configured():
            every_ms = max(HOUR_MS, d.poller.interval_ms(name))
            last = self.last_poll_ms.get(name)
            if last is None or hour_ms - last >= every_ms:
                self.last_poll_ms[name] = hour_ms
                self.clock.t_ms = hour_ms
                complete(d.poll_source(name))

    def _replies(self, day: int, hour: int, hour_ms: int, *, before: bool) -> None:
        """Report the scenario's replies of this hour (those before the traffic, or after)."""
        batch_ips = [ip for b in self.plan.batches.values() for ip in b.ips]
        for r in self.replies:
            if r.day != day or r.hour != hour or (r.minute * 60_000 < _TRAFFIC_AT_MS) != before:
                continue
            self.clock.t_ms = hour_ms + r.minute * 60_000
            result = r.result or ("deferred" if r.code < 500 else "bounced")
            lines = []
            for ip in r.ips or batch_ips:
                req: dict[str, Any] = {
                    "op": "report",
                    "ip": ip,
                    "provider": self._fold[r.provider],
                    "result": result,
                    "n": r.count,
                    "code": r.code,
                    "text": r.text,
                }
                if r.enhanced:
                    req["enhanced"] = r.enhanced
                lines.append(json.dumps(req).encode() + b"\n")
            self._serve(b"".join(lines))
            self.d.collect(self.clock.t_ms)  # the 1 Hz flush acts on it within a second

    def _serve(self, data: bytes) -> list[dict[str, Any]]:
        """Requests through the core's native protocol; the replies, in order."""
        if not data:
            return []
        served = self.d.engine.serve(data, self.clock.t_ms)
        if served.consumed != len(data) or served.upcall is not None:
            raise RuntimeError("the engine did not take every simulated request")
        text = served.reply.decode()
        return list(json.loads("[" + text.strip().replace("\n", ",") + "]"))

    def _room(self, ip: str, provider: str, hour: int, now_ms: int) -> int | None:
        """What (ip, provider) may still take this hour by its caps (None: no cap), read
        from the engine: the size of the chunk `pick` is asked for."""
        key = self._keys.get((ip, provider))
        if key is None:
            key = self._keys[(ip, provider)] = self.d.engine.key(ip, provider)
        u = self.d.engine.usage(key)
        if u["paused"] or u["retired"] or u["suspended_until_ms"] > now_ms:
            return 0
        mask = u["active_hours"]
        if mask is not None and not (mask >> hour) & 1:
            return 0
        ppm = math.floor(u["multiplier"] * 1_000_000 + 0.5)
        room: int | None = None
        hourly, daily, left = u["hourly_cap"], u["daily_cap"], u["reservation_left"]
        if hourly is not None:
            room = hourly * ppm // 1_000_000 - u["hour_used"]
        if daily is not None:
            by_day = daily * ppm // 1_000_000 - u["day_used"]
            room = by_day if room is None else min(room, by_day)
        if left is not None and left < 2**32 - 1:
            room = left if room is None else min(room, left)
        return None if room is None else max(0, room)

    def _offer(
        self, figures: _DayFigures, rates: dict[str, _Rates], hour: int, now_ms: int
    ) -> None:
        """Offer this hour's traffic with `pick`, then report what happened to it."""
        share = self.shares[hour]
        asked: list[tuple[str, str, int]] = []  # (pool, provider, n) of each warming chunk
        wanting: dict[tuple[str, str], int] = {}
        fresh: dict[tuple[str, str], int] = {}
        for (pool, provider), per_day in self.daily.items():
            new = round(per_day * share)
            old = self.backlog.pop((pool, provider), 0)
            if not new and not old:
                continue
            figures.add("offered", provider, new)
            fresh[(pool, provider)] = new
            left = new + old
            rooms = [self._room(ip, provider, hour, now_ms) for ip in self._pool_ips[pool]]
            for room in sorted(rooms, key=lambda r: -1 if r is None else -r):
                n = left if room is None else min(room, left)
                if n <= 0:
                    break
                asked.append((pool, provider, n))
                left -= n
            wanting[(pool, provider)] = left
        granted: dict[tuple[str, str, str], int] = {}
        replies = self._serve(b"".join(_pick(pool, p, n) for pool, p, n in asked))
        for (pool, provider, n), r in zip(asked, replies, strict=True):
            if r.get("granted"):
                self._granted(figures, granted, pool, provider, r)
            else:
                wanting[(pool, provider)] += n
        rest = [(key, n) for key, n in wanting.items() if n > 0]
        replies = self._serve(b"".join(_pick(pool, p, n) for (pool, p), n in rest))
        for ((pool, provider), n), r in zip(rest, replies, strict=True):
            if r.get("granted"):
                self._granted(figures, granted, pool, provider, r)
                wanting[(pool, provider)] = 0
            else:
                wanting[(pool, provider)] = self._split(figures, granted, pool, provider, n)
        for key, left in wanting.items():
            if left:
                self.backlog[key] = self.backlog.get(key, 0) + left
                figures.add("waited", key[1], min(left, fresh.get(key, 0)))
        self._outcomes(figures, granted, rates)

    def _split(
        self,
        figures: _DayFigures,
        granted: dict[tuple[str, str, str], int],
        pool: str,
        provider: str,
        n: int,
    ) -> int:
        """Traffic no IP could take whole: halves of it are tried; what is left waits."""
        left, size = n, n // 2
        for _ in range(_SPLITS):
            if size < 1 or not left:
                break
            (r,) = self._serve(_pick(pool, provider, min(size, left)))
            if r.get("granted"):
                self._granted(figures, granted, pool, provider, r)
                left -= r["granted"]
            else:
                size //= 2
        return left

    def _granted(
        self,
        figures: _DayFigures,
        granted: dict[tuple[str, str, str], int],
        pool: str,
        provider: str,
        r: dict[str, Any],
    ) -> None:
        """Count one granted pick by its tier and IP."""
        n = int(r["granted"])
        figures.add(str(r["tier"]), provider, n)
        key = (pool, provider, str(r["ip"]))
        granted[key] = granted.get(key, 0) + n

    def _outcomes(
        self,
        figures: _DayFigures,
        granted: dict[tuple[str, str, str], int],
        rates: dict[str, _Rates],
    ) -> None:
        """Draw what happened to this hour's granted mail; deferred mail is offered again
        next hour. The reports go to the engine once a day (`_report_outcomes`)."""
        rng = self.rng
        for (pool, provider, ip), n in granted.items():
            r = rates[provider]
            bounced = _draw(rng, n, r.bounce) if r.bounce else 0
            deferred = _draw(rng, n - bounced, r.deferred) if r.deferred else 0
            delivered = n - bounced - deferred
            complaints = _draw(rng, delivered, r.complaint) if r.complaint else 0
            counts = self.outcomes.get((ip, provider))
            if counts is None:
                counts = self.outcomes[(ip, provider)] = [0, 0, 0, 0]
            counts[0] += delivered
            counts[1] += bounced
            counts[2] += deferred
            counts[3] += complaints
            if deferred:
                key = (pool, provider)
                self.backlog[key] = self.backlog.get(key, 0) + deferred

    def _report_outcomes(self) -> None:
        """Report the day's outcomes per (IP, provider) through the native protocol (reports
        without a reply code only feed the day's counts, so when in the day they arrive
        changes no decision)."""
        figures = self.figures[-1]
        lines = []
        for (ip, provider), counts in self.outcomes.items():
            for result, count in zip(_RESULTS, counts, strict=True):
                if count:
                    lines.append(
                        b'{"op":"report","ip":"%s","provider":"%s","result":"%s","n":%d}\n'
                        % (ip.encode(), provider.encode(), result.encode(), count)
                    )
                    figures.add(_RESULT_FIGURE[result], provider, count)
        self.outcomes.clear()
        self._serve(b"".join(lines))

    # ----- the report -----

    def _report(self) -> dict[str, Any]:
        """The versioned report (docs/simulate.md, "Report")."""
        d = self.d
        plan = self.plan
        ramps_log = d.store.decisions(kind="ramp", limit=10_000_000)
        automations_log = d.store.decisions(kind="automation", limit=10_000_000)
        moves = [self._move(e) for e in ramps_log]
        ramps = []
        for batch, b in plan.batches.items():
            for provider in self.providers:
                mine = [m for m in moves if m["batch"] == batch and m["provider"] == provider]
                counts: dict[str, int] = {}
                for m in mine:
                    counts[m["action"]] = counts.get(m["action"], 0) + 1
                v = ramp_view(plan, d.states, batch, provider, self.start)
                done = self.full_volume.get((batch, provider))
                ramps.append(
                    {
                        "batch": batch,
                        "pool": b.pool,
                        "provider": provider,
                        "steps": v.steps,
                        "start_date": b.start_date.isoformat(),
                        "final_step": d.states.get((batch, provider), v.ramp).step,
                        "full_volume_day": done,
                        "full_volume_date": None
                        if done is None
                        else (self.start + timedelta(days=done - 1)).isoformat(),
                        "moves": dict(sorted(counts.items())),
                    }
                )
        days = []
        for i, f in enumerate(self.figures):
            totals = {name: sum(getattr(f, name).values()) for name in _FIGURES}
            per_provider = {
                p: {name: getattr(f, name).get(p, 0) for name in _FIGURES}
                for p in self.providers
                if any(getattr(f, name).get(p, 0) for name in _FIGURES)
            }
            days.append(
                {
                    "day": i + 1,
                    "date": (self.start + timedelta(days=i)).isoformat(),
                    **totals,
                    "overflowed": totals["warm"] + totals["overflow"],
                    "providers": per_provider,
                    "steps": self.steps_by_day[i],
                }
            )
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "plan": self.source_plan.name,
            "timezone": plan.timezone,
            "start": self.start.isoformat(),
            "days": self.days,
            "seed": self.scenario.seed,
            "description": self.scenario.description,
            "pools": self.pools,
            "providers": self.providers,
            "offered_per_day": [
                {"pool": pool, "provider": p, "messages": n}
                for (pool, p), n in sorted(self.daily.items())
            ],
            "ramps": ramps,
            "daily": days,
            "automations": [self._automation(e) for e in automations_log],
            "ramp_moves": moves,
        }

    def _when(self, at_ms: int) -> tuple[int, str]:
        """(simulated day, local time HH:MM) of an instant."""
        local = self.plan.local_time(at_ms)
        return self.day_of(local.date()), local.strftime("%H:%M")

    def _move(self, e: LogEntry) -> dict[str, Any]:
        """One ramp move of the decision log."""
        batch, _, provider = e.subject.partition("/")
        rolled = date.fromisoformat(str(e.evidence.get("day")))
        return {
            "day": self.day_of(rolled),
            "date": rolled.isoformat(),
            "batch": batch,
            "provider": provider,
            "action": e.action,
            "from_step": e.evidence.get("from_step"),
            "to_step": e.evidence.get("to_step"),
            "reason": e.reason,
        }

    def _automation(self, e: LogEntry) -> dict[str, Any]:
        """One automation event of the decision log (start, end, expiry, step-down)."""
        day, at = self._when(e.at_ms)
        kind, _, event = e.action.partition(":")
        return {
            "day": day,
            "time": at,
            "id": e.evidence.get("id"),
            "kind": kind,
            "event": event,
            "rule": e.evidence.get("rule"),
            "scope": e.subject,
            "reason": e.reason,
        }


def _pick(pool: str, provider: str, n: int) -> bytes:
    """One `pick` request line."""
    return b'{"op":"pick","pool":"%s","provider":"%s","n":%d}\n' % (
        pool.encode(),
        provider.encode(),
        n,
    )


@contextmanager
def _state_dir(given: Path | None) -> Iterator[Path]:
    """`given`, or a temporary folder removed afterwards."""
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="kiln-simulate-") as tmp:
        yield Path(tmp)


def simulate(
    plan_path: Path,
    scenario: Scenario,
    days: int,
    *,
    traffic: Traffic | None = None,
    start: date | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Run a simulation and return its report (plain data, JSON-able). The daemon's store
    lives in `state_dir`, a fresh folder (default: a temporary one)."""
    with _state_dir(state_dir) as folder:
        sim = Simulation(plan_path, scenario, days, folder, traffic=traffic, start=start)
        return sim.run()


def report_json(report: dict[str, Any]) -> str:
    """The report as stable JSON text (sorted keys, two-space indent, final newline)."""
    return json.dumps(report, indent=2, sort_keys=True) + "\n"
