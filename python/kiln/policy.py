"""Policy: evidence -> action. Every action is an `Automation`.

Three entry points, all pure (state in, automations out; `now_ms` is an argument):

- `Policy.on_pushback`: a classified push-back reply (the engine classified it against the
  reply rules). Counts it against its rule's threshold ("3 per hour" = 3 matches in a sliding
  hour, per rule x IP x provider), then suspends or slows the implicated keys, re-arming a
  live action on each new match (expiry = latest match + duration). `rate_limit_rep` also
  holds the ramp's day roll; `block_rep` and `blocklist` hold it until `day.block_quiet` has
  passed without another one.
- `Policy.on_signals`: after a poll of SNDS or the blocklists: SNDS RED (`snds_pause`) or
  blocked pauses the IP for the covered providers at once; it resumes after
  `snds_resume_green_days` consecutive GREEN days (or when the block is lifted). A DNSBL
  listing pauses the IP for every provider until every zone answers clean again.
- `Policy.day_verdicts`: at each day roll, per batch x provider, from the previous day's
  counts, push-back, Postmaster and SNDS readings and source health: pause, step down, hold,
  or nothing (the ramp's own gates then decide whether it advances). See `schedules/README.md`
  ("Policy") for the table; docs/warmup.md ("Thresholds") for where its numbers come from.

Fail safe: a configured source that has had no good reading for longer than its `stale_after`
holds every ramp it covers, and a source never read at all counts as stale. Missing data never
advances a ramp.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Literal

from kiln.automation import Automation, AutomationBook
from kiln.duration import format_ms
from kiln.policyspec import RealtimeAction
from kiln.ramp import plan_providers
from kiln.records import (
    DayCounts,
    DayPushback,
    Pushback,
    RampKey,
    RampState,
    SignalBook,
    SourceHealth,
)
from kiln.schedule import Plan

__all__ = [
    "Policy",
    "RampVerdict",
    "RuleInfo",
    "undo_step_down",
]

_CIDR = re.compile(
    r"(?<![0-9A-Fa-f:.])((?:[0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}|[0-9A-Fa-f:]*:[0-9A-Fa-f:]+/[0-9]{1,3})"
)
#: A Postmaster reading older than this (before the rolled day) no longer judges a ramp.
_POSTMASTER_FRESH_DAYS = 7


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What policy needs of a reply rule: its threshold and its own action, if any."""

    threshold_count: int = 1
    threshold_period_ms: int = 3_600_000
    action: RealtimeAction | Literal["none", "default"] = "default"


@dataclass
class RampVerdict:
    """What policy says about one ramp at a day roll; the ramp's gates decide the rest."""

    pause: list[str] = field(default_factory=list)
    step_down: list[str] = field(default_factory=list)
    hold: list[str] = field(default_factory=list)
    automations: list[str] = field(default_factory=list)
    """Ids of the automations that hold or pause the ramp."""
    new_pause: list[str] = field(default_factory=list)
    """Pauses decided at this roll (the others are live automations)."""
    marks: list[str] = field(default_factory=list)
    """Readings that step the ramp down (each may do so once)."""


def _pct(x: float) -> str:
    """0.0035 -> `0.35%`."""
    return f"{x * 100:.3g}%"


