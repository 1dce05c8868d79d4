"""The engine's Python API: decisions as values, clear errors for bad input, buffers, panics."""

from __future__ import annotations

import array
import gc
import json
import threading

import pytest

import kiln
from kiln import CoreError, Engine, _core

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@pytest.fixture
def engine() -> Engine:
    """A fresh engine."""
    return Engine()


def test_throttled_is_a_value_not_an_exception(engine: Engine) -> None:
    """A denial comes back as a falsy Decision with a reason and an honest retry time."""
    k = engine.key("192.0.2.10", "google")
    engine.set_limits(k, rate_count=500, rate_period_ms=HOUR_MS)
    first = engine.acquire(k, 1, T0)
    second = engine.acquire(k, 1, T0 + 1000)
    assert first and first.granted == 1 and first.reason == "granted"
    assert first.retry_after_ms == 0 and first.ip == "192.0.2.10" and first.tier == "direct"
    assert not second
    assert (second.granted, second.reason, second.retry_after_ms) == (0, "rate", 6200)
    assert engine.acquire(k, 1, T0 + 1000 + 6200)


def test_calendar_caps_and_retry_at_next_boundary(engine: Engine) -> None:
    """Hourly caps hold until the next hour boundary Python supplied, then reset."""
    k = engine.key("192.0.2.10", "google")
    engine.set_limits(k, hourly_cap=2, daily_cap=3)
    engine.set_calendar([T0 + HOUR_MS, T0 + 2 * HOUR_MS], [T0 + DAY_MS])
    assert engine.acquire(k, 2, T0)
    d = engine.acquire(k, 1, T0 + 10)
    assert (d.reason, d.retry_after_ms) == ("hourly_cap", HOUR_MS - 10)
    assert engine.acquire(k, 1, T0 + HOUR_MS)
    d = engine.acquire(k, 1, T0 + HOUR_MS + 5)
    # Both the daily cap (3 used) and nothing else: the reason is the daily cap.
    assert (d.reason, d.retry_after_ms) == ("daily_cap", DAY_MS - HOUR_MS - 5)
    usage = engine.usage(k)
    assert (usage["hour_used"], usage["day_used"], usage["daily_cap"]) == (1, 3, 3)


