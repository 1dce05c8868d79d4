"""The records kiln's parts hand each other: one type, one name per concept.

A leaf module: it imports nothing of kiln, so the store, policy, the guard, the poller, the
day roll and the daemon all read and write the same types without importing each other.
Nothing here decides anything; a record validates itself and converts to plain data.

| concept                                   | type          | made by                  |
|-------------------------------------------|---------------|--------------------------|
| one step of a curve, before spreading     | `StepCaps`    | the plan's curve kinds   |
| a ramp's position (step, pause, counters) | `RampState`   | the day roll, operators  |
| a day's counts of a key or a ramp         | `DayCounts`   | the engine's tallies     |
| a classified push-back reply              | `Pushback`    | the guard (engine rules) |
| a day's push-back of one key              | `DayPushback` | the daemon's roll        |
| a stored push-back counter's key          | `PushbackKey` | the store                |
| the signal sources' facts by day          | `SignalBook`  | the poller               |
| a source's health                         | `SourceHealth`| the poller               |
| a decision-log row                        | `LogEntry`    | everything that decides  |
| a recipient held in Postfix's queue       | `Held`        | the Postfix integration  |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass, field
from datetime import date
from typing import Any

__all__ = [
    "DayCounts",
    "DayPushback",
    "Held",
    "KeyName",
    "LogEntry",
    "Pushback",
    "PushbackKey",
    "RampKey",
    "RampState",
    "SignalBook",
    "SourceHealth",
    "StepCaps",
]

RampKey = tuple[str, str]
"""(batch, provider): one ramp."""

KeyName = tuple[str, str]
"""(ip, provider): one engine key, by name."""

PushbackKey = tuple[str, str, str, int, str]
"""(ip, provider, class, local hour, rule): one stored push-back counter."""


@dataclass(frozen=True, slots=True)
class Held:
    """A recipient Postfix deferred on kiln's word, waiting in kiln's release queue."""

    queue_id: str
    recipient: str
    pool: str
    provider: str
    since_ms: int


#: Signal history kept per IP or domain, in days.
HISTORY_DAYS = 45


@dataclass(frozen=True, slots=True)
class StepCaps:
    """One step of a curve before spreading: caps per IP, or a share of a stream."""

    daily_cap: int | None = None
    hourly_cap: int | None = None
    share_percent: float | None = None


@dataclass(frozen=True, slots=True)
class RampState:
    """Where one (batch, provider) ramp stands, as the store keeps it."""

    step: int = 1
    """1-based; past the last step the ramp is done."""
    paused: bool = False
    idle_days: int = 0
    """Consecutive calendar days without traffic."""
    last_sending_day: date | None = None
    days_without_advance: int = 0
    """Held days that counted since the last advance or restart."""

    def __post_init__(self) -> None:
        """Steps start at 1; counters are never negative."""
        if self.step < 1:
            raise ValueError(f"step is 1-based, got {self.step}")
        if self.idle_days < 0 or self.days_without_advance < 0:
            raise ValueError(
                f"day counts are never negative, got idle_days={self.idle_days}, "
                f"days_without_advance={self.days_without_advance}"
            )


@dataclass(frozen=True, slots=True)
class DayCounts:
    """What one local day showed for a key (ip, provider), or for a ramp summed over its
    batch's IPs: `granted` is what kiln let through, the rest what the MTA reported."""

    granted: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    complaints: int = 0

    def __post_init__(self) -> None:
        """Counts of messages are never negative."""
        for name, value in zip(_COUNT_FIELDS, astuple(self), strict=True):
            if value < 0:
                raise ValueError(f"{name} is a count of messages, got {value}")

    def __add__(self, other: DayCounts) -> DayCounts:
        """Field by field."""
        return DayCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


_COUNT_FIELDS = ("granted", "delivered", "deferred", "bounced", "complaints")


