"""The one place that reads wall time. Everything else is given `now_ms`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

__all__ = ["MAX_SPEED", "MIN_SPEED", "Clock", "ScaledClock", "SystemClock"]

#: The slowest and fastest a `ScaledClock` may run (a day in under a tenth of a second is no
#: drill).
MIN_SPEED = 0.001
MAX_SPEED = 1_000_000.0


class Clock(Protocol):
    """Something that says what time it is, in integer milliseconds since the epoch."""

    def now_ms(self) -> int:
        """The current time in ms since 1970-01-01T00:00:00Z."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        """Wall time in ms since the epoch."""
        return time.time_ns() // 1_000_000


class ScaledClock:
    """A clock for drills and tests: it reads `start_ms` when created and then runs `speed`
    times faster than real time (`speed` 360: an hour lasts 10 s, a day 4 minutes).

    Elapsed time is measured on the monotonic clock, so a step of the system clock (NTP, an
    operator) does not move it, and it never goes backwards. `monotonic_ns` is injectable for
    tests; `anchor_ns` is its reading at creation, so another process on the same host can
    compute the same time from `time.monotonic_ns()` (Linux's monotonic clock is system-wide).
    """

    def __init__(
        self,
        start_ms: int,
        speed: float = 1.0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not (math.isfinite(speed) and MIN_SPEED <= speed <= MAX_SPEED):
            raise ValueError(
                f"clock speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}, got {speed:g}"
            )
        if start_ms < 0:
            raise ValueError(f"clock start must not be before 1970, got {start_ms} ms")
        self.start_ms = start_ms
        self.speed = speed
        # Integer arithmetic: exact and monotonic however long the clock runs.
        self._num, den = Fraction(speed).limit_denominator(1_000_000).as_integer_ratio()
        self._den = den * 1_000_000
        self._monotonic_ns = monotonic_ns
        self.anchor_ns = monotonic_ns()

    @property
    def monotonic_ns(self) -> Callable[[], int]:
        """The monotonic clock this clock reads."""
        return self._monotonic_ns

    def linear(self) -> tuple[int, int, int, int]:
        """(start_ms, num, den, anchor_ns): the clock shows `start_ms + (m - anchor_ns) * num
        // den` when the monotonic clock reads `m` (how the Rust MTA socket computes it)."""
        return self.start_ms, self._num, self._den, self.anchor_ns

    def at(self, monotonic_ns: int) -> int:
        """The time this clock shows (or showed) when the monotonic clock reads `monotonic_ns`."""
        return self.start_ms + (monotonic_ns - self.anchor_ns) * self._num // self._den

    def now_ms(self) -> int:
        """`start_ms` plus the real time since creation times `speed`, in ms."""
        return self.at(self._monotonic_ns())