def test_pause_suspend_multiplier(engine: Engine) -> None:
    """Pause and suspension deny with their own reasons; the multiplier scales caps."""
    k = engine.key("192.0.2.10", "yahoo")
    engine.set_limits(k, daily_cap=10)
    engine.pause(k)
    d = engine.acquire(k, 1, T0)
    assert (d.reason, d.retry_after_ms) == ("paused", None)
    engine.resume(k)
    engine.suspend(k, T0 + 500)
    d = engine.acquire(k, 1, T0)
    assert (d.reason, d.retry_after_ms) == ("suspended", 500)
    assert engine.acquire(k, 1, T0 + 500)
    engine.set_multiplier(k, 0.5)
    assert engine.usage(k)["multiplier"] == 0.5
    assert engine.acquire(k, 4, T0 + 600)
    assert engine.acquire(k, 1, T0 + 600).reason == "daily_cap"
    engine.set_multiplier(k, 0.0)
    assert engine.acquire(k, 1, T0 + 700).reason == "paused"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, k: e.acquire(k, 0, T0), "n: must be at least 1, got 0"),
        (lambda e, k: e.acquire(k, -1, T0), "n: must not be negative, got -1"),
        (lambda e, k: e.acquire(k + 99, 1, T0), "unknown key handle 99"),
        (lambda e, k: e.acquire(k, 1, -5), "now_ms: must not be negative, got -5"),
        (lambda e, k: e.acquire(k, 1, kiln.MAX_NOW_MS + 1), "now_ms: must be at most"),
        (
            lambda e, k: e.set_limits(k, rate_count=10, rate_period_ms=0),
            "rate_period_ms: must be at least 1, got 0",
        ),
        (
            lambda e, k: e.set_limits(k, rate_count=-10, rate_period_ms=1000),
            "rate_count: must not be negative, got -10",
        ),
        (lambda e, k: e.set_limits(k, rate_count=10), "rate: give rate_count and rate_period_ms"),
        (lambda e, k: e.set_limits(k, max_burst=0), "max_burst: must be at least 1, got 0"),
        (lambda e, k: e.set_limits(k, daily_cap=2**32), "daily_cap: must be below 4294967295"),
        (lambda e, k: e.set_limits(k, hourly_cap=2**80), "hourly_cap: is too large"),
        (lambda e, k: e.set_multiplier(k, float("nan")), "multiplier: must be a number in [0, 1]"),
        (lambda e, k: e.set_multiplier(k, 1.5), "multiplier: must be a number in [0, 1]"),
        (lambda e, k: e.set_calendar([T0, T0], []), "hour_starts_ms: must be strictly increasing"),
        (lambda e, k: e.set_limits(k, active_hours=2**24), "active_hours: must be a mask of hours"),
        (lambda e, k: e.set_limits(k, active_hours=-1), "active_hours: must not be negative"),
        (
            lambda e, k: e.set_calendar([T0], [], [7, 8]),
            "hours_of_day: must give one hour per hour start (1), got 2",
        ),
        (
            lambda e, k: e.set_calendar([T0], [], [24]),
            "hours_of_day: an hour of day must be 0 to 23, got 24",
        ),
        (lambda e, k: e.key("300.1.1.1", "google"), "ip: must be an IPv4 or IPv6 address"),
        (lambda e, k: e.key("192.0.2.1", ""), "provider: must not be empty"),
        (lambda e, k: e.pool("nope"), 'unknown pool "nope"'),
        (lambda e, k: e.define_pool("p", []), 'members: pool "p" needs at least one IP'),
        (lambda e, k: e.define_pool("p", [("192.0.2.1", 0, True)]), "weight: must be at least 1"),
        (lambda e, k: e.pick(7, 0, 1, T0), "unknown pool handle 7"),
        (lambda e, k: e.restore({"version": 2}), "is missing from the snapshot"),
    ],
)
def test_bad_input_is_a_clear_value_error(engine: Engine, call: object, message: str) -> None:
    """Invalid input raises CoreError (a ValueError) naming the argument, and changes nothing."""
    k = engine.key("192.0.2.10", "google")
    before = engine.snapshot()
    with pytest.raises(CoreError, match=None) as info:
        call(engine, k)  # type: ignore[operator]
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)
    assert engine.snapshot() == before


def test_core_error_is_reexported() -> None:
    """kiln.CoreError is the engine's exception class and a ValueError."""
    assert kiln.CoreError is _core.CoreError
    assert issubclass(kiln.CoreError, ValueError)


def test_rust_panic_is_an_exception_not_a_crash(engine: Engine) -> None:
    """A Rust panic surfaces as a Python exception; the interpreter and engine carry on."""
    with pytest.raises(BaseException, match="deliberate panic") as info:
        _core._panic_for_tests()
    assert type(info.value).__name__ == "PanicException"
    k = engine.key("192.0.2.10", "google")
    assert engine.acquire(k, 1, T0)


def test_batch_matches_single_calls(engine: Engine) -> None:
    """acquire_batch decides in order exactly as single acquires would."""
    other = Engine()
    keys = []
    for e in (engine, other):
        ks = [e.key(f"192.0.2.{i}", "google") for i in range(4)]
        for k in ks:
            e.set_limits(k, rate_count=2, rate_period_ms=1000, max_burst=2, daily_cap=5)
        keys = ks
    requests = [keys[i % 4] for i in range(40)]
    batch = engine.acquire_batch(array.array("I", requests), T0)
    singles = [other.acquire(k, 1, T0) for k in requests]
    assert len(batch) == 40
    assert list(batch) == singles
    assert batch[-1] == singles[-1]
    assert batch.granted == sum(d.granted for d in singles) == 8
    assert batch.denied == 32
    assert batch.granted_counts() == [d.granted for d in singles]
    with pytest.raises(IndexError):
        batch[40]


def test_batch_counts_and_bad_buffers(engine: Engine) -> None:
    """Counts go with keys; bad buffer types, lengths or handles are errors deciding nothing."""
    k = engine.key("192.0.2.10", "google")
    engine.set_limits(k, daily_cap=10)
    batch = engine.acquire_batch(array.array("I", [k, k]), T0, array.array("I", [4, 7]))
    assert batch.granted_counts() == [4, 0]
    with pytest.raises(CoreError, match="unsigned 32-bit"):
        engine.acquire_batch(array.array("q", [k]), T0)
    with pytest.raises(CoreError, match="one count per key"):
        engine.acquire_batch(array.array("I", [k]), T0, array.array("I", [1, 1]))
    with pytest.raises(CoreError, match="unknown key handle 5"):
        engine.acquire_batch(array.array("I", [k, 5]), T0)
    with pytest.raises(CoreError, match="asks for 0"):
        engine.acquire_batch(array.array("I", [k]), T0, array.array("I", [0]))
    assert engine.usage(k)["day_used"] == 4


