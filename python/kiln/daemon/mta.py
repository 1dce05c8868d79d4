"""The MTA socket served by the Rust core on a thread of its own (`_core.MtaServer`).

Decisions (`acquire`, `pick`, `report`, `route`, `classify`, `ping`) are read, answered and
written on that thread: they never wait for this event loop, its jobs, operator requests or
the GIL. The lines the core hands up come here: the loop watches the server's notify
descriptor, takes the waiting upcalls and answers each as a task (operator operations are
refused, as on the asyncio MTA socket); the reply goes back to the thread, which then goes
on with that connection's later lines. docs/daemon.md, "Latency", says why.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import _core
from kiln.clock import ScaledClock, SystemClock
from kiln.daemon.listener import answer_upcall, op_of, prepare_socket_path, refusal
from kiln.daemon.ops import MTA_UPCALL_OPS

if TYPE_CHECKING:
    from kiln.clock import Clock
    from kiln.daemon.core import Daemon

__all__ = ["RustMtaSocket", "clock_spec"]


def clock_spec(clock: Clock) -> tuple[int, int, int, int, int] | None:
    """The clock as the serving thread computes it: None for the system clock, else a
    `ScaledClock`'s (start_ms, num, den, anchor_ns, monotonic ns now). ValueError for a
    clock the thread cannot follow (a test's hand-moved clock)."""
    if isinstance(clock, SystemClock):
        return None
    if isinstance(clock, ScaledClock) and clock.monotonic_ns is time.monotonic_ns:
        start_ms, num, den, anchor_ns = clock.linear()
        return start_ms, num, den, anchor_ns, time.monotonic_ns()
    raise ValueError(f"the MTA socket's thread cannot read a {type(clock).__name__}")


class RustMtaSocket:
    """The MTA socket: `_core.MtaServer` plus the loop's side of its upcalls."""

    def __init__(self, d: Daemon, path: Path, backlog: int) -> None:
        prepare_socket_path(path)
        self.daemon = d
        self.server = _core.MtaServer(
            d.engine,
            str(path),
            backlog=backlog,
            max_connections=d.max_connections,
            clock=clock_spec(d.clock),
        )
        self._fd = self.server.notify_fd()
        self._refused = 0
        self._failures = 0
        asyncio.get_running_loop().add_reader(self._fd, self._take)

    @property
    def connections(self) -> int:
        """Connections open on the MTA socket now."""
        return int(self.server.counters()["connections"])

    @property
    def running(self) -> bool:
        """Whether the serving thread is up (the watchdog is fed only then)."""
        return bool(self.server.counters()["running"])

    def _take(self) -> None:
        """Upcalls wait: answer each as a task (one at a time per connection, by design of
        the thread: a connection's later lines wait for its reply); log new refusals."""
        self.check()
        for conn, line in self.server.take_upcalls():
            _ = self.daemon.spawn(self._answer(conn, line))

    async def _answer(self, conn: int, line: bytes) -> None:
        """Answer one upcall and hand the reply to the thread."""
        if op_of(line) not in MTA_UPCALL_OPS:
            out = refusal(line)
        else:
            out = await answer_upcall(self.daemon, line)
        self.server.reply(conn, out)

    def check(self) -> None:
        """Log refusals and accept failures since the last check (at most every few
        seconds, as the asyncio listener does); called when the thread wakes the loop and by
        the 1 Hz tick."""
        counters = self.server.counters()
        d = self.daemon
        if counters["refused"] > self._refused:
            self._refused = int(counters["refused"])
            d.warn_repeated(
                "connection_refused",
                limit=d.max_connections,
                hint="at the connection limit (--max-connections); open ones are still served",
            )
        if counters["accept_failures"] > self._failures:
            self._failures = int(counters["accept_failures"])
            d.warn_repeated(
                "accept_failed",
                error=counters["last_error"],
                hint="out of file descriptors or memory; open connections are still served",
            )
        if not counters["running"]:
            d.warn_repeated("mta_socket_thread_stopped", hint="decisions are not answered")

    def close(self) -> None:
        """Stop serving (connections closed, thread joined)."""
        asyncio.get_running_loop().remove_reader(self._fd)
        self.server.stop()
