"""Durations written the way operators write them: `90s`, `30m`, `2h`, `3d`, `1h30m`.

Units: `s`, `m`/`min`, `h`, `d`; parts may be combined largest first (`1h30m`). A bare
number is rejected (is `30` seconds or minutes?). `format_ms` prints the canonical form and
`parse_ms(format_ms(x)) == x` holds for every whole number of seconds.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["Duration", "DurationError", "format_ms", "parse_ms"]

_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "min": 60_000, "s": 1_000}
_PART = re.compile(r"([0-9]+)\s*(min|d|h|m|s)", re.IGNORECASE)
_WHOLE = re.compile(r"(?:\s*[0-9]+\s*(?:min|d|h|m|s)\s*)+", re.IGNORECASE)
_ORDER = ["d", "h", "m", "s"]


class DurationError(ValueError):
    """A duration that does not parse; the message says what was expected."""


def parse_ms(text: str) -> int:
    """`"1h30m"` -> 5_400_000. Raises DurationError naming the accepted forms."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise DurationError(f"expected a duration such as 90s, 30m, 2h, 3d or 1h30m, got {text!r}")
    total = 0
    last = -1
    for count, unit in _PART.findall(text):
        u = unit.lower()
        u = "m" if u == "min" else u
        rank = _ORDER.index(u)
        if rank <= last:
            raise DurationError(f"duration parts must go from days to seconds, got {text!r}")
        last = rank
        total += int(count) * _UNIT_MS[u]
    if total <= 0:
        raise DurationError(f"a duration must be longer than zero, got {text!r}")
    return total


def format_ms(ms: int) -> str:
    """5_400_000 -> `"1h30m"`; sub-second remainders are dropped."""
    seconds = ms // 1000
    if seconds <= 0:
        return "0s"
    out = []
    for unit in _ORDER:
        size = _UNIT_MS[unit] // 1000
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def _validate(value: object) -> int:
    if isinstance(value, bool):
        raise DurationError(f"expected a duration such as 30m, got {value!r}")
    if isinstance(value, str):
        return parse_ms(value)
    raise DurationError(f"expected a duration such as 90s, 30m, 2h or 3d, got {value!r}")


#: A pydantic field type: written `30m` in YAML, held as whole milliseconds.
Duration = Annotated[
    int,
    BeforeValidator(_validate),
    PlainSerializer(format_ms, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(\s*[0-9]+\s*(min|d|h|m|s|D|H|M|S)\s*)+$",
            "examples": ["30m", "2h", "1h30m"],
        }
    ),
]
