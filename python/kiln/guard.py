"""The guard: runs policy's automations against the engine, and answers for them.

The daemon hands the guard what happened (push-back reports, signal polls, day rolls); the
guard asks `kiln.policy` what to do, keeps the resulting automations (`AutomationBook`),
pushes their effects into the engine (suspensions, slow-downs, pauses) and returns the
decision-log entries to write. It also answers the operator: `automations`, `cancel`,
`explain`. Time is always an argument.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from kiln import _core
from kiln.automation import Automation, AutomationBook, KeyEffect
from kiln.policy import Policy, RampVerdict, RuleInfo, undo_step_down
from kiln.ramp import plan_providers
from kiln.rampday import RampMove, ramp_view
from kiln.records import (
    DayPushback,
    LogEntry,
    Pushback,
    PushbackKey,
    RampKey,
    RampState,
    SignalBook,
)
from kiln.schedule import Plan

__all__ = ["Classify", "Guard"]

#: Classifier: (provider, code, enhanced, text) -> (class, scope, rule) or None.
Classify = Callable[[str, int | None, str | None, str], tuple[str, str, str] | None]


def _when(ms: int | None, zone: ZoneInfo) -> str | None:
    """Epoch ms as ISO 8601 in the plan's time zone, with its offset (None stays None)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone).isoformat(timespec="seconds")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """`1 step`, `2 steps`."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _per(cap: int | None, unit: str, kind: str) -> str:
    """`75 a day` or `no daily cap`."""
    return f"no {kind} cap" if cap is None else f"{cap:,} {unit}"


