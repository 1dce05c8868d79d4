"""Automations: every action policy takes is a named, audited, cancellable object.

An `Automation` says what was done (`kind`), to what (`provider` with an `ip` or a `batch`),
why (`rule`, `reason`, `evidence`), since when and until when (`start_ms`, `expires_ms`, or
`ends_when` in words for actions that end on a condition), and who may end it early
(`cancel_by`). `AutomationBook` holds them in memory, re-arms them on new evidence, expires
them, and says what they add up to for each key (`effects`). It does no I/O and reads no clock:
the daemon persists `dirty` automations in the store and pushes `effects` into the engine.

Kinds and what they do:

- `suspend` (IP x provider): the key is denied until `expires_ms`.
- `slow` (IP x provider): the key runs at `factor` of its rate and caps until `expires_ms`.
- `pause` (IP x provider, IP x every provider, or batch x provider): keys denied, and the
  ramp does not advance.
- `hold` (batch x provider): the day roll of every day it was active on holds the ramp.
- `step_down` (batch x provider): taken at a day roll (`applied`); cancelling it gives the
  steps back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "OPERATOR",
    "Automation",
    "AutomationBook",
    "KeyEffect",
    "Kind",
    "State",
]

Kind = Literal["suspend", "slow", "pause", "hold", "step_down"]
State = Literal["active", "expired", "ended", "cancelled", "applied"]
OPERATOR = "an operator (kiln cancel ID)"
#: Ended automations are kept in memory this long (day rolls read yesterday's holds).
KEEP_ENDED_MS = 3 * 86_400_000


@dataclass(frozen=True, slots=True)
class Automation:
    """One action taken by policy; see the module docstring."""

    id: str
    kind: Kind
    rule: str
    """The reply rule id or policy condition that fired (`day.bounce_pause`, `snds.red`)."""
    reason: str
    evidence: dict[str, Any]
    provider: str | None
    """None: every provider."""
    ip: str | None
    batch: str | None
    start_ms: int
    expires_ms: int | None
    """None: until `ends_when` happens, or someone cancels it."""
    ends_when: str
    cancel_by: str = OPERATOR
    factor: float | None = None
    """`slow`: the multiplier."""
    from_step: int | None = None
    to_step: int | None = None
    """`step_down`: the move made."""
    dedupe: str = ""
    """Automations with the same non-empty `dedupe` re-arm one another instead of stacking."""
    matches: int = 1
    state: State = "active"
    ended_ms: int | None = None
    ended_by: str | None = None

    @property
    def scope(self) -> str:
        """`192.0.2.10 x google`, `batch tx x microsoft-consumer`, `192.0.2.10 x every provider`."""
        who = self.ip if self.ip is not None else f"batch {self.batch}"
        return f"{who} x {self.provider or 'every provider'}"

    def live(self, now_ms: int) -> bool:
        """Active, and not past its expiry."""
        return self.state == "active" and (self.expires_ms is None or now_ms < self.expires_ms)

    def overlaps(self, start_ms: int, end_ms: int) -> bool:
        """Was it in force at some time in [start_ms, end_ms) (cancellation ends it early)?"""
        if self.state in ("cancelled", "ended") and self.ended_ms is not None:
            until = self.ended_ms
        else:
            until = self.expires_ms if self.expires_ms is not None else end_ms
        return self.start_ms < end_ms and until > start_ms

    def to_json(self) -> dict[str, Any]:
        """Plain data for the API, the CLI and the store."""
        return asdict(self) | {"scope": self.scope}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Automation:
        """Back from `to_json` (unknown keys ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True)
class KeyEffect:
    """What the live automations add up to for one (IP, provider) key."""

    suspended_until_ms: int = 0
    multiplier: float = 1.0
    paused: bool = False
    because: tuple[str, ...] = ()
    """Ids of the automations behind it."""


