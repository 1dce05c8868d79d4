"""Reservations: no cap is overshot across crashes, and they cost nothing in normal running.

A hypothesis state machine runs one daemon's engine over calendar hours and days: traffic
(`acquire`, `acquire_batch`, `pick`), limit changes, pauses, and flushes that take a
reservation snapshot (`reservation_snapshot`) which is then written and committed, written
only (the process dies before the commit, or the commit is late), or lost (the write
failed). The durable snapshot is the last one written. A crash, at any later time, is what
the daemon does on start: a new engine restored from the durable bytes at the restart
time (`restore_bytes(data, now_ms)`), the plan pushed again, and a snapshot written and
committed before traffic resumes. The machine keeps its own account of every grant, across
crashes, and checks that:

- no key grants more than its hourly cap in any calendar hour, nor its daily cap in any day,
  and no IP more than its IP caps, counting grants before and after every crash;
- a restore charges each capped key exactly its block (nothing for an uncapped key) on top of
  what the durable snapshot had counted in the windows current at the restart, and what the
  key was granted since that snapshot never exceeds its block: what a crash costs (the block
  minus what was granted) is at most the block.

A property test checks the other side: with a snapshot committed every interval, an engine
with reservations decides exactly as one without, while every key has a rate and the limits
stay (reservations cost nothing in normal running).
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kiln import Decision, Engine

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ORIGIN = T0 - T0 % DAY_MS
"""Midnight before T0: calendar hours and days are the grid `ORIGIN + i * HOUR_MS|DAY_MS`."""
INTERVAL_MS = 1_000
"""The daemon's snapshot interval; also the `retry_ms` of every commit."""
AHEAD_MS = 2_000
FLOOR = 2
"""Small, so that keys without a rate run into their reservation often."""

IPS = ("192.0.2.1", "192.0.2.2")
PROVIDERS = ("google", "yahoo")
KEYS = [(ip, p) for ip in IPS for p in PROVIDERS]
"""Every key, in handle order: interned first, so no later call adds one."""


def hour_of(t_ms: int) -> int:
    """Index of the calendar hour holding `t_ms`."""
    return (t_ms - ORIGIN) // HOUR_MS


def day_of(t_ms: int) -> int:
    """Index of the calendar day holding `t_ms`."""
    return (t_ms - ORIGIN) // DAY_MS


def supply_calendar(engine: Engine, now: int) -> None:
    """The grid's next 40 hour and 3 day boundaries after `now`, as the daemon keeps them."""
    next_hour = ORIGIN + (hour_of(now) + 1) * HOUR_MS
    next_day = ORIGIN + (day_of(now) + 1) * DAY_MS
    engine.set_calendar(
        [next_hour + i * HOUR_MS for i in range(40)], [next_day + i * DAY_MS for i in range(3)]
    )


@dataclass(frozen=True)
class Limits:
    """A key's limits as the plan sets them."""

    rate: tuple[int, int] | None = None
    max_burst: int = 1
    hourly_cap: int | None = None
    daily_cap: int | None = None
    paused: bool = False


@dataclass
class Durable:
    """The last snapshot written, and what the engine counted when it was taken."""

    data: bytes
    taken_ms: int
    grants_before: int
    """How many grants the machine had recorded when it was taken."""
    used: dict[tuple[object, str], int]
    """(key or ip, "hour" | "day") -> the engine's counter at the snapshot."""
    blocks: dict[int, int] = field(default_factory=dict)
    """Each key's block, as a restore at the snapshot's own time charges it."""


# ----- strategies -----

keys = st.integers(0, len(KEYS) - 1)
counts = st.sampled_from([1, 1, 1, 2, 3])
small_caps = st.integers(0, 12)
rates = st.none() | st.tuples(st.integers(1, 5), st.sampled_from([1_000, 5_000, 60_000]))
steps_ms = (
    st.sampled_from([1, 100, 500, 999, 1_000, 2_500])
    | st.integers(1, 60_000)
    | st.integers(1, 2 * HOUR_MS)
    | st.integers(1, 2 * DAY_MS)
)


