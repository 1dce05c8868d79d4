"""Operator operations: the requests the core hands back to Python (upcalls).

One registry, `OPS`, names every operation Python answers, how (on the loop, or as a
coroutine that keeps slow work off it), and whether the MTA socket may ask it. The list the
core hands up (`UPCALL_OPS`) and the MTA socket's allowance (`MTA_UPCALL_OPS`) are derived from
it. Store reads run on the store thread; state changes take the daemon's job lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import itertools
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import _core
from kiln.daemon import reload
from kiln.daemon.runner import OFF_LOOP, Now, Runner
from kiln.duration import DurationError, parse_ms
from kiln.mtashape import shape_of
from kiln.mx import MxLookups
from kiln.ramp import plan_providers
from kiln.rampday import ramp_view
from kiln.rate import RateSpec
from kiln.records import LogEntry, RampKey, RampState, SuppressionEvent
from kiln.store import LogBatches, Store, StoreError
from kiln.suppress.files import (
    ExportIncomplete,
    FoldColumns,
    ImportRows,
    export_list,
    hash_events,
    read_file,
)
from kiln.suppress.formats import EXPORT_FORMATS, SOURCES
from kiln.suppress.live import SuppressionRequest

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["MTA_UPCALL_OPS", "OPS", "UPCALL_OPS", "Op", "RequestError", "upcall"]


class RequestError(Exception):
    """A bad operator request: becomes `{"ok": false, "error": ...}`."""


def status(d: Daemon, now_ms: int) -> dict[str, Any]:
    """Every batch x provider: step, state, caps per IP and what was used."""
    ramps = []
    today = d.plan_day(now_ms)
    for name, batch in d.plan.batches.items():
        for provider in plan_providers(d.plan):
            v = ramp_view(d.plan, d.states, name, provider, today)
            usage = [d.engine.usage(d.engine.key(ip, provider)) for ip in batch.ips]
            ramps.append(
                {
                    "batch": name,
                    "pool": batch.pool,
                    "provider": provider,
                    "state": v.shown_state,
                    "step": v.step,
                    "steps": v.steps,
                    "ips": list(batch.ips),
                    "daily_cap": v.caps.daily_cap,
                    "hourly_cap": usage[0]["hourly_cap"] if usage else None,
                    "day_cap_total": v.day_cap_total,
                    "day_used": sum(u["day_used"] for u in usage),
                    "hour_used": sum(u["hour_used"] for u in usage),
                    "idle_days": v.ramp.idle_days,
                    "days_without_advance": v.ramp.days_without_advance,
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
        "connections": d.open_connections,
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
        v = ramp_view(d.plan, d.states, batch, provider, d.plan_day(now_ms))
        out |= {"step": v.step, "state": v.shown_state}
    else:
        out |= {"step": None, "state": "warm"}
    return out


def automations(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """Live automations (`"all": true`: also those ended in the last three days)."""
    everything = req.get("all", False)
    if not isinstance(everything, bool):
        raise RequestError("all: must be true or false")
    return {"ok": True, "automations": d.guard.listing(now_ms, everything)}


async def cancel(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """End an automation early, as one job; a cancelled step-down gives its steps back. A
    failed write still answers (what was not written waits for the next)."""
    automation_id = req.get("automation")
    if not isinstance(automation_id, str):
        raise RequestError("automation: missing or not a string (an id such as A12)")
    who = _who(req)
    async with d.job_lock:
        now_ms = now()
        try:
            a, entry, restored = d.guard.cancel(automation_id, now_ms, who, d.states)
        except (KeyError, ValueError) as e:
            raise RequestError(str(e.args[0])) from None
        d.states.update(restored)
        await _in_force(d, [entry], run, now_ms, "cancel", restored)
        return {"ok": True, "automation": a.to_json()}


async def pause(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """Pause an IP or a batch at one provider or every one, for a while (`for`, a duration
    such as 2h) or until resumed: an automation, with its reason and who asked."""
    ip, batch, provider = _scope(d, req)
    for_text = req.get("for")
    try:
        for_ms = None if for_text is None else parse_ms(for_text)
    except DurationError as e:
        raise RequestError(f"for: {e}") from None
    reason = req.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise RequestError("reason: say why, in at most 500 characters")
    async with d.job_lock:
        now_ms = now()
        a, entry = d.guard.pause(
            now_ms,
            ip=ip,
            batch=batch,
            provider=provider,
            for_ms=for_ms,
            reason=reason.strip(),
            who=_who(req),
        )
        await _in_force(d, [entry], run, now_ms, "pause")
        return {"ok": True, "automation": a.to_json()}


async def resume(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """End the live pauses of exactly one scope (IP or batch, a provider or every one)."""
    ip, batch, provider = _scope(d, req)
    async with d.job_lock:
        now_ms = now()
        try:
            ended = d.guard.resume(now_ms, ip=ip, batch=batch, provider=provider, who=_who(req))
        except KeyError as e:
            raise RequestError(str(e.args[0])) from None
        await _in_force(d, [entry for _, entry in ended], run, now_ms, "resume")
        return {"ok": True, "automations": [a.to_json() for a, _ in ended]}


MAX_CHECK = 10_000
"""Most addresses one `check` asks about."""


def check(d: Daemon, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """Which of `addresses` are suppressed now (globally, or in `scope`), and why."""
    addresses = req.get("addresses")
    if (
        not isinstance(addresses, list)
        or not all(isinstance(a, str) for a in addresses)
        or not 1 <= len(addresses) <= MAX_CHECK
    ):
        raise RequestError(f"addresses: a list of 1 to {MAX_CHECK} addresses")
    scope = req.get("scope", "")
    if not isinstance(scope, str):
        raise RequestError("scope: must be a string")
    return {"ok": True, "suppressed": d.suppression.check(addresses, now_ms, scope)}


async def _record(d: Daemon, run: Runner, events: list[SuppressionEvent], failed: str) -> list[int]:
    """Write suppression events to the store (durable before any reply says so), then
    fold them into the live set; their log ids. A failed write is a RequestError."""
    try:
        ids = await run.store(d.persist, d.store.suppress_append, events)
    except StoreError as e:
        raise RequestError(f"{failed}: {e}") from None
    d.suppression.written(events, ids)
    return ids


#: The fields of a `report` of `result` unsubscribe (about no IP: the core never sees it).
_UNSUBSCRIBE_FIELDS = frozenset({"op", "id", "result", "address", "scope", "text"})


async def report(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """A `report` naming its recipient (`address`; the core hands only those up). The core
    counts it as any report (an `unsubscribe` is about no IP and is not counted), then the
    suppression list's rules judge it (`SuppressionList.verdict`); a listing is durable in
    the store before the reply names it (`suppressed`)."""
    address, scope, result = req.get("address"), req.get("scope", ""), req.get("result")
    if not isinstance(address, str) or not isinstance(scope, str):
        raise RequestError("address and scope: strings")
    try:
        address = d.engine.suppress_fingerprint(address, scope)[0]
    except _core.CoreError as e:
        raise RequestError(str(e)) from None
    if result == "unsubscribe":
        if extra := sorted(set(req) - _UNSUBSCRIBE_FIELDS):
            raise RequestError(f"{extra[0]}: not a field of an unsubscribe report")
        text = req.get("text", "")
        if not isinstance(text, str):
            raise RequestError("text: must be a string")
        reply: dict[str, Any] = {"ok": True}
        code = enhanced = None
    else:
        counted = {k: v for k, v in req.items() if k not in ("id", "address", "scope")}
        if "domain" not in counted and "provider" not in counted:
            counted["domain"] = address.rpartition("@")[2]
        served = d.engine.serve(json.dumps(counted).encode() + b"\n", now())
        reply = json.loads(served.reply)
        if not reply.get("ok"):
            return dict(reply)
        code = req.get("code") if isinstance(req.get("code"), int) else None
        enhanced = req.get("enhanced") or None
        text = req.get("text") or ""
    now_ms = now()
    try:
        verdict = d.suppression.verdict(address, scope, str(result), (code, enhanced, text), now_ms)
    except ValueError as e:
        raise RequestError(str(e)) from None
    reply["address"] = address
    reply["suppressed"] = None if verdict is None else verdict.event
    if verdict is None:
        return reply
    ip = req.get("ip")
    request = verdict.request(address, scope, "report", ip, (code, enhanced, text))
    events = d.suppression.events([request], now_ms)
    await _record(d, run, events, "counted, but not recorded on the suppression list")
    return reply


async def suppress(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """The operator's hand on the suppression list: `action` add, remove, list or history.
    An add or remove is durable in the store before the reply says it was recorded."""
    action = req.get("action")
    if action in ("add", "remove"):
        address = req.get("address")
        if not isinstance(address, str):
            raise RequestError("address: missing or not a string")
        event = "remove" if action == "remove" else req.get("event", "manual")
        scope = req.get("scope", "")
        reason = req.get("reason", "")
        if not isinstance(scope, str) or not isinstance(reason, str) or len(reason) > 500:
            raise RequestError("scope and reason: strings (reason at most 500 characters)")
        for_text = req.get("for")
        try:
            for_ms = None if for_text is None else parse_ms(for_text)
        except DurationError as e:
            raise RequestError(f"for: {e}") from None
        if event == "soft_bounce" and for_ms is None:
            raise RequestError("for: a soft bounce needs how long it holds, e.g. 3d")
        now_ms = now()
        try:
            events = d.suppression.events(
                [
                    SuppressionRequest(
                        address=address,
                        event=str(event),
                        source=f"operator ({_who(req)})",
                        scope=scope,
                        expires_ms=None if for_ms is None else now_ms + for_ms,
                        evidence={"reason": reason} if reason else {},
                    )
                ],
                now_ms,
            )
        except ValueError as e:
            raise RequestError(str(e)) from None
        ids = await _record(d, run, events, "not recorded")
        done = events[0]
        return {
            "ok": True,
            "id": ids[0],
            # As the caller sent it, normalised (in hashed-only mode the log keeps none).
            "address": done.address or d.engine.suppress_fingerprint(address, scope)[0],
            "event": done.event,
            "scope": done.scope,
        }
    if action in ("list", "history"):
        limit = req.get("limit", 100)
        after = req.get("after_id", 0)
        if not isinstance(limit, int) or not 1 <= limit <= 1000 or not isinstance(after, int):
            raise RequestError("limit: 1 to 1000; after_id: an integer")
        fps = None
        if action == "history":
            address = req.get("address")
            if not isinstance(address, str):
                raise RequestError("address: missing or not a string")
            scope = req.get("scope", "")
            try:
                fps = [d.engine.suppress_fingerprint(address, s)[1] for s in {"", str(scope)}]
            except _core.CoreError as e:
                raise RequestError(str(e)) from None
        fetch = functools.partial(
            d.store.suppress_events, fingerprints=fps, after_id=after, limit=limit
        )
        rows = await run.store(d.persist, fetch)
        listed, size = d.engine.suppress_stats()
        return {
            "ok": True,
            "listed": listed,
            "bytes": size,
            # The fingerprint as 16 hex digits (61 bits do not fit a JSON client's double);
            # the address is "" for events written in hashed-only mode.
            "events": [
                dataclasses.asdict(r) | {"fingerprint": f"{r.fingerprint:016x}"} for r in rows
            ],
        }
    raise RequestError("action: add, remove, list or history")


def _write_import(
    store: Store, events: list[SuppressionEvent] | LogBatches
) -> tuple[int, int | StoreError]:
    """Write an import's events and read the log's last id in one job of the store's thread,
    so that no event written after them is taken for one of theirs: (how many, the id or why
    it could not be read). A failed write raises (nothing written)."""
    n = store.suppress_bulk(events)
    try:
        return n, store.suppress_last_id()
    except StoreError as e:
        return n, e


async def suppress_file(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """`action` import (an export of `from` at `path` onto the list: every event in one
    transaction, or none when a line cannot be read unless `skip_bad`), verify (is every
    address of that export suppressed?) or export (the list to `path` as `format`). Files are
    read and written by the daemon, off the event loop; `path` must be absolute."""
    action, path_text = req.get("action"), req.get("path")
    if not isinstance(path_text, str) or not os.path.isabs(path_text):
        raise RequestError("path: an absolute path the daemon can read or write")
    path = Path(path_text)
    if action == "export":
        fmt = req.get("format", "csv")
        if fmt not in EXPORT_FORMATS:
            raise RequestError(f"format: one of {', '.join(EXPORT_FORMATS)}")
        if d.suppression.spec.hashed_only:
            # Events from before the setting keep their addresses, but a list of only those
            # would pass for the whole list in the MTA that loads it.
            raise RequestError(
                "export: the plan's suppression.hashed_only is on, so the log keeps no "
                "addresses to write (only their keyed hashes); nothing was exported"
            )
        partial = req.get("partial", False)
        if not isinstance(partial, bool):
            raise RequestError("partial: true or false")
        write = functools.partial(export_list, partial=partial)
        try:
            n, left_out = await run.store(d.persist, write, d.store, str(fmt), path, now())
        except OSError as e:
            raise RequestError(f"{path}: {e.strerror or e}") from None
        except ExportIncomplete as e:
            raise RequestError(f"export: {e}") from None
        return {"ok": True, "path": str(path), "written": n, "left_out_hashed": left_out}
    if action not in ("import", "verify"):
        raise RequestError("action: import, verify or export")
    source = req.get("from")
    if source not in SOURCES:
        raise RequestError(f"from: one of {', '.join(SOURCES)}")
    scope, fold_case = req.get("scope"), req.get("fold_case", False)
    if scope is not None and not isinstance(scope, str):
        raise RequestError("scope: must be a string")
    if not isinstance(fold_case, bool):
        raise RequestError("fold_case: true or false")
    now_ms = now()
    try:
        events, scanned = await run.worker(
            functools.partial(read_file, scope=scope, fold_case=fold_case), str(source), path
        )
    except ValueError as e:
        raise RequestError(str(e)) from None
    scanned = await hash_events(
        d.engine, path, events, scanned, now_ms, yield_to_loop=run is OFF_LOOP
    )
    if action == "verify":
        unlisted = scanned.events  # named without making an object per event
        shown = (
            unlisted.addresses()
            if isinstance(unlisted, ImportRows)
            else (e.address for e in unlisted)
        )
        return {
            "ok": True,
            "verified": not unlisted and scanned.problem_count == 0,
            "missing_count": len(unlisted),
            "missing": list(itertools.islice(shown, 50)),
            **scanned.summary(),
        }
    if scanned.problem_count and not req.get("skip_bad", False):
        return {
            "ok": False,
            "error": f"{scanned.problem_count} lines could not be read; nothing was imported "
            "(skip_bad imports the rest)",
            **scanned.summary(),
        }
    if req.get("dry_run", False):
        return {"ok": True, "imported": 0, "would_import": len(scanned.events), **scanned.summary()}
    try:
        d.suppression.begin_import()
    except ValueError as e:
        raise RequestError(f"not imported: {e}") from None
    unfolded = False  # events may be in the log and not yet in the live set
    try:
        # In hashed-only mode the events lose their addresses here (off the loop: no engine).
        scanned.events = await run.worker(d.suppression.at_rest, scanned.events)
        unfolded = True
        try:
            n, last_id = await run.store(d.persist, _write_import, d.store, scanned.events)
        except StoreError as e:
            unfolded = False  # its one transaction rolled back: nothing was written
            raise RequestError(f"not imported: {e}") from None
        if isinstance(last_id, StoreError):
            raise RequestError(
                f"imported {n} events, but the log's last id could not be read ({last_id}): "
                "they are in force from the next start"
            ) from None
        # A batch at a time, the loop serving others in between; an event folded meanwhile
        # stays its address's last word (`imported_columns`). The core takes its lock a few
        # thousand events at a time.
        kept = scanned.events
        batches = (
            kept.fold_columns()
            if isinstance(kept, ImportRows)
            else (  # hashed-only mode made them events
                FoldColumns.of_events(kept[i : i + 50_000]) for i in range(0, len(kept), 50_000)
            )
        )
        for columns in batches:
            d.suppression.imported_columns(columns, last_id)
            if run is OFF_LOOP:
                await asyncio.sleep(0)
        unfolded = False
    finally:
        d.suppression.end_import(folded=not unfolded)
    return {"ok": True, "imported": n, **scanned.summary()}


def _who(req: dict[str, Any]) -> str:
    """Who asked (`by`), for the automation and the decision log."""
    who = req.get("by", "an operator")
    if not isinstance(who, str) or not who.strip() or len(who) > 200:
        raise RequestError("by: must be a short string")
    return who


def _scope(d: Daemon, req: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(ip, batch, provider) of a pause or resume: one of `ip` and `batch`, and `provider`
    (absent: every provider), checked against the plan."""
    ip, batch, provider = req.get("ip"), req.get("batch"), req.get("provider")
    if (ip is None) == (batch is None):
        raise RequestError("give ip or batch (one of them)")
    if ip is not None:
        if not isinstance(ip, str):
            raise RequestError("ip: must be a string")
        ip = _plan_ip(d, ip)
    if batch is not None and (not isinstance(batch, str) or batch not in d.plan.batches):
        raise RequestError(
            f"batch: unknown batch {batch!r}, expected one of " + ", ".join(d.plan.batches)
        )
    if provider is not None and (
        not isinstance(provider, str) or provider not in plan_providers(d.plan)
    ):
        raise RequestError(
            f"provider: unknown provider {provider!r}, expected one of "
            + ", ".join(plan_providers(d.plan))
        )
    return ip, batch, provider


