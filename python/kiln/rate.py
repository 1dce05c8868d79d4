"""Rates written the way mail engineers write them: `500/h`, `2_000/day,max_burst=10`.

The grammar follows KumoMTA's throttle specs: `<count>/<period>[,max_burst=<n>]`, with `_` or
`,` as digit separators in the count, and periods `s`/`sec`/`second`, `m`/`min`/`minute`,
`h`/`hr`/`hour`, `d`/`day`. `str()` prints one canonical form (`2_000/day,max_burst=10`), and
`RateSpec.parse(str(spec)) == spec` always holds.

One difference from KumoMTA: without `max_burst`, kiln spreads the count evenly over the
period (`max_burst=1`), which is what a warm-up wants; KumoMTA lets the whole count go at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PERIOD_MS", "RateError", "RateSpec"]

#: Milliseconds per period unit, by every spelling accepted.
PERIOD_MS: dict[str, int] = {
    "s": 1_000,
    "sec": 1_000,
    "second": 1_000,
    "m": 60_000,
    "min": 60_000,
    "minute": 60_000,
    "h": 3_600_000,
    "hr": 3_600_000,
    "hour": 3_600_000,
    "d": 86_400_000,
    "day": 86_400_000,
}
_CANONICAL_UNIT = {1_000: "s", 60_000: "min", 3_600_000: "h", 86_400_000: "day"}
_COUNT = re.compile(r"[0-9]+(?:[_,][0-9]+)*")
_MAX_COUNT = 2**32 - 2
_OPTIONS = re.compile(r",\s*max_burst", re.IGNORECASE)


class RateError(ValueError):
    """A rate string that does not parse; the message says what was expected."""

    def __init__(self, text: str, problem: str) -> None:
        self.text = text
        self.problem = problem
        super().__init__(f"invalid rate {text!r}: {problem}")


def _count(text: str, part: str, what: str) -> int:
    """A positive integer with optional `_`/`,` digit separators."""
    if not _COUNT.fullmatch(part):
        raise RateError(text, f"{what} must be a whole number such as 500 or 2_000, got {part!r}")
    value = int(part.replace("_", "").replace(",", ""))
    if value < 1:
        raise RateError(text, f"{what} must be at least 1, got {value}")
    if value > _MAX_COUNT:
        raise RateError(text, f"{what} must be at most {_MAX_COUNT:_}, got {value:_}")
    return value


def _group(n: int) -> str:
    """`2000` as `2_000`: digits grouped by thousands, as in the YAML people write."""
    return f"{n:_}"


@dataclass(frozen=True, slots=True)
class RateSpec:
    """`count` messages per `period_ms`, at most `max_burst` of them at once."""

    count: int
    period_ms: int
    max_burst: int = 1

    def __post_init__(self) -> None:
        """Reject specs that no rate string can express."""
        if self.period_ms not in _CANONICAL_UNIT:
            raise RateError(repr(self), "period_ms must be one second, minute, hour or day")
        for name in ("count", "max_burst"):
            value = getattr(self, name)
            if not 1 <= value <= _MAX_COUNT:
                raise RateError(repr(self), f"{name} must be in 1..{_MAX_COUNT:_}, got {value}")

    @classmethod
    def parse(cls, text: str) -> RateSpec:
        """Parse `500/h`, `2_000/day,max_burst=10`, `10,000/d` (spaces around parts allowed)."""
        body = text.strip()
        # "10,000/day" uses a comma as a digit separator; only ", max_burst" starts options.
        head, *rest = _OPTIONS.split(body, maxsplit=1)
        sep, opts = bool(rest), (rest[0] if rest else "")
        if "/" not in head:
            raise RateError(text, "expected <count>/<period>, such as 500/h")
        count_part, _, unit_part = head.partition("/")
        count = _count(text, count_part.strip(), "count")
        unit = unit_part.strip().lower()
        if unit not in PERIOD_MS:
            known = ", ".join(sorted(PERIOD_MS, key=lambda u: (PERIOD_MS[u], u)))
            raise RateError(text, f"unknown period {unit_part.strip()!r}; use one of {known}")
        max_burst = 1
        if sep:
            opts = opts.strip()
            if not opts.startswith("="):
                raise RateError(text, "expected max_burst=<n> after the comma")
            max_burst = _count(text, opts[1:].strip(), "max_burst")
        return cls(count=count, period_ms=PERIOD_MS[unit], max_burst=max_burst)

    def __str__(self) -> str:
        rate = f"{_group(self.count)}/{_CANONICAL_UNIT[self.period_ms]}"
        return rate if self.max_burst == 1 else f"{rate},max_burst={_group(self.max_burst)}"

    @property
    def per_hour(self) -> float:
        """The long-run rate in messages per hour."""
        return self.count * 3_600_000 / self.period_ms
