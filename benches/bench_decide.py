"""One decision for one key from Python: kiln next to limits and pyrate-limiter.

Groups `decide-granted` (a generous limit: every call granted) and `decide-denied` (1 per
hour, spent by the first call: every timed call denied). Limits have the same shape in every
implementation: `count` per `period_ms`, all of it available at once (kiln's
`max_burst = count`). Each implementation first shows it decides the same pattern as the
others (3 per hour: granted x3, then denied), then is timed.

(No shared conftest.py here: tests/ has one, and two top-level `conftest` modules collide
in mypy and in `from conftest import ...`. Each bench file is self-contained.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version

import limits
import pyrate_limiter
import pytest
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from benchkit import GENEROUS, NOW_MS, Benchmark
from benchkit import frozen_gc as frozen_gc
from kiln import Engine

"""A fixed `now_ms` (June 2025): kiln never reads a clock, so the benches pass one."""
IP = "192.0.2.1"
PROVIDER = "gmail.com"
HOUR_MS = 3_600_000

DENYING = (1, HOUR_MS)
"""(count, period_ms) that denies every call after the first: 1 per hour."""

DECIDE_IMPLS = (
    "kiln",
    "limits-fixed-window",
    "limits-moving-window",
    "pyrate-inmemory",
    "pyrate-gcra",
)
"""kiln, and the pure-Python limiters a user would pick instead (limits, pyrate-limiter 4)."""


def _nothing() -> None:
    """Nothing to close."""


@dataclass
class Limiter:
    """One implementation's limiter for one (IP, provider) key, ready to decide.

    `call(*args)` makes one decision the way a user of that library would; `granted` reads
    its answer; `close` stops whatever background threads the library started.
    """

    impl: str
    call: Callable[..., object]
    args: tuple[object, ...]
    granted: Callable[[object], bool]
    close: Callable[[], None] = _nothing
    info: dict[str, object] = field(default_factory=dict)

    def decide(self) -> bool:
        """Make one decision; True when granted."""
        return self.granted(self.call(*self.args))


def _kiln(count: int, period_ms: int) -> Limiter:
    """kiln: a key handle, then `Engine.acquire(key, 1, now_ms)`."""
    engine = Engine()
    key = engine.key(IP, PROVIDER)
    engine.set_limits(key, rate_count=count, rate_period_ms=period_ms, max_burst=count)

    def granted(d: object) -> bool:
        """A kiln Decision is truthy when granted."""
        return bool(d)

    return Limiter(
        "kiln", engine.acquire, (key, 1, NOW_MS), granted, info={"version": version("kiln-warmup")}
    )


def _limits(strategy: str, count: int, period_ms: int) -> Limiter:
    """limits: MemoryStorage with a fixed- or moving-window strategy, `hit(item, ip, provider)`."""
    storage = MemoryStorage()
    limiter = (
        FixedWindowRateLimiter(storage)
        if strategy == "fixed-window"
        else MovingWindowRateLimiter(storage)
    )
    item = limits.RateLimitItemPerSecond(count, period_ms // 1_000)

    def granted(ok: object) -> bool:
        """limits answers a plain bool."""
        return ok is True

    def close() -> None:
        """Stop the storage's expiry timer."""
        storage.timer.cancel()

    return Limiter(
        f"limits-{strategy}",
        limiter.hit,
        (item, IP, PROVIDER),
        granted,
        close,
        {"version": version("limits"), "storage": "memory"},
    )


def _pyrate(kind: str, count: int, period_ms: int) -> Limiter:
    """pyrate-limiter 4: a Limiter over an in-memory bucket, `try_acquire(name, 1, False)`."""
    rate = pyrate_limiter.Rate(count, period_ms)
    bucket: pyrate_limiter.AbstractBucket = (
        pyrate_limiter.InMemoryBucket([rate])
        if kind == "inmemory"
        else pyrate_limiter.StateBucket([rate])
    )
    limiter = pyrate_limiter.Limiter(bucket)

    def granted(ok: object) -> bool:
        """pyrate-limiter answers a plain bool when not blocking."""
        return ok is True

    return Limiter(
        f"pyrate-{kind}",
        limiter.try_acquire,
        (f"{IP}|{PROVIDER}", 1, False),
        granted,
        limiter.close,
        {"version": version("pyrate-limiter"), "bucket": type(bucket).__name__},
    )


def make_limiter(impl: str, count: int, period_ms: int) -> Limiter:
    """A fresh single-key limiter of `impl` allowing `count` per `period_ms` (whole seconds)."""
    assert period_ms % 1_000 == 0, "limits counts whole seconds"
    if impl == "kiln":
        return _kiln(count, period_ms)
    if impl.startswith("limits-"):
        return _limits(impl.removeprefix("limits-"), count, period_ms)
    if impl.startswith("pyrate-"):
        return _pyrate(impl.removeprefix("pyrate-"), count, period_ms)
    raise ValueError(f"unknown implementation {impl!r}")


@pytest.fixture(params=DECIDE_IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    """Each implementation in turn."""
    name: str = request.param
    return name


PATTERN = [True, True, True, False, False]


def _check_pattern(impl: str) -> None:
    """`impl` grants 3 per hour, then denies: the shape all implementations must share."""
    lim = make_limiter(impl, 3, HOUR_MS)
    try:
        assert [lim.decide() for _ in PATTERN] == PATTERN, impl
    finally:
        lim.close()


def test_decide_granted(benchmark: Benchmark, impl: str) -> None:
    """A granted decision on a hot key costs what the table says, and is granted."""
    _check_pattern(impl)
    lim = make_limiter(impl, *GENEROUS)
    try:
        assert lim.decide()
        benchmark.group = "decide-granted"
        benchmark.extra_info.update(impl=impl, ops_per_call=1, **lim.info)
        result = benchmark(lim.call, *lim.args)
        assert lim.granted(result)
        assert lim.decide(), "still granting after the timed calls"
    finally:
        lim.close()


def test_decide_denied(benchmark: Benchmark, impl: str) -> None:
    """A denied decision (limit spent) costs what the table says, and is denied."""
    _check_pattern(impl)
    lim = make_limiter(impl, *DENYING)
    try:
        assert lim.decide(), "the first call spends the limit"
        assert not lim.decide()
        benchmark.group = "decide-denied"
        benchmark.extra_info.update(impl=impl, ops_per_call=1, **lim.info)
        result = benchmark(lim.call, *lim.args)
        assert not lim.granted(result)
    finally:
        lim.close()


def test_kiln_denial_says_when() -> None:
    """kiln's denial carries the reason and an honest retry time (the others say only no)."""
    engine = Engine()
    key = engine.key(IP, PROVIDER)
    engine.set_limits(key, rate_count=DENYING[0], rate_period_ms=DENYING[1])
    assert engine.acquire(key, 1, NOW_MS)
    d = engine.acquire(key, 1, NOW_MS)
    assert (d.granted, d.reason, d.retry_after_ms) == (0, "rate", HOUR_MS)
