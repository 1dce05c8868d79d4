"""What a configuration-driven MTA must enforce now: every warming (IP, provider) key's room
per hour, read from the engine (`kiln render`; docs/integrations/powermta.md, kumomta.md).

PowerMTA and KumoMTA's shaping enforce a message rate per source and destination; they do
not ask kiln per message and kiln does not see what they send until their logs are read. So
the rate rendered for a key is one that cannot exceed any of its caps over the day even if
kiln never sees a grant:

    per_hour = min(hourly cap, daily cap // active hours, daily room, the key's rate per hour)

with each cap scaled by the key's multiplier (a slow-down), and 0 while the key is paused,
suspended, retired or outside its active hours. `daily cap // active hours` spreads the day
evenly (what Gmail asks for), so the rendered rates summed over a day's active hours never
exceed the daily cap; `daily room` (daily cap minus what kiln granted today) makes a
re-render late in the day honour grants kiln did see (KumoMTA's per-message asks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from kiln import _core
from kiln.provider import DEFAULT_PROVIDER
from kiln.ramp import HOUR_MS, apply, calendar, compile_limits, hours_of_day, plan_providers
from kiln.records import RampState
from kiln.schedule import Plan

__all__ = [
    "SHAPE_VERSION",
    "KeyRoom",
    "PoolShape",
    "ProviderShape",
    "Shape",
    "nominal_engine",
    "shape_of",
]

#: Version of the `caps` op's reply shape (docs/protocol.md).
SHAPE_VERSION = 1
_PPM = 1_000_000


@dataclass(frozen=True, slots=True)
class KeyRoom:
    """One warming (IP, provider) key: what the MTA may send per hour from now, and why."""

    ip: str
    provider: str
    batch: str
    pool: str
    #: Messages per hour the MTA may send on this key (0: none now; None: no limit).
    per_hour: int | None
    #: What sets `per_hour`: hourly_cap, daily_spread, daily_cap, rate, paused, suspended,
    #: retired, outside_active_hours, or None without a limit.
    bound: str | None
    hourly_cap: int | None
    daily_cap: int | None
    day_used: int
    multiplier: float


@dataclass(frozen=True, slots=True)
class ProviderShape:
    """How an MTA recognises a provider: recipient domains and MX host suffixes."""

    domains: list[str]
    mx_suffixes: list[str]


@dataclass(frozen=True, slots=True)
class PoolShape:
    """A pool's IPs: warm ones with their weights, warming ones by batch, and its overflow."""

    warm: dict[str, int]
    warming: dict[str, int]
    overflow: str | None


