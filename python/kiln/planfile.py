"""Reading a plan file: YAML -> a checked `kiln.schedule.Plan`, with every mistake located.

`load_plan(path)` reads a plan file and returns a `Plan`, or raises `ScheduleError` listing
every problem at once, each as `file:line:column: key.path: what was found, what is expected`.
Problems come from three places: the YAML reader (`kiln.yamlfile`: syntax, duplicate keys,
size and depth bounds), the models' own validation (`kiln.schedule`, messages written here in
plain words), and the semantic checks below, which see the whole plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from kiln.errors import Problem, ScheduleError
from kiln.modelerrors import (
    did_you_mean,
    located_problems,
    plain_message,
    type_word,
    unknown_key,
)
from kiln.policyspec import Signals
from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS
from kiln.schedule import (
    MAX_CAP,
    Batch,
    Plan,
    Pool,
    ProviderOverride,
    ProviderSpec,
    Schedule,
    Step,
    _ip,
    _provider_table,
    provider_hint,
)
from kiln.yamlfile import Loc, SourceMap, load_yaml, short_repr

__all__ = ["load_plan", "parse_plan"]

# ----- loading -----


def load_plan(path: Path | str) -> Plan:
    """Read and check a plan file. Raises `ScheduleError` with every problem found.

    Reading is bounded (`kiln.yamlfile`: regular files only, size, nesting depth, node budget)
    and keeps no shared state, so a reload may run it in a worker thread; nothing it raises is
    anything but a `ScheduleError`.
    """
    data, source = load_yaml(Path(path))
    try:
        return parse_plan(data, source)
    except (RecursionError, MemoryError, ValidationError) as e:
        # The YAML limits should make these impossible; a plan mistake is never a traceback.
        message = f"cannot check the plan ({type(e).__name__}); please report this file"
        raise ScheduleError([source.problem((), message)]) from None


def parse_plan(data: Any, source: SourceMap) -> Plan:
    """Check already-loaded plan data; `source` locates problems."""
    if not isinstance(data, dict):
        raise ScheduleError(
            [source.problem((), f"a plan is a YAML mapping of keys, got {type_word(data)}")]
        )
    unreadable = {p.path for p in source.problems}
    plan: Plan | None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        plan = None
        found = [p for p in _model_problems(e, data, source) if p.path not in unreadable]
    else:
        found = []
    # Semantic checks run on every part that validated, so one bad value hides nothing else;
    # they stay quiet where a mistake of its own was already reported.
    reported = unreadable | {p.path for p in found}
    semantic = [
        p for p in _semantic_problems(_parts(data, plan), source) if not _within(p.path, reported)
    ]
    problems = sorted(source.problems + found + semantic, key=_order)
    if plan is None or any(p.severity == "error" for p in problems):
        raise ScheduleError(problems)
    plan._warnings = problems
    plan._source = source.file
    return plan


def _within(path: str, paths: set[str]) -> bool:
    """Is `path` one of `paths` or inside one of them?"""
    return path in paths or any(path.startswith((p + ".", p + "[")) for p in paths if p)


def _order(p: Problem) -> tuple[int, int, str]:
    """File order."""
    return (p.line, p.column, p.path)


def _fields_at(loc: Loc) -> list[str]:
    """The keys allowed at `loc` in the plan, for "did you mean" suggestions."""
    model: Any = Plan
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            # A dict of named things: the next part is a name, the model is the value type.
            if model is Plan:
                return []
            continue
        annotation = fields[part].annotation
        model = _model_of(annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    """The model class inside `dict[str, M]`, `list[M]`, `M | None` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _model_problems(e: ValidationError, data: Any, source: SourceMap) -> Iterator[Problem]:
    """Pydantic's errors in kiln's words, each located, one per place."""
    return located_problems(e, data, source, _message, is_key=str.isidentifier)


def _message(err: Any, loc: Loc) -> str:
    """One sentence: what was found, what is expected (plan-specific words first)."""
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return unknown_key(str(loc[-1]) if loc else "?", _fields_at(loc[:-1]))
    if kind == "greater_than_equal" and loc and loc[-1] == "warmup_day":
        return f"must be at least 1 (warm-up day 1 is the start date), got {short_repr(got)}"
    if kind == "string_pattern_mismatch":
        return (
            f"names use lower-case letters, digits and - _ . (starting with a letter or digit), "
            f"got {short_repr(got)}"
        )
    return plain_message(err)