def test_pick_prefers_warming_then_warm_then_overflow(engine: Engine) -> None:
    """pick fills warming IPs first, spills to warm IPs, then to the overflow pool."""
    engine.define_pool("spare", [("198.51.100.1", 1, False)])
    pool = engine.define_pool(
        "transactional",
        [("192.0.2.1", 1, True), ("192.0.2.2", 1, False)],
        overflow="spare",
    )
    g = engine.provider("google")
    engine.set_limits(engine.key("192.0.2.1", "google"), daily_cap=2)
    engine.set_limits(engine.key("192.0.2.2", "google"), daily_cap=1)
    got = [engine.pick(pool, g, 1, T0) for _ in range(5)]
    assert [(d.ip, d.tier) for d in got] == [
        ("192.0.2.1", "warming"),
        ("192.0.2.1", "warming"),
        ("192.0.2.2", "warm"),
        ("198.51.100.1", "overflow"),
        ("198.51.100.1", "overflow"),
    ]
    assert engine.pool("transactional") == pool


def test_release_queue_orders_and_waits(engine: Engine) -> None:
    """due releases by priority then FIFO, sets blocked queues aside, and says when to come back."""
    pool = engine.define_pool("p", [("192.0.2.1", 1, False)])
    g = engine.provider("google")
    y = engine.provider("yahoo")
    engine.set_limits(engine.key("192.0.2.1", "google"), rate_count=1, rate_period_ms=1000)
    for mid, prov, prio in [(1, g, 0), (2, g, 9), (3, y, 0), (4, g, 0)]:
        engine.enqueue(mid, pool, prov, priority=prio)
    assert engine.queued() == 4
    released = engine.due(T0, 10)
    assert [(mid, d.ip) for mid, d in released] == [(2, "192.0.2.1"), (3, "192.0.2.1")]
    assert engine.next_due_ms(T0) == T0 + 1000
    assert engine.due(T0 + 999, 10) == []
    assert [mid for mid, _ in engine.due(T0 + 1000, 10)] == [1]
    assert [mid for mid, _ in engine.due(T0 + 2000, 10)] == [4]
    assert engine.next_due_ms(T0 + 2000) is None
    assert engine.queued() == 0


def test_snapshot_is_plain_json_data(engine: Engine) -> None:
    """A snapshot survives a JSON round trip and restores to an engine that decides the same."""
    pool = engine.define_pool("p", [("192.0.2.1", 2, True), ("2001:db8::1", 1, False)])
    g = engine.provider("google")
    k = engine.key("192.0.2.1", "google")
    engine.set_limits(k, rate_count=10, rate_period_ms=1000, max_burst=3, daily_cap=100)
    engine.set_ip_caps("2001:db8::1", hourly_cap=50)
    engine.suspend(k, T0 + 100)
    engine.set_calendar([T0 + HOUR_MS], [T0 + DAY_MS])
    engine.enqueue(11, pool, g, priority=1)
    engine.acquire(k, 2, T0 + 200)
    state = json.loads(json.dumps(engine.snapshot()))
    restored = Engine()
    restored.restore(state)
    assert json.loads(json.dumps(restored.snapshot())) == state
    for t in range(T0, T0 + 5000, 97):
        assert engine.pick(pool, g, 1, t) == restored.pick(pool, g, 1, t)
    assert engine.due(T0 + 9000, 5) == restored.due(T0 + 9000, 5)


def test_corrupt_snapshot_leaves_engine_untouched(engine: Engine) -> None:
    """A snapshot with a bad field is rejected with its name, and the engine keeps its state."""
    k = engine.key("192.0.2.1", "google")
    engine.acquire(k, 3, T0)
    good = engine.snapshot()
    bad = dict(good, keys=[(0, 0, (0, 0, 0, None, None, 1_000_000, False), (0, 0, 0, 0))])
    with pytest.raises(CoreError, match="max_burst"):
        engine.restore(bad)
    bad = dict(good, ips=[("192.0.2.1", None, None, "many", 0)])
    with pytest.raises(CoreError, match="ips entry hour_used: has the wrong type"):
        engine.restore(bad)
    assert engine.snapshot() == good


