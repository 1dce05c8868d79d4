"""Load generator for the native JSON-lines socket, run as its own process.

    python benches/loadgen.py --socket PATH [--connections 1] [--depth 1] [--seconds 2]
        [--warmup-seconds 0.3] [--pid PID] [--check-ids] [--cpu N]

Keeps `depth` requests in flight on each of `connections` Unix-socket connections: it writes
`depth` request lines, then one more for every reply line that comes back (a sliding window,
so the server never waits for the client to refill a whole window). After the warm-up it
counts the replies received for `seconds`, then stops asking, reads every reply still owed,
closes, and prints one JSON object on stdout (see `LoadResult`).

Nothing here shares the server's event loop: one connection is a blocking socket and a
`recv` loop; more connections share one `selectors` loop in this process. Requests are
built once, so the client spends its core on system calls and `bytes.count`, not on JSON.

Every reply line is checked, warm-up and drain included: a line that does not open with
`{"ok":true` is an error, and a reply that never comes is `lost`. With `--check-ids` every
request carries a sequence number as its `id` and every reply is parsed, so replies out of
order show up too (slow: for tests, not for timing). Round trips (p50, p99) are measured at
depth 1 only, from the write of a request to the read that completes its reply.
With `--pid`, the server's CPU time in the timed window is read from /proc/PID/stat; with
`--cpu N` this process runs on CPU N only (benches/daemon_bench.py's pinned modes).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["REQUEST", "LoadResult", "count_replies", "run_load", "server_cpu_s"]

REQUEST = b'{"op":"acquire","ip":"192.0.2.10","domain":"gmail.com","n":1}\n'
"""The request every connection sends: a single-message acquire on the bench plan's warm IP."""

_REQUEST_WITH_ID = '{"op":"acquire","id":%d,"ip":"192.0.2.10","domain":"gmail.com","n":1}\n'
_OK = b'{"ok":true'
_GRANTED = b',"granted":1,'
_RECV_BYTES = 1 << 16
"""Bytes per `recv`: above glibc's mmap threshold (128 KiB) every call would map and unmap."""
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S  # utime, stime


def count_replies(partial: bytes, data: bytes) -> tuple[bytes, int, int, int]:
    """Count the complete reply lines in `partial + data` without parsing them.

    Returns (the new partial line, lines, lines opening with `{"ok":true`, grants of one).
    `{"ok":true` cannot occur inside a JSON reply except at its start (a string would escape
    the quotes), so counting it counts ok replies exactly; a line cut anywhere by a read,
    even inside that prefix, is held back whole until its newline arrives.
    """
    buf = partial + data if partial else data
    end = buf.rfind(b"\n") + 1
    if end < len(buf):
        partial = buf[end:]
        buf = buf[:end]
    else:
        partial = b""
    if not end:
        return partial, 0, 0, 0
    return partial, buf.count(b"\n"), buf.count(_OK), buf.count(_GRANTED)


@dataclass
class LoadResult:
    """What one run measured. Counts cover the timed window unless named otherwise."""

    connections: int
    depth: int
    seconds: float
    requests: int
    """Replies received in the timed window: each one a decision."""
    decisions_per_s: float
    p50_us: float | None
    p99_us: float | None
    latency_samples: int
    granted: int
    """Replies (whole run) that granted the message."""
    errors: int
    """Reply lines (whole run) that did not open with `{"ok":true`."""
    out_of_order: int
    """Replies whose `id` was not the next one sent (only with `--check-ids`)."""
    lost: int
    """Replies still owed when the drain gave up."""
    replies_total: int
    server_cpu_us_per_decision: float | None
    client_cpu_us_per_decision: float


@dataclass
class _Conn:
    """One connection's state: replies owed, a partial reply line, the next ids."""

    sock: socket.socket
    in_flight: int = 0
    partial: bytes = b""
    sent_ns: int = 0
    next_id: int = 0
    expect_id: int = 0


@dataclass
class _Tally:
    """Counts over the whole run."""

    replies: int = 0
    ok: int = 0
    granted: int = 0
    out_of_order: int = 0
    latencies_ns: list[int] = field(default_factory=list)


class _Load:
    """The connections and the two ways of writing requests and checking replies."""

    def __init__(self, path: Path, connections: int, depth: int, check_ids: bool) -> None:
        self.depth = depth
        self.check_ids = check_ids
        self.tally = _Tally()
        # Request bytes for every count a refill can need, built once.
        self.blocks = [REQUEST * k for k in range(depth + 1)]
        self.conns: list[_Conn] = []
        try:
            for _ in range(connections):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.conns.append(_Conn(sock))
                sock.connect(str(path))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close every connection."""
        for c in self.conns:
            c.sock.close()

    def send(self, c: _Conn, count: int) -> None:
        """Write `count` more requests on `c` (never more than `depth` are owed, so the
        socket buffer always has room and a blocking write cannot stall)."""
        if self.check_ids:
            first = c.next_id
            c.next_id += count
            data = "".join([_REQUEST_WITH_ID % i for i in range(first, c.next_id)]).encode()
        else:
            data = self.blocks[count]
        c.sent_ns = time.perf_counter_ns()
        c.sock.sendall(data)
        c.in_flight += count

    def received(self, c: _Conn, data: bytes) -> int:
        """Check the complete reply lines in `c`'s partial line plus `data`; return how many."""
        t = self.tally
        if self.check_ids:
            buf = c.partial + data
            end = buf.rfind(b"\n") + 1
            c.partial = buf[end:]
            lines = buf[:end].splitlines()
            for line in lines:
                reply = json.loads(line)
                t.ok += reply.get("ok") is True
                t.granted += reply.get("granted") == 1
                t.out_of_order += reply.get("id") != c.expect_id
                c.expect_id += 1
            n = len(lines)
        else:
            c.partial, n, ok, granted = count_replies(c.partial, data)
            t.ok += ok
            t.granted += granted
        t.replies += n
        c.in_flight -= n
        return n


