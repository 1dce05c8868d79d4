"""Reply rules: SMTP reply text -> push-back class and scope. Rust decides, Python acts.

A rule file (YAML; docs/rules.md) lists rules; `load_rules` reads the shipped defaults
(`kiln/data/rules.yaml`), then each operator file in order: a rule whose `id` already exists
replaces it, `disable: [ids]` removes earlier ones. Every mistake is a located `Problem`
(file, line, key): unknown keys, a bad regex, an unknown provider (pitfall 1 in
docs/rules.md), a repeated id, an `example` that does not classify to its rule's class.

`RuleSet.compiled` compiles the rules in Rust once (on any thread, with the GIL released);
`RuleSet.compile_into(engine)` puts them in force by a pointer swap, and the engine then
answers `classify` itself (one `RegexSet` scan per reply). `RuleFiles` remembers the last
rules read, so a reload whose rule files did not change reads and compiles nothing.
Thresholds and actions are only validated here; the policy applies them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TextIO, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from kiln._core import CompiledRules, Engine, check_pattern
from kiln.duration import DurationError, format_ms, parse_ms
from kiln.errors import Problem, ScheduleError
from kiln.modelerrors import did_you_mean, located_problems, plain_message, unknown_key
from kiln.policyspec import PushbackClass, RealtimeAction
from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS
from kiln.schedule import provider_hint
from kiln.yamlfile import Loc, SourceMap, load_yaml

if TYPE_CHECKING:
    from kiln._core import RuleTuple
    from kiln.schedule import Plan

__all__ = [
    "DEFAULT_RULES",
    "PROVIDER_GROUPS",
    "Classification",
    "Rule",
    "RuleFile",
    "RuleFiles",
    "RuleSet",
    "Scope",
    "Threshold",
    "add_classify_arguments",
    "classify_main",
    "known_providers",
    "load_rules",
    "parse_threshold",
]

#: The rules kiln ships; operator files are read after it.
DEFAULT_RULES = Path(__file__).parent / "data" / "rules.yaml"

#: Provider groups a rule may name: `microsoft` covers both Microsoft keys (docs/providers.md).
PROVIDER_GROUPS: dict[str, tuple[str, ...]] = {
    "microsoft": ("microsoft-consumer", "microsoft-365"),
}

Scope = Literal["ip", "netblock", "domain", "url", "recipient", "message"]
"""What a reply implicates (docs/rules.md)."""

_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_THRESHOLD = re.compile(r"\s*([0-9][0-9_]*)\s*/\s*(\S+)\s*")


class _Model(BaseModel):
    """Strict: unknown keys are errors, types are not coerced, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class Threshold(_Model):
    """`N/period`: the rule acts once N matches fall within `period_ms` (sliding, per rule x
    IP x provider). The default, 1 match and no period, acts on every match."""

    count: int = Field(default=1, ge=1)
    period_ms: int | None = Field(default=None, gt=0)

    def __str__(self) -> str:
        return f"{self.count}/{format_ms(self.period_ms)}" if self.period_ms else str(self.count)


def parse_threshold(value: object) -> Threshold:
    """`"3/1h"` -> Threshold(3, 3_600_000); `"3/h"` is the same; a bare `1` is every match."""
    if isinstance(value, Threshold):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return Threshold()
    m = _THRESHOLD.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"expected a threshold such as 3/1h (matches per period), got {value!r}")
    count = int(m.group(1).replace("_", ""))
    period = m.group(2)
    if period[0].isalpha():
        period = "1" + period
    try:
        period_ms = parse_ms(period)
    except DurationError as e:
        raise ValueError(f"threshold period: {e}") from None
    if count < 1:
        raise ValueError(f"a threshold counts at least 1 match, got {value!r}")
    return Threshold(count=count, period_ms=period_ms)


