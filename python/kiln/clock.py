"""The one place that reads wall time. Everything else is given `now_ms`."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


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
