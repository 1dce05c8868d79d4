"""Warm-up plans as strict, validated models: pools, batches, schedules and their curves.

Each model checks its own values; each curve kind makes its own steps (`caps`). Reading a
file, locating every mistake and the checks that need the whole plan are
`kiln.planfile.load_plan`'s job; turning a plan into day-by-day caps and engine limits is
`kiln.ramp`'s. Warnings (caps that fall, unused schedules) ride along on `Plan.warnings`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kiln.errors import Problem
from kiln.modelerrors import did_you_mean
from kiln.policyspec import PolicySpec, Signals, SuppressionSpec
from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS, ProviderDef
from kiln.rate import RateError, RateSpec
from kiln.records import StepCaps

__all__ = [
    "Batch",
    "Gates",
    "Geometric",
    "Hourly",
    "Linear",
    "Plan",
    "Pool",
    "PoolIp",
    "ProviderOverride",
    "ProviderSpec",
    "Schedule",
    "Share",
    "SteadyState",
    "Step",
    "provider_hint",
]

MAX_CAP = 4_294_967_294
"""Caps are 32-bit counters in the engine; the largest value is reserved."""


def _error(kind: str, message: str, **context: Any) -> PydanticCustomError:
    """A validation error whose message kiln wrote itself."""
    return PydanticCustomError(kind, message, context)


def _rate(value: object) -> RateSpec:
    """A rate string such as `500/h,max_burst=10`."""
    if isinstance(value, RateSpec):
        return value
    if not isinstance(value, str):
        raise _error("rate_type", 'expected a rate such as "500/h", got {got}', got=repr(value))
    try:
        return RateSpec.parse(value)
    except RateError as e:
        raise _error("rate", "{problem}", problem=e.problem) from None


def _ip(value: object) -> str:
    """An IPv4 or IPv6 address, in its normal text form."""
    if not isinstance(value, str):
        raise _error("ip_type", "expected an IP address, got {got}", got=repr(value))
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise _error("ip", "expected an IPv4 or IPv6 address, got {got}", got=repr(value)) from None


def _date(value: object) -> date:
    """A calendar date, written 2026-12-01 (quoted or not)."""
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise _error("date", "expected a date written YYYY-MM-DD, got {got}", got=repr(value))


_RATE_SCHEMA = {
    "type": "string",
    "pattern": r"^\s*[0-9][0-9_,]*\s*/\s*[A-Za-z]+\s*(,\s*max_burst\s*=\s*[0-9][0-9_,]*\s*)?$",
    "examples": ["500/h", "2_000/day,max_burst=10"],
}


def _number(value: object) -> object:
    """Whole numbers are numbers too: `factor: 2` is as good as `factor: 2.0`."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Number = Annotated[float, BeforeValidator(_number)]
Rate = Annotated[RateSpec, BeforeValidator(_rate), WithJsonSchema(_RATE_SCHEMA)]
IpText = Annotated[str, BeforeValidator(_ip)]
Day = Annotated[date, BeforeValidator(_date)]
Cap = Annotated[int, Field(ge=1, le=MAX_CAP)]
Count = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]