@dataclass(frozen=True, slots=True)
class SuppressionEvent:
    """One event of the suppression list's append-only log (docs/suppression.md)."""

    at_ms: int
    #: The keyed hash the core holds for (scope, address).
    fingerprint: int
    #: The normalised address; "" where only hashes are kept.
    address: str
    #: hard_bounce, complaint, unsubscribe, manual, soft_bounce, or remove.
    event: str
    source: str
    #: "" for the global list, else a sending domain, stream or tenant.
    scope: str = ""
    expires_ms: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One row of the append-only decision log; `id` is assigned by the store."""

    at_ms: int
    kind: str  # "ramp", "reload", "suspend", "start", "stop", ...
    subject: str  # "tx-2026-12/google", "192.0.2.10/google", "plan", ...
    action: str  # "advance", "hold", "restart", "reload_failed", ...
    reason: str  # a human sentence
    evidence: dict[str, Any]  # JSON-able
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Pushback:
    """A remote reply the engine classified: its class (`cls`, a `kiln.rules` class name),
    the scope it acts on and the rule that matched."""

    at_ms: int
    ip: str
    provider: str
    cls: str
    scope: str
    rule: str
    text: str = ""


@dataclass
class DayPushback:
    """Push-back seen on one local day for one (IP, provider): hours with hits, per class."""

    hours: dict[str, set[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, cls: str, hour: int, n: int = 1) -> None:
        """Count `n` replies of `cls` in local `hour`."""
        self.hours.setdefault(cls, set()).add(hour)
        self.counts[cls] = self.counts.get(cls, 0) + n


@dataclass
class SourceHealth:
    """When a source last gave a good reading, and what went wrong since."""

    last_good_ms: int | None = None
    last_attempt_ms: int | None = None
    failures: int = 0
    last_error: str | None = None

    def stale(self, now_ms: int, stale_after_ms: int) -> bool:
        """No good reading, or none for longer than `stale_after_ms`."""
        return self.last_good_ms is None or now_ms - self.last_good_ms > stale_after_ms

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "last_good_ms": self.last_good_ms,
            "last_attempt_ms": self.last_attempt_ms,
            "failures": self.failures,
            "last_error": self.last_error,
        }


@dataclass
class SignalBook:
    """The latest facts every source gave, by day; persisted as JSON by the daemon."""

    spam_rate: dict[str, dict[str, float]] = field(default_factory=dict)
    """domain -> {day: fraction (the upper bound when Google gives one)}."""
    domain_reputation: dict[str, dict[str, str]] = field(default_factory=dict)
    ip_reputation: dict[str, dict[str, str]] = field(default_factory=dict)
    snds: dict[str, dict[str, str]] = field(default_factory=dict)
    """ip -> {day: GREEN | YELLOW | RED | other}."""
    snds_blocked: dict[str, str] = field(default_factory=dict)
    """ip -> reason, as of the last good ipStatus poll."""
    dnsbl: dict[str, dict[str, str]] = field(default_factory=dict)
    """ip -> {zone: clean | listed | policy | unknown (+ detail)}."""
    health: dict[str, SourceHealth] = field(default_factory=dict)

    def good(self, source: str, now_ms: int) -> None:
        """`source` just gave a good reading."""
        h = self.health.setdefault(source, SourceHealth())
        h.last_good_ms = h.last_attempt_ms = now_ms
        h.failures = 0
        h.last_error = None

    def failed(self, source: str, now_ms: int, error: str) -> None:
        """`source` failed (the error text holds no secret)."""
        h = self.health.setdefault(source, SourceHealth())
        h.last_attempt_ms = now_ms
        h.failures += 1
        h.last_error = error

    @staticmethod
    def put(table: dict[str, dict[str, Any]], subject: str, day: date, value: Any) -> None:
        """Record a daily value, keeping `HISTORY_DAYS` of history."""
        days = table.setdefault(subject, {})
        days[day.isoformat()] = value
        for old in sorted(days)[:-HISTORY_DAYS]:
            del days[old]

    @staticmethod
    def latest(
        table: Mapping[str, Mapping[str, Any]], subject: str, until: date, fresh_days: int
    ) -> tuple[date, Any] | None:
        """The newest value for `subject` on a day in (until - fresh_days, until]."""
        days = table.get(subject, {})
        for text in sorted(days, reverse=True):
            d = date.fromisoformat(text)
            if d <= until:
                return (d, days[text]) if (until - d).days < fresh_days else None
        return None

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "spam_rate": self.spam_rate,
            "domain_reputation": self.domain_reputation,
            "ip_reputation": self.ip_reputation,
            "snds": self.snds,
            "snds_blocked": self.snds_blocked,
            "dnsbl": self.dnsbl,
            "health": {k: v.to_json() for k, v in self.health.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignalBook:
        """Back from `to_json`; unknown keys ignored, missing ones empty."""
        book = cls()
        for name in ("spam_rate", "domain_reputation", "ip_reputation", "snds", "dnsbl"):
            setattr(book, name, dict(data.get(name, {})))
        book.snds_blocked = dict(data.get("snds_blocked", {}))
        book.health = {k: SourceHealth(**v) for k, v in data.get("health", {}).items()}
        return book
