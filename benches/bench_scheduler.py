"""The release queue from Python: enqueue 100k messages, then `due` them all out.

Group `scheduler-100k`: kiln (4 queues of one pool, unlimited keys, so every pick grants)
next to a pure-Python heapq with the same order (priority, then first in first out) that
neither picks an IP nor charges a limit. `ops_per_call` = 100k: compare.py reports the cost
per message (enqueue + release).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import pytest

from benchkit import NOW_MS, Benchmark
from benchkit import frozen_gc as frozen_gc
from kiln import Engine

MESSAGES = 100_000
CHUNK = 1_000
PROVIDERS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com")
IMPLS = ("kiln", "python-heapq")


def _priority(message_id: int) -> int:
    """Every tenth message is urgent."""
    return 1 if message_id % 10 == 0 else 0


def _expected_order() -> list[int]:
    """Urgent messages first, oldest first; then the rest, oldest first."""
    ids = range(MESSAGES)
    return [i for i in ids if _priority(i)] + [i for i in ids if not _priority(i)]


def _kiln() -> Callable[[bool], list[int]]:
    """enqueue all, then due(now, 1000) until the queue is empty; released ids in order."""
    engine = Engine()
    pool = engine.define_pool("warm", [(f"198.51.100.{i}", 1, i == 0) for i in range(4)])
    providers = [engine.provider(p) for p in PROVIDERS]
    enqueue, due = engine.enqueue, engine.due

    def run(record: bool) -> list[int]:
        """One full cycle; with `record`, the released ids (else only their count)."""
        for i in range(MESSAGES):
            enqueue(i, pool, providers[i & 3], _priority(i))
        released: list[int] = []
        count = 0
        while out := due(NOW_MS, CHUNK):
            count += len(out)
            if record:
                released.extend(message_id for message_id, decision in out if decision)
        assert engine.queued() == 0
        return released if record else [count]

    return run


def _heapq() -> Callable[[bool], list[int]]:
    """The same order with heapq: (-priority, sequence, id); no IP pick, no limits."""
    heap: list[tuple[int, int, int]] = []

    def run(record: bool) -> list[int]:
        """One full cycle; with `record`, the released ids (else only their count)."""
        for i in range(MESSAGES):
            heapq.heappush(heap, (-_priority(i), i, i))
        released: list[int] = []
        count = 0
        while heap:
            out = [heapq.heappop(heap)[2] for _ in range(min(CHUNK, len(heap)))]
            count += len(out)
            if record:
                released.extend(out)
        return released if record else [count]

    return run


@pytest.mark.parametrize("impl", IMPLS)
def test_scheduler(benchmark: Benchmark, impl: str) -> None:
    """100k messages in and out in priority-then-FIFO order; timed per full cycle."""
    run = _kiln() if impl == "kiln" else _heapq()
    assert run(True) == _expected_order()
    benchmark.group = "scheduler-100k"
    benchmark.extra_info.update(impl=impl, ops_per_call=MESSAGES, chunk=CHUNK)
    assert benchmark(run, False) == [MESSAGES]