class _Model(BaseModel):
    """Strict: unknown keys are errors, types are not coerced, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ProviderSpec(_Model):
    """Recipient domains and MX host suffixes of a mailbox provider."""

    domains: list[str] = []
    mx_suffixes: list[str] = []

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, v: list[str]) -> list[str]:
        """Domains compare lower-case, without a trailing dot."""
        return [d.strip().lower().rstrip(".") for d in v]

    @field_validator("mx_suffixes")
    @classmethod
    def _dot_suffixes(cls, v: list[str]) -> list[str]:
        """Suffixes compare lower-case, with one leading dot and no trailing dot."""
        return ["." + s.strip().lower().strip(".") for s in v]


class PoolIp(_Model):
    """A warm IP of a pool with its share of traffic."""

    ip: IpText
    weight: Count = 1


class Pool(_Model):
    """A stream or tenant: its warm IPs (batches add warming ones) and where it overflows."""

    ips: list[IpText | PoolIp] = []
    overflow: str | None = None

    def members(self) -> list[PoolIp]:
        """The warm IPs, each with its weight."""
        return [PoolIp(ip=m) if isinstance(m, str) else m for m in self.ips]


class Batch(_Model):
    """IPs of one pool that share a schedule and a start date."""

    pool: str
    ips: list[IpText] = Field(min_length=1)
    schedule: str
    start_date: Day
    weight: Count = 1


class Step(_Model):
    """One step of a table: a daily cap and/or an hourly cap."""

    #: The step's number, if given: step N is warm-up day N (day 1 is the batch's start date)
    #: of a ramp that passes every gate. Checks that no row was lost.
    warmup_day: int | None = Field(default=None, ge=1)
    daily_cap: Cap | None = None
    hourly_cap: Cap | None = None

    @model_validator(mode="after")
    def _some_cap(self) -> Step:
        """A step without any cap would be no step at all."""
        if self.daily_cap is None and self.hourly_cap is None:
            raise _error("step_empty", "a step needs daily_cap, hourly_cap or both")
        return self

    def caps(self) -> StepCaps:
        """The step's caps."""
        return StepCaps(self.daily_cap, self.hourly_cap)


class _Rising(_Model):
    """A generated curve from `start_daily_cap` up to `target_daily_cap`."""

    start_daily_cap: Cap
    target_daily_cap: Cap

    @model_validator(mode="after")
    def _target_above_start(self) -> _Rising:
        """The curve must go up."""
        if self.target_daily_cap <= self.start_daily_cap:
            raise _error(
                "target",
                "target_daily_cap ({target}) must be above start_daily_cap ({start})",
                target=self.target_daily_cap,
                start=self.start_daily_cap,
            )
        return self


class Geometric(_Rising):
    """Caps that grow by `factor` per step from `start_daily_cap` up to `target_daily_cap`."""

    start_daily_cap: Cap
    factor: Number = Field(gt=1, le=10)
    target_daily_cap: Cap
    round_to: Count = 1

    def caps(self) -> list[StepCaps]:
        """start, start*factor, ... rounded to `round_to`, ending exactly at the target."""
        caps: list[int] = []
        value = float(self.start_daily_cap)
        while True:
            cap = max(self.round_to, round(value / self.round_to) * self.round_to)
            if cap >= self.target_daily_cap:
                caps.append(self.target_daily_cap)
                return [StepCaps(c) for c in caps]
            if not caps or cap > caps[-1]:
                caps.append(cap)
            value *= self.factor


class Linear(_Rising):
    """Caps that grow by `increment_daily_cap` per step up to `target_daily_cap`."""

    start_daily_cap: Cap
    increment_daily_cap: Cap
    target_daily_cap: Cap

    def caps(self) -> list[StepCaps]:
        """start, start + increment, ... ending exactly at the target."""
        start, step, target = self.start_daily_cap, self.increment_daily_cap, self.target_daily_cap
        count = math.ceil((target - start) / step)
        return [StepCaps(start + i * step) for i in range(count)] + [StepCaps(target)]


class Share(_Model):
    """A share of a stream's traffic per step, for moving a stream from an old MTA to new IPs."""

    percents: list[Annotated[Number, Field(gt=0, le=100)]] = Field(min_length=1)
    days_per_step: Count = 1
    stream_daily_volume: Cap | None = None

    def caps(self) -> list[StepCaps]:
        """Each percent for `days_per_step` steps."""
        return [StepCaps(share_percent=p) for p in self.percents for _ in range(self.days_per_step)]


#: The ways of giving a curve's steps: a table, or one of the generated kinds.
_CURVE_KINDS = ("steps", "geometric", "linear", "share")


