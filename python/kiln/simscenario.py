"""`kiln simulate`'s inputs: a scenario file (YAML) and the `--traffic` spec, checked.

A scenario holds what a simulated warm-up meets: the traffic offered per provider and hour,
delivery outcomes (bounce, complaint and deferral rates), push-back replies at chosen days and
hours, and signal timelines (Postmaster spam rate, SNDS colours, blocklist listings, source
outages). Mistakes are reported as plans report theirs (`kiln.planfile`): every problem at
once, each as `file:line:column: key.path: what was found, what is expected`, through the same
YAML reader (`kiln.yamlfile`) and pydantic wording (`kiln.modelerrors`). Format and meaning:
docs/simulate.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import Problem, ScheduleError
from kiln.modelerrors import located_problems, plain_message, type_word, unknown_key
from kiln.schedule import Plan
from kiln.yamlfile import Loc, SourceMap, load_yaml, short_repr

__all__ = [
    "PROFILES",
    "Scenario",
    "check_scenario",
    "load_scenario",
    "parse_traffic",
]

Day = Annotated[int, Field(ge=1, le=3660)]
Percent = Annotated[float, Field(ge=0, le=100)]

#: Shares of a day's traffic per local hour (0-23), by profile name.
PROFILES: dict[str, tuple[float, ...]] = {
    "flat": (1.0,) * 24,
    # Office hours: most mail from 08:00 to 18:00, a little in the evening, some at night.
    "business": ((0.2,) * 6 + (0.6, 1.0) + (2.0,) * 10 + (1.0, 0.8, 0.6, 0.4) + (0.3, 0.2)),
}


def _as_float(value: object) -> object:
    """`2` is as good as `2.0` for a percentage or a factor."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _Model(BaseModel):
    """Strict: unknown keys are errors, types are not coerced, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Span(_Model):
    """Simulated days `from_day` to `to_day` (1-based, both included; no end: to the last)."""

    from_day: Day = 1
    to_day: Day | None = None

    def covers(self, day: int) -> bool:
        """Whether simulated day `day` lies in the span."""
        return self.from_day <= day and (self.to_day is None or day <= self.to_day)


class Traffic(_Model):
    """Messages offered per day and provider to each traffic pool, spread by `profile`."""

    #: Pools the traffic is offered to (`pick`); left out: every pool that has a batch.
    pools: list[str] | None = None
    #: `flat`, `business`, or 24 weights for the local hours 0-23.
    profile: Literal["flat", "business"] | Annotated[list[float], Field(min_length=24)] = "flat"
    #: Provider -> messages per day offered to each pool; left out: enough to fill every cap.
    daily: dict[str, Annotated[int, Field(ge=0, le=10**12)]] | None = None
    #: Without `daily`: this many times the most the pool's warming IPs may ever take.
    fill: Annotated[float, Field(gt=0, le=1000)] = 1.25

    def weights(self) -> tuple[float, ...]:
        """The 24 hourly weights."""
        if isinstance(self.profile, str):
            return PROFILES[self.profile]
        return tuple(self.profile)


class Outcome(Span):
    """Delivery outcomes of granted mail; later entries win for the fields they give."""

    provider: str | None = None
    bounce_percent: Percent | None = None
    complaint_percent: Percent | None = None
    deferred_percent: Percent | None = None


class Reply(_Model):
    """A push-back reply the simulated MTA reports, as its log would (classified by the
    reply rules, exactly as a live report is)."""

    day: Day
    hour: Annotated[int, Field(ge=0, le=23)]
    minute: Annotated[int, Field(ge=0, le=59)] = 0
    provider: str
    #: Sending IPs that got it; left out: every IP of the batches.
    ips: list[str] | None = None
    code: Annotated[int, Field(ge=200, le=599)]
    enhanced: str | None = None
    text: Annotated[str, Field(min_length=1, max_length=1000)]
    #: `deferred` or `bounced`; left out: by the code (4xx deferred, 5xx bounced).
    result: Literal["deferred", "bounced"] | None = None
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1


class SpamRate(_Model):
    """From `from_day` on, Postmaster reports this user-reported spam rate."""

    from_day: Day = 1
    percent: Percent


class Colour(Span):
    """SNDS filter result of some IPs on the days of the span (other days: GREEN)."""

    ips: list[str] | None = None
    colour: Literal["GREEN", "YELLOW", "RED"]


class Listing(Span):
    """A blocklist lists some IPs on the days of the span."""

    ips: list[str] | None = None
    zone: str = "zen.spamhaus.org"


class PostmasterTimeline(_Model):
    """Google Postmaster Tools as the simulated daemon polls it."""

    #: Domains read; left out: the plan's, else `example.com`.
    domains: list[str] | None = None
    spam_rate: list[SpamRate] = []
    outages: list[Span] = []


class SndsTimeline(_Model):
    """Microsoft SNDS as the simulated daemon polls it."""

    colours: list[Colour] = []
    outages: list[Span] = []


class DnsblTimeline(_Model):
    """DNS blocklists as the simulated daemon polls them."""

    listings: list[Listing] = []
    outages: list[Span] = []


class Signals(_Model):
    """Signal timelines; a source given here is simulated even if the plan has none."""

    postmaster: PostmasterTimeline | None = None
    snds: SndsTimeline | None = None
    dnsbl: DnsblTimeline | None = None


class Scenario(_Model):
    """A whole scenario file (docs/simulate.md)."""

    description: str | None = None
    #: The plan, relative to the scenario file (`--config` overrides).
    plan: str | None = None
    #: How many days to simulate (`--days` overrides).
    days: Day | None = None
    #: The first simulated day; left out: the earliest batch start.
    start: date | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 1
    traffic: Traffic = Traffic()
    outcomes: list[Outcome] = []
    replies: list[Reply] = []
    signals: Signals = Signals()


# ----- loading -----


def load_scenario(path: Path) -> tuple[Scenario, Any, SourceMap]:
    """Read and check a scenario file's shape; ScheduleError with every problem found. The
    data and source map come back too, so `check_scenario` can locate plan-dependent
    problems."""
    data, source = load_yaml(path)
    if not isinstance(data, dict):
        message = f"a scenario is a YAML mapping of keys, got {type_word(data)}"
        raise ScheduleError([source.problem((), message)])
    unreadable = {p.path for p in source.problems}
    try:
        scenario = Scenario.model_validate(_floats(data))
    except ValidationError as e:
        found = [
            p
            for p in located_problems(e, data, source, _message, is_key=str.isidentifier)
            if p.path not in unreadable
        ]
        raise ScheduleError(sorted(source.problems + found, key=_order)) from None
    if source.problems:
        raise ScheduleError(source.problems)
    return scenario, data, source


def _floats(data: Any) -> Any:
    """A copy of `data` with whole numbers under percentage and factor keys as floats."""
    if isinstance(data, dict):
        return {
            k: _as_float(v)
            if _float_key(k)
            else _profile_floats(v)
            if k == "profile"
            else _floats(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_floats(v) for v in data]
    return data


def _float_key(key: object) -> bool:
    """Keys whose values are numbers that may be written as whole numbers."""
    return isinstance(key, str) and (key.endswith("_percent") or key in ("percent", "fill"))


def _profile_floats(value: object) -> object:
    """A profile list with whole numbers as floats."""
    return [_as_float(v) for v in value] if isinstance(value, list) else value


def _order(p: Problem) -> tuple[int, int, str]:
    """File order."""
    return (p.line, p.column, p.path)


def _message(err: Any, loc: Loc) -> str:
    """One sentence: what was found, what is expected."""
    if err["type"] == "extra_forbidden":
        return unknown_key(str(loc[-1]) if loc else "?", _fields_at(loc[:-1]))
    return plain_message(err)


def _fields_at(loc: Loc) -> list[str]:
    """Keys allowed at `loc`, for "did you mean" suggestions."""
    model: Any = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        model = _model_of(fields[part].annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    """The model class inside `list[M]`, `M | None` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# ----- checks against the plan -----


