"""`_core.MtaServer`: the MTA socket served by a Rust thread, driven from Python by hand
(no daemon, no event loop), over a real Unix socket."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kiln import _core
from kiln.clock import ScaledClock, SystemClock
from kiln.daemon.mta import clock_spec
from test_protocol import NOW_MS, _streams, feed, make_engine, upcall_reply

#: A client in its own process (it must not need this process's GIL): `n` pings, one at a
#: time, then prints how many were answered and the slowest round trip in ms.
PINGER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
print("connected", flush=True)
n, worst, answered = int(sys.argv[2]), 0.0, 0
f = s.makefile("rb")
for _ in range(n):
    t = time.monotonic()
    s.sendall(b'{"op":"ping"}\\n')
    if f.readline() == b'{"ok":true}\\n':
        answered += 1
    worst = max(worst, time.monotonic() - t)
    time.sleep(0.002)
print(answered, worst * 1000, flush=True)
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_core.MtaServer, _core.Engine, Path]]:
    """An engine whose `stats` is an upcall, served at a socket in `tmp_path`."""
    engine = _core.Engine()
    engine.set_upcall_ops(["stats"])
    path = tmp_path / "kiln.sock"
    server = _core.MtaServer(engine, str(path), backlog=16, max_connections=8)
    try:
        yield server, engine, path
    finally:
        server.stop()


def test_decisions_are_answered_while_python_holds_the_gil(
    served: tuple[_core.MtaServer, _core.Engine, Path],
) -> None:
    """With this process's only Python thread spinning and the switch interval at 1 s (a
    thread that needed the GIL would wait up to a second for it), a client in another
    process gets every ping answered within milliseconds: the path needs no Python."""
    _, _, path = served
    client = subprocess.Popen(  # noqa: S603 (our interpreter, our script)
        [sys.executable, "-c", PINGER, str(path), "200"], stdout=subprocess.PIPE, text=True
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "connected"
    before = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        # Hold the GIL for 5 s: pure Python, no call that lets the GIL go (the pings take
        # about 0.5 s; served through Python they would take 200 s).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pass
        finished = client.poll() is not None
    finally:
        sys.setswitchinterval(before)
    out, _ = client.communicate(timeout=300)
    assert finished, f"the client was not done while Python held the GIL: {out!r}"
    answered, worst_ms = out.split()
    assert int(answered) == 200
    assert float(worst_ms) < 250, f"slowest ping {worst_ms} ms"


def _client(path: Path) -> socket.socket:
    """A connected client of the socket at `path`, with a 10 s timeout."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(str(path))
    return c


def _lines(sock: socket.socket, n: int) -> list[bytes]:
    """`n` reply lines from `sock`."""
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(4096)
        assert chunk, "closed early"
        data += chunk
    return data.splitlines()[:n]


def test_an_upcall_is_handed_to_python_and_replies_stay_in_order(
    served: tuple[_core.MtaServer, _core.Engine, Path],
) -> None:
    """`ping, stats, ping` pipelined: the first ping is answered at once; `stats` waits for
    Python (the notify descriptor turns readable), and the last ping is answered only after
    Python's reply, so the client reads them in the order it asked."""
    server, _, path = served
    with _client(path) as c:
        c.sendall(b'{"op":"ping","id":1}\n{"op":"stats","id":2}\n{"op":"ping","id":3}\n')
        assert _lines(c, 1) == [b'{"id":1,"ok":true}']
        ready, _, _ = select.select([server.notify_fd()], [], [], 10)
        assert ready, "the notify descriptor never turned readable"
        upcalls = server.take_upcalls()
        assert [json.loads(line) for _, line in upcalls] == [{"op": "stats", "id": 2}]
        c.setblocking(False)
        with pytest.raises(BlockingIOError):
            c.recv(100)  # the third line waits for the upcall's answer
        c.settimeout(10)
        server.reply(upcalls[0][0], b'{"id":2,"ok":true,"answered":"by python"}\n')
        assert _lines(c, 2) == [b'{"id":2,"ok":true,"answered":"by python"}', b'{"id":3,"ok":true}']
    assert server.take_upcalls() == []


def test_counters_and_stop(served: tuple[_core.MtaServer, _core.Engine, Path]) -> None:
    """The open connections are counted; after `stop` the thread is gone and a client sees
    its connection closed."""
    server, _, path = served
    with _client(path) as c:
        c.sendall(b'{"op":"ping"}\n')
        assert _lines(c, 1) == [b'{"ok":true}']
        counters = server.counters()
        assert counters["connections"] == 1 and counters["running"] is True
        server.stop()
        assert c.recv(100) == b""
    with pytest.raises(_core.CoreError, match="stopped"):
        server.counters()


def test_the_thread_reads_the_clock_python_reads(tmp_path: Path) -> None:
    """The system clock is None (the thread reads wall time); a drill clock is handed over
    as its line, and a clock the thread cannot follow is refused."""
    assert clock_spec(SystemClock()) is None
    drill = ScaledClock(1_773_000_000_000, speed=360)
    start_ms, num, den, anchor_ns, now_ns = clock_spec(drill) or (0, 0, 0, 0, 0)
    assert (start_ms, anchor_ns) == (drill.start_ms, drill.anchor_ns)
    assert start_ms + (now_ns - anchor_ns) * num // den == drill.at(now_ns)
    with pytest.raises(ValueError, match="cannot read"):
        clock_spec(ScaledClock(1_773_000_000_000, monotonic_ns=lambda: 0))


def _frozen_at(now_ms: int) -> tuple[int, int, int, int, int]:
    """A clock for `MtaServer` that shows `now_ms` for the length of a test (1 ms per
    11 days of real time)."""
    mono = time.monotonic_ns()
    return now_ms, 1, 10**15, mono, mono


def _serve_stream(engine: _core.Engine, path: Path, chunks: list[bytes]) -> bytes:
    """Send `chunks` on one connection to `engine` served at `path`, answering upcalls as
    test_protocol's `feed` does, close the sending side and return every reply byte."""
    server = _core.MtaServer(
        engine, str(path), backlog=4, max_connections=4, clock=_frozen_at(NOW_MS)
    )
    stop = threading.Event()

    def answer_upcalls() -> None:
        while not stop.is_set():
            if select.select([server.notify_fd()], [], [], 0.05)[0]:
                for conn, line in server.take_upcalls():
                    server.reply(conn, upcall_reply(line))

    helper = threading.Thread(target=answer_upcalls)
    helper.start()
    try:
        with _client(path) as c:
            for chunk in chunks:
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := c.recv(1 << 16):
                out += chunk
        return out
    finally:
        stop.set()
        helper.join()
        server.stop()


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=_streams())
def test_the_thread_answers_any_stream_in_any_pieces_as_the_core_does(
    tmp_path: Path, stream: tuple[bytes, list[bytes]]
) -> None:
    """Any bytes, sent in any pieces over the socket (upcalls answered by hand): the replies
    are exactly those of the core given the whole stream at once (`Engine.serve` as
    test_protocol drives it), and the connection closes after the last one."""
    data, chunks = stream
    expected, _ = feed(make_engine(daily_cap=3), [data])
    path = tmp_path / f"s{time.monotonic_ns()}.sock"
    assert _serve_stream(make_engine(daily_cap=3), path, chunks) == expected