def _action(value: object) -> object:
    """`none` stays a word; a mapping is a `RealtimeAction`."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return "none"
    return value


Code = Annotated[int, Field(ge=200, le=599)] | Literal["2xx", "4xx", "5xx"]
Enhanced = Annotated[str, Field(pattern=r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$")]


class Rule(_Model):
    """One reply rule (docs/rules.md)."""

    id: Annotated[str, Field(pattern=_ID.pattern)]
    #: Provider names or groups; None: every provider.
    providers: Annotated[list[str], Field(min_length=1)] | None = None
    code: Code | Annotated[list[Code], Field(min_length=1)] | None = None
    enhanced: Enhanced | Annotated[list[Enhanced], Field(min_length=1)] | None = None
    #: A regex (Rust `regex` syntax), matched case-insensitively against `CODE ENH text`.
    text: Annotated[str, Field(min_length=1, max_length=4096)]
    class_: PushbackClass = Field(alias="class")
    scope: Scope
    threshold: Annotated[Threshold, BeforeValidator(parse_threshold)] = Threshold()
    #: None: the policy's action for the class; "none": no action at all.
    action: Annotated[RealtimeAction | Literal["none"] | None, BeforeValidator(_action)] = None
    description: str | None = None
    #: A last resort (generic "try again later"): wins only when no other rule matched.
    fallback: bool = False
    #: A raw reply (`421-4.7.28 ...`) the rule set must classify to this rule's class.
    example: str | None = None

    @property
    def codes(self) -> tuple[int | str, ...] | None:
        """The basic-code filter as a tuple, or None."""
        if self.code is None:
            return None
        return tuple(self.code) if isinstance(self.code, list) else (self.code,)

    @property
    def enhanced_codes(self) -> tuple[str, ...] | None:
        """The enhanced-code filter as a tuple, or None."""
        if self.enhanced is None:
            return None
        return tuple(self.enhanced) if isinstance(self.enhanced, list) else (self.enhanced,)

    @property
    def provider_keys(self) -> tuple[str, ...] | None:
        """Providers with groups expanded (`microsoft` -> both Microsoft keys), or None."""
        if self.providers is None:
            return None
        out: list[str] = []
        for p in self.providers:
            for key in PROVIDER_GROUPS.get(p, (p,)):
                if key not in out:
                    out.append(key)
        return tuple(out)

    def as_tuple(self) -> RuleTuple:
        """The plain form `Engine.set_rules` takes."""
        return (
            self.id,
            self.provider_keys,
            self.codes,
            self.enhanced_codes,
            self.text,
            self.class_,
            self.scope,
            self.fallback,
        )


class RuleFile(_Model):
    """A rule file: rules to add or replace, and ids of earlier rules to drop."""

    rules: list[Rule] = []
    disable: list[str] = []


@dataclass(frozen=True)
class Classification:
    """What the rules say about one reply."""

    #: A class, "internal" (the MTA's own reply) or "unclassified".
    cls: str
    scope: str | None
    rule: str | None
    matched: tuple[str, ...]
    normalised: str
    provider: str | None

    def as_json(self) -> dict[str, Any]:
        """The JSON form, as the native protocol's `classify` op answers."""
        return {
            "class": self.cls,
            "scope": self.scope,
            "rule": self.rule,
            "matched": list(self.matched),
            "normalised": self.normalised,
            "provider": self.provider,
        }


@dataclass(frozen=True)
class RuleSet:
    """Rules in force, in order (shipped first, then each operator file's additions)."""

    rules: tuple[Rule, ...]
    by_id: Mapping[str, Rule]
    #: Where each rule was defined: the file's source map and the rule's path in it.
    origins: Mapping[str, tuple[SourceMap, Loc]] = field(default_factory=dict, repr=False)

    def tuples(self) -> list[RuleTuple]:
        """Every rule as `Engine.set_rules` takes it."""
        return [r.as_tuple() for r in self.rules]

    @cached_property
    def compiled(self) -> CompiledRules:
        """The rules compiled in Rust, once (any thread; the GIL is released meanwhile)."""
        return CompiledRules(self.tuples())

    def compile_into(self, engine: Engine) -> None:
        """Replace the engine's reply rules with these (a pointer swap once `compiled`)."""
        engine.use_rules(self.compiled)

    def engine(self) -> Engine:
        """A fresh engine holding only these rules (for checks and the CLI)."""
        e = Engine()
        self.compile_into(e)
        return e


