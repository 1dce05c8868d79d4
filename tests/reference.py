"""A plain-Python model of kiln's engine, written from docs/core.md for reading.

`ReferenceEngine` has the method names and signatures of `kiln.Engine` and makes the same
decisions, with exact integer arithmetic and no cleverness: keys are dataclasses in a list,
calendar windows are lists of boundaries, the release queue is searched with `min()`. The
differential tests require the Rust engine to agree with it step for step, and the benchmarks
use it as the baseline. It imports nothing from kiln on purpose.

Where the page is silent, the model follows the engine and says so:
- `pick` and `enqueue` intern the key of every member on the pool's overflow chain (pool by
  pool, members in listed order) before deciding, and `define_pool` does the same for every
  (pool, provider) queue used so far, in the order the queues were first used. Handles are
  "first use" order, so this fixes which handle a new (ip, provider) gets.
- Calendar counters roll only in the calls that decide: `acquire`, `acquire_batch`, `pick`
  and `due` (not in `next_due_ms`, which decides nothing).

IP text is normalised with `ipaddress`, which writes ordinary IPv4 and IPv6 addresses as the
engine does (not IPv4-mapped IPv6 such as `::ffff:192.0.2.1`, which Rust keeps dotted).
"""

from __future__ import annotations

import builtins
import ipaddress
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "MAX_NOW_MS",
    "RefDecision",
    "RefError",
    "ReferenceEngine",
    "interval_ns",
    "multiplier_ppm",
    "scaled_cap",
]

MAX_NOW_MS = 9_000_000_000_000
"""Largest `now_ms` accepted (year 2255)."""
NS_PER_MS = 1_000_000
HOUR_MS = 3_600_000
PPM = 1_000_000
U32_MAX = 2**32 - 1
"""Counters saturate here; caps must stay below it (it is the engine's "no cap" sentinel)."""
U64_MAX = 2**64 - 1
EVERY_HOUR = 2**24 - 1
"""The active-hours mask of a key that may send at any hour (bit h: the local hour from h:00)."""


class RefError(ValueError):
    """Bad input to the model (the engine raises `CoreError`, also a `ValueError`)."""


@dataclass(frozen=True)
class RefDecision:
    """A decision with the fields of `kiln.Decision`."""

    granted: int
    reason: str
    retry_after_ms: int | None
    key: int
    ip: str
    tier: str

    def __bool__(self) -> bool:
        """True when granted, as for `kiln.Decision`."""
        return self.granted > 0


# ----- the arithmetic of docs/core.md -----


def multiplier_ppm(multiplier: float) -> int:
    """A multiplier in [0, 1] as parts per million: `floor(m * 1e6 + 0.5)`."""
    if not 0.0 <= multiplier <= 1.0:  # also rejects NaN
        raise RefError(f"multiplier must be in [0, 1], got {multiplier}")
    return math.floor(multiplier * 1_000_000.0 + 0.5)


def interval_ns(rate_count: int, rate_period_ms: int, ppm: int) -> int:
    """GCRA emission interval: `ceil(period_ms * 1e6 * 1e6 / (count * ppm))` nanoseconds."""
    return ceil_div(rate_period_ms * NS_PER_MS * PPM, rate_count * ppm)


def scaled_cap(cap: int | None, ppm: int) -> int | None:
    """A cap as enforced under a multiplier: `floor(cap * ppm / 1e6)`; None stays None."""
    return None if cap is None else cap * ppm // PPM