# ----- semantic checks -----
#
# They run on every part of the file that validated on its own, so that one bad value (an IP,
# a cap) hides nothing else: a bad time zone, an unknown pool or provider, overlapping IPs, a
# gap in `warmup_day` are all reported in the same run. Names given in the file count as
# known even when what they name has mistakes of its own (those are reported where they are).


@dataclass(frozen=True, slots=True)
class _StepPart:
    """What the table checks read of one step; `day_ok` is False if `warmup_day` was
    unreadable (its mistake is reported on its own)."""

    warmup_day: int | None
    day_ok: bool
    daily_cap: int | None
    hourly_cap: int | None


@dataclass(frozen=True, slots=True)
class _PoolPart:
    """A pool's warm IPs by position (None: an unreadable item; no tuple: an unreadable list)
    and its overflow pool."""

    ips: tuple[str | None, ...] | None
    overflow: str | None


@dataclass(frozen=True, slots=True)
class _BatchPart:
    """A batch's pool, IPs by position (None: unreadable) and schedule."""

    pool: str | None
    ips: tuple[str | None, ...]
    schedule: str | None


@dataclass(frozen=True, slots=True)
class _SchedulePart:
    """A schedule's table and its providers' own tables (None: none, or unreadable)."""

    steps: tuple[_StepPart, ...] | None
    providers: dict[str, tuple[_StepPart, ...] | None] | None


@dataclass(frozen=True, slots=True)
class _Parts:
    """The parts of a plan file that validated. A section that is None could not be read at
    all: checks that need its names are skipped. An entry that is None is named but unreadable.
    """

    timezone: str | None
    pools: dict[str, _PoolPart | None] | None
    batches: dict[str, _BatchPart | None] | None
    schedules: dict[str, _SchedulePart | None] | None
    #: Every provider name the plan may use (None: the plan's `providers` is unreadable).
    providers: frozenset[str] | None
    #: Provider -> its domains, for "did you mean" (shipped, then the plan's readable ones).
    table: dict[str, ProviderSpec]
    signals: Signals | None

    def batch_fields(self, field: Literal["pool", "schedule"]) -> set[str] | None:
        """The pools (or schedules) the batches name; None unless every one can be read."""
        if self.batches is None:
            return None
        out: set[str] = set()
        for b in self.batches.values():
            value = None if b is None else getattr(b, field)
            if value is None:
                return None
            out.add(value)
        return out

    def ips(self) -> set[str] | None:
        """Every IP of the pools and batches; None unless every one can be read."""
        if self.pools is None or self.batches is None:
            return None
        lists = [p.ips if p else None for p in self.pools.values()]
        lists += [b.ips if b else None for b in self.batches.values()]
        out: set[str] = set()
        for ips in lists:
            if ips is None or None in ips:
                return None
            out.update(ip for ip in ips if ip is not None)
        return out


def _parts(data: dict[str, Any], plan: Plan | None) -> _Parts:
    """The parts of `data` that validate (all of them when `plan` is the validated whole)."""
    if plan is not None:
        return _Parts(
            timezone=plan.timezone,
            pools={n: _pool_part(p) for n, p in plan.pools.items()},
            batches={n: _batch_part(b) for n, b in plan.batches.items()},
            schedules={n: _schedule_part(s) for n, s in plan.schedules.items()},
            providers=frozenset(plan.provider_names()),
            table=plan.provider_table(),
            signals=plan.signals,
        )
    timezone = data.get("timezone")
    providers = _section(data, "providers", optional=True)
    specs: dict[str, ProviderSpec] = {}
    for name, raw in (providers or {}).items():
        try:
            specs[name] = ProviderSpec.model_validate(raw)
        except ValidationError:
            pass
    return _Parts(
        timezone=timezone if isinstance(timezone, str) else None,
        pools=_entries(data, "pools", False, Pool, _pool_part, _salvage_pool),
        batches=_entries(data, "batches", True, Batch, _batch_part, _salvage_batch),
        schedules=_entries(data, "schedules", True, Schedule, _schedule_part, _salvage_schedule),
        providers=None
        if providers is None
        else frozenset({*DEFAULT_PROVIDERS, DEFAULT_PROVIDER, *providers}),
        table=_provider_table(specs),
        signals=_salvage_signals(data.get("signals", {})),
    )