def known_providers(plan: Plan | None = None) -> frozenset[str]:
    """Names a rule may use: shipped providers, `default`, groups, and the plan's providers."""
    names = {*DEFAULT_PROVIDERS, DEFAULT_PROVIDER, *PROVIDER_GROUPS}
    if plan is not None:
        names |= plan.provider_names()
    return frozenset(names)


def load_rules(
    paths: Sequence[Path | str] = (),
    known: Iterable[str] | None = None,
    *,
    defaults: bool = True,
) -> RuleSet:
    """The shipped rules (unless `defaults` is false), then each file of `paths` in order.

    `known` are the provider names rules may use (default: `known_providers()`, i.e. the
    shipped table, `default` and groups). Raises `ScheduleError` with every problem found.
    """
    names = frozenset(known) if known is not None else known_providers()
    files = ([DEFAULT_RULES] if defaults else []) + [Path(p) for p in paths]
    order: dict[str, Rule] = {}
    origins: dict[str, tuple[SourceMap, Loc]] = {}
    problems: list[Problem] = []
    for path in files:
        try:
            data, source = load_yaml(path)
        except ScheduleError as e:
            problems.extend(e.problems)
            continue
        parsed = _parse_file(data, source, names, problems)
        if parsed is None:
            continue
        for j, rid in enumerate(parsed.disable):
            if rid not in order:
                problems.append(
                    source.problem(
                        ("disable", j), f"no earlier rule has id {rid!r}{did_you_mean(rid, order)}"
                    )
                )
                continue
            del order[rid]
            del origins[rid]
        for i, rule in enumerate(parsed.rules):
            order.pop(rule.id, None)  # a replaced rule takes its new place at the end
            order[rule.id] = rule
            origins[rule.id] = (source, ("rules", i))
    if problems:
        raise ScheduleError(problems)
    rules = RuleSet(tuple(order.values()), dict(order), origins)
    problems = list(_example_problems(rules))
    if problems:
        raise ScheduleError(problems)
    return rules


class RuleFiles:
    """`load_rules` that remembers its last result: when the same files, unchanged (device,
    inode, size and modification time in ns), are read with the same provider names, the
    rules read and compiled before are returned. A reload that only changed the plan then
    spends nothing on rules."""

    def __init__(self) -> None:
        self._last: tuple[tuple[object, ...], RuleSet] | None = None

    def load(self, paths: Sequence[Path], known: frozenset[str]) -> RuleSet:
        """The rules of the shipped file then `paths` (ScheduleError, as `load_rules`)."""
        key = self._key(paths, known)
        last = self._last
        if key is not None and last is not None and last[0] == key:
            return last[1]
        rules = load_rules(paths, known)
        _ = rules.compiled  # compiled here, on the caller's thread, not where it is swapped in
        self._last = None if key is None else (key, rules)
        return rules

    @staticmethod
    def _key(paths: Sequence[Path], known: frozenset[str]) -> tuple[object, ...] | None:
        """What the result depends on, or None when a file cannot be looked at (the read
        will then report it)."""
        parts: list[object] = [known]
        for path in [DEFAULT_RULES, *paths]:
            try:
                st = path.stat()
            except OSError:
                return None
            parts.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(parts)


def _parse_file(
    data: Any, source: SourceMap, known: frozenset[str], problems: list[Problem]
) -> RuleFile | None:
    """One file's rules, or None after adding its problems to `problems`."""
    if data is None:
        return RuleFile()
    if not isinstance(data, dict):
        problems.append(source.problem((), "a rule file is a YAML mapping with `rules:`"))
        return None
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as e:
        problems.extend(_model_problems(e, data, source))
        return None
    found = list(_file_problems(parsed, source, known))
    problems.extend(found)
    return None if found else parsed