@dataclass(frozen=True, slots=True)
class Shape:
    """Everything `kiln render` writes a configuration from (the `caps` op's reply)."""

    plan: str
    at_ms: int
    timezone: str
    #: Local hour and date at `at_ms` (what a watch compares to re-render at each roll).
    local_hour: str
    providers: dict[str, ProviderShape]
    pools: dict[str, PoolShape]
    keys: list[KeyRoom] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the `caps` op's reply, without `ok`)."""
        return {"version": SHAPE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Shape:
        """Back from `to_json` (ValueError if the shape is not one this version reads)."""
        if doc.get("version") != SHAPE_VERSION:
            raise ValueError(
                f"caps reply version {doc.get('version')!r}; this kiln reads {SHAPE_VERSION}"
            )
        try:
            return cls(
                plan=doc["plan"],
                at_ms=doc["at_ms"],
                timezone=doc["timezone"],
                local_hour=doc["local_hour"],
                providers={k: ProviderShape(**v) for k, v in doc["providers"].items()},
                pools={k: PoolShape(**v) for k, v in doc["pools"].items()},
                keys=[KeyRoom(**k) for k in doc["keys"]],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"caps reply: not the expected shape ({e})") from None

    def limits_fingerprint(self) -> str:
        """A digest of the limits, without usage: it changes on a reload, a pause, a
        suspension or a slow-down, not when kiln grants (a watch re-renders on it)."""
        parts = [
            self.plan,
            json.dumps({k: asdict(v) for k, v in self.pools.items()}, sort_keys=True),
            json.dumps({k: asdict(v) for k, v in self.providers.items()}, sort_keys=True),
        ]
        parts += [
            f"{k.ip}|{k.provider}|{k.hourly_cap}|{k.daily_cap}|{k.multiplier}|"
            f"{k.bound if k.bound in _CLOSED else ''}"
            for k in self.keys
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


_CLOSED = ("paused", "suspended", "retired", "outside_active_hours")


def shape_of(engine: _core.Engine, plan: Plan, now_ms: int) -> Shape:
    """The shape of `plan`'s keys in `engine` at `now_ms` (called on the engine's thread)."""
    local = plan.local_time(now_ms)
    hour_bit = 1 << local.hour
    keys: list[KeyRoom] = []
    providers = plan_providers(plan)
    for name, batch in plan.batches.items():
        for ip in batch.ips:
            for provider in providers:
                u = engine.usage(engine.key(ip, provider))
                keys.append(_room(ip, provider, name, batch.pool, u, now_ms, hour_bit))
    table = plan.provider_table()
    return Shape(
        plan=plan.name,
        at_ms=now_ms,
        timezone=plan.timezone,
        local_hour=local.strftime("%Y-%m-%dT%H"),
        providers={
            p: ProviderShape(list(table[p].domains), list(table[p].mx_suffixes))
            for p in providers
            if p != DEFAULT_PROVIDER and p in table
        },
        pools={
            name: PoolShape(
                warm={m.ip: m.weight for m in pool.members()},
                warming={
                    ip: b.weight for b in plan.batches.values() if b.pool == name for ip in b.ips
                },
                overflow=pool.overflow,
            )
            for name, pool in plan.pools.items()
        },
        keys=keys,
    )


def _room(
    ip: str, provider: str, batch: str, pool: str, u: dict[str, Any], now_ms: int, hour_bit: int
) -> KeyRoom:
    """One key's room per hour from its usage (the rule in the module's docstring)."""
    ppm = int(u["multiplier"] * _PPM + 0.5)

    def scaled(cap: int | None) -> int | None:
        """A cap times the multiplier, rounded down as the engine does."""
        return None if cap is None else cap * ppm // _PPM

    hourly, daily = scaled(u["hourly_cap"]), scaled(u["daily_cap"])
    mask = u["active_hours"]
    closed = (
        "retired"
        if u["retired"]
        else "paused"
        if u["paused"] or ppm == 0
        else "suspended"
        if (u["suspended_until_ms"] or 0) > now_ms
        else "outside_active_hours"
        if mask is not None and not mask & hour_bit
        else None
    )
    candidates: list[tuple[int, str]] = []
    if hourly is not None:
        candidates.append((hourly, "hourly_cap"))
    if daily is not None:
        hours = bin(mask).count("1") if mask is not None else 24
        candidates.append((daily // max(hours, 1), "daily_spread"))
        candidates.append((max(daily - u["day_used"], 0), "daily_cap"))
    if u["rate_count"]:
        per_hour = u["rate_count"] * ppm * HOUR_MS // (_PPM * u["rate_period_ms"])
        candidates.append((per_hour, "rate"))
    if closed is not None:
        per, bound = 0, closed
    elif candidates:
        per, bound = min(candidates, key=lambda c: c[0])  # a tie names the first: caps first
    else:
        per, bound = None, None
    return KeyRoom(
        ip=ip,
        provider=provider,
        batch=batch,
        pool=pool,
        per_hour=per,
        bound=bound,
        hourly_cap=hourly,
        daily_cap=daily,
        day_used=u["day_used"],
        multiplier=u["multiplier"],
    )


def nominal_engine(plan: Plan, at_ms: int) -> _core.Engine:
    """An engine holding the caps `plan` gives at `at_ms` if every ramp advanced each day
    since its batch's start (what `kiln plan` shows): what `kiln render` reads without a
    daemon."""
    engine = _core.Engine()
    today = plan.local_date(at_ms)
    positions = {
        (name, p): RampState(step=max(1, (today - b.start_date).days + 1))
        for name, b in plan.batches.items()
        for p in plan_providers(plan)
    }
    apply(engine, plan, compile_limits(plan, positions, at_ms))
    hours, days = calendar(plan.zone, at_ms)
    engine.set_calendar(hours, days, hours_of_day(plan.zone, hours))
    return engine


def local_iso(ms: int, plan: Plan) -> str:
    """`ms` as local ISO 8601 in the plan's zone (for headers of rendered files)."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(plan.zone).isoformat("T", "seconds")
