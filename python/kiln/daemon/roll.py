"""The day roll: every local day that ended is decided for every ramp, once.

Evidence is summed per batch and provider from the stored day counts, policy gives its
verdicts, `rampday.roll_day` moves the ramps, and positions, log entries and the rolled-day
mark are saved in one transaction, so a crash never rolls a day twice. The serving daemon
reads and writes the store on its store thread (`kiln.daemon.runner.OFF_LOOP`); decisions
stay on the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from kiln.rampday import RampMove, day_evidence, roll_day
from kiln.records import DayCounts, LogEntry, PushbackKey, RampState
from kiln.store import Store

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon
    from kiln.daemon.runner import Runner

__all__ = ["ROLLED_KEY", "roll_days"]

#: Last local day whose ramps were rolled (store meta key, per plan name).
ROLLED_KEY = "last_rolled_day:{plan}"


async def roll_days(d: Daemon, run: Runner, now_ms: int) -> list[RampMove]:
    """Roll every local day that ended since the last roll (idempotent; catches up). The
    serving daemon runs it under `Daemon.job_lock`, so no other state-changing job
    interleaves. The caller pushes the new positions' limits with `apply_plan`."""
    key = ROLLED_KEY.format(plan=d.plan.name)
    rolled: str | None = await run.store(d.persist, d.store.get_meta, key)
    last = date.fromisoformat(rolled or "1970-01-01")
    today = d.plan_day(now_ms)
    moves: list[RampMove] = []
    day = last + timedelta(days=1)
    while day < today:
        counts, pushback = await run.store(d.persist, _day_facts, d.store, day)
        states, day_moves, save = _decide(d, day, counts, pushback, now_ms)
        await run.store(d.persist, save, {key: day.isoformat()})
        d.states = states
        for e in save.entries:
            level = (
                "warning"
                if e.action in ("step_down", "pause") or e.kind == "automation"
                else "info"
            )
            d.log_entry(e, level)
        moves += day_moves
        day += timedelta(days=1)
    return moves


def _day_facts(
    store: Store, day: date
) -> tuple[dict[tuple[str, str], DayCounts], dict[PushbackKey, int]]:
    """What the store counted on `day`: deliveries per key, and push-back (any thread)."""
    return store.counts(day), store.pushback(day)


@dataclass(frozen=True, slots=True)
class _Save:
    """Positions, log entries and automations of one rolled day, saved in one transaction
    with the rolled-day mark, so a crash never rolls a day twice (any thread)."""

    store: Store
    plan: str
    positions: dict[tuple[str, str], RampState]
    now_ms: int
    entries: list[LogEntry]
    automations: list[dict[str, Any]]

    def __call__(self, meta: dict[str, str]) -> None:
        self.store.save_positions(
            self.plan,
            self.positions,
            self.now_ms,
            meta=meta,
            entries=self.entries,
            automations=self.automations,
        )


def _decide(
    d: Daemon,
    day: date,
    counts: dict[tuple[str, str], DayCounts],
    pushback: dict[PushbackKey, int],
    now_ms: int,
) -> tuple[dict[tuple[str, str], RampState], list[RampMove], _Save]:
    """One finished day for every ramp (on the loop; touches no store): the new states, the
    moves, and what to save."""
    evidence = day_evidence(d.plan, counts)
    verdicts = d.guard.verdicts(day, evidence, pushback, now_ms)
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
    save = _Save(
        d.store,
        d.plan.name,
        states,
        now_ms,
        entries,
        d.guard.dirty(),
    )
    return states, moves, save