def _section(data: dict[str, Any], key: str, optional: bool) -> dict[str, Any] | None:
    """A top-level mapping of named entries, or None if it is missing (and required) or not a
    mapping."""
    value = data.get(key, {} if optional else None)
    return value if isinstance(value, dict) else None


_M = TypeVar("_M", bound=BaseModel)
_P = TypeVar("_P")


def _entries(
    data: dict[str, Any],
    key: str,
    optional: bool,
    model: type[_M],
    part: Callable[[_M], _P],
    salvage: Callable[[dict[str, Any]], _P],
) -> dict[str, _P | None] | None:
    """Each entry of a section as its part: validated whole, or what can be read of it."""
    section = _section(data, key, optional)
    if section is None:
        return None
    out: dict[str, _P | None] = {}
    for name, raw in section.items():
        try:
            out[name] = part(model.model_validate(raw))
        except ValidationError:
            out[name] = salvage(raw) if isinstance(raw, dict) else None
    return out


def _readable_ip(value: object) -> str | None:
    """An IP in its normal form, or None if it is not one."""
    try:
        return _ip(value)
    except (PydanticCustomError, ValueError):
        return None


def _text(value: object) -> str | None:
    """`value` if it is text."""
    return value if isinstance(value, str) else None


def _pool_part(pool: Pool) -> _PoolPart:
    """A valid pool's part."""
    return _PoolPart(tuple(m.ip for m in pool.members()), pool.overflow)


def _salvage_pool(raw: dict[str, Any]) -> _PoolPart:
    """What can be read of an invalid pool."""

    def member(item: object) -> str | None:
        """One warm IP (text or `{ip, weight}`), or None."""
        try:
            return Pool.model_validate({"ips": [item]}).members()[0].ip
        except ValidationError:
            return None

    ips = raw.get("ips", [])
    return _PoolPart(
        tuple(member(x) for x in ips) if isinstance(ips, list) else None,
        _text(raw.get("overflow")),
    )


def _batch_part(batch: Batch) -> _BatchPart:
    """A valid batch's part."""
    return _BatchPart(batch.pool, tuple(batch.ips), batch.schedule)


def _salvage_batch(raw: dict[str, Any]) -> _BatchPart:
    """What can be read of an invalid batch."""
    ips = raw.get("ips", [])
    return _BatchPart(
        _text(raw.get("pool")),
        tuple(_readable_ip(x) for x in ips) if isinstance(ips, list) else (),
        _text(raw.get("schedule")),
    )


def _steps_part(steps: list[Step] | None) -> tuple[_StepPart, ...] | None:
    """A valid table's parts."""
    if steps is None:
        return None
    return tuple(_StepPart(s.warmup_day, True, s.daily_cap, s.hourly_cap) for s in steps)


def _schedule_part(schedule: Schedule) -> _SchedulePart:
    """A valid schedule's part."""
    return _SchedulePart(
        _steps_part(schedule.steps),
        {p: _steps_part(o.steps) for p, o in schedule.providers.items()},
    )


def _salvage_steps(value: object) -> tuple[_StepPart, ...] | None:
    """What can be read of a table with mistakes."""
    if not isinstance(value, list):
        return None
    out: list[_StepPart] = []
    for raw in value:
        try:
            s = Step.model_validate(raw)
        except ValidationError:
            out.append(_salvage_step(raw))
        else:
            out.append(_StepPart(s.warmup_day, True, s.daily_cap, s.hourly_cap))
    return tuple(out)


def _salvage_step(raw: object) -> _StepPart:
    """What can be read of an invalid step."""
    if not isinstance(raw, dict):
        return _StepPart(None, False, None, None)

    def whole(value: object, low: int, high: int) -> int | None:
        """`value` if it is a whole number in [low, high]."""
        return value if type(value) is int and low <= value <= high else None

    day = raw.get("warmup_day")
    return _StepPart(
        whole(day, 1, 2**63),
        day is None or whole(day, 1, 2**63) is not None,
        whole(raw.get("daily_cap"), 1, MAX_CAP),
        whole(raw.get("hourly_cap"), 1, MAX_CAP),
    )


