"""Uses the public API the way callers will; checked by mypy --strict, never run by pytest."""

from __future__ import annotations

import array

from kiln import BatchDecisions, CoreError, Decision, Engine


def decide(engine: Engine, now_ms: int) -> tuple[int, int | None, str]:
    """A typical hot-path call and what callers read from it."""
    key: int = engine.key("192.0.2.10", "google")
    engine.set_limits(key, rate_count=500, rate_period_ms=3_600_000, max_burst=10, daily_cap=2000)
    d: Decision = engine.acquire(key, 1, now_ms)
    if d:
        return d.granted, d.retry_after_ms, d.ip
    return 0, d.retry_after_ms, d.reason


def batch(engine: Engine, keys: list[int], now_ms: int) -> list[int]:
    """The batch form, with an array of handles."""
    result: BatchDecisions = engine.acquire_batch(array.array("I", keys), now_ms)
    return [d.granted for d in result]


def release(engine: Engine, now_ms: int) -> list[tuple[int, str]]:
    """The release queue."""
    pool = engine.define_pool("p", [("192.0.2.1", 1, True)], overflow=None)
    engine.enqueue(1, pool, engine.provider("google"), priority=1)
    sleep_until: int | None = engine.next_due_ms(now_ms)
    assert sleep_until is None or sleep_until >= now_ms
    return [(mid, d.ip) for mid, d in engine.due(now_ms, 100)]


def bad(engine: Engine) -> str:
    """CoreError is a ValueError."""
    try:
        engine.acquire(-1, 1, 0)
    except CoreError as e:
        err: ValueError = e
        return str(err)
    return ""
