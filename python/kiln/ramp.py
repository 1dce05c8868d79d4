"""From a plan to caps: pure functions, time and ramp positions given as arguments.

- `steps_for(schedule, provider)`: the curve of one provider as a list of `StepCaps`.
- `caps_at(plan, batch, provider, step)`: the caps of one step, hourly spreading applied.
- `nominal_plan(plan, days)`: what the plan allows day by day if every gate passes.
- `compile_limits(plan, positions, now_ms)`: per-(IP, provider) limits for the engine now.
- `active_hours_mask(window)`: a schedule's active hours as the engine's mask of local hours.
- `calendar(zone, now_ms, hours)`: when coming calendar hours and days begin (DST-correct).
- `hours_of_day(zone, instants)`: the local hour each of those hours is (for active hours).
- `apply(engine, plan, limits)`: push limits and pools into a `kiln.Engine`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from kiln._core import Engine
from kiln.provider import DEFAULT_PROVIDER
from kiln.rate import RateSpec
from kiln.records import RampKey, RampState, StepCaps
from kiln.schedule import MAX_CAP, Plan, Schedule, SteadyState

__all__ = [
    "CompiledLimit",
    "PlanRow",
    "PoolRow",
    "active_hours_mask",
    "apply",
    "calendar",
    "caps_at",
    "compile_limits",
    "hours_of_day",
    "nominal_plan",
    "plan_providers",
    "steps_for",
]

HOUR_MS = 3_600_000
State = Literal["warming", "done", "not_started"]


@dataclass(frozen=True, slots=True)
class CompiledLimit:
    """What the engine enforces for one (IP, provider) key now. None means no limit.

    `active_hours` is the engine's mask of local hours in which the key may send (bit h: the
    hour from h:00 in the plan's zone); None: every hour.
    """

    ip: str
    provider: str
    daily_cap: int | None
    hourly_cap: int | None
    rate: RateSpec | None
    paused: bool = False
    warming: bool = True
    active_hours: int | None = None


@dataclass(frozen=True, slots=True)
class PlanRow:
    """One day of one (batch, provider) ramp in the nominal plan (see schedules/README.md)."""

    date: str
    #: Warm-up day: 1 on the batch's start date (0 and below before it), as `warmup_day`.
    day: int
    batch: str
    pool: str
    provider: str
    state: State
    step: int | None
    ips: int
    daily_cap: int | None
    hourly_cap: int | None
    share_percent: float | None


@dataclass(frozen=True, slots=True)
class PoolRow:
    """New-IP capacity of a pool for one provider on one day (None: unlimited)."""

    date: str
    pool: str
    provider: str
    new_ip_daily_capacity: int | None


#: `steps_for` results by (schedule object, provider); the schedule is held, so its id stays
#: its own while cached. Plans are immutable once loaded; a reload brings new objects.
_STEPS: dict[tuple[int, str], tuple[Schedule, tuple[StepCaps, ...]]] = {}
_STEPS_MAX = 4096


def steps_for(schedule: Schedule, provider: str) -> Sequence[StepCaps]:
    """The curve `provider` follows under `schedule`: its own, scaled, or the schedule's.
    Computed once per schedule and provider (status and policy ask for it per request)."""
    key = (id(schedule), provider)
    hit = _STEPS.get(key)
    if hit is not None and hit[0] is schedule:
        return hit[1]
    steps = tuple(_steps_for(schedule, provider))
    if len(_STEPS) >= _STEPS_MAX:
        _STEPS.clear()
    _STEPS[key] = (schedule, steps)
    return steps


def _steps_for(schedule: Schedule, provider: str) -> list[StepCaps]:
    base = schedule.curve_caps()
    override = schedule.providers.get(provider)
    if override is None:
        return base
    if override.scale is not None:
        scale = override.scale

        def scaled(cap: int | None) -> int | None:
            """A cap times the scale, at least 1."""
            return None if cap is None else min(MAX_CAP, max(1, round(cap * scale)))

        return [StepCaps(scaled(s.daily_cap), scaled(s.hourly_cap), s.share_percent) for s in base]
    return override.curve_caps()


def plan_providers(plan: Plan) -> list[str]:
    """Providers that get their own rows: named in the plan or its overrides, then `default`.

    Every other provider follows the `default` row's curve.
    """
    named = set(plan.providers)
    for schedule in plan.schedules.values():
        named |= set(schedule.providers)
    named.discard(DEFAULT_PROVIDER)
    return [*sorted(named), DEFAULT_PROVIDER]


def _spread(schedule: Schedule, caps: StepCaps, ips: int) -> tuple[int | None, int | None]:
    """(daily, hourly) per IP: the hourly cap defaults to the daily cap over active hours."""
    daily = caps.daily_cap
    if caps.share_percent is not None and schedule.share is not None:
        volume = schedule.share.stream_daily_volume
        if volume is not None:
            daily = max(1, math.ceil(volume * caps.share_percent / 100 / max(ips, 1)))
    hourly = caps.hourly_cap
    if hourly is None and daily is not None:
        hourly = math.ceil(daily / schedule.hourly.hours)
    return daily, hourly


def caps_at(plan: Plan, batch: str, provider: str, step: int) -> tuple[StepCaps, State]:
    """Per-IP caps of `batch` for `provider` at 1-based `step` (past the end: steady state)."""
    b = plan.batches[batch]
    schedule = plan.schedules[b.schedule]
    steps = steps_for(schedule, provider)
    if step <= len(steps):
        current = steps[step - 1]
        daily, hourly = _spread(schedule, current, len(b.ips))
        return StepCaps(daily, hourly, current.share_percent), "warming"
    after = schedule.after_last_step
    if isinstance(after, SteadyState):
        return StepCaps(after.daily_cap, after.hourly_cap), "done"
    return StepCaps(), "done"


def nominal_plan(
    plan: Plan,
    days: int | None = None,
    batch: str | None = None,
    provider: str | None = None,
) -> tuple[list[PlanRow], list[PoolRow]]:
    """Day by day from the first batch's start: the caps if every day passes its gates."""
    batches = {n: b for n, b in plan.batches.items() if batch is None or n == batch}
    providers = [p for p in plan_providers(plan) if provider is None or p == provider]
    if provider is not None and provider not in providers:
        providers = [provider]
    if not batches:
        return [], []
    first = min(b.start_date for b in batches.values())
    if days is None:
        ends = [
            (b.start_date - first).days
            + max(len(steps_for(plan.schedules[b.schedule], p)) for p in providers)
            for b in batches.values()
        ]
        days = min(max(ends) + 1, 3660)
    rows: list[PlanRow] = []
    pools: list[PoolRow] = []
    for offset in range(days):
        today = first + timedelta(days=offset)
        capacity: dict[tuple[str, str], int | None] = {}
        for name, b in batches.items():
            day = (today - b.start_date).days + 1  # warm-up day: 1 is the start date
            schedule = plan.schedules[b.schedule]
            for p in providers:
                if day < 1:
                    rows.append(_row(today, day, name, b.pool, p, "not_started", None, len(b.ips)))
                    continue
                caps, state = caps_at(plan, name, p, day)
                rows.append(_row(today, day, name, b.pool, p, state, day, len(b.ips), caps))
                key = (b.pool, p)
                per_ip = _daily_volume(caps, schedule)
                prior = capacity.get(key, 0)
                capacity[key] = (
                    None if per_ip is None or prior is None else prior + per_ip * len(b.ips)
                )
        pools.extend(
            PoolRow(today.isoformat(), pool, p, cap) for (pool, p), cap in sorted(capacity.items())
        )
    return rows, pools