def _salvage_schedule(raw: dict[str, Any]) -> _SchedulePart:
    """What can be read of an invalid schedule."""

    def override(value: object) -> tuple[_StepPart, ...] | None:
        """A provider override's own table, if it has one."""
        try:
            return _steps_part(ProviderOverride.model_validate(value).steps)
        except ValidationError:
            return _salvage_steps(value.get("steps")) if isinstance(value, dict) else None

    providers = raw.get("providers", {})
    return _SchedulePart(
        _salvage_steps(raw.get("steps")),
        {p: override(o) for p, o in providers.items()} if isinstance(providers, dict) else None,
    )


def _salvage_signals(raw: object) -> Signals | None:
    """The sources of `signals` that validate on their own."""
    if not isinstance(raw, dict):
        return None
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        if key in Signals.model_fields:
            try:
                kept[key] = getattr(Signals.model_validate({key: value}), key)
            except ValidationError:
                pass
    return Signals.model_construct(**kept)


def _semantic_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """Mistakes that span keys: unknown names, overlaps, curves that fall, bad time zones."""
    yield from _timezone_problems(parts, source)
    yield from _pool_problems(parts, source)
    yield from _batch_problems(parts, source)
    yield from _schedule_problems(parts, source)
    yield from _signal_problems(parts, source)


