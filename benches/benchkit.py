"""What every benchmark module shares: the fixture type, a fixed clock, a quiet collector."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import pytest

__all__ = ["GENEROUS", "NOW_MS", "Benchmark", "frozen_gc"]

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