@dataclass
class Guard:
    """Automations of one plan, and their effects on one engine."""

    plan: Plan
    rules: Mapping[str, RuleInfo] = field(default_factory=dict)
    book: AutomationBook = field(default_factory=AutomationBook)
    signals: SignalBook = field(default_factory=SignalBook)
    #: Replies not yet saved: local day -> (ip, provider, class, hour, rule) -> count.
    pending_pushback: dict[date, dict[PushbackKey, int]] = field(default_factory=dict)
    _enforced: set[tuple[str, str]] = field(default_factory=set)
    policy: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = Policy(self.plan, self.rules)

    def replan(self, plan: Plan, rules: Mapping[str, RuleInfo]) -> None:
        """A reloaded plan (automations and signals are kept)."""
        self.plan = plan
        self.rules = rules
        self.policy = Policy(plan, rules)

    # ----- what happened -----

    def on_reports(
        self, reports: Iterable[_core.Report], classify: Classify, now_ms: int
    ) -> list[LogEntry]:
        """Classify push-back reports, count them for the day roll and act on them."""
        entries: list[LogEntry] = []
        for at_ms, ip, provider, result, n, code, enhanced, text in reports:
            if result not in ("deferred", "bounced") or code is None:
                continue
            found = classify(provider, code, enhanced or None, text or "")  # "": none given
            if found is None:
                continue
            cls, scope, rule = found
            local = self.plan.local_time(at_ms)
            day_rows = self.pending_pushback.setdefault(local.date(), {})
            key = (ip, provider, cls, local.hour, rule)
            day_rows[key] = day_rows.get(key, 0) + n
            reply = " ".join(str(x) for x in (code, enhanced, text) if x)
            p = Pushback(at_ms, ip, provider, cls, scope, rule, reply)
            for a, created in self.policy.on_pushback(p, self.book):
                if created:
                    entries.append(self._entry(now_ms, a, "start", a.reason))
        return entries

    def on_signals(self, now_ms: int) -> list[LogEntry]:
        """After a signal poll: pause or resume IPs."""
        return [
            self._entry(now_ms, a, "start" if a.state == "active" else a.state, a.reason)
            for a in self.policy.on_signals(self.signals, self.book, now_ms)
        ]

    def expire(self, now_ms: int) -> list[LogEntry]:
        """Automations whose time ran out."""
        return [
            self._entry(now_ms, a, "expired", f"{a.kind} ended: {a.ends_when}")
            for a in self.book.expire(now_ms)
        ]

    def verdicts(
        self,
        day: date,
        evidence: Mapping[tuple[str, str], Any],
        pushback: Mapping[PushbackKey, int],
        now_ms: int,
    ) -> dict[tuple[str, str], RampVerdict]:
        """Policy's verdict on every ramp for a finished day (see `Policy.day_verdicts`)."""
        days: dict[tuple[str, str], DayPushback] = {}
        rows = dict(pushback)
        for key, count in self.pending_pushback.get(day, {}).items():
            rows[key] = rows.get(key, 0) + count
        for (ip, provider, cls, hour, _rule), count in rows.items():
            days.setdefault((ip, provider), DayPushback()).add(cls, hour, count)
        return self.policy.day_verdicts(day, evidence, days, self.signals, self.book, now_ms)

    def after_roll(
        self, verdicts: Mapping[RampKey, RampVerdict], moves: Sequence[RampMove], now_ms: int
    ) -> list[LogEntry]:
        """Step-downs and pauses of a day roll become automations."""
        return [
            self._entry(now_ms, a, "start" if a.state == "active" else a.state, a.reason)
            for a in self.policy.record_moves(verdicts, moves, self.book, now_ms)
        ]

    # ----- the engine -----

    def enforce(
        self, engine: _core.Engine, states: Mapping[tuple[str, str], RampState], now_ms: int
    ) -> None:
        """Push every live automation's effect into the engine; lift effects that ended."""
        effects = self.book.effects(now_ms, self.policy.batch_ips(), plan_providers(self.plan))
        known = set(plan_providers(self.plan))
        for ip, provider in set(effects) | self._enforced:
            if provider not in known:
                continue
            key = engine.key(ip, provider)
            e = effects.get((ip, provider), KeyEffect())
            engine.suspend(key, e.suspended_until_ms if e.suspended_until_ms > now_ms else 0)
            engine.set_multiplier(key, e.multiplier)
            batch = self.policy.batch_of(ip)
            base = batch is not None and states.get((batch, provider), RampState()).paused
            if e.paused or base:
                engine.pause(key)
            else:
                engine.resume(key)
        self._enforced = set(effects)

    # ----- the operator -----

    def cancel(
        self, automation_id: str, now_ms: int, who: str, states: Mapping[RampKey, RampState]
    ) -> tuple[Automation, LogEntry, dict[RampKey, RampState]]:
        """End an automation early. Raises KeyError (unknown) or ValueError (already over).
        A cancelled step-down gives its steps back: the new positions come third, for the
        daemon to put in force and save."""
        a = self.book.get(automation_id)
        if a is None:
            raise KeyError(f"no automation {automation_id!r}")
        ended = self.book.end(a.id, now_ms, who, "cancelled")
        if ended is None:
            raise ValueError(f"automation {a.id} is {a.state}, not active")
        back = f": back to step {a.from_step}" if a.kind == "step_down" else ""
        entry = self._entry(now_ms, ended, "cancelled", f"cancelled by {who}{back}")
        return ended, entry, undo_step_down(ended, states)

    def pause(
        self,
        now_ms: int,
        *,
        ip: str | None,
        batch: str | None,
        provider: str | None,
        for_ms: int | None,
        reason: str,
        who: str,
    ) -> tuple[Automation, LogEntry]:
        """An operator's pause of an IP or a batch, at one provider or all (None), for
        `for_ms` or until resumed: an automation like policy's, cancellable by its id."""
        a = self.book.add(
            now_ms,
            kind="pause",
            rule="operator.pause",
            reason=reason,
            evidence={"by": who},
            provider=provider,
            ip=ip,
            batch=batch,
            expires_ms=None if for_ms is None else now_ms + for_ms,
            ends_when="kiln resume (or kiln cancel ID)",
        )
        return a, self._entry(now_ms, a, "start", f"paused by {who}: {reason}")

    def resume(
        self, now_ms: int, *, ip: str | None, batch: str | None, provider: str | None, who: str
    ) -> list[tuple[Automation, LogEntry]]:
        """End the live pauses of exactly this scope (an operator's or policy's). Raises
        KeyError naming the live pauses that touch it when none has this scope."""
        ended = []
        for a in self.book.live(now_ms):
            if a.kind == "pause" and (a.ip, a.batch, a.provider) == (ip, batch, provider):
                done = self.book.end(a.id, now_ms, who)
                if done is not None:
                    ended.append((done, self._entry(now_ms, done, "ended", f"resumed by {who}")))
        if not ended:
            touching = [
                f"{a.id} ({a.scope})"
                for a in self.book.live(now_ms)
                if a.kind == "pause"
                and (ip is None or a.ip in (ip, None))
                and (batch is None or a.batch == batch)
                and (provider is None or a.provider in (provider, None))
            ]
            scope = f"{ip or f'batch {batch}'} x {provider or 'every provider'}"
            more = (
                "; pauses that touch it: " + ", ".join(touching) + " (kiln cancel ID ends one)"
                if touching
                else ""
            )
            raise KeyError(f"no live pause of {scope}{more}")
        return ended

    def listing(self, now_ms: int, everything: bool = False) -> list[dict[str, Any]]:
        """Automations for `kiln automations`: live ones, or all kept ones."""
        return [
            a.to_json()
            | {
                "live": a.live(now_ms),
                "start": _when(a.start_ms, self.plan.zone),
                "expires": _when(a.expires_ms, self.plan.zone),
                "remaining_ms": None if a.expires_ms is None else max(0, a.expires_ms - now_ms),
            }
            for a in self.book
            if everything or a.live(now_ms)
        ]

    def explain(
        self,
        engine: _core.Engine,
        states: Mapping[tuple[str, str], RampState],
        ip: str,
        provider: str,
        now_ms: int,
        today: date,
        last_moves: Sequence[LogEntry],
    ) -> dict[str, Any]:
        """Why (ip, provider) has the limit it has right now, as data and as sentences. Times
        are in the plan's time zone with their offset. An IP that is in no pool or batch of the
        plan is an error reply, as for `acquire`."""
        plan = self.plan
        zone = plan.zone
        try:
            ip = str(ipaddress.ip_address(ip.strip()))
        except ValueError:
            return {"ok": False, "error": f"ip: not an IP address, got {ip!r}"}
        batch = self.policy.batch_of(ip)
        pool = next((n for n, p in plan.pools.items() if ip in {m.ip for m in p.members()}), None)
        if batch is None and pool is None:
            return {"ok": False, "error": f"ip: {ip} is not a sending IP of this daemon's plan"}
        u = engine.usage(engine.key(ip, provider))
        why: list[str] = []
        out: dict[str, Any] = {"ok": True, "ip": ip, "provider": provider, "batch": batch}
        if batch is None:
            out["pool"] = pool
            why.append(f"{ip} is a warm IP of pool {pool!r}: no warm-up caps")
        else:
            b = plan.batches[batch]
            v = ramp_view(plan, states, batch, provider, today)
            s, caps, state, steps, warmup_day = v.ramp, v.caps, v.state, v.steps, v.warmup_day
            out |= {
                "pool": b.pool,
                "step": s.step,
                "steps": steps,
                "state": state,
                "warmup_day": warmup_day,
                "days_without_advance": s.days_without_advance,
                "day_cap_batch": v.day_cap_total,
            }
            if state == "not_started":
                why.append(f"batch {batch!r} starts on {b.start_date}: nothing may be sent yet")
            elif state == "done":
                why.append(f"batch {batch!r} finished its {_plural(steps, 'step')} for {provider}")
            else:
                why.append(
                    f"batch {batch!r} is at step {s.step} of {steps} for {provider} on warm-up "
                    f"day {warmup_day} (schedule {b.schedule!r}): per IP "
                    f"{_per(caps.daily_cap, 'a day', 'daily')} and "
                    f"{_per(u['hourly_cap'], 'this hour', 'hourly')}"
                )
        out |= {
            "hourly_cap": u["hourly_cap"],
            "daily_cap": u["daily_cap"],
            "hour_used": u["hour_used"],
            "day_used": u["day_used"],
            "paused": u["paused"],
            "multiplier": u["multiplier"],
            "suspended_until": _when(u["suspended_until_ms"] or None, zone)
            if u["suspended_until_ms"] > now_ms
            else None,
        }
        if u["daily_cap"] is not None and u["day_used"] >= u["daily_cap"]:
            why.append(f"today's cap is used up ({u['day_used']:,} of {u['daily_cap']:,})")
        elif u["hourly_cap"] is not None and u["hour_used"] >= u["hourly_cap"]:
            why.append(f"this hour's cap is used up ({u['hour_used']:,} of {u['hourly_cap']:,})")
        live = self.book.for_key(ip, provider, batch, now_ms)
        out["automations"] = [a.to_json() | {"expires": _when(a.expires_ms, zone)} for a in live]
        for a in live:
            until = f"until {_when(a.expires_ms, zone)}" if a.expires_ms else f"until {a.ends_when}"
            why.append(
                f"{a.id} {a.kind} ({a.rule}) {until}: {a.reason}; cancel: kiln cancel {a.id}"
            )
        if not live:
            why.append("no automation touches this key")
        stale = self.policy.stale_sources(self.signals, now_ms)
        for source, ramps in stale.items():
            if batch is not None and (batch, provider) in ramps:
                why.append(f"{source} is stale: the next day roll holds this ramp")
        out["signals"] = self._signals_for(ip)
        if last_moves:
            m = last_moves[-1]
            at = _when(m.at_ms, zone)
            out["last_move"] = {"at": at, "action": m.action, "reason": m.reason}
            why.append(f"last day roll ({at}): {m.action}: {m.reason}")
        out["why"] = why
        return out

    def _signals_for(self, ip: str) -> dict[str, Any]:
        """What the sources last said about one IP, and their health."""
        s = self.signals
        snds = s.snds.get(ip, {})
        rep = s.ip_reputation.get(ip, {})
        return {
            "snds": {d: snds[d] for d in sorted(snds)[-3:]},
            "snds_blocked": s.snds_blocked.get(ip),
            "dnsbl": s.dnsbl.get(ip, {}),
            "ip_reputation": {d: rep[d] for d in sorted(rep)[-3:]},
            "health": {k: v.to_json() for k, v in s.health.items()},
        }

    # ----- the decision log -----

    def _entry(self, now_ms: int, a: Automation, action: str, reason: str) -> LogEntry:
        """A decision-log entry about an automation."""
        evidence = {
            "id": a.id,
            "kind": a.kind,
            "rule": a.rule,
            "scope": a.scope,
            "expires_ms": a.expires_ms,
            "ends_when": a.ends_when,
            "cancel_by": a.cancel_by,
            "matches": a.matches,
        } | {f"evidence_{k}": v for k, v in a.evidence.items()}
        json.dumps(evidence)  # fail here, not in the store, if something is not JSON-able
        return LogEntry(now_ms, "automation", a.scope, f"{a.kind}:{action}", reason, evidence)

    def dirty(self) -> list[dict[str, Any]]:
        """Changed automations as plain data, for the store (and forget they changed)."""
        out = [
            self.book.items[i].to_json() for i in sorted(self.book.dirty) if i in self.book.items
        ]
        self.book.dirty.clear()
        return out
