"""The daemon's jobs and the one place apscheduler is imported.

Every job is a coroutine: apscheduler 3 runs those on the event loop, never on a worker thread
(the engine is pinned to the loop's thread and would refuse one). Time is an argument of the
work; the scheduler only says when.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from kiln.daemon.runner import OFF_LOOP
from kiln.store import StoreError

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["schedule_signals", "start_jobs", "tick_job"]


def start_jobs(d: Daemon, loop: asyncio.AbstractEventLoop) -> Any:
    """The scheduler with the tick (flush, hour and day rolls, MTA logs), MX feeding and one
    polling job per signal source, started."""
    scheduler = AsyncIOScheduler(event_loop=loop, timezone=d.plan.zone)
    scheduler.add_job(
        tick_job,
        IntervalTrigger(seconds=d.config.snapshot_interval_ms / 1000),
        args=[d],
        id="flush",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        d.resolve_pending,
        IntervalTrigger(seconds=0.2),
        id="mx",
        max_instances=1,
        coalesce=True,
    )
    d.scheduler = scheduler
    schedule_signals(d)
    scheduler.start()
    return scheduler


def schedule_signals(d: Daemon, keep: dict[str, int] | None = None) -> None:
    """One polling job per configured signal source. A reload keeps the schedule of every
    source whose interval did not change (`keep`: name -> interval before); new or changed
    sources poll now."""
    if d.scheduler is None:
        return
    wanted = {f"signal:{n}": n for n in d.poller.configured()}
    kept = set()
    for job in d.scheduler.get_jobs():
        if not job.id.startswith("signal:"):
            continue
        name = wanted.get(job.id)
        if keep is not None and name is not None and keep.get(name) == d.poller.interval_ms(name):
            kept.add(job.id)
        else:
            job.remove()
    for job_id, name in wanted.items():
        if job_id in kept:
            continue
        d.scheduler.add_job(
            d.poll_source,
            IntervalTrigger(seconds=d.poller.interval_ms(name) / 1000),
            args=[name],
            id=job_id,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(tz=UTC),
        )


async def tick_job(d: Daemon) -> None:
    """The 1 Hz job as the daemon runs it, on the loop, with the store written on the store
    thread and the MTA logs read on a worker (`Daemon.tick_with`). Never raises: a failure
    is logged and the next run tries again (an hour roll that could not read or write the
    store included)."""
    async with d.job_lock:
        try:
            await d.tick_with(OFF_LOOP, d.clock.now_ms)
            if d.mta is not None:
                d.mta.check()
        except StoreError as e:
            d.warn_repeated("job_store_failed", job="tick", error=str(e))
        except Exception:
            d.log.exception("job_failed", job="tick")