def _timezone_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """The time zone must exist in the tz database."""
    if parts.timezone is None:
        return
    try:
        ZoneInfo(parts.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        hint = did_you_mean(parts.timezone, available_timezones())
        yield source.problem(
            ("timezone",),
            f"unknown time zone {parts.timezone!r}{hint} (use an IANA name such as Europe/Berlin)",
        )


def _pool_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """Overflow pools exist and do not loop; pools do not share IPs; none is empty."""
    pools = parts.pools
    if pools is None:
        return
    owner: dict[str, str] = {}
    batch_pools = parts.batch_fields("pool")
    for name, pool in pools.items():
        if pool is None:
            continue
        if pool.overflow is not None:
            if pool.overflow not in pools:
                yield source.problem(
                    ("pools", name, "overflow"),
                    f"unknown pool {pool.overflow!r}{did_you_mean(pool.overflow, pools)}",
                )
            elif _overflow_loops(pools, name):
                yield source.problem(
                    ("pools", name, "overflow"),
                    f"overflow from {name!r} leads back to {name!r}",
                )
        if pool.ips == () and batch_pools is not None and name not in batch_pools:
            yield source.problem(("pools", name), "a pool needs warm IPs or a batch of new IPs")
        for i, ip in enumerate(pool.ips or ()):
            if ip is None:
                continue
            if ip in owner:
                other = owner[ip]
                what = "twice in this pool" if other == name else f"also in pool {other!r}"
                yield source.problem(
                    ("pools", name, "ips", i), f"IP {ip} is {what}; pools must not overlap"
                )
            else:
                owner[ip] = name
    batches = parts.batches or {}
    for bname, batch in batches.items():
        for i, ip in enumerate(batch.ips if batch else ()):
            if ip is None or batch is None:
                continue
            if ip not in owner:
                owner[ip] = f"batch:{bname}"
                continue
            other = owner[ip]
            loc: Loc = ("batches", bname, "ips", i)
            if not other.startswith("batch:"):
                yield source.problem(
                    loc, f"IP {ip} is also a warm IP of pool {other!r}; a new IP is in one batch"
                )
                continue
            other_batch = other.removeprefix("batch:")
            other_part = batches[other_batch]
            other_pool = other_part.pool if other_part else None
            if other_batch == bname:
                what = "listed twice in this batch"
            elif other_pool is not None and other_pool == batch.pool:
                what = f"also in batch {other_batch!r} of the same pool"
            elif other_pool is not None:
                what = f"also in batch {other_batch!r} of pool {other_pool!r}"
            else:
                what = f"also in batch {other_batch!r}"
            yield source.problem(loc, f"IP {ip} is {what}")


def _overflow_loops(pools: Mapping[str, _PoolPart | None], start: str) -> bool:
    """Does following `overflow` from `start` come back to it?"""
    seen: set[str] = set()
    first = pools[start]
    at = first.overflow if first else None
    while at is not None and at in pools and at not in seen:
        if at == start:
            return True
        seen.add(at)
        part = pools[at]
        at = part.overflow if part else None
    return False


def _batch_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """Batches name existing pools and schedules."""
    for name, batch in (parts.batches or {}).items():
        if batch is None:
            continue
        if batch.pool is not None and parts.pools is not None and batch.pool not in parts.pools:
            yield source.problem(
                ("batches", name, "pool"),
                f"unknown pool {batch.pool!r}{did_you_mean(batch.pool, parts.pools)}",
            )
        schedules = parts.schedules
        if batch.schedule is not None and schedules is not None and batch.schedule not in schedules:
            yield source.problem(
                ("batches", name, "schedule"),
                f"unknown schedule {batch.schedule!r}{did_you_mean(batch.schedule, schedules)}",
            )


def _schedule_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """Provider overrides name known providers; tables number their days; caps rise."""
    providers = parts.providers
    used = parts.batch_fields("schedule")
    for name, schedule in (parts.schedules or {}).items():
        base: Loc = ("schedules", name)
        if used is not None and name not in used:
            yield source.problem(base, "schedule is not used by any batch", "warning")
        if schedule is None:
            continue
        for provider, steps in (schedule.providers or {}).items():
            if providers is not None and provider not in providers:
                hint = provider_hint(provider, providers, parts.table)
                yield source.problem(
                    (*base, "providers", provider), f"unknown provider {provider!r}{hint}"
                )
            if steps is not None:
                yield from _table_problems(steps, (*base, "providers", provider), source)
        if schedule.steps is not None:
            yield from _table_problems(schedule.steps, base, source)


def _table_problems(steps: Sequence[_StepPart], base: Loc, source: SourceMap) -> Iterator[Problem]:
    """`warmup_day` is the step's number (day 1 is the start date); caps that fall are worth a
    warning. Only the first wrong `warmup_day` is reported: a lost row shifts every later one."""
    if any(s.warmup_day is not None for s in steps):
        for i, s in enumerate(steps, start=1):
            if s.day_ok and s.warmup_day is None:
                yield source.problem(
                    (*base, "steps", i - 1),
                    f"warmup_day is missing: expected {i} (step {i} of the table), "
                    "as other steps give theirs",
                )
                break
            if s.day_ok and s.warmup_day != i:
                yield source.problem(
                    (*base, "steps", i - 1, "warmup_day"),
                    f"expected warmup_day {i} (step {i} of the table; warm-up day 1 is the "
                    f"start date), got {s.warmup_day}",
                )
                break
    for key in ("daily_cap", "hourly_cap"):
        prev: int | None = None
        for i, step in enumerate(steps):
            cap = getattr(step, key)
            if cap is not None and prev is not None and cap < prev:
                yield source.problem(
                    (*base, "steps", i, key),
                    f"falls below the step before ({prev}), got {cap}",
                    "warning",
                )
            prev = cap if cap is not None else prev


def _signal_problems(parts: _Parts, source: SourceMap) -> Iterator[Problem]:
    """Signal sources name known providers and batches, and IPs the plan has."""
    s = parts.signals
    if s is None:
        return
    providers = parts.providers
    for name, spec in (("postmaster", s.postmaster), ("snds", s.snds)):
        if spec is None or providers is None:
            continue
        for i, provider in enumerate(spec.providers):
            if provider not in providers:
                hint = provider_hint(provider, providers, parts.table)
                yield source.problem(
                    ("signals", name, "providers", i), f"unknown provider {provider!r}{hint}"
                )
    batches = parts.batches
    if s.postmaster is not None and s.postmaster.batches is not None and batches is not None:
        for i, batch in enumerate(s.postmaster.batches):
            if batch not in batches:
                yield source.problem(
                    ("signals", "postmaster", "batches", i),
                    f"unknown batch {batch!r}{did_you_mean(batch, batches)}",
                )
    feedback = s.feedback
    if feedback is None:
        return
    ips = parts.ips()
    maps: list[tuple[Loc, dict[str, str]]] = []
    if feedback.postfix is not None:
        maps.append(
            (("signals", "feedback", "postfix", "syslog_names"), feedback.postfix.syslog_names)
        )
    if feedback.kumomta is not None:
        maps.append(
            (("signals", "feedback", "kumomta", "egress_sources"), feedback.kumomta.egress_sources)
        )
    for loc, table in maps:
        for name, ip in table.items():
            try:
                text = str(ipaddress.ip_address(ip.strip()))
            except ValueError:
                yield source.problem((*loc, name), f"expected an IPv4 or IPv6 address, got {ip!r}")
                continue
            if ips is not None and text not in ips:
                yield source.problem(
                    (*loc, name), f"IP {ip} is in no pool or batch of the plan", "warning"
                )