def ceil_div(a: int, b: int) -> int:
    """`ceil(a / b)` for non-negative integers, exactly."""
    return -(-a // b)


def check_count(name: str, value: int, *, low: int = 0, high: int = U64_MAX) -> int:
    """Reject a number outside [low, high] (the engine's unsigned arguments)."""
    if not low <= value <= high:
        raise RefError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_cap(name: str, cap: int | None) -> int | None:
    """A cap is None or an integer in [0, 2**32 - 1)."""
    if cap is not None:
        check_count(name, cap, high=U32_MAX - 1)
    return cap


def check_now(now_ms: int) -> int:
    """A time in [0, MAX_NOW_MS]."""
    return check_count("now_ms", now_ms, high=MAX_NOW_MS)


# ----- state -----


@dataclass
class Key:
    """One (ip, provider) key: its limits as set, and its counters."""

    ip: int
    provider: int
    rate_count: int | None = None
    rate_period_ms: int | None = None
    max_burst: int = 1
    hourly_cap: int | None = None
    daily_cap: int | None = None
    ppm: int = PPM
    paused: bool = False
    active_hours: int = EVERY_HOUR
    suspended_until_ms: int = 0
    tat_ns: int = 0
    hour_used: int = 0
    day_used: int = 0

    def interval_ns(self) -> int | None:
        """The emission interval T now, or None when the key has no rate (or is paused)."""
        if self.rate_count is None or self.rate_period_ms is None or self.is_paused():
            return None
        return interval_ns(self.rate_count, self.rate_period_ms, self.ppm)

    def is_paused(self) -> bool:
        """Paused by `pause`, or by a multiplier of 0."""
        return self.paused or self.ppm == 0


@dataclass
class Ip:
    """A sending IP: its caps across all providers and its counters."""

    addr: str
    hourly_cap: int | None = None
    daily_cap: int | None = None
    hour_used: int = 0
    day_used: int = 0


@dataclass
class Calendar:
    """Calendar hours (or days): the current window's start and the boundaries to come.

    Each hour also has its local hour of day (None: nobody said), which active hours are read
    against: `hour` for the current window, `pending_hours` for the boundaries to come. A
    local hour never lasts longer than an hour, so an hour of day holds until the next
    boundary and at most an hour after its own.
    """

    start_ms: int = 0
    pending: list[int] = field(default_factory=list)
    hour: int | None = None
    pending_hours: list[int | None] = field(default_factory=list)

    def set_pending(self, starts_ms: Sequence[int], hours: Sequence[int] | None = None) -> None:
        """Replace the boundaries to come; ones at or before the current start are dropped.
        With `hours`, a boundary equal to the current start names the current hour."""
        named: list[int | None] = [None] * len(starts_ms) if hours is None else list(hours)
        if hours is not None and self.start_ms in starts_ms:
            self.hour = named[list(starts_ms).index(self.start_ms)]
        kept = [(b, h) for b, h in zip(starts_ms, named, strict=True) if b > self.start_ms]
        self.pending = [b for b, _ in kept]
        self.pending_hours = [h for _, h in kept]

    def advance(self, now_ms: int) -> bool:
        """Consume every boundary `<= now_ms`; True if a new window began (reset counters)."""
        passed = [
            (b, h) for b, h in zip(self.pending, self.pending_hours, strict=True) if b <= now_ms
        ]
        kept = [(b, h) for b, h in zip(self.pending, self.pending_hours, strict=True) if b > now_ms]
        self.pending = [b for b, _ in kept]
        self.pending_hours = [h for _, h in kept]
        if passed and max(passed)[0] > self.start_ms:
            self.start_ms, self.hour = max(passed)
            return True
        return False

    def hour_at(self, t_ms: int) -> int | None:
        """The hour of day at `t_ms` (not before now): that of the last boundary at or before
        it, if that was less than an hour before."""
        start, hour = self.start_ms, self.hour
        for b, h in zip(self.pending, self.pending_hours, strict=True):
            if b <= t_ms:
                start, hour = b, h
        return hour if t_ms < start + HOUR_MS else None

    def next_open(self, mask: int, t_ms: int) -> int | None:
        """The first instant at or after `t_ms` in an hour of `mask` (an unknown hour is never
        one, unless the mask is every hour), or None if no pending boundary begins one."""

        def active(hour: int | None) -> bool:
            """Is `hour` in the mask?"""
            return mask == EVERY_HOUR or (hour is not None and mask >> hour & 1 == 1)

        if active(self.hour_at(t_ms)):
            return t_ms
        later = [
            b
            for b, h in zip(self.pending, self.pending_hours, strict=True)
            if b > t_ms and active(h)
        ]
        return later[0] if later else None

    def wait_ms(self, now_ms: int) -> int | None:
        """Time until the next boundary, or None when none is pending."""
        return self.pending[0] - now_ms if self.pending else None


@dataclass
class Pool:
    """A pool: (ip handle, weight, warming) members and an optional overflow pool handle."""

    name: str
    members: list[tuple[int, int, bool]]
    overflow: int | None


@dataclass
class Message:
    """A held message."""

    message_id: int
    seq: int
    priority: int
    n: int


@dataclass
class Queue:
    """The messages held for one (pool, provider), and whether the queue is set aside.

    `state` is "ready", "blocked" (until `wake_ms`) or "parked" (until something changes).
    """

    pool: int
    provider: int
    messages: list[Message] = field(default_factory=list)
    state: str = "ready"
    wake_ms: int = 0

    def head(self) -> Message:
        """The message that goes next: highest priority, then oldest."""
        return min(self.messages, key=lambda m: (-m.priority, m.seq))


Hold = tuple[str, int | None]
"""A limit that holds: (reason, wait in ms or None)."""


def longest_wait(holds: list[Hold]) -> int | None:
    """The wait of a denial: the largest among the holding limits, None if any is None."""
    waits = [wait for _, wait in holds]
    return None if None in waits else max(w for w in waits if w is not None)


# ----- the engine -----


class ReferenceEngine:
    """The model of `kiln.Engine`: same methods, same decisions, plain Python."""

    def __init__(self) -> None:
        """An empty engine: no keys, no calendar, no pools, nothing queued."""
        self.keys: list[Key] = []
        self.ips: list[Ip] = []
        self.providers: list[str] = []
        self.hours = Calendar()
        self.days = Calendar()
        self.pools: list[Pool] = []
        self.queues: list[Queue] = []
        self.next_seq = 0

    # ----- handles -----

    def ip_handle(self, ip: str) -> int:
        """Intern an IP by its normalised text."""
        addr = _normalise(ip)
        for handle, known in enumerate(self.ips):
            if known.addr == addr:
                return handle
        self.ips.append(Ip(addr))
        return len(self.ips) - 1

    def provider(self, name: str) -> int:
        """The handle of a provider name, interned on first use."""
        if not name:
            raise RefError("provider must not be empty")
        if name not in self.providers:
            self.providers.append(name)
        return self.providers.index(name)

    def key_of(self, ip: int, provider: int) -> int:
        """The handle of (ip handle, provider handle), interned on first use."""
        for handle, k in enumerate(self.keys):
            if (k.ip, k.provider) == (ip, provider):
                return handle
        self.keys.append(Key(ip, provider))
        return len(self.keys) - 1

    def key(self, ip: str, provider: str) -> int:
        """The handle of (ip, provider), interned on first use."""
        if not provider:
            raise RefError("provider must not be empty")
        return self.key_of(self.ip_handle(ip), self.provider(provider))

    def _key(self, key: int) -> Key:
        """The key behind a handle, or RefError."""
        if not 0 <= key < len(self.keys):
            raise RefError(f"unknown key {key}")
        return self.keys[key]

    def _check_provider(self, provider: int) -> None:
        """RefError unless `provider` is a known provider handle."""
        if not 0 <= provider < len(self.providers):
            raise RefError(f"unknown provider {provider}")

    # ----- limits: each successful change wakes the release queue -----

    def set_limits(
        self,
        key: int,
        *,
        rate_count: int | None = None,
        rate_period_ms: int | None = None,
        max_burst: int = 1,
        hourly_cap: int | None = None,
        daily_cap: int | None = None,
        active_hours: int | None = None,
    ) -> None:
        """Set rate, caps and active hours (a mask of local hours, None: every hour);
        multiplier, pause, suspension, counters and GCRA time stay."""
        k = self._key(key)
        if (rate_count is None) != (rate_period_ms is None):
            raise RefError("give rate_count and rate_period_ms together, or neither")
        if rate_count is not None and rate_period_ms is not None:
            check_count("rate_count", rate_count, low=1)
            check_count("rate_period_ms", rate_period_ms, low=1)
        check_count("max_burst", max_burst, low=1, high=U32_MAX)
        check_cap("hourly_cap", hourly_cap)
        check_cap("daily_cap", daily_cap)
        if active_hours is not None:
            check_count("active_hours", active_hours, high=EVERY_HOUR)
        self._check_interval(replace(k, rate_count=rate_count, rate_period_ms=rate_period_ms))
        k.rate_count, k.rate_period_ms, k.max_burst = rate_count, rate_period_ms, max_burst
        k.hourly_cap, k.daily_cap = hourly_cap, daily_cap
        k.active_hours = EVERY_HOUR if active_hours is None else active_hours
        self._wake_all()

    def set_multiplier(self, key: int, multiplier: float) -> None:
        """Slow a key's rate and caps to `multiplier` (held as ppm); 0 pauses it."""
        k = self._key(key)
        ppm = multiplier_ppm(multiplier)
        self._check_interval(replace(k, ppm=ppm))
        k.ppm = ppm
        self._wake_all()

    def pause(self, key: int) -> None:
        """Deny every request of `key` ("paused") until `resume`."""
        self._key(key).paused = True
        self._wake_all()

    def resume(self, key: int) -> None:
        """Lift a pause."""
        k = self._key(key)
        self._check_interval(replace(k, paused=False))
        k.paused = False
        self._wake_all()

    def suspend(self, key: int, until_ms: int) -> None:
        """Deny `key` until `until_ms` (exclusive); replaces the deadline; 0 lifts it."""
        k = self._key(key)
        k.suspended_until_ms = check_now(until_ms)
        self._wake_all()

    def set_ip_caps(
        self, ip: str, *, hourly_cap: int | None = None, daily_cap: int | None = None
    ) -> None:
        """Cap an IP's total over all providers per calendar hour and day."""
        check_cap("hourly_cap", hourly_cap)
        check_cap("daily_cap", daily_cap)
        slot = self.ips[self.ip_handle(ip)]
        slot.hourly_cap, slot.daily_cap = hourly_cap, daily_cap
        self._wake_all()

    def set_calendar(
        self,
        hour_starts_ms: Sequence[int],
        day_starts_ms: Sequence[int],
        hours_of_day: Sequence[int] | None = None,
    ) -> None:
        """The coming hour and day boundaries, each list strictly increasing, and the local
        hour of day each hour boundary begins (None: unknown)."""
        for starts in (hour_starts_ms, day_starts_ms):
            for b in starts:
                check_count("boundary", b)
            if any(a >= b for a, b in itertools.pairwise(starts)):
                raise RefError("calendar boundaries must be strictly increasing")
        if hours_of_day is not None:
            if len(hours_of_day) != len(hour_starts_ms):
                raise RefError("hours_of_day must give one hour per hour start")
            for h in hours_of_day:
                check_count("hours_of_day", h, high=23)
        self.hours.set_pending(hour_starts_ms, hours_of_day)
        self.days.set_pending(day_starts_ms)
        self._wake_all()

    @staticmethod
    def _check_interval(k: Key) -> None:
        """The engine stores T in 64 bits: a rate slower than that is bad input."""
        t = k.interval_ns()
        if t is not None and t > U64_MAX:
            raise RefError("rate interval overflows")

    # ----- the decision -----

    def _roll(self, now_ms: int) -> None:
        """Consume calendar boundaries up to `now_ms`, resetting counters of a new window."""
        slots: list[Key | Ip] = [*self.keys, *self.ips]
        if self.hours.advance(now_ms):
            for slot in slots:
                slot.hour_used = 0
        if self.days.advance(now_ms):
            for slot in slots:
                slot.day_used = 0

    def _holds(self, key: int, n: int, now_ms: int) -> list[Hold]:
        """Every limit of `key` that holds back `n` now, in the table order of docs/core.md.

        Outside its active hours a key holds with wait 0: `_wait` carries the longest wait on
        to the next active hour."""
        k = self.keys[key]
        ip = self.ips[k.ip]
        if k.is_paused():
            return [("paused", None)]
        holds: list[Hold] = []
        if self.hours.next_open(k.active_hours, now_ms) != now_ms:
            holds.append(("outside_active_hours", 0))
        if now_ms < k.suspended_until_ms:
            holds.append(("suspended", k.suspended_until_ms - now_ms))
        caps = [
            ("daily_cap", k.day_used, scaled_cap(k.daily_cap, k.ppm), self.days),
            ("hourly_cap", k.hour_used, scaled_cap(k.hourly_cap, k.ppm), self.hours),
            ("ip_daily_cap", ip.day_used, ip.daily_cap, self.days),
            ("ip_hourly_cap", ip.hour_used, ip.hourly_cap, self.hours),
        ]
        for reason, used, cap, window in caps:
            if cap is not None and used + n > cap:
                holds.append((reason, None if n > cap else window.wait_ms(now_ms)))
        t_ns = now_ms * NS_PER_MS
        interval = k.interval_ns()
        if interval is not None:
            burst = k.max_burst
            over = max(k.tat_ns, t_ns) + n * interval - (t_ns + burst * interval)
            if n > burst:
                holds.append(("rate", None))
            elif over > 0:
                holds.append(("rate", ceil_div(over, NS_PER_MS)))
        return holds

    def _wait(self, key: int, holds: list[Hold], now_ms: int) -> int | None:
        """When `key` is free of every hold: the longest wait, carried on to the start of the
        next active hour if it ends outside the key's active hours; None if none is known."""
        wait = longest_wait(holds)
        if wait is None:
            return None
        opens = self.hours.next_open(self.keys[key].active_hours, now_ms + wait)
        return None if opens is None else opens - now_ms

    def _decide(self, key: int, n: int, now_ms: int, tier: str) -> RefDecision:
        """Grant and charge `n` to `key` if no limit holds; else say why and for how long."""
        holds = self._holds(key, n, now_ms)
        ip = self.ips[self.keys[key].ip].addr
        if holds:
            return RefDecision(0, holds[0][0], self._wait(key, holds, now_ms), key, ip, tier)
        self._charge(key, n, now_ms)
        return RefDecision(n, "granted", 0, key, ip, tier)

    def _charge(self, key: int, n: int, now_ms: int) -> None:
        """Charge a grant: GCRA time (if there is a rate) and all four counters."""
        k = self.keys[key]
        interval = k.interval_ns()
        if interval is not None:
            k.tat_ns = max(k.tat_ns, now_ms * NS_PER_MS) + n * interval
        slot: Key | Ip
        for slot in (k, self.ips[k.ip]):
            slot.hour_used = min(slot.hour_used + n, U32_MAX)
            slot.day_used = min(slot.day_used + n, U32_MAX)

    def acquire(self, key: int, n: int, now_ms: int) -> RefDecision:
        """May `key` send `n` more at `now_ms`? All or nothing; charged when granted."""
        self._key(key)
        check_count("n", n, low=1, high=U32_MAX)
        self._roll(check_now(now_ms))
        return self._decide(key, n, now_ms, "direct")

    def acquire_batch(
        self, keys: Sequence[int], now_ms: int, counts: Sequence[int] | None = None
    ) -> list[RefDecision]:
        """`acquire` for each (key, n) in order, all validated before any is decided."""
        check_now(now_ms)
        ns = [1] * len(keys) if counts is None else list(counts)
        if len(ns) != len(keys):
            raise RefError("counts must have one count per key")
        for key, n in zip(keys, ns, strict=True):
            self._key(key)
            check_count("n", n, low=1, high=U32_MAX)
        self._roll(now_ms)
        return [self._decide(key, n, now_ms, "direct") for key, n in zip(keys, ns, strict=True)]

    # ----- pools -----

    def define_pool(
        self, name: str, members: Sequence[tuple[str, int, bool]], overflow: str | None = None
    ) -> int:
        """Define or redefine a pool of (ip, weight, warming); returns its handle."""
        overflow_handle = None if overflow is None else self.pool(overflow)
        addrs = [_normalise(ip) for ip, _, _ in members]
        if not name or not members:
            raise RefError("a pool needs a name and at least one member")
        if len(set(addrs)) != len(addrs):
            raise RefError("a pool lists an IP twice")
        for _, weight, _ in members:
            check_count("weight", weight, low=1, high=U32_MAX)
        names = [p.name for p in self.pools]
        handle = names.index(name) if name in names else len(self.pools)
        at = overflow_handle
        while at is not None:
            if at == handle:
                raise RefError(f"pool {name!r} would overflow into itself")
            at = self.pools[at].overflow
        pool = Pool(
            name,
            [(self.ip_handle(ip), w, warm) for ip, w, warm in members],
            overflow_handle,
        )
        if handle == len(self.pools):
            self.pools.append(pool)
        else:
            self.pools[handle] = pool
        # Keys are interned for queues that hold messages (an emptied queue is forgotten by a
        # snapshot, so interning for it would make handles differ after a restore).
        for q in self.queues:
            if q.messages:
                self._chain_keys(q.pool, q.provider)
        self._wake_all()
        return handle

    def pool(self, name: str) -> int:
        """The handle of a defined pool."""
        for handle, p in enumerate(self.pools):
            if p.name == name:
                return handle
        raise RefError(f"unknown pool {name!r}")

    def _chain(self, pool: int) -> list[int]:
        """`pool`, then its overflow pool, then that one's, and so on."""
        chain: list[int] = []
        at: int | None = pool
        while at is not None:
            chain.append(at)
            at = self.pools[at].overflow
        return chain

    def _chain_keys(self, pool: int, provider: int) -> None:
        """Intern the key of every member on the chain, in search order (the engine's habit)."""
        for p in self._chain(pool):
            for ip, _, _ in self.pools[p].members:
                self.key_of(ip, provider)

    def pick(self, pool: int, provider: int, n: int, now_ms: int) -> RefDecision:
        """Choose and charge the IP of `pool` (or its overflow chain) that carries `n`."""
        if not 0 <= pool < len(self.pools):
            raise RefError(f"unknown pool {pool}")
        check_count("n", n, low=1, high=U32_MAX)
        check_now(now_ms)
        self._check_provider(provider)
        self._chain_keys(pool, provider)
        self._roll(now_ms)
        return self._pick(pool, provider, n, now_ms)

    def _pick(self, pool: int, provider: int, n: int, now_ms: int) -> RefDecision:
        """The search of docs/core.md: warming then warm members, pool after pool."""
        soonest: tuple[int | None, str, int] | None = None  # (wait, reason, key)
        for p in self._chain(pool):
            members = self.pools[p].members
            for warming in (True, False):
                fits: list[tuple[int, int]] = []  # (key, weight)
                for ip, weight, is_warming in members:
                    if is_warming != warming:
                        continue
                    key = self.key_of(ip, provider)
                    holds = self._holds(key, n, now_ms)
                    if not holds:
                        fits.append((key, weight))
                        continue
                    wait = self._wait(key, holds, now_ms)
                    if soonest is None or _sooner(wait, soonest[0]):
                        soonest = (wait, holds[0][0], key)
                if fits:
                    best_key, best_weight = fits[0]
                    for key, weight in fits[1:]:
                        best_load = self.keys[best_key].day_used * weight
                        if self.keys[key].day_used * best_weight < best_load:
                            best_key, best_weight = key, weight
                    tier = "overflow" if p != pool else "warming" if warming else "warm"
                    return self._decide(best_key, n, now_ms, tier)
        assert soonest is not None, "pools are never empty"
        wait, reason, key = soonest
        return RefDecision(0, reason, wait, key, self.ips[self.keys[key].ip].addr, "direct")

    # ----- the release queue -----

    def enqueue(
        self, message_id: int, pool: int, provider: int, priority: int = 0, n: int = 1
    ) -> None:
        """Hold a message for (pool, provider); higher priority first, then FIFO."""
        check_count("message_id", message_id)
        check_count("n", n, low=1, high=U32_MAX)
        check_count("priority", priority, low=-(2**31), high=2**31 - 1)
        if not 0 <= pool < len(self.pools):
            raise RefError(f"unknown pool {pool}")
        self._check_provider(provider)
        self._chain_keys(pool, provider)
        queue = next((q for q in self.queues if (q.pool, q.provider) == (pool, provider)), None)
        if queue is None:
            queue = Queue(pool, provider)
            self.queues.append(queue)
        old_head = queue.head() if queue.messages else None
        queue.messages.append(Message(message_id, self.next_seq, priority, n))
        self.next_seq += 1
        if old_head is None or queue.head() is not old_head:
            # An empty queue, or a new head that may go where the old one could not.
            queue.state = "ready"

    def _wake_all(self) -> None:
        """Something changed that may free capacity: every set-aside queue is ready again."""
        for q in self.queues:
            q.state = "ready"

    def due(self, now_ms: int, max: int) -> list[tuple[int, RefDecision]]:
        """Release up to `max` held messages that may go at `now_ms`."""
        check_now(now_ms)
        check_count("max", max)
        self._roll(now_ms)
        for q in self.queues:
            if q.state == "blocked" and q.wake_ms <= now_ms:
                q.state = "ready"
        released: list[tuple[int, RefDecision]] = []
        while len(released) < max:
            ready = [q for q in self.queues if q.state == "ready" and q.messages]
            if not ready:
                break
            queue = min(ready, key=lambda q: (-q.head().priority, q.head().seq))
            head = queue.head()
            d = self._pick(queue.pool, queue.provider, head.n, now_ms)
            if d.granted:
                queue.messages.remove(head)
                released.append((head.message_id, d))
            elif d.retry_after_ms is None:
                queue.state = "parked"
            else:
                queue.state = "blocked"
                queue.wake_ms = now_ms + builtins.max(d.retry_after_ms, 1)
        return released

    def next_due_ms(self, now_ms: int) -> int | None:
        """`now_ms` if a queue is ready, else the earliest wake-up (not before now), else None."""
        check_count("now_ms", now_ms)
        if any(q.state == "ready" and q.messages for q in self.queues):
            return now_ms
        wakes = [q.wake_ms for q in self.queues if q.state == "blocked"]
        return max(min(wakes), now_ms) if wakes else None

    def queued(self) -> int:
        """How many messages are held."""
        return sum(len(q.messages) for q in self.queues)

    def usage(self, key: int) -> dict[str, Any]:
        """A key's limits and counters, in the shape of `kiln.Engine.usage`."""
        k = self._key(key)
        ip = self.ips[k.ip]
        return {
            "rate_count": k.rate_count,
            "rate_period_ms": k.rate_period_ms,
            "max_burst": k.max_burst,
            "hourly_cap": k.hourly_cap,
            "daily_cap": k.daily_cap,
            "multiplier": k.ppm / PPM,
            "paused": k.paused,
            "active_hours": None if k.active_hours == EVERY_HOUR else k.active_hours,
            "hour_used": k.hour_used,
            "day_used": k.day_used,
            "ip_hour_used": ip.hour_used,
            "ip_day_used": ip.day_used,
            "suspended_until_ms": k.suspended_until_ms,
            "tat_ns": k.tat_ns,
            # Reservations (reservation_snapshot) and retired IPs (retain_ips) are not
            # modelled: an engine that uses neither has no reservation and no retired key.
            "reservation_left": None,
            "retired": False,
        }


def _normalise(ip: str) -> str:
    """An IP's canonical text, or RefError."""
    try:
        return str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise RefError(f"ip must be an IPv4 or IPv6 address, got {ip!r}") from None


def _sooner(wait: int | None, than: int | None) -> bool:
    """Is `wait` strictly sooner than `than`? A known wait beats None; ties keep the first."""
    if wait is None:
        return False
    return than is None or wait < than