def check_scenario(scenario: Scenario, data: Any, source: SourceMap, plan: Plan, days: int) -> None:
    """Names and days that must fit the plan and the run; ScheduleError listing each."""
    problems = sorted(_plan_problems(scenario, data, source, plan, days), key=_order)
    if problems:
        raise ScheduleError(problems)


def _plan_problems(
    s: Scenario, data: Any, source: SourceMap, plan: Plan, days: int
) -> Iterator[Problem]:
    """Every name and day of `s` that does not fit `plan` or a run of `days` days."""
    del data
    providers = plan.provider_names()
    ips = set(plan.all_ips())
    batch_ips = {ip for b in plan.batches.values() for ip in b.ips}

    def provider(loc: Loc, name: str) -> Iterator[Problem]:
        if name not in providers:
            hint = plan.provider_hint(name)
            yield source.problem(loc, f"unknown provider {name!r} for plan {plan.name!r}{hint}")

    def ip_list(loc: Loc, given: list[str] | None, allowed: set[str]) -> Iterator[Problem]:
        for i, ip in enumerate(given or []):
            if ip not in allowed:
                what = "an IP of a batch" if allowed is batch_ips else "a sending IP"
                yield source.problem(
                    (*loc, i), f"{short_repr(ip)} is not {what} of plan {plan.name!r}"
                )

    def day(loc: Loc, value: int | None) -> Iterator[Problem]:
        if value is not None and value > days:
            yield source.problem(loc, f"day {value} is after the last simulated day ({days})")

    for i, name in enumerate(s.traffic.pools or []):
        if name not in plan.pools:
            yield source.problem(
                ("traffic", "pools", i),
                f"unknown pool {name!r}; the plan's pools: {', '.join(plan.pools)}",
            )
    for name in s.traffic.daily or {}:
        yield from provider(("traffic", "daily", name), name)
    for i, o in enumerate(s.outcomes):
        if o.provider is not None:
            yield from provider(("outcomes", i, "provider"), o.provider)
        yield from _span(("outcomes", i), o, source, days)
    for i, r in enumerate(s.replies):
        yield from provider(("replies", i, "provider"), r.provider)
        yield from ip_list(("replies", i, "ips"), r.ips, ips)
        yield from day(("replies", i, "day"), r.day)
    pm, snds, dnsbl = s.signals.postmaster, s.signals.snds, s.signals.dnsbl
    if pm is not None:
        for i, rate in enumerate(pm.spam_rate):
            yield from day(("signals", "postmaster", "spam_rate", i, "from_day"), rate.from_day)
        for i, gap in enumerate(pm.outages):
            yield from _span(("signals", "postmaster", "outages", i), gap, source, days)
    if snds is not None:
        for i, c in enumerate(snds.colours):
            yield from _span(("signals", "snds", "colours", i), c, source, days)
            yield from ip_list(("signals", "snds", "colours", i, "ips"), c.ips, ips)
        for i, gap in enumerate(snds.outages):
            yield from _span(("signals", "snds", "outages", i), gap, source, days)
    if dnsbl is not None:
        zones = set(plan.signals.dnsbl.zones) if plan.signals.dnsbl is not None else None
        for i, listing in enumerate(dnsbl.listings):
            yield from _span(("signals", "dnsbl", "listings", i), listing, source, days)
            yield from ip_list(("signals", "dnsbl", "listings", i, "ips"), listing.ips, ips)
            if zones is not None and listing.zone not in zones:
                yield source.problem(
                    ("signals", "dnsbl", "listings", i, "zone"),
                    f"the plan polls {', '.join(sorted(zones))}, not {listing.zone!r}",
                )
        for i, gap in enumerate(dnsbl.outages):
            yield from _span(("signals", "dnsbl", "outages", i), gap, source, days)


