"""What each ramp does at a day roll-over: a pure decision, one move per (batch, provider).

`roll_day(plan, day, states, evidence, holds)` takes the local calendar date that just ended,
the persisted `RampState` of every ramp, what that day showed (`DayCounts`, summed over the
batch's IPs) and the hold conditions policy recorded, and returns every ramp's new state plus
the `RampMove`s to write to the decision log. No I/O, no clock, no engine: the caller stores
the states, logs the moves and recompiles the limits (the states feed
`kiln.ramp.compile_limits`).

Rules, checked in this order for each ramp (`gates` are the batch's schedule's):

1. `not_started`: the batch's `start_date` is after `day`. State unchanged.
2. `done`: the ramp is past its last step. State unchanged.
3. `paused`: the ramp holds where it is. Idle and no-advance counters do not age; a day with
   traffic is still recorded (`last_sending_day`, and `idle_days` back to 0).
4. A *sending day* is a day with `granted > 0`: mail was actually let through. On a day without
   traffic `idle_days` grows by one, and:
   - `restart`: `idle_days` reached `gates.rewarm_after_idle_days` (unless null) above step 1:
     back to step 1; the no-advance count starts again.
   - otherwise `hold`. With `gates.sending_days_only` (the default) the day neither advances
     nor ages the ramp; without it the day is an ordinary failed day that counts towards the
     no-advance flag below.
5. On a sending day `idle_days` goes back to 0 and `last_sending_day` becomes `day`, then:
   - `hold` if `holds` lists any condition for the ramp (policy's words, quoted in the reason);
   - `advance` one step if `delivered` was strictly *more* than
     `gates.delivered_above_percent` of `day_cap` (SparkPost: exactly 90% holds), or if the
     step has no cap at all;
   - `hold` otherwise, with the numbers.
6. `flag`: every held day that counts (a sending day, or any day without `sending_days_only`)
   adds one to `days_without_advance`; an advance or restart sets it to 0. Above step 1, once
   it reaches `FLAG_AFTER_DAYS` (10), the hold is followed by a second move, `flag`, for an
   operator (SparkPost would switch its warm-up off). The flag changes nothing and repeats on
   each further held day until the ramp advances or restarts.

`delivered` is what the MTA reported as delivered (the daemon's `report` operation or log
ingestion), never what kiln granted: missing feedback never advances a ramp. Bounces,
complaints and deferrals are recorded in the move's evidence but not judged here; policy turns
them into `holds`. The gate compares exact fractions, so 270 of 300 is 90% and holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal

from kiln.ramp import State, caps_at, plan_providers, steps_for
from kiln.records import DayCounts, RampKey, RampState, StepCaps
from kiln.schedule import Gates, Plan

__all__ = [
    "FLAG_AFTER_DAYS",
    "Action",
    "RampMove",
    "RampView",
    "day_cap",
    "day_evidence",
    "ramp_view",
    "roll_day",
]

FLAG_AFTER_DAYS = 10
"""Held days without an advance, above step 1, after which a ramp is flagged for an operator."""

Action = Literal[
    "advance", "hold", "restart", "done", "not_started", "paused", "flag", "pause", "step_down"
]
_NO_HOLDS: Mapping[RampKey, Sequence[str]] = MappingProxyType({})


def day_evidence(
    plan: Plan, counts: Mapping[tuple[str, str], DayCounts]
) -> dict[tuple[str, str], DayCounts]:
    """Each (batch, provider)'s evidence of a day: the counts of its IPs (keyed by (ip,
    provider)) summed; a key with no counts counts zero."""
    evidence: dict[tuple[str, str], DayCounts] = {}
    for name, batch in plan.batches.items():
        for provider in plan_providers(plan):
            rows = [counts.get((ip, provider)) for ip in batch.ips]
            got = [r for r in rows if r is not None]
            evidence[(name, provider)] = DayCounts(
                granted=sum(r.granted for r in got),
                delivered=sum(r.delivered for r in got),
                deferred=sum(r.deferred for r in got),
                bounced=sum(r.bounced for r in got),
                complaints=sum(r.complaints for r in got),
            )
    return evidence


@dataclass(frozen=True, slots=True)
class RampMove:
    """One decision about one ramp on one day, for the decision log."""

    batch: str
    provider: str
    action: Action
    from_step: int
    to_step: int
    reason: str
    """One sentence for people, with the numbers."""
    evidence: dict[str, Any]
    """JSON-able facts the decision read: counts, cap, percent, threshold, day counts, holds."""


@dataclass(frozen=True, slots=True)
class RampView:
    """One (batch, provider) ramp as operators see it on a local day (status, limits,
    explain): where it stands, what that step allows and how far through the curve it is."""

    batch: str
    provider: str
    state: State
    """`warming`, `done` or `not_started` (before the batch's start date)."""
    paused: bool
    step: int
    steps: int
    caps: StepCaps
    """The step's caps per IP, before spreading over the day."""
    day_cap_total: int | None
    """What the whole batch may send that day (`day_cap`)."""
    warmup_day: int | None
    """Day N of the warm-up (day 1 is the start date); None before it."""
    ramp: RampState

    @property
    def shown_state(self) -> str:
        """The state with a pause shown over it."""
        return "paused" if self.paused else self.state


def ramp_view(
    plan: Plan, states: Mapping[RampKey, RampState], batch: str, provider: str, today: date
) -> RampView:
    """The one view of a ramp that every operator answer is built from."""
    b = plan.batches[batch]
    s = states.get((batch, provider), RampState())
    caps, state = caps_at(plan, batch, provider, s.step)
    warmup_day = (today - b.start_date).days + 1
    return RampView(
        batch=batch,
        provider=provider,
        state="not_started" if b.start_date > today else state,
        paused=s.paused,
        step=s.step,
        steps=len(steps_for(plan.schedules[b.schedule], provider)),
        caps=caps,
        day_cap_total=day_cap(plan, batch, provider, s.step),
        warmup_day=warmup_day if warmup_day >= 1 else None,
        ramp=s,
    )


def day_cap(plan: Plan, batch: str, provider: str, step: int) -> int | None:
    """Most the whole batch may send to `provider` in one day at 1-based `step`.

    Per IP: the step's daily cap, or its hourly cap times the schedule's active hours when it
    has only an hourly cap; with both, the smaller of the two (an explicit hourly cap can make
    the daily cap unreachable). Share steps use the daily cap `caps_at` derives from
    `stream_daily_volume`. Times the batch's IPs. None when the step has no cap or the ramp is
    done. For the shipped curves this is `nominal_plan`'s daily volume times the IPs.
    """
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    caps, state = caps_at(plan, batch, provider, step)
    if state == "done":
        return None
    b = plan.batches[batch]
    hours = plan.schedules[b.schedule].hourly.hours
    per_ip = [
        cap
        for cap in (
            caps.daily_cap,
            None if caps.hourly_cap is None else caps.hourly_cap * hours,
        )
        if cap is not None
    ]
    return min(per_ip) * len(b.ips) if per_ip else None


def roll_day(
    plan: Plan,
    day: date,
    states: Mapping[RampKey, RampState],
    evidence: Mapping[RampKey, DayCounts],
    holds: Mapping[RampKey, Sequence[str]] = _NO_HOLDS,
    step_downs: Mapping[RampKey, Sequence[str]] = _NO_HOLDS,
    pauses: Mapping[RampKey, Sequence[str]] = _NO_HOLDS,
) -> tuple[dict[RampKey, RampState], list[RampMove]]:
    """Every ramp's state after `day` (the local date that just ended) and the moves made.

    Each (batch, provider) of the plan gets a new state and one move (two when a hold is
    flagged), batches in plan order and providers in `plan_providers` order. A missing state
    is `RampState()`, missing evidence is `DayCounts()` (no traffic), missing holds are none.
    Keys of `states` that are not ramps of the plan are left out of the result.

    `step_downs` and `pauses` are policy's verdicts (`kiln.policy`), with their reasons: a
    pause wins over a step-down, which wins over a hold. A paused ramp neither advances nor
    ages; a step-down goes back `plan.policy.day.step_down_steps` steps (never below 1).
    """
    new_states: dict[RampKey, RampState] = {}
    moves: list[RampMove] = []
    providers = plan_providers(plan)
    for batch in plan.batches:
        for provider in providers:
            key = (batch, provider)
            state, day_moves = _roll_one(
                plan,
                day,
                batch,
                provider,
                states.get(key, RampState()),
                evidence.get(key, DayCounts()),
                _hold_list(holds.get(key, ())),
                _hold_list(step_downs.get(key, ())),
                _hold_list(pauses.get(key, ())),
            )
            new_states[key] = state
            moves.extend(day_moves)
    return new_states, moves


def _hold_list(value: Sequence[str]) -> list[str]:
    """Hold conditions as a list; a lone string is one condition, not its letters."""
    return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True, slots=True)
