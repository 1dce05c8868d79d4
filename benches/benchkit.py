"""What every benchmark module shares: the fixture type, a fixed clock, a quiet collector."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

__all__ = ["GENEROUS", "NOW_MS", "Benchmark", "at_most", "frozen_gc", "publish"]

_T = TypeVar("_T")

NOW_MS = 1_750_000_000_000
"""A fixed instant: time is an argument, so every run decides the same."""

GENEROUS = (2**32 - 1, 1_000)
"""(count, period_ms) that grants every call of a run: 4.29e9 per second, all at once."""


class Benchmark(Protocol):
    """The part of pytest-benchmark's `benchmark` fixture these benches use."""

    group: str | None
    extra_info: dict[str, object]

    def __call__(self, function_to_benchmark: Callable[..., _T], /, *args: object) -> _T:
        """Time `function_to_benchmark(*args)` (or call it once when disabled)."""
        ...


@pytest.fixture(scope="module", autouse=True)
def frozen_gc() -> Iterator[None]:
    """Collect and freeze what set-up allocated, so collections time only the benchmark's
    own garbage. Modules use it by importing it (`from benchkit import frozen_gc as frozen_gc`)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def at_most(name: str, measured: float, bound: float, unit: str) -> dict[str, Any]:
    """A target of a script bench's JSON (benches/compare.py reads them): `measured` must
    be at most `bound`."""
    return {"name": name, "measured": measured, "bound": bound, "unit": unit, "at_most": True}


def publish(result: dict[str, Any], path: Path | None) -> None:
    """Print a script bench's result, and write it as JSON to `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