class _Curve(_Model):
    """Exactly one way of giving steps."""

    steps: list[Step] | None = Field(default=None, min_length=1)
    geometric: Geometric | None = None
    linear: Linear | None = None
    share: Share | None = None

    def curve_kinds(self) -> list[str]:
        """Which of the ways were given."""
        return [k for k in _CURVE_KINDS if getattr(self, k) is not None]

    def curve_caps(self) -> list[StepCaps]:
        """The steps of the curve given (each kind owns how its steps are made)."""
        if self.steps is not None:
            return [s.caps() for s in self.steps]
        kind = self.geometric or self.linear or self.share
        assert kind is not None, "validated: exactly one way of giving steps"
        return kind.caps()


class ProviderOverride(_Curve):
    """A provider's own curve, or the schedule's curve scaled."""

    scale: Number | None = Field(default=None, gt=0, le=10)

    @model_validator(mode="after")
    def _one_way(self) -> ProviderOverride:
        """A provider override is a scale or a curve, not both, not neither; a share is of
        the whole stream, so it is no provider's own curve."""
        if self.share is not None:
            raise _error(
                "override_share",
                "share is a curve for the whole stream; a provider gives scale, steps, "
                "geometric or linear",
            )
        kinds = self.curve_kinds() + (["scale"] if self.scale is not None else [])
        if len(kinds) != 1:
            raise _error(
                "override",
                "give exactly one of scale, steps, geometric, linear; got {got}",
                got=", ".join(kinds) or "none",
            )
        return self


class Hourly(_Model):
    """How a day's volume is spread: active hours of the plan's day and the burst size."""

    active_hours: str = "00-24"
    max_burst: Count = 1

    @field_validator("active_hours")
    @classmethod
    def _hours(cls, v: str) -> str:
        """`HH-HH` with 0 <= start < end <= 24."""
        m = re.fullmatch(r"\s*(\d{1,2})(?::00)?\s*-\s*(\d{1,2})(?::00)?\s*", v)
        if not m or not 0 <= int(m[1]) < int(m[2]) <= 24:
            raise _error(
                "hours",
                "expected hours of the day as START-END with 0 <= START < END <= 24, "
                "such as 08-20, got {got}",
                got=repr(v),
            )
        return f"{int(m[1]):02d}-{int(m[2]):02d}"

    @property
    def window(self) -> tuple[int, int]:
        """(first active hour, first inactive hour)."""
        start, end = self.active_hours.split("-")
        return int(start), int(end)

    @property
    def hours(self) -> int:
        """How many hours a day are active."""
        start, end = self.window
        return end - start


class Gates(_Model):
    """What a day must show for its ramp to advance one step."""

    delivered_above_percent: Number = Field(default=90.0, ge=0, lt=100)
    sending_days_only: bool = True
    rewarm_after_idle_days: Count | None = 30


class SteadyState(_Model):
    """Limits that stay after the last step."""

    daily_cap: Cap | None = None
    hourly_cap: Cap | None = None
    max_message_rate: Rate | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> SteadyState:
        """Steady state with no limit is `uncapped`."""
        if self.daily_cap is None and self.hourly_cap is None and self.max_message_rate is None:
            raise _error(
                "steady_empty",
                "give daily_cap, hourly_cap or max_message_rate, "
                "or write after_last_step: uncapped",
            )
        return self


class Schedule(_Curve):
    """A warm-up curve with its per-provider variations, hourly spreading and gates."""

    description: str | None = None
    providers: dict[str, ProviderOverride] = {}
    hourly: Hourly = Hourly()
    max_message_rate: Rate | None = None
    gates: Gates = Gates()
    after_last_step: Literal["uncapped"] | SteadyState = "uncapped"

    @model_validator(mode="after")
    def _one_curve(self) -> Schedule:
        """A schedule gives its steps exactly one way."""
        kinds = self.curve_kinds()
        if len(kinds) != 1:
            raise _error(
                "curve",
                "give exactly one of steps, geometric, linear, share; got {got}",
                got=", ".join(kinds) or "none",
            )
        return self