class _Day:
    """One ramp's day, with what every move of it needs to say."""

    batch: str
    provider: str
    day: date
    state: RampState
    seen: DayCounts
    holds: list[str]
    gates: Gates
    cap: int | None

    def move(self, action: Action, to_step: int, reason: str, after: RampState) -> RampMove:
        """A move from the ramp's step to `to_step`, with the day's evidence attached."""
        return RampMove(
            self.batch,
            self.provider,
            action,
            self.state.step,
            to_step,
            reason,
            self.evidence(after),
        )

    def evidence(self, after: RampState) -> dict[str, Any]:
        """JSON-able numbers behind the decision; day counts are those after it."""
        share = self.share()
        return {
            "day": self.day.isoformat(),
            "granted": self.seen.granted,
            "delivered": self.seen.delivered,
            "deferred": self.seen.deferred,
            "bounced": self.seen.bounced,
            "complaints": self.seen.complaints,
            "cap": self.cap,
            "delivered_percent": None if share is None else round(float(share), 4),
            "threshold": self.gates.delivered_above_percent,
            "idle_days": after.idle_days,
            "days_without_advance": after.days_without_advance,
            "holds": list(self.holds),
        }

    def threshold(self) -> Fraction:
        """The gate as written (90.1 is 901/10, not its nearest binary float)."""
        return Fraction(repr(self.gates.delivered_above_percent))

    def share(self) -> Fraction | None:
        """Delivered as an exact percentage of the day's cap (None: no cap)."""
        if self.cap is None:
            return None
        return Fraction(self.seen.delivered * 100, self.cap)

    def passes(self) -> bool:
        """Strictly more than the threshold was delivered, or the step has no cap."""
        share = self.share()
        return share is None or share > self.threshold()

    def numbers(self) -> str:
        """`delivered 285, 95.0% of the day's cap 300 (needs more than 90%)`."""
        share = self.share()
        if share is None:
            return f"delivered {self.seen.delivered}; step {self.state.step} has no daily cap"
        threshold = self.threshold()
        return (
            f"delivered {self.seen.delivered}, {_percent(share, threshold)}% of the day's cap "
            f"{self.cap} (needs more than {_number(threshold)}%)"
        )