@dataclass
class AutomationBook:
    """The automations of one plan, in memory; see the module docstring."""

    next_id: int = 1
    items: dict[str, Automation] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    """Ids changed since the store last saved them."""

    def load(self, automations: Iterable[Automation]) -> None:
        """Take automations back from the store (ids keep counting from the highest)."""
        for a in automations:
            self.items[a.id] = a
            self.next_id = max(self.next_id, _number(a.id) + 1)

    def __iter__(self) -> Iterator[Automation]:
        return iter(sorted(self.items.values(), key=lambda a: _number(a.id)))

    def get(self, automation_id: str) -> Automation | None:
        """One automation by id (case-insensitive)."""
        return self.items.get(automation_id.upper())

    def _put(self, a: Automation) -> Automation:
        self.items[a.id] = a
        self.dirty.add(a.id)
        return a

    def add(self, now_ms: int, **fields: Any) -> Automation:
        """A new automation, started at `now_ms`."""
        a = Automation(id=f"A{self.next_id}", start_ms=now_ms, **fields)
        self.next_id += 1
        return self._put(a)

    def arm(
        self, now_ms: int, dedupe: str, expires_ms: int | None, **fields: Any
    ) -> tuple[Automation, bool]:
        """Start an automation, or re-arm the live one with the same `dedupe`.

        Re-arming moves the expiry to `expires_ms` (never earlier), counts the match and
        takes the newest reason and evidence. Returns (automation, created).
        """
        for a in self.items.values():
            if a.dedupe == dedupe and a.live(now_ms):
                later = (
                    None
                    if a.expires_ms is None or expires_ms is None
                    else max(a.expires_ms, expires_ms)
                )
                updated = replace(
                    a,
                    expires_ms=later,
                    matches=a.matches + 1,
                    reason=fields.get("reason", a.reason),
                    evidence=fields.get("evidence", a.evidence),
                )
                return self._put(updated), False
        return self.add(now_ms, dedupe=dedupe, expires_ms=expires_ms, **fields), True

    def end(
        self, automation_id: str, now_ms: int, by: str, state: State = "ended"
    ) -> Automation | None:
        """End one automation early (`cancelled` by an operator, `ended` by a condition).

        Active ones end; an `applied` step-down can only be cancelled (its steps go back).
        """
        a = self.get(automation_id)
        if a is None or not (
            a.state == "active" or (a.state == "applied" and state == "cancelled")
        ):
            return None
        return self._put(replace(a, state=state, ended_ms=now_ms, ended_by=by))

    def live_with(self, dedupe: str, now_ms: int) -> Automation | None:
        """The live automation with this `dedupe`, if any."""
        return next((a for a in self.items.values() if a.dedupe == dedupe and a.live(now_ms)), None)

    def expire(self, now_ms: int) -> list[Automation]:
        """Mark automations past their expiry `expired` (returned); forget long-ended ones."""
        done = []
        for a in list(self.items.values()):
            if a.state == "active" and a.expires_ms is not None and now_ms >= a.expires_ms:
                done.append(self._put(replace(a, state="expired", ended_ms=a.expires_ms)))
            elif a.state != "active" and (a.ended_ms or a.start_ms) + KEEP_ENDED_MS < now_ms:
                if a.id not in self.dirty:
                    del self.items[a.id]
        return done

    def live(self, now_ms: int) -> list[Automation]:
        """Automations in force now, oldest first."""
        return [a for a in self if a.live(now_ms)]

    def effects(
        self, now_ms: int, batches: dict[str, list[str]], providers: list[str]
    ) -> dict[tuple[str, str], KeyEffect]:
        """Per (IP, provider): the latest suspension, the smallest slow factor, any pause.

        `batches` maps batch names to their IPs; `providers` lists the plan's providers (for
        automations that cover every provider).
        """
        out: dict[tuple[str, str], KeyEffect] = {}
        for a in self.live(now_ms):
            if a.kind not in ("suspend", "slow", "pause"):
                continue
            ips = [a.ip] if a.ip is not None else batches.get(a.batch or "", [])
            for ip in ips:
                for provider in [a.provider] if a.provider is not None else providers:
                    e = out.get((ip, provider), KeyEffect())
                    if a.kind == "suspend":
                        e = replace(
                            e, suspended_until_ms=max(e.suspended_until_ms, a.expires_ms or 0)
                        )
                    elif a.kind == "slow":
                        e = replace(e, multiplier=min(e.multiplier, a.factor or 1.0))
                    else:
                        e = replace(e, paused=True)
                    out[(ip, provider)] = replace(e, because=(*e.because, a.id))
        return out

    def for_key(self, ip: str, provider: str, batch: str | None, now_ms: int) -> list[Automation]:
        """Live automations that touch (ip, provider), directly or through its batch."""
        return [
            a
            for a in self.live(now_ms)
            if a.provider in (None, provider)
            and (a.ip == ip or (a.ip is None and batch is not None and a.batch == batch))
        ]


def _number(automation_id: str) -> int:
    """`A12` -> 12 (0 for anything else)."""
    digits = automation_id[1:]
    return int(digits) if digits.isdigit() else 0