def _cpu_or_zero(pid: int | None) -> float:
    """`server_cpu_s(pid)`, or 0.0 when no server process was named."""
    return server_cpu_s(pid) if pid else 0.0


def _window(
    load: _Load, warmup_s: float, seconds: float, pid: int | None
) -> tuple[int, float, float]:
    """Run until the timed window ends; return the replies counted in it, its length as
    measured (it ends at the first read after `seconds`), and the server's CPU seconds in it."""
    t = load.tally
    depth = load.depth
    latencies = t.latencies_ns
    start = time.perf_counter()
    t0 = start + warmup_s
    t1 = t0 + seconds
    timing = False
    counted = 0
    cpu0 = 0.0
    for c in load.conns:
        load.send(c, depth)
    if len(load.conns) == 1:
        (c,) = load.conns
        recv = c.sock.recv
        while True:
            data = recv(_RECV_BYTES)
            if not data:
                raise ConnectionError("the server closed the connection")
            n = load.received(c, data)
            if n:
                now_ns = time.perf_counter_ns()
                if timing and depth == 1:
                    latencies.append(now_ns - c.sent_ns)
                now = now_ns / 1e9
                if not timing and now >= t0:
                    timing, counted, cpu0 = True, t.replies, _cpu_or_zero(pid)
                    t0, t1 = now, now + seconds
                elif timing and now >= t1:
                    t1 = now
                    break
                load.send(c, n)
    else:
        sel = selectors.DefaultSelector()
        try:
            for c in load.conns:
                sel.register(c.sock, selectors.EVENT_READ, c)
            while True:
                for key, _ in sel.select():
                    c = key.data
                    data = c.sock.recv(_RECV_BYTES)
                    if not data:
                        raise ConnectionError("the server closed a connection")
                    n = load.received(c, data)
                    if n:
                        if timing and depth == 1:
                            latencies.append(time.perf_counter_ns() - c.sent_ns)
                        load.send(c, n)
                now = time.perf_counter()
                if not timing and now >= t0:
                    timing, counted, cpu0 = True, t.replies, _cpu_or_zero(pid)
                    t0, t1 = now, now + seconds
                elif timing and now >= t1:
                    t1 = now
                    break
        finally:
            sel.close()
    cpu = _cpu_or_zero(pid) - cpu0
    return t.replies - counted, t1 - t0, cpu


def _drain(load: _Load, timeout_s: float) -> int:
    """Read every reply still owed; return how many never came."""
    deadline = time.monotonic() + timeout_s
    for c in load.conns:
        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while c.in_flight > 0:
                data = c.sock.recv(_RECV_BYTES)
                if not data:
                    break
                load.received(c, data)
        except TimeoutError:
            pass
    return sum(max(0, c.in_flight) for c in load.conns)


def _percentile_us(sorted_ns: list[int], q: float) -> float | None:
    """The q-quantile (nearest rank) in microseconds, or None without samples."""
    if not sorted_ns:
        return None
    rank = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e3


def run_load(
    path: Path,
    *,
    connections: int = 1,
    depth: int = 1,
    seconds: float = 2.0,
    warmup_s: float = 0.3,
    pid: int | None = None,
    check_ids: bool = False,
    drain_timeout_s: float = 10.0,
) -> LoadResult:
    """Drive the server on `path` and report; see the module docstring."""
    if connections < 1 or depth < 1 or seconds <= 0:
        raise ValueError("connections and depth must be >= 1 and seconds > 0")
    load = _Load(path, connections, depth, check_ids)
    try:
        cpu_start = time.process_time()
        requests, window_s, server_cpu = _window(load, warmup_s, seconds, pid)
        client_cpu = time.process_time() - cpu_start
        replies_in_loop = load.tally.replies
        lost = _drain(load, drain_timeout_s)
    finally:
        load.close()
    t = load.tally
    lat = sorted(t.latencies_ns)
    return LoadResult(
        connections=connections,
        depth=depth,
        seconds=window_s,
        requests=requests,
        decisions_per_s=requests / window_s,
        p50_us=_percentile_us(lat, 0.50),
        p99_us=_percentile_us(lat, 0.99),
        latency_samples=len(lat),
        granted=t.granted,
        errors=t.replies - t.ok,
        out_of_order=t.out_of_order,
        lost=lost,
        replies_total=t.replies,
        server_cpu_us_per_decision=server_cpu * 1e6 / requests if pid and requests else None,
        # Known for the whole loop only (warm-up included): spread over its replies.
        client_cpu_us_per_decision=client_cpu * 1e6 / max(1, replies_in_loop),
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the result as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", type=Path, required=True, help="the server's Unix socket")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the timed window")
    parser.add_argument("--warmup-seconds", type=float, default=0.3)
    parser.add_argument("--pid", type=int, help="server process whose CPU time to report")
    parser.add_argument("--check-ids", action="store_true", help="number requests, check order")
    parser.add_argument("--cpu", type=int, help="run on this CPU only (default: any)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    result = run_load(
        args.socket,
        connections=args.connections,
        depth=args.depth,
        seconds=args.seconds,
        warmup_s=args.warmup_seconds,
        pid=args.pid,
        check_ids=args.check_ids,
    )
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
