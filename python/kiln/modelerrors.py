"""Pydantic's validation errors as located `Problem`s: the one place both YAML readers (plans
in `kiln.schedule`, reply rules in `kiln.rules`) turn a `ValidationError` into lines and keys.

Each reader supplies its own sentences (`message`) and says which names are keys of its
format (`is_key`, so a missing or unknown key is located at the key, while pydantic's
union-branch labels such as `str` or `function-before[...]` are dropped).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from typing import Any

from pydantic import ValidationError

from kiln.errors import Problem
from kiln.yamlfile import Loc, SourceMap, short_repr

__all__ = ["did_you_mean", "located_problems", "plain_message", "type_word", "unknown_key"]


def located_problems(
    e: ValidationError,
    data: Any,
    source: SourceMap,
    message: Callable[[Any, Loc], str],
    *,
    is_key: Callable[[str], bool],
    deepest: bool = False,
) -> Iterator[Problem]:
    """One problem per place, located in `source`. `deepest`: where errors nest (a union's
    list branch names the bad item, its scalar branch only says the value is no scalar), keep
    only the deepest."""
    errors = [(_clean_loc(err["loc"], data, is_key), err) for err in e.errors(include_url=False)]
    locs = {loc for loc, _ in errors}
    seen: set[Loc] = set()
    for loc, err in errors:
        if loc in seen:
            continue
        if deepest and any(len(o) > len(loc) and o[: len(loc)] == loc for o in locs):
            continue
        seen.add(loc)
        yield source.problem(loc, message(err, loc))


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    """`unknown key 'x'` with a "did you mean" when a known key is close, else the known keys."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    choices = f" (known keys: {', '.join(allowed)})" if allowed else ""
    return f"unknown key {key!r}{choices}"


def _clean_loc(loc: tuple[Any, ...], data: Any, is_key: Callable[[str], bool]) -> Loc:
    """Keep the keys and indexes that exist in `data`, and a missing or unknown key at the
    end; drop pydantic's union-branch labels."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and is_key(part):
            out.append(part)
            node = None
    return tuple(out)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`; did you mean 'x'?` when a known name is close, else ""."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def type_word(value: object) -> str:
    """A YAML reader's word for a value's type."""
    for t, word in _TYPE_WORDS.items():
        if type(value) is t:
            return word
    if isinstance(value, date):
        return "a date"
    return type(value).__name__


_TYPE_WORDS: dict[type, str] = {
    dict: "a mapping",
    list: "a list",
    str: "text",
    bool: "true/false",
    int: "a whole number",
    float: "a number",
    type(None): "nothing (null)",
}

#: Pydantic error type -> what a value of that type was expected to be.
_EXPECTED = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "string_type": "text",
    "bool_type": "true or false",
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "list_type": "a list",
}
_BOUNDS = {
    "greater_than_equal": "at least {ge}",
    "greater_than": "more than {gt}",
    "less_than_equal": "at most {le}",
    "less_than": "less than {lt}",
}


def plain_message(err: Any) -> str:
    """One sentence for a pydantic error any YAML reader words the same way: wrong type,
    out of bounds, empty, too long, not one of the allowed values; else pydantic's own."""
    kind = err["type"]
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {type_word(got)} {short_repr(got)}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind].format(**ctx)}, got {short_repr(got)}"
    if kind == "too_short":
        return f"must not be empty (at least {ctx.get('min_length', 1)} item)"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {short_repr(got)}"
    if kind == "union_tag_invalid" or kind.startswith("union"):
        return f"unexpected value {short_repr(got)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else kind