class CrashMachine(RuleBasedStateMachine):
    """One daemon's engine under traffic, flushes and crashes."""

    def __init__(self) -> None:
        """Every key interned; limits, the pool and the first flush come in `setup`."""
        super().__init__()
        self.engine = Engine()
        self.now = T0
        for ip, provider in KEYS:
            self.engine.key(ip, provider)
        self.limits = [Limits() for _ in KEYS]
        self.capped = [False for _ in KEYS]
        """Keys with caps of their own (the others never get any)."""
        self.ip_caps: dict[str, tuple[int | None, int | None]] = dict.fromkeys(IPS, (None, None))
        self.grants: list[tuple[int, int, int]] = []
        """(key, now_ms, n) of every grant, across crashes."""
        self.windows: dict[tuple[object, str, int], int] = {}
        """Granted per (key or ip, "hour" | "day", window index), across crashes."""
        self.over: list[str] = []
        """Every grant that took a window past its cap."""
        self.durable: Durable | None = None
        self.crashes = 0

    # ----- the daemon's steps -----

    def push_plan(self) -> None:
        """What `apply` does: limits (and pauses) of every key, IP caps, the pool."""
        e = self.engine
        for key, lim in enumerate(self.limits):
            count, period = lim.rate if lim.rate is not None else (None, None)
            e.set_limits(
                key,
                rate_count=count,
                rate_period_ms=period,
                max_burst=lim.max_burst,
                hourly_cap=lim.hourly_cap,
                daily_cap=lim.daily_cap,
            )
            if lim.paused:
                e.pause(key)
            else:
                e.resume(key)
        for ip, (hourly, daily) in self.ip_caps.items():
            e.set_ip_caps(ip, hourly_cap=hourly, daily_cap=daily)
        e.define_pool("main", [(IPS[0], 1, True), (IPS[1], 1, False)])
        supply_calendar(e, self.now)

    def flush(self, outcome: str) -> None:
        """Take a reservation snapshot; "commit": write it and commit; "write": write it but
        do not commit (the process dies first, or the commit is late); "lost": the write
        failed."""
        data, token = self.engine.reservation_snapshot(self.now, AHEAD_MS, floor=FLOOR)
        if outcome == "lost":
            return
        used: dict[tuple[object, str], int] = {}
        for key, (ip, _) in enumerate(KEYS):
            u = self.engine.usage(key)
            used[key, "hour"], used[key, "day"] = u["hour_used"], u["day_used"]
            used[ip, "hour"], used[ip, "day"] = u["ip_hour_used"], u["ip_day_used"]
        durable = Durable(data, self.now, len(self.grants), used)
        scratch = Engine()
        scratch.restore_bytes(data, self.now)
        for key in range(len(KEYS)):
            u = scratch.usage(key)
            block = u["day_used"] - used[key, "day"]
            assert u["hour_used"] - used[key, "hour"] == block
            durable.blocks[key] = block
        self.durable = durable
        if outcome == "commit":
            assert self.engine.commit_reservation(token, INTERVAL_MS)

    def record(self, key: int, n: int) -> None:
        """Account for a grant of `n` to `key` now; note any window it takes past its cap."""
        ip = KEYS[key][0]
        lim = self.limits[key]
        ip_hourly, ip_daily = self.ip_caps[ip]
        self.grants.append((key, self.now, n))
        for who, kind, index, cap in [
            (key, "hour", hour_of(self.now), lim.hourly_cap),
            (key, "day", day_of(self.now), lim.daily_cap),
            (ip, "hour", hour_of(self.now), ip_hourly),
            (ip, "day", day_of(self.now), ip_daily),
        ]:
            total = self.windows.get((who, kind, index), 0) + n
            self.windows[who, kind, index] = total
            if cap is not None and total > cap:
                self.over.append(f"{who} {kind} {index}: {total} > {cap} (crashes {self.crashes})")

    def granted(self, d: Decision, n: int) -> None:
        """Record `d` if it granted; a denial by reservation names the commit's retry time."""
        if d:
            self.record(d.key, n)
        elif d.reason == "reservation":
            assert d.retry_after_ms is not None and d.retry_after_ms >= INTERVAL_MS

    # ----- rules -----

    @initialize(
        key_limits=st.lists(
            st.tuples(st.booleans(), rates, st.integers(1, 4), st.none() | small_caps, small_caps),
            min_size=len(KEYS),
            max_size=len(KEYS),
        ),
        ip_caps=st.none() | st.tuples(st.none() | st.integers(0, 20), st.integers(0, 30)),
    )
    def setup(
        self,
        key_limits: list[tuple[bool, tuple[int, int] | None, int, int | None, int]],
        ip_caps: tuple[int | None, int] | None,
    ) -> None:
        """Limits of every key (some capped, some never), maybe caps on the first IP, the
        pool, and the daemon's first flush, written and committed before any traffic."""
        for key, (capped, rate, burst, hourly, daily) in enumerate(key_limits):
            self.capped[key] = capped
            self.limits[key] = Limits(
                rate, burst, hourly if capped else None, daily if capped else None
            )
        if ip_caps is not None:
            self.ip_caps[IPS[0]] = ip_caps
        self.push_plan()
        self.flush("commit")

    @rule(dt=steps_ms)
    def advance(self, dt: int) -> None:
        """Time passes; the daemon keeps the calendar supplied."""
        self.now += dt
        supply_calendar(self.engine, self.now)

    @rule(day=st.booleans(), offset=st.integers(-1_500, 1_500))
    def advance_near_a_boundary(self, day: bool, offset: int) -> None:
        """Time passes to just before or after the next calendar hour (or day)."""
        length = DAY_MS if day else HOUR_MS
        boundary = ORIGIN + ((self.now - ORIGIN) // length + 1) * length
        self.now = max(self.now, boundary + offset)
        supply_calendar(self.engine, self.now)

    @rule(outcome=st.sampled_from(["commit", "commit", "commit", "write", "lost"]))
    def flush_counters(self, outcome: str) -> None:
        """The daemon's periodic flush."""
        self.flush(outcome)

    @rule(key=keys, n=counts, times=st.integers(1, 8), gap=st.sampled_from([0, 1, 50, 400]))
    def acquire(self, key: int, n: int, times: int, gap: int) -> None:
        """Ask for n on one key, a few times in a row, `gap` ms apart."""
        for _ in range(times):
            self.granted(self.engine.acquire(key, n, self.now), n)
            self.now += gap

    @rule(batch=st.lists(keys, min_size=1, max_size=8))
    def acquire_batch(self, batch: list[int]) -> None:
        """One batch of single messages."""
        for d in self.engine.acquire_batch(array.array("I", batch), self.now):
            self.granted(d, 1)

    @rule(provider=st.sampled_from(PROVIDERS), n=counts, times=st.integers(1, 6))
    def pick(self, provider: str, n: int, times: int) -> None:
        """Let the engine choose an IP of the pool (warming first, then warm)."""
        pool, prov = self.engine.pool("main"), self.engine.provider(provider)
        for _ in range(times):
            self.granted(self.engine.pick(pool, prov, n, self.now), n)

    @rule(
        key=keys,
        rate=rates,
        burst=st.integers(1, 4),
        hourly=st.none() | small_caps,
        daily=small_caps,
    )
    def reload(
        self, key: int, rate: tuple[int, int] | None, burst: int, hourly: int | None, daily: int
    ) -> None:
        """A plan reload changes one key's rate and caps (a capped key stays capped)."""
        capped = self.capped[key]
        self.limits[key] = replace(
            self.limits[key],
            rate=rate,
            max_burst=burst,
            hourly_cap=hourly if capped else None,
            daily_cap=daily if capped else None,
        )
        self.push_plan()

    @rule(key=keys, paused=st.booleans())
    def pause_or_resume(self, key: int, paused: bool) -> None:
        """Policy pauses or resumes a key."""
        self.limits[key] = replace(self.limits[key], paused=paused)
        self.push_plan()

    @rule(delay=st.sampled_from([0, 1, 400, 1_000]) | st.integers(1, 30 * HOUR_MS))
    def crash(self, delay: int) -> None:
        """SIGKILL, and a restart `delay` ms later: restore the durable snapshot at the restart
        time, push the plan, write and commit a snapshot before serving."""
        durable = self.durable
        assert durable is not None
        self.now += delay
        self.crashes += 1
        restored = Engine()
        restored.restore_bytes(durable.data, self.now)
        since = self.grants[durable.grants_before :]
        for key, (ip, _) in enumerate(KEYS):
            block = durable.blocks[key]
            if not self.capped[key] and self.ip_caps[ip] == (None, None):
                assert block == 0, "an uncapped key reserves nothing"
            else:
                granted_since = sum(n for k, _, n in since if k == key)
                assert granted_since <= block, (key, granted_since, block)
            ip_block = sum(durable.blocks[k] for k, (i, _) in enumerate(KEYS) if i == ip)
            u = restored.usage(key)
            for kind, of, used, ip_used in [
                ("hour", hour_of, u["hour_used"], u["ip_hour_used"]),
                ("day", day_of, u["day_used"], u["ip_day_used"]),
            ]:
                same = of(durable.taken_ms) == of(self.now)
                assert used == (durable.used[key, kind] if same else 0) + block, (key, kind)
                assert ip_used == (durable.used[ip, kind] if same else 0) + ip_block, (ip, kind)
        self.engine = restored
        self.push_plan()
        self.flush("commit")

    # ----- invariants -----

    @invariant()
    def no_window_ever_grants_more_than_its_cap(self) -> None:
        """Counted over the grid's hours and days, across every crash, for keys and IPs."""
        assert not self.over, self.over


TestReservationsAcrossCrashes = CrashMachine.TestCase
TestReservationsAcrossCrashes.settings = settings(
    stateful_step_count=60, max_examples=150, deadline=None
)


@settings(max_examples=200, deadline=None)
@given(
    key_limits=st.lists(
        st.tuples(
            st.tuples(st.integers(1, 20), st.sampled_from([1_000, 10_000, 60_000])),
            st.integers(1, 6),
            st.none() | st.integers(0, 60),
            st.none() | st.integers(0, 200),
        ),
        min_size=len(KEYS),
        max_size=len(KEYS),
    ),
    ip_daily=st.none() | st.integers(0, 300),
    requests=st.lists(
        st.tuples(
            st.sampled_from([0, 0, 1, 30, 200, 999, 1_000, 1_001, 5_000])
            | st.integers(0, HOUR_MS // 2),
            st.integers(0, len(KEYS) - 1),
            st.integers(1, 4),
        ),
        max_size=150,
    ),
)
def test_reservations_cost_nothing_while_commits_keep_up(
    key_limits: list[tuple[tuple[int, int], int, int | None, int | None]],
    ip_daily: int | None,
    requests: list[tuple[int, int, int]],
) -> None:
    """With a snapshot committed every interval (and `ahead_ms` beyond the next one), an
    engine with reservations makes exactly the decisions of one without: a key with a rate
    never reaches its reservation while the rate and caps hold it anyway."""
    engines = [Engine(), Engine()]
    for e in engines:
        for ip, provider in KEYS:
            e.key(ip, provider)
        for key, ((count, period), burst, hourly, daily) in enumerate(key_limits):
            e.set_limits(
                key,
                rate_count=count,
                rate_period_ms=period,
                max_burst=burst,
                hourly_cap=hourly,
                daily_cap=daily,
            )
        e.set_ip_caps(IPS[0], daily_cap=ip_daily)
        supply_calendar(e, T0)
    reserving = engines[0]
    now = T0
    next_flush = T0

    def flush_until(t: int) -> None:
        """Every flush due by `t`, each at its own time, written and committed at once."""
        nonlocal next_flush
        while next_flush <= t:
            _, token = reserving.reservation_snapshot(next_flush, AHEAD_MS, floor=0)
            assert reserving.commit_reservation(token, INTERVAL_MS)
            next_flush += INTERVAL_MS

    decisions: list[Any] = []
    for dt, key, n in requests:
        now += dt
        flush_until(now)
        got = [e.acquire(key, n, now) for e in engines]
        a, b = ((d.granted, d.reason, d.retry_after_ms) for d in got)
        assert a == b, (now, key, n, a, b)
        decisions.append(a)
    assert all(d[1] != "reservation" for d in decisions)
