"""Invariants of the engine, checked by a hypothesis state machine.

The machine drives one `kiln.Engine` through limits, multipliers, pauses, suspensions, IP
caps, calendars, acquires, picks and the release queue, with a clock that only moves
forward. It keeps its own account of every grant (by calendar hour and day of a fixed grid,
and by rate) and checks, after every step, that:

- no key grants more than its hourly cap in any calendar hour, nor its daily cap in any day;
- no IP grants more than its IP caps in any calendar hour or day;
- GCRA never admits more than `max_burst + rate * t` in any interval of length `t`;
- a suspended key grants nothing before its deadline, a paused key nothing at all;
- a key with active hours grants nothing in any other local hour (the machine's calendar
  names each hour's hour of day, in a zone some whole hours off UTC);
- a denial's `retry_after_ms` is honest and tight: asking again exactly then succeeds, a
  millisecond earlier does not, and `None` means not at any later time;
- `pick` follows the overflow order: warming IPs, then warm IPs by weight, then the overflow
  pool, and a denial names the member with the shortest wait;
- an engine restored from a (JSON round-tripped) snapshot makes every later decision the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kiln import Decision, Engine
from reference import PPM, multiplier_ppm, scaled_cap

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ORIGIN = T0 - T0 % DAY_MS
"""Midnight before T0: calendar hours and days are the grid `ORIGIN + i * HOUR_MS|DAY_MS`."""

IPS = ("192.0.2.1", "192.0.2.2", "198.51.100.7")
PROVIDERS = ("google", "yahoo")
KEYS = [(ip, p) for ip in IPS for p in PROVIDERS]
"""Every key, in handle order: the machine interns them all first, so no call adds one."""
POOLS = ("main", "spare")
"""Pool "main" holds the first two IPs and overflows into "spare", which holds the third."""


def hour_of(t_ms: int) -> int:
    """Index of the calendar hour holding `t_ms`."""
    return (t_ms - ORIGIN) // HOUR_MS


def day_of(t_ms: int) -> int:
    """Index of the calendar day holding `t_ms`."""
    return (t_ms - ORIGIN) // DAY_MS


@dataclass(frozen=True)
class Limits:
    """A key's limits as the machine set them."""

    rate: tuple[int, int] | None = None
    max_burst: int = 1
    hourly_cap: int | None = None
    daily_cap: int | None = None
    ppm: int = PPM
    paused: bool = False
    suspended_until_ms: int = 0
    active_hours: int | None = None


@dataclass(frozen=True)
class Grant:
    """One grant, with what the machine knew when it happened."""

    key: int
    ip: str
    now_ms: int
    n: int
    hour_of_day: int
    """The local hour of day the grant fell in."""
    limits: Limits
    ip_caps: tuple[int | None, int | None]
    key_hour: int
    """Granted to this key in this calendar hour, this grant included (likewise below)."""
    key_day: int
    ip_hour: int
    ip_day: int
    rate_excess: int
    """The most this key was granted beyond `max_burst + rate * t` over the intervals that
    end with this grant (scaled to integers; positive means too many)."""


# ----- strategies -----

keys = st.integers(0, len(KEYS) - 1)
counts = st.sampled_from([1, 1, 1, 1, 2, 3, 7])
caps = st.none() | st.integers(0, 8) | st.integers(1, 8)
rates = st.none() | st.tuples(st.integers(1, 5), st.sampled_from([1_000, 10_000, 60_000, HOUR_MS]))
multipliers = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0, 1.0]) | st.floats(0.0, 1.0)
DAYTIME = sum(1 << h for h in range(7, 22))
"""Active hours 07-22."""
masks = st.none() | st.sampled_from([DAYTIME, 1 << 0 | 1 << 12, 0]) | st.integers(0, 2**24 - 1)
gaps_ms = st.sampled_from([0, 0, 1, 250, 999, 1_000, 5_000])
steps_ms = (
    st.sampled_from([0, 1, 999, 1_000])
    | st.integers(1, 60_000)
    | st.integers(1, 2 * HOUR_MS)
    | st.integers(1, 2 * DAY_MS)
)