def _file_problems(parsed: RuleFile, source: SourceMap, known: frozenset[str]) -> Iterator[Problem]:
    """Repeated ids, unknown providers, regexes the engine cannot compile."""
    seen: dict[str, int] = {}
    for i, rule in enumerate(parsed.rules):
        base: Loc = ("rules", i)
        if rule.id in seen:
            first = source.where(("rules", seen[rule.id], "id"))[0]
            yield source.problem((*base, "id"), f"id {rule.id!r} already used at line {first}")
        seen.setdefault(rule.id, i)
        for j, p in enumerate(rule.providers or ()):
            if p not in known:
                yield source.problem(
                    (*base, "providers", j),
                    f"unknown provider {p!r}{provider_hint(p, known)} "
                    f"(known: {', '.join(sorted(known))})",
                )
        problem = check_pattern(rule.text)
        if problem is not None:
            yield source.problem((*base, "text"), f"not a valid regex: {_regex_error(problem)}")


def _regex_error(text: str) -> str:
    """The `error: ...` line of a regex crate message (the rest draws a caret)."""
    for line in text.splitlines():
        if line.strip().startswith("error:"):
            return line.strip().removeprefix("error:").strip()
    return " ".join(text.split())


def _example_problems(rules: RuleSet) -> Iterator[Problem]:
    """Each rule's `example` must classify to the rule's class, with the rule among the
    matches (its provider being the first it names)."""
    engine = rules.engine()
    for rule in rules.rules:
        if rule.example is None:
            continue
        keys = rule.provider_keys
        provider = keys[0] if keys else None
        got = engine.classify(provider, None, None, rule.example)
        source, loc = rules.origins[rule.id]
        where = (*loc, "example")
        if got is None:
            yield source.problem(where, f"no rule classifies this example (rule {rule.id!r})")
        elif got[0] == "internal":
            yield source.problem(where, "the example reads as the MTA's own reply (no code?)")
        elif rule.id not in got[3]:
            yield source.problem(
                where, f"rule {rule.id!r} does not match its own example (matched: {got[3]})"
            )
        elif got[0] != rule.class_:
            yield source.problem(
                where,
                f"classifies as {got[0]} (rule {got[2]!r}), not this rule's {rule.class_}",
            )


def _model_problems(e: ValidationError, data: Any, source: SourceMap) -> Iterator[Problem]:
    """Pydantic's errors, located, one per place (the deepest: a union's list branch says
    which item is wrong, its scalar branch only that the value is not a scalar)."""
    return located_problems(e, data, source, _message, is_key=_KEYS.__contains__, deepest=True)


_KEYS = {*RuleFile.model_fields, *(f.alias or n for n, f in Rule.model_fields.items())}


def _message(err: Any, loc: Loc) -> str:
    """One sentence: what was found, what is expected."""
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        allowed = sorted(RuleFile.model_fields if len(loc) == 1 else _RULE_KEYS)
        return unknown_key(key, allowed)
    if kind == "literal_error" and loc and loc[-1] == "class":
        return f"unknown class {got!r}; expected one of {', '.join(_CLASSES)}"
    if kind == "literal_error" and loc and loc[-1] == "scope":
        return f"unknown scope {got!r}; expected one of {', '.join(_SCOPES)}"
    if "code" in loc[-2:]:
        return f"expected a reply code 200-599, 4xx or 5xx, or a list of them, got {got!r}"
    if "enhanced" in loc[-2:]:
        return f"expected an enhanced code such as 4.7.28 (text), or a list of them, got {got!r}"
    return plain_message(err)


_RULE_KEYS = [f.alias or n for n, f in Rule.model_fields.items()]
_CLASSES: list[str] = list(get_args(PushbackClass))
_SCOPES: list[str] = list(get_args(Scope))


# ----- `kiln classify` -----


