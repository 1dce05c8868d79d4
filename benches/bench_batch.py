"""Many decisions in one call: `Engine.acquire_batch(array('I'), now_ms)` per decision.

Groups `batch-64` and `batch-1024`: the batch call alone, the batch call plus reading the
granted counts back (what a daemon does with the reply), and the same keys decided one
`acquire` at a time in a Python loop. `ops_per_call` in `extra_info` turns each figure into a
per-decision cost; compare.py holds it against the in-process Rust batch of the same size.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import pytest

from benchkit import GENEROUS, NOW_MS, Benchmark
from benchkit import frozen_gc as frozen_gc
from kiln import Engine

PROVIDERS = [f"provider-{p}.example" for p in range(16)]
BATCH_IMPLS = ("kiln-batch", "kiln-batch+counts", "kiln-loop")


def _engine(size: int) -> tuple[Engine, array[int]]:
    """An engine with `size` distinct keys (16 providers per IP), all with generous limits."""
    engine = Engine()
    keys = array("I")
    for i in range(size):
        key = engine.key(f"192.0.2.{i // 16}", PROVIDERS[i % 16])
        engine.set_limits(
            key, rate_count=GENEROUS[0], rate_period_ms=GENEROUS[1], max_burst=2**32 - 1
        )
        keys.append(key)
    return engine, keys


def test_batch_decides_in_order() -> None:
    """acquire_batch decides like acquire, request by request: paused keys are denied."""
    engine, keys = _engine(64)
    for key in keys[3::4]:
        engine.pause(key)
    batch = engine.acquire_batch(keys, NOW_MS)
    expected = [0 if i % 4 == 3 else 1 for i in range(64)]
    assert batch.granted_counts() == expected
    assert (batch.granted, batch.denied) == (48, 16)
    assert [d.reason for d in batch][:4] == ["granted", "granted", "granted", "paused"]
    one_by_one = [engine.acquire(k, 1, NOW_MS).granted for k in keys]
    assert one_by_one == expected


def _call(impl: str, engine: Engine, keys: array[int]) -> Callable[[], int]:
    """One batch of `keys` decided the way `impl` says; returns how many were granted."""
    acquire_batch, acquire = engine.acquire_batch, engine.acquire

    def batch() -> int:
        """The batch call alone."""
        return acquire_batch(keys, NOW_MS).granted

    def batch_counts() -> int:
        """The batch call, then its granted counts as a Python list."""
        return sum(acquire_batch(keys, NOW_MS).granted_counts())

    def loop() -> int:
        """One acquire per key from a Python loop."""
        granted = 0
        for key in keys:
            granted += acquire(key, 1, NOW_MS).granted
        return granted

    return {"kiln-batch": batch, "kiln-batch+counts": batch_counts, "kiln-loop": loop}[impl]


@pytest.mark.parametrize("impl", BATCH_IMPLS)
@pytest.mark.parametrize("size", [64, 1024])
def test_batch(benchmark: Benchmark, size: int, impl: str) -> None:
    """A batch of `size` distinct keys, all granted; timed per call (ops_per_call = size)."""
    engine, keys = _engine(size)
    run = _call(impl, engine, keys)
    assert run() == size
    benchmark.group = f"batch-{size}"
    benchmark.extra_info.update(impl=impl, ops_per_call=size, batch=size)
    assert benchmark(run) == size