class EngineMachine(RuleBasedStateMachine):
    """One engine (and, after a restore, its twin) under random operations."""

    def __init__(self) -> None:
        """A fresh engine with every key interned and nothing else."""
        super().__init__()
        self.engine = Engine()
        self.twin: Engine | None = None
        self.now = T0
        for ip, provider in KEYS:
            self.engine.key(ip, provider)
        self.limits = [Limits() for _ in KEYS]
        self.ip_caps: dict[str, tuple[int | None, int | None]] = dict.fromkeys(IPS, (None, None))
        self.members: dict[str, list[tuple[str, int, bool]]] = {}
        self.granted: dict[tuple[object, ...], int] = {}
        """Grants per (key or ip, "hour" or "day", window index)."""
        self.recent: list[list[tuple[int, int]]] = [[] for _ in KEYS]
        """Each key's (now_ms, n) grants since its rate or multiplier last changed."""
        self.grants: list[Grant] = []
        self.held: dict[int, tuple[str, str, int, int]] = {}
        """(pool, provider, priority, n) of each queued message, by message id."""
        self.next_message = 0
        self.utc_offset = 0
        """The local zone's offset from UTC in whole hours (set up once)."""

    # ----- helpers -----

    def both(self, call: Any) -> Any:
        """Run `call` on the engine and, if there is one, on its restored twin; the twin
        must answer the same."""
        result = call(self.engine)
        if self.twin is not None:
            assert call(self.twin) == result, "a restored engine decided differently"
        return result

    def configure(self, call: Any) -> None:
        """`both` for a change of limits, pauses, suspensions, IP caps or calendar: every such
        change also wakes the set-aside queues of the release queue."""
        self.both(call)

    def copy(self) -> Engine:
        """A new engine restored from the current state (for what-if questions)."""
        other = Engine()
        other.restore(self.engine.snapshot())
        return other

    def hour_of_day(self, t_ms: int) -> int:
        """The local hour of day at `t_ms`."""
        return (hour_of(t_ms) + self.utc_offset) % 24

    def set_key(self, key: int, **changes: Any) -> None:
        """Note a key's new limits; a new rate or multiplier starts a new GCRA record."""
        old = self.limits[key]
        new = replace(old, **changes)
        if (old.rate, old.max_burst, old.ppm) != (new.rate, new.max_burst, new.ppm):
            self.recent[key] = []
        self.limits[key] = new

    def record(self, d: Decision, n: int) -> None:
        """Account for a grant of `n` to `d.key` now."""
        key, ip, now = d.key, d.ip, self.now
        assert d.granted == n and ip == KEYS[key][0]
        self.recent[key].append((now, n))
        self.grants.append(
            Grant(
                key=key,
                ip=ip,
                now_ms=now,
                n=n,
                hour_of_day=self.hour_of_day(now),
                limits=self.limits[key],
                ip_caps=self.ip_caps[ip],
                key_hour=self.count((key, "hour", hour_of(now)), n),
                key_day=self.count((key, "day", day_of(now)), n),
                ip_hour=self.count((ip, "hour", hour_of(now)), n),
                ip_day=self.count((ip, "day", day_of(now)), n),
                rate_excess=self.excess(key),
            )
        )

    def count(self, window: tuple[object, ...], n: int) -> int:
        """Add n to a (key or ip, "hour" or "day", index) window; its new total."""
        self.granted[window] = self.granted.get(window, 0) + n
        return self.granted[window]

    def excess(self, key: int) -> int:
        """max over earlier grants a of: granted in [a, now] - (burst + rate * (now - a)),
        times period * 1e6 so it stays an integer; 0 or less when GCRA kept its promise."""
        limits = self.limits[key]
        if limits.rate is None:
            return 0
        count, period_ms = limits.rate
        scale = period_ms * PPM
        worst, admitted = -1, 0
        for t_ms, n in reversed(self.recent[key]):
            admitted += n
            allowed = limits.max_burst * scale + (self.now - t_ms) * count * limits.ppm
            worst = max(worst, admitted * scale - allowed)
        return worst

    def check_retry(self, d: Decision, ask: Any) -> None:
        """A denial's retry_after_ms is honest and tight: `ask(engine, t)` repeats the request
        at t on a copy of the engine; it fails a millisecond before now + retry_after_ms and
        succeeds at it. None: it fails even a month later. And the wait reaches at least the
        end of the limit the denial names: the next calendar hour or day of the grid for a
        cap, the deadline for a suspension."""
        copy = self.copy()
        if d.retry_after_ms is None:
            assert not ask(copy, self.now + 30 * DAY_MS), "denied for good, yet granted later"
            return
        assert d.retry_after_ms >= 1
        assert not ask(copy, self.now + d.retry_after_ms - 1), "granted before retry_after_ms"
        assert ask(copy, self.now + d.retry_after_ms), "not granted after retry_after_ms"
        next_hour = ORIGIN + (hour_of(self.now) + 1) * HOUR_MS
        next_day = ORIGIN + (day_of(self.now) + 1) * DAY_MS
        end = {
            "suspended": self.limits[d.key].suspended_until_ms,
            "daily_cap": next_day,
            "hourly_cap": next_hour,
            "ip_daily_cap": next_day,
            "ip_hourly_cap": next_hour,
        }.get(d.reason, self.now)
        assert self.now + d.retry_after_ms >= end, "retry before the named limit ends"
        mask = self.limits[d.key].active_hours
        if mask is not None:
            hour = self.hour_of_day(self.now + d.retry_after_ms)
            assert mask >> hour & 1, "retry at a time outside the key's active hours"

    def check_pick_order(
        self, before: dict[str, Any], pool: str, provider: str, n: int, d: Decision
    ) -> None:
        """`pick` chose as docs/core.md says, judged by asking each member with `acquire` on
        an engine restored from the state before the pick: no warming IP could grant when a
        warm one was chosen, no IP of the asked pool when an overflow IP was; within its
        tier the chosen IP had the least day_used per weight; a denial names the member
        with the shortest wait."""
        copy = Engine()
        copy.restore(before)
        groups: list[tuple[str, list[tuple[int, int]]]] = []  # (tier, [(key, weight)])
        for at in [pool, "spare"] if pool == "main" else [pool]:
            for warming in (True, False):
                tier = "overflow" if at != pool else "warming" if warming else "warm"
                group = [
                    (KEYS.index((ip, provider)), w)
                    for ip, w, is_warming in self.members[at]
                    if is_warming == warming
                ]
                groups.append((tier, group))
        answers = {k: copy.acquire(k, n, self.now) for _, g in groups for k, _ in g}
        for tier, group in groups:
            fits = [(k, w) for k, w in group if answers[k]]
            if fits:
                per_weight = {k: Fraction(copy.usage(k)["day_used"] - n, w) for k, w in fits}
                lightest = min(per_weight, key=per_weight.__getitem__)  # first of the least
                assert (d.tier, d.key) == (tier, lightest), "pick skipped a better IP"
                return
        assert not d, "pick granted although no member could"
        soonest = min(
            (a for _, g in groups for k, _ in g for a in [answers[k]]),
            key=lambda a: (a.retry_after_ms is None, a.retry_after_ms or 0),
        )
        want = (soonest.retry_after_ms, soonest.reason, soonest.key, "direct")
        assert (d.retry_after_ms, d.reason, d.key, d.tier) == want

    # ----- rules -----

    @initialize(
        main=st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=2, max_size=2),
        spare_weight=st.integers(1, 3),
        key_limits=st.lists(
            st.tuples(rates, st.integers(1, 4), caps, caps), min_size=len(KEYS), max_size=len(KEYS)
        ),
        hours=st.integers(0, 30),
        days=st.integers(0, 3),
        utc_offset=st.integers(-12, 14),
    )
    def setup(
        self,
        main: list[tuple[int, bool]],
        spare_weight: int,
        key_limits: list[tuple[tuple[int, int] | None, int, int | None, int | None]],
        hours: int,
        days: int,
        utc_offset: int,
    ) -> None:
        """Pools "spare" (one warm IP) and "main" (two IPs, overflowing into "spare"),
        limits on every key, the zone, and the first calendar boundaries."""
        self.members["spare"] = [(IPS[2], spare_weight, False)]
        self.members["main"] = [(IPS[i], w, warming) for i, (w, warming) in enumerate(main)]
        self.engine.define_pool("spare", self.members["spare"])
        self.engine.define_pool("main", self.members["main"], overflow="spare")
        self.utc_offset = utc_offset
        for key, (rate, max_burst, hourly, daily) in enumerate(key_limits):
            self.set_limits(key, rate, max_burst, hourly, daily, None)
        self.supply_calendar(hours, days, True)

    @rule(dt=steps_ms)
    def advance(self, dt: int) -> None:
        """Time passes."""
        self.now += dt

    @rule(day=st.booleans(), offset=st.sampled_from([-1, 0, 1]) | st.integers(-1_500, 1_500))
    def advance_near_a_boundary(self, day: bool, offset: int) -> None:
        """Time passes to just before or just after the next calendar hour (or day)."""
        length = DAY_MS if day else HOUR_MS
        boundary = ORIGIN + ((self.now - ORIGIN) // length + 1) * length
        self.now = max(self.now, boundary + offset)

    @rule(
        key=keys,
        rate=rates,
        max_burst=st.integers(1, 4),
        hourly=caps,
        daily=caps,
        active_hours=masks,
    )
    def set_limits(
        self,
        key: int,
        rate: tuple[int, int] | None,
        max_burst: int,
        hourly: int | None,
        daily: int | None,
        active_hours: int | None,
    ) -> None:
        """Give a key a new rate, burst, caps and active hours."""
        count, period = rate if rate is not None else (None, None)
        self.configure(
            lambda e: e.set_limits(
                key,
                rate_count=count,
                rate_period_ms=period,
                max_burst=max_burst,
                hourly_cap=hourly,
                daily_cap=daily,
                active_hours=active_hours,
            )
        )
        self.set_key(
            key,
            rate=rate,
            max_burst=max_burst,
            hourly_cap=hourly,
            daily_cap=daily,
            active_hours=active_hours,
        )

    @rule(key=keys, multiplier=multipliers)
    def set_multiplier(self, key: int, multiplier: float) -> None:
        """Slow a key down (0 pauses it)."""
        self.configure(lambda e: e.set_multiplier(key, multiplier))
        self.set_key(key, ppm=multiplier_ppm(multiplier))

    @rule(key=keys, paused=st.booleans())
    def pause_or_resume(self, key: int, paused: bool) -> None:
        """Pause or resume a key."""
        self.configure(lambda e: e.pause(key) if paused else e.resume(key))
        self.set_key(key, paused=paused)

    @rule(
        key=keys, delta=st.none() | st.sampled_from([1, 1_000, 5_000]) | st.integers(1, 2 * HOUR_MS)
    )
    def suspend(self, key: int, delta: int | None) -> None:
        """Suspend a key for a while, or lift its suspension."""
        until = 0 if delta is None else self.now + delta
        self.configure(lambda e: e.suspend(key, until))
        self.set_key(key, suspended_until_ms=until)

    @rule(ip=st.sampled_from(IPS), hourly=caps, daily=caps)
    def set_ip_caps(self, ip: str, hourly: int | None, daily: int | None) -> None:
        """Cap an IP across providers."""
        self.configure(lambda e: e.set_ip_caps(ip, hourly_cap=hourly, daily_cap=daily))
        self.ip_caps[ip] = (hourly, daily)

    @rule(
        hours=st.integers(0, 30),
        days=st.integers(0, 3),
        named=st.sampled_from([True, True, True, False]),
    )
    def supply_calendar(self, hours: int, days: int, named: bool) -> None:
        """Tell the engine the next `hours` hour and `days` day boundaries of the grid (none:
        the current windows go on), mostly with their hours of day (without: unknown, and keys
        with active hours closed). Only future boundaries: a boundary already passed would
        start a window late."""
        next_hour = ORIGIN + (hour_of(self.now) + 1) * HOUR_MS
        next_day = ORIGIN + (day_of(self.now) + 1) * DAY_MS
        hour_starts = [next_hour + i * HOUR_MS for i in range(hours)]
        day_starts = [next_day + i * DAY_MS for i in range(days)]
        of_day = [self.hour_of_day(h) for h in hour_starts] if named else None
        self.configure(lambda e: e.set_calendar(hour_starts, day_starts, of_day))

    @rule(key=keys, n=counts, times=st.integers(1, 6), gap=gaps_ms)
    def acquire(self, key: int, n: int, times: int, gap: int) -> None:
        """Ask for n on one key, a few times in a row, `gap` ms apart."""
        for _ in range(times):
            now = self.now
            d = self.both(lambda e, now=now: e.acquire(key, n, now))
            if d:
                self.record(d, n)
            else:
                assert d.key == key and d.tier == "direct"
                self.check_retry(d, lambda e, t: e.acquire(key, n, t))
            self.now += gap

    @rule(
        pool=st.sampled_from(POOLS),
        provider=st.sampled_from(PROVIDERS),
        n=counts,
        times=st.integers(1, 6),
        gap=gaps_ms,
    )
    def pick(self, pool: str, provider: str, n: int, times: int, gap: int) -> None:
        """Let the engine choose an IP of a pool for n messages to a provider, a few times in
        a row, `gap` ms apart."""
        p, prov = self.engine.pool(pool), self.engine.provider(provider)
        for _ in range(times):
            now, before = self.now, self.engine.snapshot()
            d = self.both(lambda e, now=now: e.pick(p, prov, n, now))
            self.check_pick_order(before, pool, provider, n, d)
            if d:
                self.record(d, n)
            else:
                self.check_retry(d, lambda e, t: e.pick(p, prov, n, t))
            self.now += gap

    @rule(
        pool=st.sampled_from(POOLS),
        provider=st.sampled_from(PROVIDERS),
        priority=st.integers(-1, 1),
        n=counts,
    )
    def enqueue(self, pool: str, provider: str, priority: int, n: int) -> None:
        """Hold a message."""
        mid = self.next_message
        self.next_message += 1
        self.held[mid] = (pool, provider, priority, n)
        p, prov = self.engine.pool(pool), self.engine.provider(provider)
        self.both(lambda e: e.enqueue(mid, p, prov, priority, n))

    @rule(max_=st.integers(0, 5))
    def due(self, max_: int) -> None:
        """Release what may go now."""
        now = self.now
        released = self.both(lambda e: e.due(now, max_))
        assert len(released) <= max_
        for mid, d in released:
            self.record(d, self.held.pop(mid)[3])
        assert self.engine.queued() == len(self.held)
        # Only the engine's own next_due_ms: set-aside queues are not in a snapshot, so a
        # twin may look again sooner (or later) without releasing anything differently.
        wake = self.engine.next_due_ms(now)
        assert wake is None or wake >= now

    @rule()
    def restore_a_twin(self) -> None:
        """Restore a new engine from a JSON round trip of a snapshot; from now on it must
        decide exactly as the original."""
        self.twin = Engine()
        self.twin.restore(json.loads(json.dumps(self.engine.snapshot())))

    # ----- invariants -----

    @invariant()
    def no_key_grants_more_than_its_hourly_cap_in_any_calendar_hour(self) -> None:
        """Counted over the grid's hours, whatever boundaries the engine was told."""
        for g in self.grants:
            cap = scaled_cap(g.limits.hourly_cap, g.limits.ppm)
            assert cap is None or g.key_hour <= cap, g

    @invariant()
    def no_key_grants_more_than_its_daily_cap_in_any_calendar_day(self) -> None:
        """Counted over the grid's days, whatever boundaries the engine was told."""
        for g in self.grants:
            cap = scaled_cap(g.limits.daily_cap, g.limits.ppm)
            assert cap is None or g.key_day <= cap, g

    @invariant()
    def no_ip_grants_more_than_its_ip_caps_in_any_calendar_hour_or_day(self) -> None:
        """The sum over providers stays within the IP's hourly and daily caps."""
        for g in self.grants:
            hourly, daily = g.ip_caps
            assert hourly is None or g.ip_hour <= hourly, g
            assert daily is None or g.ip_day <= daily, g

    @invariant()
    def gcra_never_admits_more_than_burst_plus_rate_times_elapsed(self) -> None:
        """In any interval of length t, at most max_burst + rate * t (at the multiplied rate)."""
        for g in self.grants:
            assert g.rate_excess <= 0, g

    @invariant()
    def a_suspended_or_paused_key_grants_nothing(self) -> None:
        """Nothing before the suspension deadline; nothing while paused or at multiplier 0."""
        for g in self.grants:
            assert g.now_ms >= g.limits.suspended_until_ms, g
            assert not g.limits.paused and g.limits.ppm > 0, g

    @invariant()
    def a_key_grants_nothing_outside_its_active_hours(self) -> None:
        """Every grant of a key with active hours fell in one of them (local time)."""
        for g in self.grants:
            mask = g.limits.active_hours
            assert mask is None or mask >> g.hour_of_day & 1, g

    @invariant()
    def a_restored_twin_holds_the_same_state(self) -> None:
        """snapshot() of the twin equals the engine's: restore lost and changed nothing."""
        if self.twin is not None:
            assert self.twin.snapshot() == self.engine.snapshot()


TestEngineInvariants = EngineMachine.TestCase
TestEngineInvariants.settings = settings(stateful_step_count=100)
