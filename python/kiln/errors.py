"""kiln's exceptions. `KilnError` is the root; the engine's `CoreError` is a `ValueError`.

Each exception takes the facts as arguments and builds its own message, so raise sites stay
one line and messages stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kiln._core import CoreError

__all__ = ["ConfigError", "CoreError", "KilnError", "Problem", "ScheduleError"]


class KilnError(Exception):
    """Base of every error kiln raises on purpose (besides the engine's `CoreError`)."""


class ConfigError(KilnError, ValueError):
    """Configuration that kiln cannot use."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake (or warning) in a plan file, located as precisely as the YAML allows."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        what = f"{self.path}: {self.message}" if self.path else self.message
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{what}"


class ScheduleError(ConfigError):
    """A plan file with mistakes; `problems` holds every one of them, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__("\n".join(str(p) for p in errors))
