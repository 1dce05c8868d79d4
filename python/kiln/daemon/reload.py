"""Reloading the plan: read off the loop, swap in on it, only if valid.

The plan and its rule files are read and checked on a worker thread (they touch no engine);
any error keeps the running plan and answers the problems. A valid plan is compiled into the
engine on the loop; signal sources whose settings did not change keep their schedule.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.daemon.jobs import schedule_signals
from kiln.errors import ScheduleError
from kiln.guard import Guard
from kiln.planfile import load_plan
from kiln.rules import RuleSet
from kiln.schedule import Plan
from kiln.store import StoreError

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon
    from kiln.daemon.runner import Now, Runner

__all__ = ["failed", "read_plan", "reload", "swap"]

#: What reading a plan may raise; every one keeps the running plan.
_PLAN_ERRORS = (ScheduleError, OSError, RecursionError, UnicodeError, ValueError, MemoryError)


def read_plan(d: Daemon) -> tuple[Plan, RuleSet]:
    """The plan file and its rule files, read and checked; touches no engine, so it runs
    off the loop (ScheduleError, OSError)."""
    plan = load_plan(d.config.plan_path)
    return plan, d.read_rules(plan)


async def reload(d: Daemon, run: Runner, now: Now) -> dict[str, Any]:
    """Re-read the plan (on `run.worker`: off the loop when serving), swap it in on the
    engine's thread only if valid, and write the result. Returns the reply for `kiln reload`;
    a failed write is logged and the client still answered."""
    async with d.job_lock:
        try:
            plan, rules = await run.worker(read_plan, d)
        except _PLAN_ERRORS as e:
            reply = failed(d, e, now())
        else:
            reply = swap(d, plan, rules, now())
        with contextlib.suppress(StoreError):
            await run.write(d.persist)
        return reply


def failed(d: Daemon, e: BaseException, now_ms: int) -> dict[str, Any]:
    """Keep the running plan; log and answer the problems."""
    problems = [str(p) for p in e.problems] if isinstance(e, ScheduleError) else [str(e)]
    d.record(
        now_ms,
        "reload",
        "plan",
        "reload_failed",
        "the plan has errors; the running plan stays",
        {"problems": problems},
        level="error",
    )
    d.collect(now_ms)
    return {
        "ok": False,
        "error": "the plan has errors; the running plan stays",
        "problems": problems,
    }


def swap(d: Daemon, plan: Plan, rules_read: RuleSet, now_ms: int) -> dict[str, Any]:
    """Put a read and checked plan in force (on the engine's thread)."""
    try:
        rules = d.compile_rules(rules_read)
    except ScheduleError as e:
        return failed(d, e, now_ms)
    d.collect(now_ms)  # what was counted under the old plan goes under its name
    old = d.plan.name
    old_feedback = _feedback_setting(d.plan)
    old_sources = {n: d.poller.interval_ms(n) for n in d.poller.configured()}
    d.plan = plan
    d.suppression.replan(plan.suppression)
    d.guard.replan(plan, rules)
    d.poller.replan(plan)
    if plan.name != old:
        loaded = d.store.load_positions(plan.name)
        d.states = dict(loaded)
        d.guard = Guard(plan, rules)
        d.load_guard(now_ms)
        d.mark_start(now_ms)
    elif _feedback_setting(plan) != old_feedback:
        d.load_feedback()  # else the open readers go on where they are
    d.apply_plan(now_ms)
    d.push_routes()
    if d.lookups is not None:  # the provider table may have changed
        d.lookups.close()
        d.lookups = d.make_lookups()
    schedule_signals(d, keep=old_sources)
    d.record(
        now_ms,
        "reload",
        "plan",
        "reloaded",
        f"plan {plan.name!r} is in force",
        {"plan": str(d.config.plan_path), "previous": old},
    )
    d.collect(now_ms)
    return {"ok": True, "plan": plan.name}


def _feedback_setting(plan: Plan) -> tuple[object, ...]:
    """What the MTA-log readers are made from (`feedback_reader`): their settings, the folder
    their paths are relative to, and the zone their timestamps are read in."""
    return (plan.signals.feedback, Path(plan.source).parent, plan.timezone)