def _n(n: int, word: str, plural: str | None = None) -> str:
    """`1 GREEN day`, `3 GREEN days`: a count and its noun, in agreement."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def undo_step_down(a: Automation, states: Mapping[RampKey, RampState]) -> dict[RampKey, RampState]:
    """The positions a cancelled step-down gives back: its ramp at `from_step` again, if it
    still stands where the step-down put it (a roll since then may have moved it)."""
    if a.kind != "step_down" or a.batch is None or a.provider is None or a.from_step is None:
        return {}
    key = (a.batch, a.provider)
    s = states.get(key, RampState())
    return {key: replace(s, step=a.from_step)} if s.step == a.to_step else {}


class Policy:
    """Evidence -> automations for one plan; see the module docstring."""

    def __init__(self, plan: Plan, rules: Mapping[str, RuleInfo] | None = None) -> None:
        self.plan = plan
        self.rules: Mapping[str, RuleInfo] = rules or {}
        self._windows: dict[tuple[str, str, str], deque[int]] = {}

    # ----- the plan's shape -----

    def batch_of(self, ip: str) -> str | None:
        """The batch an IP warms in, if any."""
        return next((n for n, b in self.plan.batches.items() if ip in b.ips), None)

    def batch_ips(self) -> dict[str, list[str]]:
        """Batch name -> its IPs."""
        return {n: list(b.ips) for n, b in self.plan.batches.items()}

    def all_ips(self) -> list[str]:
        """Every IP of the plan: batches first, then warm pool members."""
        return self.plan.all_ips()

    def implicated(self, p: Pushback) -> list[str]:
        """The IPs a reply's scope names (scopes: docs/rules.md)."""
        if p.scope == "ip":
            return [p.ip]
        if p.scope == "netblock":
            net = _netblock(p.text, p.ip)
            return [ip for ip in self.all_ips() if ipaddress.ip_address(ip) in net]
        if p.scope == "domain":
            return self.all_ips()
        return []

    # ----- real time -----

    def on_pushback(self, p: Pushback, book: AutomationBook) -> list[tuple[Automation, bool]]:
        """Suspend, slow and hold for one classified reply; returns (automation, created)."""
        info = self.rules.get(p.rule, RuleInfo())
        window = self._windows.setdefault((p.rule, p.ip, p.provider), deque())
        window.append(p.at_ms)
        while window and window[0] <= p.at_ms - info.threshold_period_ms:
            window.popleft()
        action = (
            self.plan.policy.realtime_action(p.cls) if info.action == "default" else info.action
        )
        ips = self.implicated(p)
        out: list[tuple[Automation, bool]] = []
        if action != "none" and action is not None:
            # One automation per implicated IP; a live one re-arms on every new match.
            reached = len(window) >= info.threshold_count
            for ip in ips:
                dedupe = f"reply|{p.rule}|{p.provider}|{ip}"
                if reached or book.live_with(dedupe, p.at_ms) is not None:
                    out.append(self._act(p, action, ip, dedupe, len(window), info, book))
        out += self._pushback_holds(p, ips, book)
        return out

    def _act(
        self,
        p: Pushback,
        action: RealtimeAction,
        ip: str,
        dedupe: str,
        seen: int,
        info: RuleInfo,
        book: AutomationBook,
    ) -> tuple[Automation, bool]:
        """Start or re-arm the suspend or slow of (ip, provider) for one reply."""
        duration = format_ms(action.duration_ms)
        what = (
            f"suspended for {duration}"
            if action.suspend is not None
            else f"slowed to {action.slow:g}x for {duration}"
        )
        threshold = (
            f" ({seen} within {format_ms(info.threshold_period_ms)}, "
            f"threshold {info.threshold_count})"
            if info.threshold_count > 1
            else ""
        )
        return book.arm(
            p.at_ms,
            dedupe,
            p.at_ms + action.duration_ms,
            kind="suspend" if action.suspend is not None else "slow",
            rule=p.rule,
            reason=f"{p.cls} reply ({p.scope} scope){threshold}: {what} after the latest one",
            evidence={"class": p.cls, "scope": p.scope, "reply": p.text[:300], "from_ip": p.ip},
            provider=p.provider,
            ip=ip,
            batch=None,
            ends_when=f"{duration} after the latest matching reply",
            factor=action.slow,
        )

    def _pushback_holds(
        self, p: Pushback, ips: list[str], book: AutomationBook
    ) -> list[tuple[Automation, bool]]:
        """Reputation push-back holds the day roll of the batches it implicates."""
        if p.cls not in ("rate_limit_rep", "block_rep", "blocklist"):
            return []
        day = self.plan.local_date(p.at_ms)
        _, day_end = self.plan.day_bounds_ms(day)
        if p.cls == "rate_limit_rep":
            expires, until = day_end, "the end of the local day (the day roll holds)"
        else:
            quiet = self.plan.policy.day.block_quiet
            expires, until = p.at_ms + quiet, f"{format_ms(quiet)} without another {p.cls} reply"
        out = []
        for batch in sorted({b for ip in ips if (b := self.batch_of(ip)) is not None}):
            out.append(
                book.arm(
                    p.at_ms,
                    f"hold|{p.cls}|{batch}|{p.provider}",
                    expires,
                    kind="hold",
                    rule=p.rule,
                    reason=(
                        f"{p.cls} reply from {p.provider}: the ramp does not advance until {until}"
                    ),
                    evidence={"class": p.cls, "reply": p.text[:300], "ip": p.ip},
                    provider=p.provider,
                    ip=None,
                    batch=batch,
                    ends_when=until,
                )
            )
        return out

    # ----- signals -----

    def on_signals(
        self, signals: SignalBook, book: AutomationBook, now_ms: int
    ) -> list[Automation]:
        """Pause or resume IPs after an SNDS or blocklist poll; returns what changed."""
        changed: list[Automation] = []
        sp = self.plan.policy.signals
        snds = self.plan.signals.snds
        if snds is not None:
            for ip in self.all_ips():
                for provider in snds.providers:
                    changed += self._snds_ip(ip, provider, signals, book, now_ms)
        if self.plan.signals.dnsbl is not None and sp.blocklist_pauses:
            for ip in self.all_ips():
                changed += self._dnsbl_ip(ip, signals, book, now_ms)
        return changed

    def _snds_ip(
        self, ip: str, provider: str, signals: SignalBook, book: AutomationBook, now_ms: int
    ) -> list[Automation]:
        sp = self.plan.policy.signals
        out: list[Automation] = []
        days = signals.snds.get(ip, {})
        colour_key = f"snds.colour|{ip}|{provider}"
        live = book.live_with(colour_key, now_ms)
        latest = max(days) if days else None
        if latest is not None and days[latest] in sp.snds_pause:
            a, created = book.arm(
                now_ms,
                colour_key,
                None,
                kind="pause",
                rule="snds.filter_result",
                reason=(
                    f"SNDS filter result {days[latest]} for {ip} on {latest}: paused for "
                    f"{provider} until {_n(sp.snds_resume_green_days, 'GREEN day')} in a row"
                ),
                evidence={"day": latest, "colour": days[latest]},
                provider=provider,
                ip=ip,
                batch=None,
                ends_when=f"{_n(sp.snds_resume_green_days, 'consecutive GREEN day')} in SNDS",
            )
            if created:
                out.append(a)
        elif live is not None:
            start_day = str(live.evidence.get("day", ""))
            after = sorted(d for d in days if d > start_day)
            green = _green_run(after, days)
            if green >= sp.snds_resume_green_days:
                ended = book.end(live.id, now_ms, f"{_n(green, 'GREEN day')} in SNDS")
                if ended is not None:
                    out.append(ended)
        block_key = f"snds.blocked|{ip}|{provider}"
        live_block = book.live_with(block_key, now_ms)
        reason = signals.snds_blocked.get(ip)
        if reason is not None and sp.snds_blocked_pauses:
            a, created = book.arm(
                now_ms,
                block_key,
                None,
                kind="pause",
                rule="snds.blocked",
                reason=f"SNDS lists {ip} as blocked ({reason}): paused for {provider}",
                evidence={"reason": reason},
                provider=provider,
                ip=ip,
                batch=None,
                ends_when="SNDS no longer lists the IP as blocked",
            )
            if created:
                out.append(a)
        elif live_block is not None:
            ended = book.end(live_block.id, now_ms, "SNDS no longer lists the IP as blocked")
            if ended is not None:
                out.append(ended)
        return out

    def _dnsbl_ip(
        self, ip: str, signals: SignalBook, book: AutomationBook, now_ms: int
    ) -> list[Automation]:
        zones = signals.dnsbl.get(ip, {})
        listed = sorted(z for z, outcome in zones.items() if outcome.startswith("listed"))
        key = f"dnsbl|{ip}"
        live = book.live_with(key, now_ms)
        if listed:
            a, created = book.arm(
                now_ms,
                key,
                None,
                kind="pause",
                rule="dnsbl.listed",
                reason=f"{ip} is listed on {', '.join(listed)}: paused for every provider",
                evidence={z: zones[z] for z in listed},
                provider=None,
                ip=ip,
                batch=None,
                ends_when="every blocklist answers clean for the IP",
            )
            return [a] if created else []
        all_clean = zones and all(o == "clean" for o in zones.values())
        if live is not None and all_clean:
            ended = book.end(live.id, now_ms, "every blocklist answered clean")
            return [ended] if ended is not None else []
        return []

    # ----- the day roll -----

    def day_verdicts(
        self,
        day: date,
        evidence: Mapping[RampKey, DayCounts],
        pushback: Mapping[tuple[str, str], DayPushback],
        signals: SignalBook,
        book: AutomationBook,
        now_ms: int,
    ) -> dict[RampKey, RampVerdict]:
        """Pause / step down / hold per (batch, provider) for the local `day` that ended.

        `evidence` holds each ramp's counts (summed over its batch), `pushback` each (IP,
        provider)'s of that day. Step-downs and pauses decided here are recorded in `book` as
        automations (`applied` for step-downs, `active` for pauses).
        """
        start_ms, end_ms = self.plan.day_bounds_ms(day)
        stale = self.stale_sources(signals, now_ms)
        out: dict[RampKey, RampVerdict] = {}
        for batch, b in self.plan.batches.items():
            if b.start_date > day:
                continue
            for provider in plan_providers(self.plan):
                v = RampVerdict()
                self._counts(v, evidence.get((batch, provider)))
                self._replies(v, [pushback.get((ip, provider)) for ip in b.ips])
                self._postmaster(v, batch, provider, day, signals, book, now_ms)
                self._snds_day(v, b.ips, provider, day, signals)
                for source, covers in stale.items():
                    if (batch, provider) in covers:
                        h = signals.health.get(source)
                        since = (
                            "never"
                            if h is None or h.last_good_ms is None
                            else f"{format_ms(now_ms - h.last_good_ms)} ago"
                        )
                        v.hold.append(f"{source} is stale (last good reading {since})")
                for a in book:
                    if (
                        a.kind == "hold"
                        and a.batch == batch
                        and a.provider in (None, provider)
                        and a.state != "cancelled"
                        and a.overlaps(start_ms, end_ms)
                    ):
                        v.hold.append(f"{a.id}: {a.reason}")
                        v.automations.append(a.id)
                    if a.kind == "pause" and a.live(now_ms) and a.provider in (None, provider):
                        if a.batch == batch or (a.ip is not None and a.ip in b.ips):
                            v.pause.append(f"{a.id}: {a.reason}")
                            v.automations.append(a.id)
                if v.pause or v.step_down or v.hold:
                    out[(batch, provider)] = v
        return out

    def _counts(self, v: RampVerdict, ev: DayCounts | None) -> None:
        """Bounce and complaint rates of the day: hold, step down and pause thresholds."""
        if ev is None:
            return
        d = self.plan.policy.day
        attempted = ev.delivered + ev.bounced
        rates = []
        if attempted:
            rates.append(("bounce", ev.bounced / attempted * 100, attempted))
        if ev.delivered:
            rates.append(("complaint", ev.complaints / ev.delivered * 100, ev.delivered))
        for what, pct, volume in rates:
            hold, down, pause = (
                getattr(d, f"{k}_{what}_percent") for k in ("hold", "step_down", "pause")
            )
            text = f"{what} rate {pct:.3g}% of {volume}"
            big = volume >= d.min_volume
            if big and pct >= pause:
                v.new_pause.append(f"day.{what}_pause: {text} (pause at {pause:g}%)")
                v.pause.append(v.new_pause[-1])
            elif big and pct >= down:
                v.step_down.append(f"day.{what}_step_down: {text} (step down at {down:g}%)")
            elif pct >= hold:
                small = "" if big else f"; under {d.min_volume} messages, it can only hold"
                v.hold.append(f"day.{what}_hold: {text} (hold at {hold:g}%{small})")

    def _replies(self, v: RampVerdict, days: Sequence[DayPushback | None]) -> None:
        """Push-back classes of the day: rate limits hold or step down, blocks step down."""
        hours: dict[str, set[int]] = {}
        counts: dict[str, int] = {}
        for d in days:
            if d is None:
                continue
            for cls, hs in d.hours.items():
                hours.setdefault(cls, set()).update(hs)
                counts[cls] = counts.get(cls, 0) + d.counts.get(cls, 0)
        need = self.plan.policy.day.rate_limit_step_down_hours
        for cls in ("blocklist", "block_rep"):
            if cls in counts:
                v.step_down.append(
                    f"day.{cls}: {_n(counts[cls], f'{cls} reply', f'{cls} replies')}"
                )
        rl = hours.get("rate_limit_rep", set())
        if len(rl) >= need:
            v.step_down.append(
                f"day.rate_limit_rep: rate_limit_rep replies in {_n(len(rl), 'distinct hour')} "
                f"(step down from {need})"
            )
        elif rl:
            got = _n(counts["rate_limit_rep"], "rate_limit_rep reply", "rate_limit_rep replies")
            v.hold.append(f"day.rate_limit_rep: {got}")

    def _postmaster(
        self,
        v: RampVerdict,
        batch: str,
        provider: str,
        day: date,
        signals: SignalBook,
        book: AutomationBook,
        now_ms: int,
    ) -> None:
        """Gmail spam rate and reputation (one step-down per reading day at most)."""
        pm = self.plan.signals.postmaster
        if pm is None or provider not in pm.providers:
            return
        if pm.batches is not None and batch not in pm.batches:
            return
        sp = self.plan.policy.signals
        found: list[tuple[str, str, date, str]] = []  # (severity, rule, day, text)
        for domain in pm.domains:
            got = SignalBook.latest(signals.spam_rate, domain, day, _POSTMASTER_FRESH_DAYS)
            if got is not None:
                d, rate = got
                pct = rate * 100
                seen = f"{domain} spam rate {_pct(rate)} on {d}"
                down, hold = sp.spam_rate_step_down_percent, sp.spam_rate_hold_percent
                if pct >= down:
                    text = f"{seen} (step down at {down:g}%)"
                    found.append(("down", f"postmaster.spam_rate|{domain}", d, text))
                elif pct >= hold:
                    text = f"{seen} (hold at {hold:g}%)"
                    found.append(("hold", f"postmaster.spam_rate|{domain}", d, text))
            rep = SignalBook.latest(signals.domain_reputation, domain, day, _POSTMASTER_FRESH_DAYS)
            if rep is not None:
                found += _reputation(
                    f"{domain} domain reputation", rep, sp, f"postmaster.domain_reputation|{domain}"
                )
        for ip in self.plan.batches[batch].ips:
            rep = SignalBook.latest(signals.ip_reputation, ip, day, _POSTMASTER_FRESH_DAYS)
            if rep is not None:
                found += _reputation(
                    f"{ip} IP reputation", rep, sp, f"postmaster.ip_reputation|{ip}"
                )
        # A reading steps a ramp down once; a cancelled step-down is an operator's "no".
        used = {m for a in book for m in a.evidence.get("marks", [])}
        for severity, rule, d, text in found:
            name = _rule_of(rule.replace("|", ":", 1))
            if severity == "hold":
                v.hold.append(f"{name}: {text}")
                continue
            mark = f"{rule}|{d}|{batch}|{provider}"
            if mark in used:
                v.hold.append(f"{name}: {text}; already stepped down for this reading")
            else:
                v.step_down.append(f"{name}: {text}")
                v.marks.append(mark)

    def _snds_day(
        self, v: RampVerdict, ips: Sequence[str], provider: str, day: date, signals: SignalBook
    ) -> None:
        """SNDS colours that hold (pauses are real time, in `on_signals`)."""
        snds = self.plan.signals.snds
        if snds is None or provider not in snds.providers:
            return
        hold = self.plan.policy.signals.snds_hold
        for ip in ips:
            got = SignalBook.latest(signals.snds, ip, day, 3)
            if got is not None and got[1] in hold:
                v.hold.append(f"snds.filter_result: {ip} was {got[1]} on {got[0]}")

    def stale_sources(self, signals: SignalBook, now_ms: int) -> dict[str, set[RampKey]]:
        """Configured sources past their `stale_after`, with the ramps each covers."""
        s = self.plan.signals
        providers = plan_providers(self.plan)
        batches = list(self.plan.batches)
        out: dict[str, set[RampKey]] = {}
        checks: list[tuple[str, Any, list[str], list[str]]] = []
        if s.postmaster is not None:
            pm_batches = s.postmaster.batches if s.postmaster.batches is not None else batches
            checks.append(("postmaster", s.postmaster, pm_batches, s.postmaster.providers))
        if s.snds is not None:
            checks.append(("snds", s.snds, batches, s.snds.providers))
        if s.dnsbl is not None:
            checks.append(("dnsbl", s.dnsbl, batches, providers))
        for name, spec, covered_batches, covered in checks:
            health = signals.health.get(name, SourceHealth())
            if health.stale(now_ms, spec.stale_after):
                out[name] = {(b, p) for b in covered_batches for p in covered if p in providers}
        return out

    def record_moves(
        self,
        verdicts: Mapping[RampKey, RampVerdict],
        moves: Sequence[Any],
        book: AutomationBook,
        now_ms: int,
    ) -> list[Automation]:
        """Every step-down and pause a day roll made becomes an automation; returns them."""
        out: list[Automation] = []
        for m in moves:
            v = verdicts.get((m.batch, m.provider))
            if v is None or m.action not in ("step_down", "pause"):
                continue
            common: dict[str, Any] = {
                "reason": m.reason,
                "evidence": m.evidence | {"marks": v.marks},
                "provider": m.provider,
                "ip": None,
                "batch": m.batch,
                "expires_ms": None,
            }
            if m.action == "step_down":
                a = book.add(
                    now_ms,
                    kind="step_down",
                    rule=_rule_of(v.step_down[0]),
                    ends_when="taken at the day roll; cancelling it gives the steps back",
                    state="applied",
                    from_step=m.from_step,
                    to_step=m.to_step,
                    **common,
                )
                out.append(a)
            elif v.new_pause:
                a, _ = book.arm(
                    now_ms,
                    f"day.pause|{m.batch}|{m.provider}",
                    kind="pause",
                    rule=_rule_of(v.new_pause[0]),
                    ends_when="an operator cancels it (kiln cancel ID)",
                    **common,
                )
                out.append(a)
        return out