def _daily_volume(caps: StepCaps, schedule: Schedule) -> int | None:
    """Most one IP may send in a day under `caps` (None: unlimited)."""
    if caps.daily_cap is not None:
        return caps.daily_cap
    if caps.hourly_cap is not None:
        return caps.hourly_cap * schedule.hourly.hours
    return None


def _row(
    today: date,
    day: int,
    batch: str,
    pool: str,
    provider: str,
    state: State,
    step: int | None,
    ips: int,
    caps: StepCaps | None = None,
) -> PlanRow:
    """A plan row."""
    c = caps or StepCaps()
    return PlanRow(
        today.isoformat(),
        day,
        batch,
        pool,
        provider,
        state,
        step if state == "warming" else None,
        ips,
        c.daily_cap,
        c.hourly_cap,
        c.share_percent,
    )


def compile_limits(
    plan: Plan, positions: Mapping[RampKey, RampState], now_ms: int
) -> list[CompiledLimit]:
    """The limit of every (batch IP, provider) key, for every provider row.

    A warming key carries its schedule's active hours: outside them the engine denies it
    (`outside_active_hours`, with the time the next active hour starts) and `pick` overflows
    to warm IPs. A done ramp sends at any hour. A batch before its start date is treated as
    at step 1. The limits do not depend on the hour (`now_ms` is kept for callers); the engine
    reads the hour of day from its calendar (`calendar`, `hours_of_day`).
    """
    del now_ms  # the hour of day reaches the engine through set_calendar's hours_of_day
    out: list[CompiledLimit] = []
    for name, b in plan.batches.items():
        schedule = plan.schedules[b.schedule]
        mask = active_hours_mask(schedule.hourly.window)
        for provider in plan_providers(plan):
            position = positions.get((name, provider), RampState())
            caps, state = caps_at(plan, name, provider, position.step)
            hourly = caps.hourly_cap
            rate = schedule.max_message_rate
            if rate is None and state == "warming" and caps.hourly_cap is not None:
                rate = RateSpec(caps.hourly_cap, HOUR_MS, schedule.hourly.max_burst)
            if state == "done" and isinstance(schedule.after_last_step, SteadyState):
                rate = schedule.after_last_step.max_message_rate
            elif state == "done":
                rate = None
            warming = state != "done"
            out.extend(
                CompiledLimit(
                    ip,
                    provider,
                    caps.daily_cap,
                    hourly,
                    rate,
                    position.paused,
                    warming,
                    mask if warming else None,
                )
                for ip in b.ips
            )
    return out