def _span(loc: Loc, span: Span, source: SourceMap, days: int) -> Iterator[Problem]:
    """A span that ends before it starts, or starts after the run."""
    if span.to_day is not None and span.to_day < span.from_day:
        yield source.problem(
            (*loc, "to_day"),
            f"to_day ({span.to_day}) is before from_day ({span.from_day})",
        )
    if span.from_day > days:
        yield source.problem(
            (*loc, "from_day"),
            f"day {span.from_day} is after the last simulated day ({days})",
        )


# ----- --traffic -----


def parse_traffic(text: str, plan: Plan) -> Traffic:
    """`--traffic`: a YAML file holding a scenario's `traffic` section, or an inline spec
    `PROVIDER=N,...[;profile=NAME][;pools=A+B]` (messages per day per provider; `fill` or
    `fill=FACTOR` for enough to fill every cap). ScheduleError (file) or ValueError (spec)."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data, source = load_yaml(path)
        if not isinstance(data, dict):
            message = f"a traffic file is a YAML mapping of keys, got {type_word(data)}"
            raise ScheduleError([source.problem((), message)])
        try:
            traffic = Traffic.model_validate(_traffic_floats(data))
        except ValidationError as e:
            found = located_problems(e, data, source, _traffic_message, is_key=str.isidentifier)
            raise ScheduleError(sorted(found, key=_order)) from None
        wrapped = {"traffic": data}
        shifted = SourceMap(source.file, {("traffic", *k): v for k, v in source.marks.items()})
        check_scenario(Scenario(traffic=traffic), wrapped, shifted, plan, 3660)
        return traffic
    return _inline_traffic(text, plan)


def _traffic_floats(data: dict[str, Any]) -> dict[str, Any]:
    """`fill` and profile weights written as whole numbers, as floats."""
    out = dict(data)
    if "fill" in out:
        out["fill"] = _as_float(out["fill"])
    if "profile" in out:
        out["profile"] = _profile_floats(out["profile"])
    return out


def _traffic_message(err: Any, loc: Loc) -> str:
    """Messages for a traffic file (its keys are those of `Traffic`)."""
    if err["type"] == "extra_forbidden":
        return unknown_key(str(loc[-1]) if loc else "?", list(Traffic.model_fields))
    return plain_message(err)


def _inline_traffic(text: str, plan: Plan) -> Traffic:
    """The inline `--traffic` spec (see `parse_traffic`)."""
    fields: dict[str, Any] = {}
    daily: dict[str, int] = {}
    known = plan.provider_names()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part == "fill" or part.startswith("fill="):
            fields["fill"] = float(part.partition("=")[2] or 1.25)
            continue
        if part.startswith("profile="):
            fields["profile"] = part.partition("=")[2]
            continue
        if part.startswith("pools="):
            fields["pools"] = part.partition("=")[2].split("+")
            continue
        for item in part.split(","):
            name, eq, count = item.strip().partition("=")
            if not eq or not count.strip().replace("_", "").isdigit():
                raise ValueError(
                    f"--traffic: expected PROVIDER=MESSAGES_PER_DAY such as google=50_000, "
                    f"got {item.strip()!r}"
                )
            if name not in known:
                raise ValueError(f"--traffic: unknown provider {name!r}{plan.provider_hint(name)}")
            daily[name] = int(count.strip().replace("_", ""))
    if daily:
        fields["daily"] = daily
    try:
        traffic = Traffic.model_validate(fields)
    except ValidationError as e:
        raise ValueError(f"--traffic: {plain_message(e.errors()[0])}") from None
    for name in traffic.pools or []:
        if name not in plan.pools:
            raise ValueError(f"--traffic: unknown pool {name!r}")
    return traffic