def test_engine_is_safe_across_threads(engine: Engine) -> None:
    """Concurrent callers never exceed a cap: the engine serialises decisions internally."""
    k = engine.key("192.0.2.1", "google")
    engine.set_limits(k, daily_cap=1000)
    granted = []

    def worker() -> None:
        """Ask 500 times."""
        granted.append(sum(engine.acquire(k, 1, T0).granted for _ in range(500)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000


def test_decisions_do_not_leak(engine: Engine) -> None:
    """Creating many decisions and batches leaves no live objects behind."""
    k = engine.key("192.0.2.1", "google")
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(1000):
        engine.acquire(k, 1, T0)
        engine.acquire_batch(array.array("I", [k] * 8), T0)
    gc.collect()
    assert len(gc.get_objects()) - before < 50


def test_a_new_head_wakes_a_set_aside_queue(engine: Engine) -> None:
    """A more urgent message that can go is released even if its queue's old head is stuck,
    exactly as an engine restored from a snapshot would."""
    g = engine.provider("google")
    p = engine.define_pool("p", [("192.0.2.1", 1, False)])
    engine.set_limits(engine.key("192.0.2.1", "google"), daily_cap=1)
    engine.enqueue(1, p, g, priority=0, n=2)
    assert engine.due(T0, 10) == []
    assert engine.next_due_ms(T0) is None
    engine.enqueue(2, p, g, priority=1, n=1)
    twin = Engine()
    twin.restore(engine.snapshot())
    assert engine.next_due_ms(T0) == T0
    assert [m for m, _ in engine.due(T0, 10)] == [m for m, _ in twin.due(T0, 10)] == [2]


def test_restore_keeps_later_key_handles(engine: Engine) -> None:
    """After a restore, redefining a pool hands out the same new key handles as without it."""
    g = engine.provider("google")
    p = engine.define_pool("main", [("192.0.2.1", 1, False)])
    engine.enqueue(1, p, g)
    engine.due(T0, 10)
    twin = Engine()
    twin.restore(engine.snapshot())
    results = []
    for e in (engine, twin):
        e.define_pool("main", [("192.0.2.1", 1, False), ("192.0.2.2", 1, False)])
        results.append((e.key("198.51.100.9", "google"), e.pick(p, g, 1, T0).key))
    assert results[0] == results[1]


def test_bad_ip_caps_change_nothing(engine: Engine) -> None:
    """An IP cap too large for the engine is refused without registering the IP."""
    before = engine.snapshot()
    with pytest.raises(CoreError, match="hourly_cap: must be below"):
        engine.set_ip_caps("192.0.2.7", hourly_cap=2**32 - 1)
    assert engine.snapshot() == before


def test_restore_keeps_routes_of_known_providers_and_adds_none() -> None:
    """A restore moves routes to the restored engine's handles and never adds providers."""
    empty = Engine()
    empty.key("192.0.2.1", "google")
    snap = empty.snapshot()
    e = Engine()
    e.set_default_provider("default")
    e.set_route("gmail.com", "google", 2**40)
    e.set_route("yahoo.com", "yahoo", 2**40)
    e.restore(snap)
    assert e.snapshot() == snap  # no provider was added by the restore
    assert e.route("gmail.com", 0) == "google"
    assert e.route_count() == 1  # yahoo is unknown to the restored engine: its route is gone


VERSION_1_BYTES = bytes.fromhex(
    "4b494c4e534e415001000180dddb01000180b899290106676f6f676c6502093139322e302e322e3101f40300"
    "0202093139322e302e322e32000000000200000ae80703016401e807c0843d008092fd7b0202000100000001"
    "0000c0843d000000000001046d61696e0200010101020000010700000201"
)
"""`snapshot_bytes()` of an engine before snapshot version 2: key 0 (192.0.2.1, google) with
a daily cap of 1000 and 2 used, a pool and one queued message."""


def test_reservations_hold_keys_to_their_block_after_a_commit(engine: Engine) -> None:
    """A reservation snapshot gives each capped key a block; after its commit a key is denied
    past it with reason "reservation" and the commit's retry time; stale tokens are ignored."""
    k = engine.key("192.0.2.1", "google")
    free = engine.key("192.0.2.1", "yahoo")
    engine.set_limits(k, daily_cap=1000)
    engine.set_calendar([T0 + HOUR_MS], [T0 + DAY_MS])
    assert engine.usage(k)["reservation_left"] is None
    data, token = engine.reservation_snapshot(T0, 2000, floor=4)
    assert isinstance(data, bytes) and isinstance(token, int)
    assert engine.commit_reservation(token, 700)
    assert not engine.commit_reservation(token, 700)
    assert not engine.commit_reservation(token - 1, 700)
    assert engine.usage(k)["reservation_left"] == 4
    assert engine.usage(free)["reservation_left"] is None
    assert engine.acquire(k, 4, T0)
    d = engine.acquire(k, 1, T0)
    assert (d.granted, d.reason, d.retry_after_ms) == (0, "reservation", 700)
    assert engine.acquire(free, 10**6, T0)
    # The next block is at least twice what was granted since the last snapshot.
    _, token = engine.reservation_snapshot(T0 + 1000, 2000, floor=4)
    assert engine.commit_reservation(token, 700)
    assert engine.usage(k)["reservation_left"] == 8
    with pytest.raises(CoreError, match="now_ms: must not be negative"):
        engine.reservation_snapshot(-1, 2000)
    with pytest.raises(CoreError, match="floor: is too large"):
        engine.reservation_snapshot(T0, 2000, floor=2**32)


def test_restore_bytes_charges_the_reservation_at_now_ms(engine: Engine) -> None:
    """restore_bytes(data, now_ms) rolls the calendar and charges each key's block; without
    now_ms nothing is charged; a plain snapshot charges nothing and reserves nothing."""
    k = engine.key("192.0.2.1", "google")
    engine.set_limits(k, hourly_cap=500, daily_cap=1000)
    engine.set_calendar([T0 + HOUR_MS, T0 + 2 * HOUR_MS], [T0 + DAY_MS])
    assert engine.acquire(k, 100, T0)
    data, token = engine.reservation_snapshot(T0 + 10, 2000, floor=30)
    assert engine.commit_reservation(token, 1000)
    plain = engine.snapshot_bytes()
    restored = Engine()
    restored.restore_bytes(data, T0 + HOUR_MS + 5)
    u = restored.usage(k)
    assert (u["hour_used"], u["day_used"], u["ip_day_used"]) == (30, 130, 130)
    assert u["reservation_left"] == 0
    assert restored.acquire(k, 1, T0 + HOUR_MS + 5).reason == "reservation"
    _, token = restored.reservation_snapshot(T0 + HOUR_MS + 5, 2000, floor=30)
    assert restored.commit_reservation(token, 1000)
    assert restored.acquire(k, 1, T0 + HOUR_MS + 5)
    restored.restore_bytes(data)
    assert restored.usage(k)["day_used"] == 100
    restored.restore_bytes(plain, T0 + 5)
    assert restored.usage(k)["day_used"] == 100
    assert restored.usage(k)["reservation_left"] is None
    assert restored.acquire(k, 400, T0 + 5)


def test_tokens_from_before_a_restore_are_ignored(engine: Engine) -> None:
    """A reservation snapshot taken before a restore cannot be committed after it."""
    k = engine.key("192.0.2.1", "google")
    engine.set_limits(k, daily_cap=10)
    data, old = engine.reservation_snapshot(T0, 1000)
    engine.restore_bytes(data, T0)
    assert not engine.commit_reservation(old, 1000)
    _, new = engine.reservation_snapshot(T0, 1000)
    assert new > old
    assert engine.commit_reservation(new, 1000)


def test_old_and_corrupt_snapshot_bytes() -> None:
    """Version 1 bytes still restore (with and without now_ms); corrupt bytes are a CoreError
    that leaves the engine unchanged."""
    e = Engine()
    e.restore_bytes(VERSION_1_BYTES)
    assert e.snapshot()["version"] == 3
    assert e.usage(0)["day_used"] == 2 and e.usage(0)["daily_cap"] == 1000
    assert e.queued() == 1
    e.restore_bytes(VERSION_1_BYTES, 5)
    assert e.usage(0)["day_used"] == 2
    before = e.snapshot()
    for bad in (VERSION_1_BYTES[:-3], VERSION_1_BYTES[:8] + b"\x07" + VERSION_1_BYTES[9:], b"x"):
        with pytest.raises(CoreError, match=r"snapshot|version"):
            e.restore_bytes(bad, 5)
    assert e.snapshot() == before


def test_retain_ips_retires_the_rest(engine: Engine) -> None:
    """IPs not listed never grant (reason "retired"), in acquire, batches and pick; a bad
    address changes nothing; a later call listing them brings them back; snapshots keep it,
    and a version 1 snapshot (no retired_ips) still restores."""
    a = engine.key("192.0.2.1", "google")
    b = engine.key("192.0.2.2", "google")
    pool = engine.define_pool("p", [("192.0.2.2", 1, True), ("192.0.2.1", 1, False)])
    g = engine.provider("google")
    engine.set_limits(b, daily_cap=3)
    assert engine.retain_ips(["192.0.2.1"]) == ["192.0.2.2"]
    assert engine.retain_ips(["192.0.2.1", "192.0.2.77"]) == []
    d = engine.acquire(b, 1, T0)
    assert (d.granted, d.reason, d.retry_after_ms) == (0, "retired", None)
    assert engine.usage(b)["retired"] and not engine.usage(a)["retired"]
    assert engine.acquire_batch(array.array("I", [b, a]), T0).granted_counts() == [0, 1]
    assert all(engine.pick(pool, g, 1, T0).ip == "192.0.2.1" for _ in range(5))
    before = engine.snapshot()
    assert before["retired_ips"] == [1]
    with pytest.raises(CoreError, match="ip: must be an IPv4 or IPv6 address"):
        engine.retain_ips(["192.0.2.2", "nope"])
    assert engine.snapshot() == before
    twin = Engine()
    twin.restore(json.loads(json.dumps(before)))
    assert twin.snapshot() == before
    twin.restore_bytes(engine.snapshot_bytes())
    assert twin.snapshot() == before
    assert engine.retain_ips(["192.0.2.1", "192.0.2.2"]) == []
    assert engine.acquire(b, 3, T0) and engine.acquire(b, 1, T0).reason == "daily_cap"
    old = {k: v for k, v in before.items() if k != "retired_ips"}
    twin.restore(dict(old, version=1))
    assert twin.snapshot()["retired_ips"] == []


def test_active_hours_survive_snapshots(engine: Engine) -> None:
    """Active hours and the calendar's hours of day are in the snapshot (version 3): a JSON
    round trip and the bytes restore an engine that decides the same; version 2 data (no
    hours of day) restores with the hours unknown, and may not name active hours."""
    k = engine.key("192.0.2.1", "google")
    engine.set_limits(k, daily_cap=10, active_hours=1 << 9 | 1 << 10)
    hours = [T0 + i * HOUR_MS for i in range(4)]
    engine.set_calendar(hours, [T0 + DAY_MS], [8, 9, 10, 11])
    d = engine.acquire(k, 1, T0 + 5)
    assert (d.reason, d.retry_after_ms) == ("outside_active_hours", HOUR_MS - 5)
    snap = engine.snapshot()
    assert snap["version"] == 3 and snap["active_hours"] == [(k, 1 << 9 | 1 << 10)]
    assert (snap["hour_of_day"], snap["hour_pending_of_day"]) == (8, [9, 10, 11])
    assert engine.usage(k)["active_hours"] == 1 << 9 | 1 << 10
    twin, again = Engine(), Engine()
    twin.restore(json.loads(json.dumps(snap)))
    again.restore_bytes(engine.snapshot_bytes())
    assert twin.snapshot() == again.snapshot() == snap
    for t in (T0 + HOUR_MS - 1, T0 + HOUR_MS, T0 + 3 * HOUR_MS):
        assert engine.acquire(k, 1, t) == twin.acquire(k, 1, t) == again.acquire(k, 1, t)
    old = {
        key: value
        for key, value in snap.items()
        if key not in ("hour_of_day", "hour_pending_of_day", "active_hours")
    }
    twin.restore(dict(old, version=2))
    assert twin.snapshot()["hour_of_day"] is None and twin.usage(k)["active_hours"] is None
    with pytest.raises(CoreError, match="a version 2 snapshot has no hours of day"):
        twin.restore(dict(snap, version=2))