async def _in_force(
    d: Daemon,
    entries: list[LogEntry],
    run: Runner,
    now_ms: int,
    during: str,
    restored: dict[RampKey, RampState] | None = None,
) -> None:
    """Put an operator's change in force now (engine, decision log), then write it. A failed
    write still answers: it holds in memory and is written with the next flush."""
    for entry in entries:
        d.pending_log.append(entry)
        d.log_entry(entry, "warning")
    d.apply_plan(now_ms)
    d.collect(now_ms)
    try:
        if restored:
            await run.store(d.persist, d.store.save_positions, d.plan.name, restored, now_ms)
        await run.write(d.persist)
    except StoreError as e:
        d.warn_repeated("store_write_failed", error=str(e), during=during)


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


async def explain(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """Why one (IP, provider) key has the limit it has right now (the decision log read by
    `run.store`: on the store thread when serving)."""
    ip, provider, batch = _explain_key(d, req)
    moves = await run.store(d.persist, _ramp_moves, d, batch, provider, now())
    now_ms = now()
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
        "resp": d.engine.resp_stats(),
    }


def queue(d: Daemon, now_ms: int) -> dict[str, Any]:
    """What waits in the release queue, per pool and provider, and the Postfix figures."""
    gate = d.postfix
    return {
        "ok": True,
        "now_ms": now_ms,
        "queues": gate.queue(now_ms) if gate is not None else [],
        "postfix": gate.stats() if gate is not None else None,
    }


