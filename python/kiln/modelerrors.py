"""Pydantic's validation errors as located `Problem`s: the one place both YAML readers (plans
in `kiln.schedule`, reply rules in `kiln.rules`) turn a `ValidationError` into lines and keys.

Each reader supplies its own sentences (`message`) and says which names are keys of its
format (`is_key`, so a missing or unknown key is located at the key, while pydantic's
union-branch labels such as `str` or `function-before[...]` are dropped).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from kiln.errors import Problem
from kiln.yamlfile import Loc, SourceMap

__all__ = ["located_problems", "unknown_key"]


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
