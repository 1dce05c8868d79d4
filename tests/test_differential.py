"""The Rust engine against the reference model: random operation sequences, identical results.

hypothesis draws a list of `(dt, operation)` steps; both `kiln.Engine` and `ReferenceEngine`
run them with one shared clock, and every step must give the same result: the same decision
(granted, reason, retry_after_ms, key, ip, tier), the same released messages, the same
`next_due_ms`, the same handles, and an error from both or from neither.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln import MAX_NOW_MS, CoreError, Decision, Engine
from reference import RefDecision, ReferenceEngine, RefError

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
NO_CAP = 2**32 - 1
"""Caps must stay below this; as a cap it is bad input."""

IPS = ("192.0.2.1", "192.0.2.2", "198.51.100.7", "2001:db8::1", "2001:DB8::1")
"""Four IPs: the last two entries are one IPv6 address, written two ways."""
PROVIDERS = ("google", "yahoo")
POOLS = ("main", "spare", "bulk")

Model = Engine | ReferenceEngine
Outcome = Any
"""What a step returned, reduced to plain comparable data (or ERROR)."""
ERROR = "<error>"


def plain(d: Decision | RefDecision) -> tuple[int, str, int | None, int, str, str]:
    """A decision as a tuple of its six fields."""
    return (d.granted, d.reason, d.retry_after_ms, d.key, d.ip, d.tier)


# ----- operations: each runs the same calls on either engine -----


@dataclass(frozen=True)
class SetLimits:
    """`set_limits` on the key (ip, provider); `rate` is (count, period_ms) or None;
    `active_hours` a mask of local hours or None (every hour)."""

    ip: str
    provider: str
    rate: tuple[int, int] | None
    max_burst: int
    hourly_cap: int | None
    daily_cap: int | None
    active_hours: int | None = None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        count, period = self.rate if self.rate is not None else (None, None)
        e.set_limits(
            e.key(self.ip, self.provider),
            rate_count=count,
            rate_period_ms=period,
            max_burst=self.max_burst,
            hourly_cap=self.hourly_cap,
            daily_cap=self.daily_cap,
            active_hours=self.active_hours,
        )


@dataclass(frozen=True)
class BadLimits:
    """`set_limits` with raw (possibly invalid) keyword arguments."""

    ip: str
    provider: str
    kwargs: tuple[tuple[str, int], ...]

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        e.set_limits(e.key(self.ip, self.provider), **dict(self.kwargs))


@dataclass(frozen=True)
class SetMultiplier:
    """`set_multiplier`, including 0 (a pause), 1 and invalid values."""

    ip: str
    provider: str
    multiplier: float

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        e.set_multiplier(e.key(self.ip, self.provider), self.multiplier)


@dataclass(frozen=True)
class Pause:
    """`pause` (paused=True) or `resume` (paused=False)."""

    ip: str
    provider: str
    paused: bool

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        k = e.key(self.ip, self.provider)
        if self.paused:
            e.pause(k)
        else:
            e.resume(k)


@dataclass(frozen=True)
class Suspend:
    """`suspend` until `now + delta_ms` (in the past when negative), or lift it (None)."""

    ip: str
    provider: str
    delta_ms: int | None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        until = 0 if self.delta_ms is None else max(1, now_ms + self.delta_ms)
        e.suspend(e.key(self.ip, self.provider), until)


@dataclass(frozen=True)
class SetIpCaps:
    """`set_ip_caps`."""

    ip: str
    hourly_cap: int | None
    daily_cap: int | None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        e.set_ip_caps(self.ip, hourly_cap=self.hourly_cap, daily_cap=self.daily_cap)


@dataclass(frozen=True)
class SetCalendar:
    """`set_calendar` with boundaries given relative to now (some may lie in the past), and
    the hour of day of each hour boundary or None."""

    hour_offsets: tuple[int, ...]
    day_offsets: tuple[int, ...]
    hours_of_day: tuple[int, ...] | None = None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        e.set_calendar(
            [now_ms + o for o in self.hour_offsets],
            [now_ms + o for o in self.day_offsets],
            None if self.hours_of_day is None else list(self.hours_of_day),
        )


@dataclass(frozen=True)
class Acquire:
    """`acquire(key(ip, provider), n, now)`."""

    ip: str
    provider: str
    n: int

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        return plain(e.acquire(e.key(self.ip, self.provider), self.n, now_ms))


@dataclass(frozen=True)
class AcquireBatch:
    """`acquire_batch` over keys given as (ip, provider) pairs, with counts or without."""

    keys: tuple[tuple[str, str], ...]
    counts: tuple[int, ...] | None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        handles = array.array("I", [e.key(ip, p) for ip, p in self.keys])
        counts = None if self.counts is None else array.array("I", self.counts)
        return [plain(d) for d in e.acquire_batch(handles, now_ms, counts)]


@dataclass(frozen=True)
class DefinePool:
    """`define_pool`, valid or not (duplicate IPs, weight 0, loops, unknown overflow)."""

    name: str
    members: tuple[tuple[str, int, bool], ...]
    overflow: str | None

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        return e.define_pool(self.name, list(self.members), self.overflow)


@dataclass(frozen=True)
class Pick:
    """`pick(pool(name), provider(name), n, now)`; an undefined pool is an error in both."""

    pool: str
    provider: str
    n: int

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        return plain(e.pick(e.pool(self.pool), e.provider(self.provider), self.n, now_ms))


@dataclass(frozen=True)
class Enqueue:
    """`enqueue` a message for (pool, provider)."""

    message_id: int
    pool: str
    provider: str
    priority: int
    n: int

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        pool, provider = e.pool(self.pool), e.provider(self.provider)
        e.enqueue(self.message_id, pool, provider, self.priority, self.n)
        return e.queued()


@dataclass(frozen=True)
class Due:
    """`due(now, max)`, then `next_due_ms(now)` and `queued()`."""

    max: int

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        released = [(mid, plain(d)) for mid, d in e.due(now_ms, self.max)]
        return released, e.next_due_ms(now_ms), e.queued()


@dataclass(frozen=True)
class NextDue:
    """`next_due_ms(now)` alone."""

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        return e.next_due_ms(now_ms)


@dataclass(frozen=True)
class Usage:
    """`usage` of one key: limits and counters."""

    ip: str
    provider: str

    def run(self, e: Model, now_ms: int) -> Outcome:
        """Apply it."""
        return e.usage(e.key(self.ip, self.provider))


Op = (
    SetLimits
    | BadLimits
    | SetMultiplier
    | Pause
    | Suspend
    | SetIpCaps
    | SetCalendar
    | Acquire
    | AcquireBatch
    | DefinePool
    | Pick
    | Enqueue
    | Due
    | NextDue
    | Usage
)


# ----- strategies -----

# Repeated entries are drawn more often: most steps meet the same few keys.
ips = st.sampled_from([*IPS, IPS[0], IPS[0], IPS[1]])
providers = st.sampled_from([*PROVIDERS, PROVIDERS[0]])
pool_names = st.sampled_from(["main", "main", "spare", "bulk"])
caps = st.none() | st.integers(0, 12)
counts = st.sampled_from([1, 1, 1, 1, 2, 2, 3, 5, 12])
rate = st.tuples(
    st.integers(1, 20), st.sampled_from([1_000, 60_000, HOUR_MS]) | st.integers(1, 10_000_000)
)
rates = st.none() | rate | rate
dts = st.one_of(
    st.just(0),
    st.just(0),
    st.integers(1, 2_000),
    st.integers(1, 2_000),
    st.integers(1, 120_000),
    st.integers(1, 6 * HOUR_MS),
    st.integers(1, 2 * DAY_MS),
    st.integers(-60_000, -1),  # now and then the clock steps back
)
rarely = st.integers(0, 15).map(lambda x: x == 15)
"""True about one time in sixteen (and shrinks to False): for invalid input."""
bad_limit_kwargs = st.sampled_from(
    [
        (("max_burst", 0),),
        (("hourly_cap", NO_CAP),),
        (("daily_cap", NO_CAP),),
        (("rate_count", 5),),
        (("rate_period_ms", 1_000),),
        (("rate_count", 0), ("rate_period_ms", 1_000)),
        (("rate_count", 5), ("rate_period_ms", 0)),
        (("daily_cap", -1),),
        (("daily_cap", NO_CAP - 1), ("hourly_cap", 3)),  # the largest valid cap
    ]
)
multipliers = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 0.1, 1e-6, 4e-7, 5e-7]),
    st.floats(0.0, 1.0),
    st.integers(0, 10**7).map(lambda i: i / 10**7),  # the 7th digit decides the rounding
    st.sampled_from([float("nan"), 1.5, -0.25]),  # bad input
)
DAYTIME = sum(1 << h for h in range(7, 22))
"""Active hours 07-22, as the example plan has them."""
active_hours = st.one_of(
    st.none(),
    st.none(),
    st.sampled_from([DAYTIME, DAYTIME, 1 << 3, 0, 2**24 - 1]),
    st.integers(0, 2**24 - 1),
    st.sampled_from([2**24, -1]),  # bad input
)
limits = st.builds(SetLimits, ips, providers, rates, st.integers(1, 4), caps, caps, active_hours)


@st.composite
def boundary_offsets(draw: st.DrawFn, step: int) -> tuple[int, ...]:
    """Calendar boundaries relative to now: a first one (maybe past, often now or just
    after, where off-by-one mistakes show), then rising steps; sometimes none, rarely a
    repeat (which makes the list invalid)."""
    first = draw(st.sampled_from([0, 1, 1_000]) | st.integers(-step, step))
    offsets = [first]
    for s in draw(st.lists(st.sampled_from([1, 1_000]) | st.integers(1, step), max_size=4)):
        offsets.append(offsets[-1] + s)
    if draw(rarely):
        offsets.append(offsets[-1])
    return () if draw(rarely) else tuple(offsets)


@st.composite
def calendars(draw: st.DrawFn) -> SetCalendar:
    """Hour and day boundaries relative to now; mostly with an hour of day for each hour
    boundary, counting on from a random hour (now and then skipping or repeating one, as DST
    does); rarely a wrong one (out of range, or one too few)."""
    hours = draw(boundary_offsets(2 * HOUR_MS))
    days = draw(boundary_offsets(DAY_MS))
    if draw(st.integers(0, 3)) == 0:
        return SetCalendar(hours, days)
    of_day: list[int] = []
    hour = draw(st.integers(0, 23))
    for _ in hours:
        of_day.append(hour)
        hour = (hour + draw(st.sampled_from([1, 1, 1, 1, 1, 2, 0]))) % 24
    out_of_range, one_short = draw(rarely), draw(rarely)
    if out_of_range and of_day:
        of_day[-1] = draw(st.sampled_from([24, -1]))
    if one_short and of_day:
        of_day.pop()
    return SetCalendar(hours, days, tuple(of_day))


@st.composite
def pool_members(draw: st.DrawFn) -> tuple[tuple[str, int, bool], ...]:
    """One to four (ip, weight, warming) members; rarely a weight of 0, rarely the other
    spelling of the IPv6 address (a duplicate when both spellings are listed)."""
    chosen = draw(
        st.lists(
            st.tuples(st.sampled_from(IPS[:4]), st.integers(1, 4), st.booleans()),
            min_size=1,
            max_size=4,
            unique_by=lambda m: m[0],
        )
    )
    if draw(rarely):
        chosen[0] = (chosen[0][0], 0, chosen[0][2])
    if draw(rarely):
        chosen.append((IPS[4], 1, draw(st.booleans())))
    return tuple(chosen)


@st.composite
def batches(draw: st.DrawFn) -> AcquireBatch:
    """A batch of up to six requests, with per-request counts or without; rarely a 0."""
    requests = draw(st.lists(st.tuples(ips, providers, counts), min_size=1, max_size=6))
    ns = [n for _, _, n in requests]
    if draw(rarely):
        ns[-1] = 0
    with_counts = draw(st.booleans())
    return AcquireBatch(tuple((ip, p) for ip, p, _ in requests), tuple(ns) if with_counts else None)


acquires = st.builds(Acquire, ips, providers, counts)
picks = st.builds(Pick, pool_names, providers, counts)
enqueues = st.builds(
    Enqueue, st.integers(0, 100), pool_names, providers, st.integers(-2, 2), counts
)
dues = st.builds(Due, st.integers(0, 6))
operation_kinds: list[st.SearchStrategy[Op]] = [  # a kind listed n times comes n times as often
    *[acquires] * 4,
    *[picks] * 3,
    *[enqueues] * 2,
    *[dues] * 2,
    *[limits] * 2,
    batches(),
    st.builds(BadLimits, ips, providers, bad_limit_kwargs),
    st.builds(SetMultiplier, ips, providers, multipliers),
    st.builds(Pause, ips, providers, st.booleans()),
    st.builds(Suspend, ips, providers, st.none() | st.integers(-HOUR_MS, 2 * HOUR_MS)),
    st.builds(SetIpCaps, ips, caps, caps),
    calendars(),
    st.builds(DefinePool, pool_names, pool_members(), st.none() | pool_names),
    st.builds(NextDue),
    st.builds(Usage, ips, providers),
]
operations = st.sampled_from(operation_kinds).flatmap(lambda kind: kind)


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[int, Op]]:
    """A setup (pools "spare" and "main" overflowing into it, a calendar of whole hours and
    days with their hours of day, limits on a few keys), then random steps."""
    hours = tuple(range(draw(st.integers(1, HOUR_MS)), 30 * HOUR_MS, HOUR_MS))
    days = tuple(range(draw(st.integers(1, DAY_MS)), 3 * DAY_MS, DAY_MS))
    first = draw(st.integers(0, 23))
    setup: list[Op] = [
        DefinePool("spare", draw(pool_members()), None),
        DefinePool("main", draw(pool_members()), "spare"),
        SetCalendar(hours, days, tuple((first + i) % 24 for i in range(len(hours)))),
        *draw(st.lists(limits, max_size=6)),
    ]
    steps = draw(st.lists(st.tuples(dts, operations), min_size=20, max_size=100))
    return [(0, op) for op in setup] + steps


def run(e: Model, now_ms: int, op: Op) -> Outcome:
    """Run one step, turning the engine's (or the model's) bad-input error into ERROR."""
    try:
        return op.run(e, now_ms)
    except (CoreError, RefError):
        return ERROR


def clock(now_ms: int, dt: int) -> int:
    """Move the shared clock by `dt`, staying within [0, MAX_NOW_MS]."""
    return min(max(now_ms + dt, 0), MAX_NOW_MS)


# ----- the tests -----


def tight_limits(ip: str, provider: str) -> st.SearchStrategy[SetLimits]:
    """A slow rate (1 to 3 per 1 s to 1 min), a small burst and small caps for one key, and
    sometimes active hours."""
    return st.builds(
        SetLimits,
        st.just(ip),
        st.just(provider),
        st.tuples(st.integers(1, 3), st.sampled_from([1_000, 10_000, 60_000])),
        st.integers(1, 2),
        st.none() | st.integers(0, 6),
        st.none() | st.integers(0, 12),
        st.none() | st.none() | st.sampled_from([DAYTIME, 1 << 1 | 1 << 5]),
    )


@st.composite
def queue_scenarios(draw: st.DrawFn) -> list[tuple[int, Op]]:
    """A busy release queue: small pools whose every key has a tight rate (so queues are
    often set aside, with a known wait or none), then mostly enqueue and due steps."""
    spare = draw(st.sampled_from(IPS[:4]))
    main = draw(st.lists(st.sampled_from(IPS[:4]), min_size=1, max_size=2, unique=True))
    setup: list[Op] = [
        DefinePool("spare", ((spare, 1, False),), None),
        DefinePool("main", tuple((ip, 1, draw(st.booleans())) for ip in main), "spare"),
        SetCalendar(
            tuple(range(HOUR_MS, 30 * HOUR_MS, HOUR_MS)),
            (DAY_MS, 2 * DAY_MS),
            tuple(i % 24 for i in range(1, 30)),
        ),
    ]
    setup.extend(draw(tight_limits(ip, p)) for ip in IPS[:4] for p in PROVIDERS)
    kinds: list[st.SearchStrategy[Op]] = [
        *[enqueues] * 4,
        *[dues] * 4,
        st.builds(NextDue),
        acquires,
        picks,
        st.builds(Suspend, ips, providers, st.none() | st.integers(1, 120_000)),
        st.builds(Pause, ips, providers, st.booleans()),
        st.builds(SetMultiplier, ips, providers, st.sampled_from([0.0, 0.5, 1.0])),
    ]
    small_dts = st.sampled_from([0, 0, 1, 999, 1_000]) | st.integers(0, 30_000) | dts
    steps = st.tuples(small_dts, st.sampled_from(kinds).flatmap(lambda kind: kind))
    return [(0, op) for op in setup] + draw(st.lists(steps, min_size=20, max_size=100))


@st.composite
def key_scenarios(draw: st.DrawFn) -> list[tuple[int, Op]]:
    """Two keys on one IP under every kind of limit at once (rate, caps, IP caps,
    multiplier, pause, suspension, active hours, calendar), asked again and again within
    short times, so that denials often have several holding limits."""
    ip = IPS[0]
    both_keys = st.sampled_from(PROVIDERS)
    setup: list[Op] = [
        SetCalendar(
            tuple(range(HOUR_MS // 2, 30 * HOUR_MS, HOUR_MS)),
            (DAY_MS // 3, DAY_MS),
            tuple(i % 24 for i in range(30)),
        ),
        *(draw(tight_limits(ip, p)) for p in PROVIDERS),
    ]
    kinds: list[st.SearchStrategy[Op]] = [
        *[st.builds(Acquire, st.just(ip), both_keys, counts)] * 6,
        st.builds(
            SetLimits, st.just(ip), both_keys, rates, st.integers(1, 4), caps, caps, active_hours
        ),
        st.builds(SetMultiplier, st.just(ip), both_keys, multipliers),
        st.builds(Pause, st.just(ip), both_keys, st.booleans()),
        st.builds(Suspend, st.just(ip), both_keys, st.none() | st.integers(1, 120_000)),
        st.builds(SetIpCaps, st.just(ip), caps, caps),
        calendars(),
        st.builds(Usage, st.just(ip), both_keys),
    ]
    small_dts = st.sampled_from([0, 0, 1, 999, 1_000]) | st.integers(0, 30_000) | dts
    steps = st.tuples(small_dts, st.sampled_from(kinds).flatmap(lambda kind: kind))
    return [(0, op) for op in setup] + draw(st.lists(steps, min_size=20, max_size=100))


@given(key_scenarios())
def test_limits_of_one_ip_agree_with_reference(steps: list[tuple[int, Op]]) -> None:
    """With every kind of limit on two keys of one IP, the engine names the same first
    holding limit and the same longest wait as the model, at every step."""
    check_steps(steps)


@given(scenarios())
def test_engine_agrees_with_reference_on_every_step(steps: list[tuple[int, Op]]) -> None:
    """Any sequence of limits, pauses, suspensions, IP caps, calendars, acquires, batches,
    pools, picks and queue operations gives the same result from engine and model at every
    step, and leaves every key with the same limits and counters."""
    check_steps(steps)


@given(queue_scenarios())
def test_release_queue_agrees_with_reference(steps: list[tuple[int, Op]]) -> None:
    """With tightly limited pools, the release queue sets queues aside and wakes them exactly
    as the model does: the same messages released with the same decisions, and the same
    next_due_ms, at every step."""
    check_steps(steps)


def check_steps(steps: list[tuple[int, Op]]) -> None:
    """Run the steps on a new engine and a new model with one clock; require equal results
    at every step and equal usage of every key at the end."""
    engine, model = Engine(), ReferenceEngine()
    now = T0
    for i, (dt, op) in enumerate(steps):
        now = clock(now, dt)
        got, want = run(engine, now, op), run(model, now, op)
        assert got == want, f"step {i}: {op} at {now}"
    assert engine.key_count() == len(model.keys)
    for k in range(engine.key_count()):
        assert engine.usage(k) == model.usage(k), f"key {k}"


@st.composite
def batch_scenarios(
    draw: st.DrawFn,
) -> tuple[list[SetLimits], list[tuple[int, list[int], list[int] | None]]]:
    """Limits for a few keys, then batches of (dt, key handles, counts or None) over the
    eight keys; rarely an unknown handle or a count of 0, which makes a batch invalid."""
    key_limits = draw(st.lists(limits, min_size=1, max_size=8))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        dt = draw(dts)
        size = draw(st.integers(1, 24))
        keys = draw(st.lists(st.integers(0, 7), min_size=size, max_size=size))
        counts = draw(st.none() | st.lists(st.integers(1, 4), min_size=size, max_size=size))
        if draw(rarely):
            keys[-1] = 8
        if counts is not None and draw(rarely):
            counts[0] = 0
        requests.append((dt, keys, counts))
    return key_limits, requests


@given(batch_scenarios())
def test_acquire_batch_is_sequential_acquires(
    scenario: tuple[list[SetLimits], list[tuple[int, list[int], list[int] | None]]],
) -> None:
    """acquire_batch(array('I') of keys, now, counts) decides exactly as one reference
    acquire per (key, n) in order; a batch with an unknown key or a count of 0 raises and
    decides nothing."""
    engine, model = Engine(), ReferenceEngine()
    for ip in IPS[:4]:
        for provider in PROVIDERS:
            assert engine.key(ip, provider) == model.key(ip, provider)
    for op in scenario[0]:
        assert run(engine, T0, op) == run(model, T0, op)
    now = T0
    for dt, keys, counts in scenario[1]:
        now = clock(now, dt)
        ns: Sequence[int] = [1] * len(keys) if counts is None else counts
        batch_counts = None if counts is None else array.array("I", counts)
        if max(keys) >= engine.key_count() or 0 in ns:
            before = engine.snapshot()
            with pytest.raises(CoreError):
                engine.acquire_batch(array.array("I", keys), now, batch_counts)
            assert engine.snapshot() == before
            continue
        got = engine.acquire_batch(array.array("I", keys), now, batch_counts)
        want = [model.acquire(k, n, now) for k, n in zip(keys, ns, strict=True)]
        assert [plain(d) for d in got] == [plain(d) for d in want]
        assert got.granted == sum(d.granted for d in want)
        assert got.denied == sum(not d for d in want)
    for k in range(engine.key_count()):
        assert engine.usage(k) == model.usage(k)