def _rule_of(text: str) -> str:
    """`day.bounce_pause: bounce rate ...` -> `day.bounce_pause`."""
    return text.split(":", 1)[0]


def _reputation(
    what: str, got: tuple[date, str], sp: Any, rule: str
) -> list[tuple[str, str, date, str]]:
    """A reputation category that holds or steps down."""
    d, category = got
    if category in sp.reputation_step_down:
        return [("down", rule, d, f"{what} {category} on {d}")]
    if category in sp.reputation_hold:
        return [("hold", rule, d, f"{what} {category} on {d}")]
    return []


def _green_run(days_after: Sequence[str], colours: Mapping[str, str]) -> int:
    """Consecutive GREEN calendar days ending at the newest of `days_after`."""
    run = 0
    prev: date | None = None
    for text in reversed(days_after):
        d = date.fromisoformat(text)
        if colours[text] != "GREEN" or (prev is not None and (prev - d).days != 1):
            break
        run += 1
        prev = d
    return run


def _netblock(text: str, ip: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The CIDR a reply names, else the IP's /24 (IPv4) or /64 (IPv6)."""
    m = _CIDR.search(text)
    if m is not None:
        try:
            return ipaddress.ip_network(m.group(1), strict=False)
        except ValueError:
            pass
    addr = ipaddress.ip_address(ip)
    return ipaddress.ip_network(f"{ip}/{24 if addr.version == 4 else 64}", strict=False)