def _roll_one(
    plan: Plan,
    day: date,
    batch: str,
    provider: str,
    state: RampState,
    seen: DayCounts,
    holds: list[str],
    step_downs: list[str] | None = None,
    pauses: list[str] | None = None,
) -> tuple[RampState, list[RampMove]]:
    """One ramp's new state and moves; see the module docstring for the rules."""
    b = plan.batches[batch]
    gates = plan.schedules[b.schedule].gates
    _, status = caps_at(plan, batch, provider, state.step)
    cap = None if status == "done" else day_cap(plan, batch, provider, state.step)
    d = _Day(batch, provider, day, state, seen, holds, gates, cap)
    step = state.step

    if b.start_date > day:
        reason = f"batch {batch!r} starts on {b.start_date.isoformat()}; nothing to decide yet"
        return state, [d.move("not_started", step, reason, state)]
    if status == "done":
        count = len(steps_for(plan.schedules[b.schedule], provider))
        reason = f"past the last of {count} steps; the ramp is done"
        return state, [d.move("done", step, reason, state)]

    sending = seen.granted > 0
    sent = replace(state, idle_days=0, last_sending_day=day) if sending else state
    if pauses:
        reason = f"paused by policy at step {step}: {'; '.join(pauses)}"
        return sent, [d.move("pause", step, reason, sent)]
    if step_downs:
        to = max(1, step - plan.policy.day.step_down_steps)
        after = replace(sent, step=to, days_without_advance=0)
        if to == step:
            after = replace(sent, days_without_advance=state.days_without_advance + 1)
            reason = f"held at step 1 (a step-down cannot go lower): {'; '.join(step_downs)}"
            return after, _held(d, after, reason)
        reason = f"stepped down from step {step} to {to}: {'; '.join(step_downs)}"
        return after, [d.move("step_down", to, reason, after)]
    if state.paused:
        after = replace(state, idle_days=0, last_sending_day=day) if sending else state
        reason = f"paused at step {step}: no advance and no ageing until resumed"
        return after, [d.move("paused", step, reason, after)]

    if not sending:
        idle = state.idle_days + 1
        rewarm = gates.rewarm_after_idle_days
        if rewarm is not None and idle >= rewarm and step > 1:
            after = replace(state, step=1, idle_days=idle, days_without_advance=0)
            reason = (
                f"no traffic for {idle} days (rewarm_after_idle_days: {rewarm}); "
                f"restart at step 1 from step {step}"
            )
            return after, [d.move("restart", 1, reason, after)]
        also = f"; also held by: {'; '.join(holds)}" if holds else ""
        if gates.sending_days_only:
            after = replace(state, idle_days=idle)
            reason = (
                f"no traffic (0 granted): the day neither advances nor ages the ramp "
                f"(sending_days_only), {idle} idle day{_s(idle)}{also}"
            )
            return after, [d.move("hold", step, reason, after)]
        after = replace(state, idle_days=idle, days_without_advance=state.days_without_advance + 1)
        reason = f"no traffic (0 granted): {d.numbers()}; {idle} idle day{_s(idle)}{also}"
        return after, _held(d, after, reason)

    if holds:
        after = replace(sent, days_without_advance=state.days_without_advance + 1)
        reason = f"held by: {'; '.join(holds)} ({d.numbers()})"
        return after, _held(d, after, reason)
    if d.passes():
        after = replace(sent, step=step + 1, days_without_advance=0)
        last = len(steps_for(plan.schedules[b.schedule], provider))
        done = "; that was the last step, the ramp is done" if step + 1 > last else ""
        return after, [d.move("advance", step + 1, d.numbers() + done, after)]
    after = replace(sent, days_without_advance=state.days_without_advance + 1)
    return after, _held(d, after, d.numbers())


def _held(d: _Day, after: RampState, reason: str) -> list[RampMove]:
    """A hold, followed by a flag once a ramp above step 1 has gone too long without advancing."""
    moves = [d.move("hold", d.state.step, reason, after)]
    if d.state.step > 1 and after.days_without_advance >= FLAG_AFTER_DAYS:
        flag = (
            f"no advance for {after.days_without_advance} days at step {d.state.step} "
            f"(flagged from {FLAG_AFTER_DAYS}): an operator should look; "
            f"SparkPost would switch its warm-up off"
        )
        moves.append(d.move("flag", d.state.step, flag, after))
    return moves


def _percent(value: Fraction, threshold: Fraction) -> str:
    """`value` with one decimal, or more when one would hide which side of the gate it is on."""
    text = ""
    for places in range(1, 7):
        text = f"{math.floor(value * 10**places) / 10**places:.{places}f}"
        shown = Fraction(text)
        if (shown > threshold) == (value > threshold) and (shown == threshold) == (
            value == threshold
        ):
            return text
    return text


def _number(value: Fraction) -> str:
    """A threshold as written: 90, 92.5."""
    return f"{float(value):g}"


def _s(count: int) -> str:
    """Plural ending."""
    return "" if count == 1 else "s"
