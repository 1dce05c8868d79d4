"""Liveness: the event loop's stalls, measured, and systemd's watchdog, fed only by a live loop.

A throttle daemon that stops answering is the worst failure kiln can have: the MTAs either
stop their mail or, failing open, let warming IPs send unthrottled. Two guards:

- `LoopMonitor` wakes every few milliseconds on the loop and records how late it woke: the
  loop's worst stall since start and in the last minute, and how many stalls passed 50 ms and
  1 s. `kiln status` shows them.
- `Notifier` speaks systemd's notify protocol (`sd_notify`): `READY=1` once listening,
  `WATCHDOG=1` at half the unit's `WatchdogSec=`, `STOPPING=1` at shutdown. The daemon sends
  `WATCHDOG=1` only from the loop and only right after a real engine call answered, so a loop
  that hangs (or an engine that cannot be entered) stops the pings and systemd restarts kiln.

Nothing here reads wall time except through the loop's monotonic clock; nothing touches the
engine (the daemon passes a probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["LoopMonitor", "Notifier", "StallFigures"]

#: How often the monitor wakes (seconds): a stall shorter than this is not seen.
TICK_S = 0.01
#: Stalls longer than these are counted.
SLOW_MS = 50
VERY_SLOW_MS = 1_000


@dataclass(frozen=True, slots=True)
class StallFigures:
    """What the loop monitor saw: the worst lateness of a wake-up, in ms."""

    worst_ms: float
    worst_last_minute_ms: float
    over_50ms: int
    over_1s: int

    def to_json(self) -> dict[str, float | int]:
        """For `status`."""
        return {
            "worst_stall_ms": round(self.worst_ms, 1),
            "worst_stall_last_minute_ms": round(self.worst_last_minute_ms, 1),
            "stalls_over_50ms": self.over_50ms,
            "stalls_over_1s": self.over_1s,
        }


class LoopMonitor:
    """Measures how late the loop wakes a sleeping task; run `run()` as a task."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self.worst_ms = 0.0
        self.over_50ms = 0
        self.over_1s = 0
        # (loop time, stall ms) of wake-ups later than one tick, for the last minute.
        self._recent: deque[tuple[float, float]] = deque(maxlen=6_000)

    async def run(self) -> None:
        """Sleep a tick at a time forever, recording each wake-up's lateness."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick_s)
            self.record(loop.time(), (loop.time() - before - self.tick_s) * 1000)

    def record(self, at_s: float, stall_ms: float) -> None:
        """One wake-up `stall_ms` late at loop time `at_s`."""
        if stall_ms <= self.tick_s * 1000:
            return
        self.worst_ms = max(self.worst_ms, stall_ms)
        self.over_50ms += stall_ms > SLOW_MS
        self.over_1s += stall_ms > VERY_SLOW_MS
        self._recent.append((at_s, stall_ms))

    def figures(self, now_s: float) -> StallFigures:
        """The figures at loop time `now_s`."""
        recent = [ms for at, ms in self._recent if at >= now_s - 60]
        return StallFigures(self.worst_ms, max(recent, default=0.0), self.over_50ms, self.over_1s)


class Notifier:
    """systemd's notify protocol; does nothing when not run by systemd with `Type=notify`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s: float | None = (
            int(usec) / 1_000_000 if usec.isdigit() and int(usec) > 0 and mine else None
        )
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return bool(self.address)

    def notify(self, message: str) -> bool:
        """Send one notification (e.g. `READY=1`); False when nobody listens or it failed."""
        if not self.address:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            return False
        return True

    async def feed(self, probe: Callable[[], bool]) -> None:
        """Forever: at half the watchdog interval, send `WATCHDOG=1` if `probe()` (a real
        engine call, made here on the loop) says the engine answered."""
        if self.watchdog_s is None:
            return
        while True:
            await asyncio.sleep(self.watchdog_s / 2)
            if probe():
                self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the datagram socket."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