class Plan(_Model):
    """A whole warm-up plan file."""

    name: Name
    description: str | None = None
    timezone: str
    providers: dict[Name, ProviderSpec] = {}
    pools: dict[Name, Pool] = Field(min_length=1)
    batches: dict[Name, Batch] = {}
    schedules: dict[Name, Schedule] = {}
    policy: PolicySpec = PolicySpec()
    signals: Signals = Signals()
    suppression: SuppressionSpec = SuppressionSpec()

    _warnings: list[Problem] = PrivateAttr(default_factory=list)
    _source: str = PrivateAttr(default="")

    @property
    def warnings(self) -> list[Problem]:
        """Located warnings found while loading."""
        return self._warnings

    @property
    def source(self) -> str:
        """The file the plan came from."""
        return self._source

    @property
    def zone(self) -> ZoneInfo:
        """The plan's time zone."""
        return ZoneInfo(self.timezone)

    def local_time(self, at_ms: int) -> datetime:
        """Wall time in the plan's zone at `at_ms` (epoch ms)."""
        return datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(self.zone)

    def local_date(self, at_ms: int) -> date:
        """The plan-zone calendar date at `at_ms`: the day caps, rolls and evidence count in."""
        return self.local_time(at_ms).date()

    def day_bounds_ms(self, day: date) -> tuple[int, int]:
        """[start, end) of the local calendar `day` in the plan's zone, in epoch ms."""
        start = datetime(day.year, day.month, day.day, tzinfo=self.zone)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=self.zone)
        return int(start.timestamp() * 1000), int(end.timestamp() * 1000)

    def all_ips(self) -> list[str]:
        """Every IP of the plan, once: batch IPs first, then warm pool members."""
        ips = [ip for b in self.batches.values() for ip in b.ips]
        return ips + [m.ip for p in self.pools.values() for m in p.members() if m.ip not in ips]

    def provider_table(self) -> dict[str, ProviderSpec]:
        """Shipped providers, extended and overridden by the plan's."""
        return _provider_table(self.providers)

    def provider_names(self) -> set[str]:
        """Every provider name a plan may use, `default` included."""
        return {*self.provider_table(), DEFAULT_PROVIDER}

    def provider_hint(self, name: str, known: Iterable[str] | None = None) -> str:
        """`; did you mean 'google'?` for an unknown provider name such as `gmail`, or "".
        `known`: the names that may be suggested (default: every provider name of the plan)."""
        names = self.provider_names() if known is None else known
        return provider_hint(name, names, self.provider_table())


# ----- names -----


def provider_hint(
    name: str, known: Iterable[str], table: Mapping[str, ProviderSpec | ProviderDef] | None = None
) -> str:
    """`; did you mean 'google'?` for an unknown provider name, or "".

    A name that is one of a provider's domains, or a domain's first label, points to that
    provider (`gmail` and `gmail.com` -> `google`, `hotmail` -> `microsoft-consumer`, `aol` ->
    `yahoo`); otherwise the closest known name by spelling (`gogle` -> `google`). `table` maps
    provider names to their domains (default: the shipped table); only `known` names are
    suggested.
    """
    names = set(known)
    wanted = name.strip().lower().rstrip(".")
    for provider, spec in (DEFAULT_PROVIDERS if table is None else table).items():
        if provider in names and any(wanted in (d, d.split(".", 1)[0]) for d in spec.domains):
            return f"; did you mean {provider!r}?"
    return did_you_mean(name, names)


def _provider_table(plan_providers: Mapping[str, ProviderSpec]) -> dict[str, ProviderSpec]:
    """Shipped providers, extended and overridden by a plan's."""
    table = {
        name: ProviderSpec(domains=list(p.domains), mx_suffixes=list(p.mx_suffixes))
        for name, p in DEFAULT_PROVIDERS.items()
    }
    table.update(plan_providers)
    return table
