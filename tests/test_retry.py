"""`retry_after_ms` is the earliest time the same request is granted, in real time zones.

A denial's `retry_after_ms = r` promises: if nothing else is granted and no limit changes,
the same request is granted at `now + r` and at no earlier time; `None` promises that no
later time grants it (a pause, a retired IP, `n` above a cap or the burst, or no calendar
boundary or active hour supplied that far). hypothesis checks both on engines without
reservations, with every kind of limit (rate, hourly and daily caps, IP caps, multiplier,
suspension, pause, active hours) and with calendars made the way the daemon makes them
(`kiln.ramp.calendar` and `hours_of_day`) in zones with DST changes, half-hour offsets and a
half-hour DST shift, around those changes and across hour and day boundaries. The same
promises are checked on the reference model, for `acquire` and for `pick`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from kiln import Decision, Engine
from kiln.ramp import active_hours_mask, calendar, hours_of_day
from reference import RefDecision, ReferenceEngine

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
IPS = ("192.0.2.1", "192.0.2.2")
PROVIDERS = ("google", "yahoo")
KEYS = [(ip, p) for ip in IPS for p in PROVIDERS]
"""Every key, in handle order (interned first)."""


def ms(text: str) -> int:
    """An ISO instant with offset as epoch milliseconds."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


MOMENTS = [
    ("Europe/Berlin", ms("2026-03-29T01:30:00+01:00")),  # DST starts: no 02:00
    ("Europe/Berlin", ms("2026-10-25T01:30:00+02:00")),  # DST ends: 02:00 twice
    ("Europe/Berlin", ms("2026-12-04T21:45:00+01:00")),
    ("America/New_York", ms("2026-03-08T01:30:00-05:00")),
    ("America/New_York", ms("2026-11-01T00:30:00-04:00")),
    ("Asia/Kolkata", ms("2026-06-01T06:40:00+05:30")),  # hours begin at :30 UTC
    ("Australia/Lord_Howe", ms("2026-10-04T01:40:00+10:30")),  # DST moves by 30 minutes
    ("Australia/Lord_Howe", ms("2026-04-05T01:20:00+11:00")),
    ("UTC", ms("2026-07-01T23:10:00+00:00")),
]
"""(zone, instant) near something interesting: a DST change, an odd offset, a day's end."""

Model = Engine | ReferenceEngine


@dataclass(frozen=True)
class KeyLimits:
    """What one key is given."""

    rate: tuple[int, int] | None
    max_burst: int
    hourly_cap: int | None
    daily_cap: int | None
    active_hours: int | None
    multiplier: float
    paused: bool
    suspended_for_ms: int | None


@dataclass(frozen=True)
class Setup:
    """A zone and start, the calendar's reach, limits per key, IP caps, a pool, traffic."""

    zone: str
    start_ms: int
    calendar_hours: int
    keys: tuple[KeyLimits, ...]
    ip_caps: tuple[tuple[int | None, int | None], ...]
    warming: tuple[bool, bool]
    traffic: tuple[tuple[int, int, int], ...]
    """(ms after the previous request, key, n): requests before the one checked."""


windows = st.tuples(st.integers(0, 23), st.integers(1, 24)).filter(lambda w: w[0] < w[1])
masks = st.one_of(
    st.none(),
    windows.map(active_hours_mask),
    st.just(active_hours_mask((7, 22))),
    st.integers(1, 2**24 - 1),
)
rates = st.tuples(st.integers(1, 30), st.sampled_from([1_000, 60_000, HOUR_MS]))
key_limits = st.builds(
    KeyLimits,
    st.none() | rates | rates,
    st.integers(1, 3),
    st.none() | st.integers(0, 6),
    st.none() | st.integers(0, 15),
    masks,
    st.sampled_from([1.0] * 8 + [0.5, 0.5, 0.25, 0.0]),
    st.integers(0, 11).map(lambda x: x == 11),
    st.none() | st.none() | st.integers(1, 3 * HOUR_MS),
)
caps = st.none() | st.integers(0, 10)
keys = st.sampled_from([0, 0, 0, 1, 2, 3])
"""Key handles, the first more often (so that traffic and the request checked meet)."""
setups = st.builds(
    Setup,
    st.sampled_from(MOMENTS).map(lambda m: m[0]),
    st.integers(-DAY_MS, DAY_MS),
    st.sampled_from([48, 48, 48, 48, 48, 6, 0]),
    st.lists(key_limits, min_size=len(KEYS), max_size=len(KEYS)).map(tuple),
    st.lists(st.tuples(caps, caps), min_size=len(IPS), max_size=len(IPS)).map(tuple),
    st.tuples(st.booleans(), st.booleans()),
    st.lists(
        st.tuples(
            st.sampled_from([0, 0, 1, 500, 60_000]) | st.integers(0, 3 * HOUR_MS),
            keys,
            st.sampled_from([1, 1, 2, 4]),
        ),
        max_size=12,
    ).map(tuple),
)


def moment(s: Setup) -> int:
    """The setup's start: an interesting instant of its zone, shifted."""
    base = next(t for zone, t in MOMENTS if zone == s.zone)
    return base + s.start_ms


