"""Operator operations: the requests the core hands back to Python (upcalls).

One registry, `OPS`, names every operation Python answers, how (on the loop, or as a
coroutine that keeps slow work off it), and whether the MTA socket may ask it. The list the
core hands up (`UPCALL_OPS`) and the MTA socket's allowance (`MTA_UPCALL_OPS`) are derived from
it. Store reads run on the store thread; state changes take the daemon's job lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln import _core
from kiln.mx import MxLookups
from kiln.ramp import caps_at, plan_providers, steps_for
from kiln.rampday import day_cap
from kiln.rate import RateSpec
from kiln.records import RampState
from kiln.store import StoreError

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["MTA_UPCALL_OPS", "OPS", "UPCALL_OPS", "Op", "RequestError", "upcall", "upcall_async"]


class RequestError(Exception):
    """A bad operator request: becomes `{"ok": false, "error": ...}`."""


def status(d: Daemon, now_ms: int) -> dict[str, Any]:
    """Every batch x provider: step, state, caps per IP and what was used."""
    ramps = []
    today = d.plan_day(now_ms)
    for name, batch in d.plan.batches.items():
        schedule = d.plan.schedules[batch.schedule]
        for provider in plan_providers(d.plan):
            s = d.states.get((name, provider), RampState())
            caps, state = caps_at(d.plan, name, provider, s.step)
            usage = [d.engine.usage(d.engine.key(ip, provider)) for ip in batch.ips]
            started = batch.start_date <= today
            ramps.append(
                {
                    "batch": name,
                    "pool": batch.pool,
                    "provider": provider,
                    "state": "paused" if s.paused else (state if started else "not_started"),
                    "step": s.step,
                    "steps": len(steps_for(schedule, provider)),
                    "ips": list(batch.ips),
                    "daily_cap": caps.daily_cap,
                    "hourly_cap": usage[0]["hourly_cap"] if usage else None,
                    "day_cap_total": day_cap(d.plan, name, provider, s.step),
                    "day_used": sum(u["day_used"] for u in usage),
                    "hour_used": sum(u["hour_used"] for u in usage),
                    "idle_days": s.idle_days,
                    "days_without_advance": s.days_without_advance,
                }
            )
    return {
        "ok": True,
        "plan": d.plan.name,
        "now_ms": now_ms,
        "timezone": d.plan.timezone,
        "ramps": ramps,
        "daemon": health(d),
    }


def health(d: Daemon) -> dict[str, Any]:
    """The process's own state: loop stalls, connections, unsaved store batches."""
    try:
        loop_time = asyncio.get_running_loop().time()
    except RuntimeError:
        loop_time = 0.0
    return {
        "loop": d.monitor.figures(loop_time).to_json(),
        "connections": d.connections,
        "max_connections": d.max_connections,
        "unsaved_batches": len(d.persist.unsaved),
        "store_error": d.persist.error,
        "watchdog": d.notifier.watchdog_s is not None,
    }