def caps(d: Daemon, now_ms: int) -> dict[str, Any]:
    """Every warming key's room per hour now, with the pools and providers: what `kiln render`
    writes PowerMTA's and KumoMTA's configuration from (kiln.mtashape)."""
    return {"ok": True, **shape_of(d.engine, d.plan, now_ms).to_json()}


async def _reload(d: Daemon, _req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
    """Re-read the plan (off the loop when serving) and swap it in only if valid."""
    return await reload.reload(d, run, now)


Answer = Callable[["Daemon", dict[str, Any], Runner, Now], Awaitable[dict[str, Any]]]


def _at_once(fn: Callable[[Daemon, dict[str, Any], int], dict[str, Any]]) -> Answer:
    """An operation answered at once on the engine's thread (no store, no files)."""

    async def answer(d: Daemon, req: dict[str, Any], run: Runner, now: Now) -> dict[str, Any]:
        del run
        return fn(d, req, now())

    return answer


@dataclass(frozen=True, slots=True)
class Op:
    """How one operator operation is answered."""

    #: A coroutine on the engine's thread; slow work goes through its `Runner`.
    answer: Answer
    #: Also answered on the MTA socket (read-only, about one key or the process).
    mta: bool = False
    #: One of the core's own operations, handed up only when its line names a recipient
    #: `address` (rust/src/protocol, `ADDRESS_UPCALLS`).
    addressed: bool = False


OPS: dict[str, Op] = {
    "status": Op(_at_once(lambda d, _r, t: status(d, t))),
    "limits": Op(_at_once(limits), mta=True),
    "reload": Op(_reload),
    "stats": Op(_at_once(lambda d, _r, t: stats(d, t)), mta=True),
    "automations": Op(_at_once(automations)),
    "queue": Op(_at_once(lambda d, _r, t: queue(d, t))),
    "caps": Op(_at_once(lambda d, _r, t: caps(d, t))),
    "cancel": Op(cancel),
    "pause": Op(pause),
    "resume": Op(resume),
    "suppress": Op(suppress),
    "check": Op(_at_once(check), mta=True),
    "report": Op(report, mta=True, addressed=True),
    "suppress_file": Op(suppress_file),
    "explain": Op(explain),
}
#: Operations Python answers (an `addressed` one only for lines naming an address); every
#: other op is decided in the core.
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


async def upcall(d: Daemon, line: bytes, run: Runner, now: Now) -> dict[str, Any]:
    """The reply to an upcall, its `id` echoed. With `OFF_LOOP` (serving) the loop goes on
    answering every other client while slow work runs elsewhere; with `HERE` (tests) all
    of it runs in the calling thread."""
    req = _request(line)
    if req is None:
        return {"ok": False, "error": "invalid JSON"}
    op = OPS.get(str(req.get("op")))
    try:
        if op is None:
            raise RequestError(f"op: not an operator operation: {req.get('op')!r}")
        reply = await op.answer(d, req, run, now)
    except RequestError as e:
        reply = {"ok": False, "error": str(e)}
    if "id" in req:
        reply = {"id": req["id"], **reply}
    return reply