def active_hours_mask(window: tuple[int, int]) -> int | None:
    """Local hours [start, end) as the engine's mask (bit h: the hour from h:00); None for
    the whole day (00-24)."""
    start, end = window
    mask = sum(1 << h for h in range(start, end))
    return None if mask == (1 << 24) - 1 else mask


def hours_of_day(zone: ZoneInfo, instants_ms: Iterable[int]) -> list[int]:
    """The local hour (0-23) in `zone` at each instant: with `calendar`'s hour starts, what
    `Engine.set_calendar` needs to read active hours (a repeated hour at the end of DST is
    the same hour twice; a skipped one never begins)."""
    return [datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone).hour for ms in instants_ms]


def calendar(zone: ZoneInfo, now_ms: int, hours: int = 48) -> tuple[list[int], list[int]]:
    """Instants (ms) at which local hours and days begin from `now_ms` for `hours` ahead.

    Scans quarter hours (every zone's offset is a multiple of 15 minutes) and records each
    change of local hour or local date, so DST gaps and repeats and half-hour zones all come
    out right. The first entries are the starts of the current hour and day.
    """
    quarter = 15 * 60_000
    t = now_ms - now_ms % quarter

    # Walk back to the start of the current local day (at most 26 hours).
    def local(ms: int) -> datetime:
        """Wall time in the zone."""
        return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone)

    begin = t
    today = local(t).date()
    while local(begin - quarter).date() == today:
        begin -= quarter
    hour_starts: list[int] = []
    day_starts: list[int] = [begin]
    prev = local(begin)
    hour_starts.append(begin)
    ms = begin + quarter
    while ms <= now_ms + hours * HOUR_MS:
        cur = local(ms)
        if cur.date() != prev.date():
            day_starts.append(ms)
        # A repeated hour (DST ends) is a new hour: the offset tells them apart.
        if (cur.date(), cur.hour, cur.utcoffset()) != (prev.date(), prev.hour, prev.utcoffset()):
            hour_starts.append(ms)
        prev = cur
        ms += quarter
    current_hour = [h for h in hour_starts if h <= now_ms][-1:]
    return current_hour + [h for h in hour_starts if h > now_ms], day_starts


def apply(engine: Engine, plan: Plan, limits: Iterable[CompiledLimit]) -> None:
    """Push `limits` into `engine`, define the plan's pools, and retire every other IP and pool.

    A batch IP is a warming member of its pool while any of its provider ramps is warming,
    and a warm member after that. Pool IPs outside batches are warm and get no limits. An IP
    the engine knows that the plan no longer lists (a reload dropped it) is retired: the
    engine answers it as an IP it never heard of and never grants it, as a fresh daemon on
    this plan would; a later plan that lists it again brings it back with the limits it pushes.
    """
    limits = list(limits)
    warming = {limit.ip for limit in limits if limit.warming}
    for limit in limits:
        key = engine.key(limit.ip, limit.provider)
        rate = limit.rate
        engine.set_limits(
            key,
            rate_count=rate.count if rate else None,
            rate_period_ms=rate.period_ms if rate else None,
            max_burst=rate.max_burst if rate else 1,
            hourly_cap=limit.hourly_cap,
            daily_cap=limit.daily_cap,
            active_hours=limit.active_hours,
        )
        if limit.paused:
            engine.pause(key)
        else:
            engine.resume(key)
    defined: set[str] = set()

    def define(name: str) -> None:
        """Define a pool after the pool it overflows into."""
        if name in defined:
            return
        defined.add(name)
        pool = plan.pools[name]
        if pool.overflow is not None:
            define(pool.overflow)
        members = [(m.ip, m.weight, False) for m in pool.members()]
        members += [
            (ip, b.weight, ip in warming)
            for b in plan.batches.values()
            if b.pool == name
            for ip in b.ips
        ]
        engine.define_pool(name, members, pool.overflow)

    for name in plan.pools:
        define(name)
    engine.retain_ips(plan.all_ips())
    engine.retain_pools(list(plan.pools))