def limits(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The caps in force for one (IP, provider or domain), what is used, and its ramp."""
    ip = req.get("ip")
    if not isinstance(ip, str):
        raise RequestError("ip: missing or not a string")
    provider = req.get("provider")
    domain = req.get("domain")
    if (provider is None) == (domain is None):
        raise RequestError("give domain or provider (one of them)")
    if domain is not None:
        if not isinstance(domain, str):
            raise RequestError("domain: must be a string")
        try:
            provider = d.engine.route(domain, now_ms)
        except _core.CoreError as e:
            raise RequestError(str(e)) from None
        if provider is None:
            return {"ok": True, "ip": ip, "provider": None, "reason": "null_mx"}
    if not isinstance(provider, str) or provider not in plan_providers(d.plan):
        raise RequestError(
            f"provider: unknown provider {provider!r}, expected one of "
            + ", ".join(plan_providers(d.plan))
            + d.plan.provider_hint(str(provider), plan_providers(d.plan))
        )
    ip = _plan_ip(d, ip)
    batch = next((n for n, b in d.plan.batches.items() if ip in b.ips), None)
    try:
        u = d.engine.usage(d.engine.key(ip, provider))
    except _core.CoreError as e:
        raise RequestError(str(e)) from None
    rate = (
        str(RateSpec(u["rate_count"], u["rate_period_ms"], u["max_burst"]))
        if u["rate_count"]
        else None
    )
    out: dict[str, Any] = {
        "ok": True,
        "ip": ip,
        "provider": provider,
        "batch": batch,
        "hourly_cap": u["hourly_cap"],
        "daily_cap": u["daily_cap"],
        "rate": rate,
        "hour_used": u["hour_used"],
        "day_used": u["day_used"],
        "paused": u["paused"],
        "multiplier": u["multiplier"],
        "suspended_until_ms": u["suspended_until_ms"] or None,
    }
    if batch is not None:
        s = d.states.get((batch, provider), RampState())
        _, state = caps_at(d.plan, batch, provider, s.step)
        if d.plan.batches[batch].start_date > d.plan_day(now_ms):
            state = "not_started"
        out |= {"step": s.step, "state": "paused" if s.paused else state}
    else:
        out |= {"step": None, "state": "warm"}
    return out


def automations(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """Live automations (`"all": true`: also those ended in the last three days)."""
    everything = req.get("all", False)
    if not isinstance(everything, bool):
        raise RequestError("all: must be true or false")
    return {"ok": True, "automations": d.guard.listing(now_ms, everything)}


def cancel(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """End an automation early; a cancelled step-down gives its steps back."""
    automation_id = req.get("automation")
    if not isinstance(automation_id, str):
        raise RequestError("automation: missing or not a string (an id such as A12)")
    who = req.get("by", "an operator")
    if not isinstance(who, str) or len(who) > 200:
        raise RequestError("by: must be a short string")
    try:
        a, entry = d.guard.cancel(automation_id, now_ms, who)
    except (KeyError, ValueError) as e:
        raise RequestError(str(e.args[0])) from None
    entries = [entry]
    if a.kind == "step_down" and a.batch is not None and a.provider is not None:
        key = (a.batch, a.provider)
        s = d.states.get(key, RampState())
        if a.from_step is not None and s.step == a.to_step:
            d.states[key] = dataclasses.replace(s, step=a.from_step)
            try:
                d.store.save_positions(d.plan.name, {key: d.states[key]}, now_ms)
            except StoreError as e:
                # The cancel holds in memory; the position is saved at the next roll.
                d.warn_repeated("store_write_failed", error=str(e), during="cancel")
    d.pending_log += entries
    d.log_entry(entry, "warning")
    d.apply_plan(now_ms)
    d.collect(now_ms)
    return {"ok": True, "automation": a.to_json()}


def _explain_key(d: Daemon, req: dict[str, Any]) -> tuple[str, str, str | None]:
    """(ip, provider, batch) of an `explain` request, checked."""
    ip = req.get("ip")
    provider = req.get("provider")
    if not isinstance(ip, str):
        raise RequestError("ip: missing or not a string")
    if not isinstance(provider, str) or provider not in plan_providers(d.plan):
        raise RequestError(
            f"provider: unknown provider {provider!r}, expected one of "
            + ", ".join(plan_providers(d.plan))
            + d.plan.provider_hint(str(provider), plan_providers(d.plan))
        )
    ip = _plan_ip(d, ip)
    return ip, provider, d.guard.policy.batch_of(ip)


def _plan_ip(d: Daemon, ip: str) -> str:
    """`ip` normalised, if it is a sending IP of the plan; else the error `acquire` gives.
    Checked before the engine is asked, so asking never makes an IP known to it."""
    try:
        text = str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise RequestError(f"ip: not an IP address, got {ip!r}") from None
    if text not in d.plan.all_ips():
        raise RequestError(f"ip: {text} is not a sending IP of this daemon's plan")
    return text


def _ramp_moves(d: Daemon, batch: str | None, provider: str, now_ms: int) -> list[Any]:
    """The ramp's moves of the last three days, from the store (any thread)."""
    if batch is None:
        return []
    return d.store.decisions(
        kind="ramp", subject=f"{batch}/{provider}", since_ms=now_ms - 3 * 86_400_000
    )


def explain(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """Why one (IP, provider) key has the limit it has right now."""
    ip, provider, batch = _explain_key(d, req)
    moves = _ramp_moves(d, batch, provider, now_ms)
    return d.guard.explain(d.engine, d.states, ip, provider, now_ms, d.plan_day(now_ms), moves)


async def explain_async(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """`explain` with the store read on the store thread."""
    now_ms = d.clock.now_ms()
    ip, provider, batch = _explain_key(d, req)
    moves = await d.persist.run(_ramp_moves, d, batch, provider, now_ms)
    now_ms = d.clock.now_ms()
    return d.guard.explain(d.engine, d.states, ip, provider, now_ms, d.plan_day(now_ms), moves)


def stats(d: Daemon, now_ms: int) -> dict[str, Any]:
    """Protocol counters and process facts."""
    return {
        "ok": True,
        "uptime_ms": now_ms - d.started_ms,
        "keys": d.engine.key_count(),
        "routes": d.engine.route_count(),
        **d.engine.wire_stats(),
        **(d.lookups.stats() if d.lookups is not None else MxLookups.idle_stats()),
    }


async def cancel_async(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """`cancel` as one job, written on the store thread."""
    async with d.job_lock:
        reply = cancel(d, req, d.clock.now_ms())
        await d.persist.write_async()
        return reply


async def reload_async(d: Daemon, _req: dict[str, Any]) -> dict[str, Any]:
    """`reload` with the plan read off the loop."""
    return await d.reload_async()


@dataclass(frozen=True, slots=True)
class Op:
    """How one operator operation is answered."""

    #: On the loop, in the calling thread (tests, and the fast operations).
    answer: Callable[[Daemon, dict[str, Any], int], dict[str, Any]]
    #: As the serving daemon answers it, when that differs (slow work off the loop).
    answer_async: Callable[[Daemon, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    #: Also answered on the MTA socket (read-only, about one key or the process).
    mta: bool = False


OPS: dict[str, Op] = {
    "status": Op(lambda d, _r, t: status(d, t)),
    "limits": Op(limits, mta=True),
    "reload": Op(lambda d, _r, t: d.reload(t), reload_async),
    "stats": Op(lambda d, _r, t: stats(d, t), mta=True),
    "automations": Op(automations),
    "cancel": Op(cancel, cancel_async),
    "explain": Op(explain, explain_async),
}
#: Operations Python answers; every other op is decided in the core.
UPCALL_OPS = tuple(OPS)
#: The upcalls the MTA socket answers too; the rest steer kiln (operator socket only).
MTA_UPCALL_OPS = frozenset(name for name, op in OPS.items() if op.mta)


def _request(line: bytes) -> dict[str, Any] | None:
    """The request object of an upcall line, or None if it is not one."""
    try:
        req = json.loads(line)
    except ValueError:
        return None
    return req if isinstance(req, dict) else None


def upcall(d: Daemon, line: bytes, now_ms: int) -> dict[str, Any]:
    """Answer an upcall in the calling thread."""
    req = _request(line)
    if req is None:
        return {"ok": False, "error": "invalid JSON"}
    return _answer(d, req, now_ms)


def _answer(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The reply to a parsed request, answered on the loop; its `id` echoed."""
    op = OPS.get(str(req.get("op")))
    try:
        if op is None:
            raise RequestError(f"op: not an operator operation: {req.get('op')!r}")
        reply = op.answer(d, req, now_ms)
    except RequestError as e:
        reply = {"ok": False, "error": str(e)}
    if "id" in req:
        reply = {"id": req["id"], **reply}
    return reply


async def upcall_async(d: Daemon, line: bytes) -> dict[str, Any]:
    """Answer an upcall as the serving daemon does: the loop goes on answering every other
    client meanwhile."""
    req = _request(line)
    if req is None:
        return {"ok": False, "error": "invalid JSON"}
    op = OPS.get(str(req.get("op")))
    if op is None or op.answer_async is None:
        return _answer(d, req, d.clock.now_ms())
    try:
        return await op.answer_async(d, req)
    except RequestError as e:
        return {"ok": False, "error": str(e)}