def build(model: type[Model], s: Setup) -> tuple[Model, int]:
    """An engine (or model) set up as `s` says, its traffic sent; returns it and the time."""
    e = model()
    zone = ZoneInfo(s.zone)
    now = moment(s)
    handles = [e.key(ip, p) for ip, p in KEYS]
    for k, lim in zip(handles, s.keys, strict=True):
        count, period = lim.rate if lim.rate is not None else (None, None)
        e.set_limits(
            k,
            rate_count=count,
            rate_period_ms=period,
            max_burst=lim.max_burst,
            hourly_cap=lim.hourly_cap,
            daily_cap=lim.daily_cap,
            active_hours=lim.active_hours,
        )
        e.set_multiplier(k, lim.multiplier)
        if lim.paused:
            e.pause(k)
        if lim.suspended_for_ms is not None:
            e.suspend(k, now + lim.suspended_for_ms)
    for ip, (hourly, daily) in zip(IPS, s.ip_caps, strict=True):
        e.set_ip_caps(ip, hourly_cap=hourly, daily_cap=daily)
    e.define_pool("main", [(ip, 1, warm) for ip, warm in zip(IPS, s.warming, strict=True)])
    hours, days = calendar(zone, now, hours=s.calendar_hours)
    e.set_calendar(hours, days, hours_of_day(zone, hours))
    for dt, key, n in s.traffic:
        now += dt
        e.acquire(handles[key], n, now)
    return e, now


def clone(e: Model) -> Model:
    """An independent copy of `e` (the engine through a snapshot, the model deep-copied)."""
    if isinstance(e, Engine):
        twin = Engine()
        twin.restore(e.snapshot())
        return twin
    return copy.deepcopy(e)


Ask = Callable[[Model, int], Decision | RefDecision]


def check_promise(e: Model, now: int, ask: Ask) -> Decision | RefDecision:
    """Ask at `now`; if denied, check what `retry_after_ms` promises on copies of `e`:
    granted at now + r, denied a millisecond before and at a few times in between; for None,
    denied at times up to 40 days later."""
    d = ask(clone(e), now)
    if d:
        return d
    r = d.retry_after_ms
    if r is None:
        for later in (1, HOUR_MS, DAY_MS, 3 * DAY_MS, 40 * DAY_MS):
            assert not ask(clone(e), now + later), f"None, yet granted {later} ms later: {d}"
        return d
    assert r >= 1, d
    assert ask(clone(e), now + r), f"not granted at now + retry_after_ms: {d}"
    for before in (r - 1, r // 2, r - r // 7, 0):
        if before < r:
            assert not ask(clone(e), now + before), f"granted {before} ms after: {d}"
    return d


def local_hour(zone: ZoneInfo, t_ms: int) -> int:
    """The hour of the local wall clock at `t_ms`."""
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(zone).hour


@given(setups, keys, st.sampled_from([1, 1, 2, 5]), st.booleans())
def test_retry_after_is_the_earliest_grant_for_acquire(
    s: Setup, key: int, n: int, on_model: bool
) -> None:
    """After any traffic, a denied acquire is granted exactly `retry_after_ms` later and not
    before; None means never. For a key with active hours the wait is, by the zone's own
    clock (DST and all), the first instant in an active hour at or after the time the same
    key open every hour would be granted."""
    e, now = build(ReferenceEngine if on_model else Engine, s)
    d = check_promise(e, now, lambda m, t: m.acquire(key, n, t))
    lim = s.keys[key]
    if d or lim.active_hours is None or d.retry_after_ms is None:
        return
    zone = ZoneInfo(s.zone)
    open_all_day = clone(e)
    count, period = lim.rate if lim.rate is not None else (None, None)
    open_all_day.set_limits(
        key,
        rate_count=count,
        rate_period_ms=period,
        max_burst=lim.max_burst,
        hourly_cap=lim.hourly_cap,
        daily_cap=lim.daily_cap,
    )
    free = open_all_day.acquire(key, n, now)
    assert free or free.retry_after_ms is not None, "a wait without active hours is known"
    t = now if free else now + (free.retry_after_ms or 0)
    # Every zone's hours begin on a quarter hour: the first active one from t.
    quarter = 15 * 60_000
    if not lim.active_hours >> local_hour(zone, t) & 1:
        t = t - t % quarter + quarter
        while not lim.active_hours >> local_hour(zone, t) & 1:
            t += quarter
    assert now + d.retry_after_ms == t, "not the first active instant the key is free"
    if d.reason == "outside_active_hours":
        assert lim.active_hours >> local_hour(zone, now) & 1 == 0, "denied in an active hour"


@given(setups, st.sampled_from(PROVIDERS), st.sampled_from([1, 1, 2, 5]), st.booleans())
def test_retry_after_is_the_earliest_grant_for_pick(
    s: Setup, provider: str, n: int, on_model: bool
) -> None:
    """A denied pick (every member of the pool held back) is granted exactly
    `retry_after_ms` later, by whichever member frees first, and not before; None means
    never."""
    e, now = build(ReferenceEngine if on_model else Engine, s)
    pool, prov = e.pool("main"), e.provider(provider)
    check_promise(e, now, lambda m, t: m.pick(pool, prov, n, t))


@given(setups)
def test_a_key_outside_its_active_hours_says_so(s: Setup) -> None:
    """In a local hour that is not one of its active hours a key is denied
    `outside_active_hours` (unless paused: then "paused" and None); it is granted only in
    its active hours."""
    e, now = build(Engine, s)
    hour = local_hour(ZoneInfo(s.zone), now)
    for k, lim in enumerate(s.keys):
        d = e.acquire(k, 1, now)
        if lim.paused or lim.multiplier == 0.0:
            assert (d.reason, d.retry_after_ms) == ("paused", None)
        elif lim.active_hours is not None and not lim.active_hours >> hour & 1:
            assert (d.granted, d.reason) == (0, "outside_active_hours")
        if d and lim.active_hours is not None:
            assert lim.active_hours >> hour & 1, "granted outside active hours"
