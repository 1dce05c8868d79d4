"""The day roll: every local day that ended is decided for every ramp, once.

Evidence is summed per batch and provider from the stored day counts, policy gives its
verdicts, `rampday.roll_day` moves the ramps, and positions, log entries and the rolled-day
mark are saved in one transaction, so a crash never rolls a day twice.
"""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta
from typing import TYPE_CHECKING

from kiln.ramp import plan_providers
from kiln.rampday import DayEvidence, RampMove, RampState, roll_day
from kiln.store import DayCounts, LogEntry, StoredPosition

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["ROLLED_KEY", "roll_days", "state_of", "stored"]

#: Last local day whose ramps were rolled (store meta key, per plan name).
ROLLED_KEY = "last_rolled_day:{plan}"


def state_of(p: StoredPosition | RampState) -> RampState:
    """A store row as the ramp module's state."""
    return RampState(**{f.name: getattr(p, f.name) for f in dataclasses.fields(RampState)})


def stored(s: RampState) -> StoredPosition:
    """A ramp state as a store row."""
    return StoredPosition(
        **{f.name: getattr(s, f.name) for f in dataclasses.fields(StoredPosition)}
    )


def roll_days(d: Daemon, now_ms: int) -> list[RampMove]:
    """Roll every local day that ended since the last roll (idempotent; catches up).
    The caller pushes the new positions' limits with `apply_plan`."""
    key = ROLLED_KEY.format(plan=d.plan.name)
    last = date.fromisoformat(d.store.get_meta(key) or "1970-01-01")
    today = d.plan_day(now_ms)
    moves: list[RampMove] = []
    day = last + timedelta(days=1)
    while day < today:
        moves += _roll(d, day, now_ms, {key: day.isoformat()})
        day += timedelta(days=1)
    return moves


def _roll(d: Daemon, day: date, now_ms: int, meta: dict[str, str]) -> list[RampMove]:
    """Decide one finished day for every ramp; save positions, `meta` and the moves'
    log entries in one transaction, so a crash never rolls a day twice."""
    counts = d.store.counts(day)
    evidence: dict[tuple[str, str], DayEvidence] = {}
    for name, batch in d.plan.batches.items():
        for provider in plan_providers(d.plan):
            rows = [counts.get((ip, provider), DayCounts()) for ip in batch.ips]
            evidence[(name, provider)] = DayEvidence(
                granted=sum(r.granted for r in rows),
                delivered=sum(r.delivered for r in rows),
                deferred=sum(r.deferred for r in rows),
                bounced=sum(r.bounced for r in rows),
                complaints=sum(r.complaints for r in rows),
            )
    verdicts = d.guard.verdicts(day, evidence, d.store.pushback(day), now_ms)
    states, moves = roll_day(
        d.plan,
        day,
        d.states,
        evidence,
        holds={k: v.hold for k, v in verdicts.items()},
        step_downs={k: v.step_down for k, v in verdicts.items()},
        pauses={k: v.pause for k, v in verdicts.items()},
    )
    acted = d.guard.after_roll(verdicts, moves, now_ms)
    entries = [
        LogEntry(
            now_ms,
            "ramp",
            f"{m.batch}/{m.provider}",
            m.action,
            m.reason,
            {"day": day.isoformat(), "from_step": m.from_step, "to_step": m.to_step} | m.evidence,
        )
        for m in moves
    ] + acted
    d.store.save_positions(
        d.plan.name,
        {k: stored(s) for k, s in states.items()},
        now_ms,
        meta=meta,
        entries=entries,
        automations=d.guard.dirty(),
    )
    d.states = states
    for e in entries:
        level = (
            "warning" if e.action in ("step_down", "pause") or e.kind == "automation" else "info"
        )
        d.log_entry(e, level)
    return moves