def classify(
    rules: RuleSet | Engine,
    reply: str,
    provider: str | None = None,
    code: int | None = None,
    enhanced: str | None = None,
) -> Classification:
    """Classify one raw reply with `rules` (or an engine already holding them). An empty
    `enhanced` is none, as in the native protocol (MTA log templates write "" for none)."""
    from kiln._core import normalise_reply

    enhanced = enhanced or None
    engine = rules if isinstance(rules, Engine) else rules.engine()
    got = engine.classify(provider, code, enhanced, reply)
    line = normalise_reply(code, enhanced, reply)
    if got is None:
        return Classification("unclassified", None, None, (), line, provider)
    cls, scope, rule, matched = got
    return Classification(cls, scope, rule, tuple(matched), line, provider)


def _code_arg(text: str) -> int | None:
    """`--code`: an SMTP reply code 200-599; "" is none (as in the native protocol)."""
    if not text.strip():
        return None
    try:
        code = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an SMTP reply code: {text!r}") from None
    if not 200 <= code <= 599:
        raise argparse.ArgumentTypeError(f"an SMTP reply code is 200-599, got {text!r}")
    return code


def _enhanced_arg(text: str) -> str | None:
    """`--enhanced`: an enhanced status code such as 4.7.28; "" is none."""
    if not text.strip():
        return None
    if not re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"an enhanced status code is CLASS.SUBJECT.DETAIL such as 4.7.28, got {text!r}"
        )
    return text.strip()


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `kiln classify` (those of the native `classify` op)."""
    parser.add_argument("reply", metavar="REPLY", help="the reply, e.g. '421-4.7.28 Gmail ...'")
    parser.add_argument(
        "--code",
        type=_code_arg,
        metavar="CODE",
        help="the SMTP reply code (200-599) when REPLY does not start with it; '' is none",
    )
    parser.add_argument(
        "--enhanced",
        type=_enhanced_arg,
        metavar="X.Y.Z",
        help="the enhanced status code (4.7.28) when REPLY does not carry it; '' is none",
    )
    parser.add_argument("--provider", help="only this provider's rules (default: every rule)")
    parser.add_argument(
        "--rules",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="operator rule file, read after the shipped rules; repeatable",
    )
    parser.add_argument(
        "--config", type=Path, metavar="PLAN", help="plan: its providers and policy.rules files"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def classify_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`kiln classify REPLY`: 0 classified, 1 unclassified or internal, 2 bad rules or plan."""
    out = out or sys.stdout
    err = sys.stderr
    paths: list[Path] = []
    plan = None
    try:
        if args.config is not None:
            from kiln.planfile import load_plan

            plan = load_plan(args.config)
            paths += [args.config.parent / p for p in plan.policy.rules]
        paths += list(args.rules)
        rules = load_rules(paths, known_providers(plan))
    except ScheduleError as e:
        for p in e.problems:
            err.write(f"{p}\n")
        return 2
    known = known_providers(plan)
    if args.provider is not None and args.provider not in known:
        hint = provider_hint(args.provider, known, None if plan is None else plan.provider_table())
        err.write(
            f"kiln classify: unknown provider {args.provider!r}{hint} "
            f"(known: {', '.join(sorted(known))})\n"
        )
        return 2
    provider = args.provider
    if provider in PROVIDER_GROUPS:
        provider = PROVIDER_GROUPS[provider][0]
    result = classify(rules, args.reply, provider, args.code, args.enhanced)
    if args.json:
        out.write(json.dumps(result.as_json()) + "\n")
    else:
        rows = [
            ("class", result.cls),
            ("scope", result.scope or "-"),
            ("rule", result.rule or "-"),
            ("matched", ", ".join(result.matched) or "-"),
            ("normalised", result.normalised),
            ("provider", result.provider or "any"),
        ]
        for name, value in rows:
            out.write(f"{name:<11}{value}\n")
        rule = rules.by_id.get(result.rule) if result.rule else None
        if rule is not None:
            out.write(f"{'threshold':<11}{rule.threshold}\n")
            action = rule.action
            shown = "class default" if action is None else str(action)
            if isinstance(action, RealtimeAction):
                shown = json.dumps(action.model_dump(by_alias=True, exclude_none=True))
            out.write(f"{'action':<11}{shown}\n")
    return 0 if result.cls not in {"unclassified", "internal"} else 1
