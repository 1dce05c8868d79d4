"""The daemon benchmark's machinery, run briefly: every reply comes back, ok and in order.

Speed is measured by `python benches/daemon_bench.py` (`make bench`), never asserted here: these
tests only show that the load generator and both servers tell the truth about what they did.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon_bench import ServerProc, echo_server, kiln_daemon, run_mode
from echo_server import REPLY
from loadgen import count_replies

ERROR = b'{"ok":false,"error":"op: missing"}\n'


def test_count_replies_holds_back_a_line_cut_anywhere() -> None:
    """A read may end anywhere, even inside `{"ok":true`: the cut line counts once, whole,
    when its newline arrives, and an error line counts as a line but not as ok."""
    stream = REPLY + ERROR + REPLY + REPLY
    for cut in range(len(stream) + 1):
        partial, lines, ok, granted = count_replies(b"", stream[:cut])
        partial, more_lines, more_ok, more_granted = count_replies(partial, stream[cut:])
        assert partial == b""
        assert (lines + more_lines, ok + more_ok, granted + more_granted) == (4, 3, 3), cut


@pytest.fixture(scope="module")
def kiln() -> Iterator[ServerProc]:
    """`kiln run` on benches/bench-plan.yaml, for this module's tests."""
    server = kiln_daemon()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.mark.parametrize(("connections", "depth"), [(1, 1), (3, 16)])
def test_every_reply_arrives_in_order(kiln: ServerProc, connections: int, depth: int) -> None:
    """With numbered requests, the daemon answers every one, ok, granted and in order,
    whether one is in flight or many on several connections."""
    r = run_mode(kiln, connections, depth, seconds=0.3, warmup_s=0.05, check_ids=True)
    assert r["requests"] > 0
    assert (r["errors"], r["out_of_order"], r["lost"]) == (0, 0, 0), r
    assert r["granted"] == r["replies_total"], r
    assert r["server_cpu_us_per_decision"] is not None
    if depth == 1:
        assert r["latency_samples"] > 0
        assert r["p50_us"] is not None and r["p99_us"] is not None


def test_fast_counting_agrees_on_the_daemon(kiln: ServerProc) -> None:
    """The benchmark's own path (fixed requests, replies counted, not parsed) sees every
    reply of the daemon as a grant."""
    r = run_mode(kiln, 2, 128, seconds=0.3, warmup_s=0.05)
    assert r["requests"] > 0
    assert (r["errors"], r["lost"]) == (0, 0), r
    assert r["granted"] == r["replies_total"], r


def test_echo_server_answers_every_line_and_stops_cleanly() -> None:
    """The baseline answers one fixed ok reply per request, pipelined or not, and exits 0
    on SIGTERM."""
    server = echo_server()
    try:
        server.start()
        for connections, depth in ((1, 1), (2, 16)):
            r = run_mode(server, connections, depth, seconds=0.2, warmup_s=0.05)
            assert r["requests"] > 0
            assert (r["errors"], r["lost"]) == (0, 0), r
            assert r["granted"] == r["replies_total"], r
        assert server.stop() == 0
        assert not server.socket.exists()
    finally:
        server.cleanup()
