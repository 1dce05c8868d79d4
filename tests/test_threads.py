"""The engine and the GIL never wait on each other, and a pinned engine refuses strangers.

The daemon once hung for good: a job on a worker thread classified a reply while holding the
engine's lock, the binding let the GIL go inside that section, and the event loop took the GIL
and waited for the lock. These tests hammer one engine from several threads with garbage
collection forced all the time, in a subprocess under a deadline, so a deadlock fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from kiln import _core

HAMMER = textwrap.dedent(
    """
    import gc, sys, threading
    from kiln import _core

    gc.set_threshold(1, 1, 1)  # collect on nearly every allocation
    e = _core.Engine()
    e.set_rules([
        ("r1", None, [421], ["4.7.28"], "unusual rate", "rate_limit_rep", "ip", False),
        ("r2", None, ["5xx"], None, "blocked", "blocklist", "ip", False),
    ])
    e.set_default_provider("default")
    e.set_upcall_ops(["status"])
    keys = [e.key(f"192.0.2.{i}", p) for i in range(1, 9) for p in ("google", "yahoo")]
    for k in keys:
        e.set_limits(k, rate_count=1000, rate_period_ms=1000, max_burst=5)
    stop = threading.Event()
    errors = []

    class Cycle:
        def __init__(self):
            self.me = self
        def __del__(self):
            # A finaliser that calls back into the engine while others hold its lock.
            try:
                e.key_count()
            except Exception as exc:
                errors.append(exc)

    def work(n):
        i = 0
        while not stop.is_set() and i < 4000:
            i += 1
            Cycle()
            k = keys[(i + n) % len(keys)]
            e.acquire(k, 1, 1_000 + i)
            e.classify(None, 421, "4.7.28", "421 4.7.28 unusual rate of mail")
            line = (b'{"op":"report","ip":"192.0.2.1","domain":"gmail.com","result":"deferred",'
                    b'"code":421,"text":"4.7.28 unusual rate"}\\n')
            e.serve(line * 3, 1_000 + i)
            e.take_reports()
            e.take_tallies()
            e.take_unresolved()
            e.usage(k)
            list(e.acquire_batch(__import__("array").array("I", keys[:4]), 1_000 + i))
            e.snapshot_bytes()
            if i % 500 == 0:
                gc.collect()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"finaliser errors: {errors[:3]}")
    print("done")
    """
)


def test_threads_and_forced_gc_never_deadlock_the_engine() -> None:
    """Four threads call every kind of engine method (decisions, classification, the wire,
    takes, snapshots) with garbage collection forced on nearly every allocation and finalisers
    that re-enter the engine; all of them finish well inside the deadline."""
    proc = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", HAMMER],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.strip() == b"done"


def test_a_pinned_engine_refuses_other_threads() -> None:
    """After `pin_thread`, a call from another thread raises CoreError naming the rule, and
    the owning thread goes on as before."""
    e = _core.Engine()
    e.pin_thread()
    key = e.key("192.0.2.1", "google")
    caught: list[BaseException] = []

    def stray() -> None:
        try:
            e.key_count()
        except _core.CoreError as exc:
            caught.append(exc)

    t = threading.Thread(target=stray)
    t.start()
    t.join(10)
    assert len(caught) == 1
    assert "another thread" in str(caught[0])
    assert e.acquire(key, 1, 1_000).granted == 1


def test_an_unpinned_engine_serves_any_thread() -> None:
    """Library users who never pin may call from any thread."""
    e = _core.Engine()
    key = e.key("192.0.2.1", "google")
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(e.acquire(key, 1, 1_000).granted))
    t.start()
    t.join(10)
    assert results == [1]


@pytest.mark.parametrize("method", ["snapshot_bytes", "key_count", "take_reports"])
def test_pinned_refusal_covers_every_entry(method: str) -> None:
    """Every engine method goes through the same check, not only the hot ones."""
    e = _core.Engine()
    e.pin_thread()
    caught: list[BaseException] = []

    def stray() -> None:
        try:
            getattr(e, method)()
        except _core.CoreError as exc:
            caught.append(exc)

    t = threading.Thread(target=stray)
    t.start()
    t.join(10)
    assert len(caught) == 1
