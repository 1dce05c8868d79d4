"""Regression tests of the reliability issue: one client or one job must not stall the others,
store failures lose nothing, reloads keep schedules, sockets separate the two trust levels,
connection floods are bounded, and systemd's watchdog is fed by a live loop.

Each test names the finding it pins down (F2, F4c, F6, F7, F9, F10, least privilege, watchdog).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from daemonproc import DaemonProc, running_daemon
from kiln import _core
from kiln.daemon import Daemon, DaemonConfig, NativeProtocol
from kiln.daemon.jobs import schedule_signals
from kiln.daemon.listener import answer_upcall
from kiln.daemon.serving import loop_exception
from kiln.store import StoreError
from test_daemon import PLAN, FakeClock, acquire, delivered, make, ms, send


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    """The daemon tests' plan on disk."""
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state folder."""
    return tmp_path / "state"


# ----- least privilege: two sockets -----


@pytest.mark.parametrize("listener", ["rust", "asyncio"])
def test_mta_socket_refuses_operator_ops_and_stays_open(tmp_path: Path, listener: str) -> None:
    """The MTA socket answers decisions and read-only `limits`/`stats`, and refuses reload,
    cancel, explain, status and automations with an error reply, on the same connection;
    the operator socket answers them. Served by the Rust thread (the default) or the loop."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    args = ["--mta-listener", listener]
    with running_daemon(plan, args=args) as d, d.mta_client() as mta:
        for op, extra in (
            ("reload", {}),
            ("cancel", {"automation": "A1"}),
            ("explain", {"ip": "192.0.2.10", "provider": "default"}),
            ("status", {}),
            ("automations", {}),
        ):
            reply = mta.request(op, **extra)
            assert reply["ok"] is False
            assert "operator socket" in reply["error"], reply
        assert mta.request("ping") == {"ok": True}
        assert mta.request("acquire", ip="192.0.2.10", domain="gmail.com")["granted"] == 1
        assert mta.request("limits", ip="192.0.2.10", provider="default")["ok"] is True
        assert mta.request("stats")["ok"] is True
        with d.client() as operator:
            assert operator.request("status")["ok"] is True
            assert operator.request("reload")["ok"] is True


def test_operator_socket_and_state_files_are_private(tmp_path: Path) -> None:
    """The operator socket is 0600, the MTA socket 0660, and the database and its companions
    are readable by the owner (and group at most), never by others."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    with running_daemon(plan) as d:
        assert stat.S_IMODE(d.operator_socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660
        files = [p for p in d.state_dir.iterdir() if p.name.startswith("kiln.db")]
        assert files
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 in (0, 0o040), p


# ----- F2: operator work never stalls decisions -----


def test_pipelined_operator_ops_do_not_stall_other_clients(tmp_path: Path) -> None:
    """One connection pipelines 100 reloads, 100 explains and 100 statuses; meanwhile another
    client's acquires keep being answered promptly (before: stalls of up to 26 s), and the
    operator connection still gets all 300 replies in order."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    with running_daemon(plan) as d:
        ops = []
        for i in range(100):
            ops += [
                {"op": "reload", "id": 3 * i},
                {"op": "explain", "ip": "192.0.2.10", "provider": "default", "id": 3 * i + 1},
                {"op": "status", "id": 3 * i + 2},
            ]
        data = b"".join(json.dumps(r).encode() + b"\n" for r in ops)
        heavy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        heavy.connect(str(d.operator_socket))
        heavy.sendall(data)
        heavy.settimeout(60)
        worst_s = 0.0
        answered = 0
        got = b""
        with d.mta_client() as c:
            while got.count(b"\n") < len(ops):
                t0 = time.monotonic()
                assert c.request("ping") == {"ok": True}
                worst_s = max(worst_s, time.monotonic() - t0)
                answered += 1
                heavy.setblocking(False)
                try:
                    while chunk := heavy.recv(1 << 16):
                        got += chunk
                except BlockingIOError:
                    pass
                heavy.setblocking(True)
                time.sleep(0.002)
        heavy.close()
        ids = [json.loads(line)["id"] for line in got.splitlines()]
        assert ids == list(range(len(ops)))
        assert answered > 10
        # Before: up to 26 s. The bound leaves room for a busy 2-core machine.
        assert worst_s < 2.0, f"a ping waited {worst_s:.3f} s behind operator work"


# ----- F9: dripping partial lines cost O(n) -----


class _Transport(asyncio.Transport):
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Keep the bytes."""
        self.out += data

    def is_closing(self) -> bool:
        """Closed yet?"""
        return self.closed

    def close(self) -> None:
        """Mark closed."""
        self.closed = True

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """No buffer here."""


class _CountingEngine:
    """An engine that counts the bytes `serve` is asked to scan."""

    def __init__(self, engine: _core.Engine) -> None:
        self.engine = engine
        self.calls = 0
        self.scanned = 0

    def serve(self, data: bytes, now_ms: int) -> _core.Served:
        """Count, then serve."""
        self.calls += 1
        self.scanned += len(data)
        return self.engine.serve(data, now_ms)


class _Daemonish:
    """What NativeProtocol needs of a daemon."""

    def __init__(self) -> None:
        self.engine = _CountingEngine(_core.Engine())
        self.clock = FakeClock(1_000)
        self.connections = 0
        self.max_connections = 10

    @property
    def open_connections(self) -> int:
        """Connections open (the asyncio socket's only, here)."""
        return self.connections

    def warn_repeated(self, event: str, **fields: Any) -> None:
        """Unused here."""


def test_a_dripped_line_is_scanned_once() -> None:
    """A 60 KiB line sent one byte per read is handed to the engine once (before: once per
    read, each time from the start: O(n^2)), and answered."""
    fake = _Daemonish()
    proto = NativeProtocol(fake, operator=False)  # type: ignore[arg-type]
    transport = _Transport()
    proto.connection_made(transport)
    line = b" " * 60_000 + b'{"op":"ping"}\n'
    for i in range(len(line)):
        proto.data_received(line[i : i + 1])
    assert bytes(transport.out) == b'{"ok":true}\n'
    assert fake.engine.calls == 1
    assert fake.engine.scanned == len(line)


def test_a_dripped_line_past_the_limit_is_refused() -> None:
    """A partial line that grows past 64 KiB without a newline gets the error and the
    connection closes, without the engine rescanning it."""
    fake = _Daemonish()
    proto = NativeProtocol(fake, operator=False)  # type: ignore[arg-type]
    transport = _Transport()
    proto.connection_made(transport)
    proto.data_received(b"{")
    chunk = b" " * 4096
    while not transport.closed:
        proto.data_received(chunk)
    assert b"longer than 65536 bytes" in transport.out
    assert fake.engine.scanned < 2 * 4096


# ----- F6/F7: connection floods -----


def test_a_burst_of_connects_is_queued_not_refused(tmp_path: Path) -> None:
    """1,000 non-blocking connects at once all get through (before: asyncio's backlog of 100
    refused 623 of them with EAGAIN), and each is then answered."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    with running_daemon(plan) as d:
        socks: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(1_000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(str(d.socket))
                except BlockingIOError:
                    refused += 1
                    s.close()
                    continue
                socks.append(s)
            assert refused == 0
            for s in socks[::50]:
                s.setblocking(True)
                s.settimeout(10)
                s.sendall(b'{"op":"ping"}\n')
                assert s.recv(100) == b'{"ok":true}\n'
        finally:
            for s in socks:
                s.close()


@pytest.mark.parametrize("listener", ["rust", "asyncio"])
def test_connections_past_the_cap_are_refused_and_logged_once(
    tmp_path: Path, listener: str
) -> None:
    """With --max-connections 20, the 21st to 30th connections get an error line and are
    closed, one log line says so, and the 20 open ones keep being served."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    args = ["--max-connections", "20", "--mta-listener", listener]
    with running_daemon(plan, args=args) as d:
        socks: list[socket.socket] = []
        try:
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(str(d.socket))
                s.sendall(b'{"op":"ping"}\n')
                assert s.recv(100) == b'{"ok":true}\n'
                socks.append(s)
            for _ in range(10):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
                    extra.settimeout(10)
                    extra.connect(str(d.socket))
                    assert b"too many connections" in extra.recv(200)
            for s in socks:
                s.sendall(b'{"op":"ping"}\n')
                assert s.recv(100) == b'{"ok":true}\n'
        finally:
            for s in socks:
                s.close()
        lines = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
        refused = [x for x in lines if x.get("event") == "connection_refused"]
        assert len(refused) == 1 and refused[0]["limit"] == 20


def test_accept_failures_are_logged_at_most_every_few_seconds(plan_file: Path, state: Path) -> None:
    """EMFILE from accept() (the open-files limit) becomes one warning per interval, not a
    flood of loop tracebacks."""
    d = make(plan_file, state, FakeClock(ms("2026-11-02T10:00:00")))

    async def storm() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(1_000):
            loop_exception(
                d,
                loop,
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                },
            )

    with structlog.testing.capture_logs() as logs:
        asyncio.run(storm())
    assert [e["event"] for e in logs] == ["accept_failed"]
    d.store.close()


# ----- F4c: a failing store loses nothing -----


def test_failed_writes_keep_tallies_and_reports_until_a_write_succeeds(
    plan_file: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every write fails (disk full), grants and delivery reports taken from the engine
    are kept, reload still answers, and the first write that succeeds stores all of them
    (before: 5,000 grants and 5,000 reports dropped and marked saved)."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    real = d.store.flush
    failing = True

    def flaky(**kwargs: Any) -> None:
        if failing:
            raise StoreError("flush state", "sqlite", "database or disk is full")
        real(**kwargs)

    monkeypatch.setattr(d.store, "flush", flaky)
    for _ in range(5):
        send(d, acquire(10), delivered(10))
        clock.t += 1_000
        with pytest.raises(StoreError):
            d.tick(clock.t)
    assert d.reload(clock.t)["ok"] is True
    assert d.persist.unsaved  # kept in memory, not dropped
    failing = False
    d.flush(clock.t)
    day = d.store.counts(datetime_day(clock.t))
    assert day[("192.0.2.10", "default")].granted == 50
    assert day[("192.0.2.10", "default")].delivered == 50
    assert any(e.action == "reloaded" for e in d.store.decisions(kind="reload"))
    assert not d.persist.unsaved
    d.store.close()


def datetime_day(now_ms: int) -> Any:
    """The UTC date of `now_ms` (the test plan's zone)."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(now_ms / 1000, tz=UTC).date()


def test_flush_on_the_store_thread_logs_a_failure_once_and_recovers(
    plan_file: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving daemon's flush logs a failing write (once per interval), raises nothing,
    and logs the recovery when a write goes through."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    real = d.store.flush
    state_ = {"failing": True}

    def flaky(**kwargs: Any) -> None:
        if state_["failing"]:
            raise StoreError("flush state", "sqlite", "attempt to write a readonly database")
        real(**kwargs)

    monkeypatch.setattr(d.store, "flush", flaky)

    async def go() -> None:
        for _ in range(3):
            send(d, acquire(1))
            d.collect(clock.t)
            await d.persist.write_async()
        state_["failing"] = False
        d.collect(clock.t)
        await d.persist.write_async()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(go())
    events = [e["event"] for e in logs]
    assert events.count("store_write_failed") == 1
    assert "store_recovered" in events
    assert d.store.counts(datetime_day(clock.t))[("192.0.2.10", "default")].granted == 3
    d.store.close()


# ----- F10: reload keeps each source's schedule -----


def test_reload_keeps_signal_schedules(tmp_path: Path) -> None:
    """Reloading an unchanged plan leaves each signal source's polling job and next run as
    they were (before: every reload re-polled every source at once); a changed interval
    reschedules only that source."""
    plan = tmp_path / "plan.yaml"
    signals = (
        "signals:\n"
        "  dnsbl: {zones: [zen.example.test], nameservers: ['127.0.0.1:9'], poll_every: 1h}\n"
    )
    plan.write_text(PLAN + signals)
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "state", node="t"), clock)
    d.start()

    async def go() -> tuple[Any, Any, Any]:
        d.scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        schedule_signals(d)
        d.scheduler.start(paused=True)
        first = d.scheduler.get_job("signal:dnsbl").next_run_time
        for _ in range(20):
            assert d.reload(clock.t)["ok"] is True
        same = d.scheduler.get_job("signal:dnsbl").next_run_time
        plan.write_text(PLAN + signals.replace("poll_every: 1h", "poll_every: 2h"))
        assert d.reload(clock.t)["ok"] is True
        changed = d.scheduler.get_job("signal:dnsbl")
        d.scheduler.shutdown(wait=False)
        return first, same, changed

    first, same, changed = asyncio.run(go())
    assert same == first
    assert changed.trigger.interval.total_seconds() == 7_200
    d.store.close()


# ----- F5: a plan path that would block is read off the loop -----


def test_a_fifo_at_the_plan_path_does_not_block_serving(tmp_path: Path) -> None:
    """SIGHUP with a FIFO where the plan was: the reload fails with a reason, and the daemon
    answers throughout (before: the loop blocked forever opening the FIFO)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    with running_daemon(plan) as d:
        plan.unlink()
        os.mkfifo(plan)
        d.signal(signal.SIGHUP)
        with d.client() as c:
            reply = c.request("reload")
            assert reply["ok"] is False
            assert any("regular file" in p or "FIFO" in p or "fifo" in p for p in reply["problems"])
            assert c.request("ping") == {"ok": True}


# ----- the watchdog -----


def test_systemd_watchdog_is_fed_while_the_loop_lives(tmp_path: Path) -> None:
    """Under `Type=notify` with `WatchdogSec=`, kiln says READY=1 once listening, sends
    WATCHDOG=1 at half the interval, and STOPPING=1 on SIGTERM; status says the watchdog is
    fed."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    sock_dir = Path(tempfile.mkdtemp(prefix="kn-", dir="/tmp"))
    addr = sock_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(addr))
        listener.settimeout(10)
        env = {"NOTIFY_SOCKET": str(addr), "WATCHDOG_USEC": "200000"}
        d = DaemonProc(plan, env=env)
        try:
            d.start()
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while got.count(b"WATCHDOG=1") < 3 and time.monotonic() < deadline:
                got.append(listener.recv(100))
            assert got[0] == b"READY=1"
            assert got.count(b"WATCHDOG=1") >= 3
            with d.client() as c:
                assert c.request("status")["daemon"]["watchdog"] is True
            assert d.stop() == 0
            rest = []
            listener.settimeout(1)
            try:
                while True:
                    rest.append(listener.recv(100))
            except TimeoutError:
                pass
            assert b"STOPPING=1" in rest
        finally:
            d.cleanup()
            addr.unlink(missing_ok=True)
            sock_dir.rmdir()


def test_sigterm_as_soon_as_the_mta_socket_answers_stops_cleanly(tmp_path: Path) -> None:
    """The MTA socket (served by its own thread) answers last, after the signal handlers,
    the operator socket and the jobs are set up: a SIGTERM the moment it answers stops the
    daemon cleanly (exit 0, sockets removed), and the operator socket already answers.
    (Before, the Rust thread answered before the handlers were installed, and such a
    SIGTERM killed the daemon: exit -15.)"""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    d = DaemonProc(plan)
    try:
        for _ in range(5):
            d.start(poll_s=0)  # SIGTERM within a moment of the first answer
            assert d.stop() == 0, d.log()[-2000:]
            assert not d.socket.exists() and not d.operator_socket.exists()
        d.start(poll_s=0)
        with d.client() as c:  # the operator socket is there as soon as the MTA one answers
            assert c.request("ping") == {"ok": True}
        assert d.stop() == 0
    finally:
        d.cleanup()


# ----- F4b: a state folder that lost its database -----


def test_a_lost_database_stops_kiln_run_unless_reinitialised(tmp_path: Path) -> None:
    """After the database file is deleted, `kiln run` on the same state folder exits 1 naming
    the file (before: a fresh database, ramps back to step 1 and the day re-granted); with
    --reinitialise it starts afresh."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    d = DaemonProc(plan)
    try:
        d.start()
        assert d.stop() == 0
        (d.state_dir / "kiln.db").unlink()
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
        assert "kiln.db" in d.log()
        d.args.append("--reinitialise")
        d.start()
        with d.client() as c:
            assert c.request("status")["ok"] is True
        assert d.stop() == 0
    finally:
        d.cleanup()


# ----- F4c: library errors are kiln's JSON lines -----


def test_library_log_records_become_kiln_json_lines() -> None:
    """An apscheduler job traceback (the standard `logging`) comes out as one JSON line with
    the traceback as a field, not a plain multi-line traceback; secrets in it are redacted."""
    import io
    import logging

    from kiln import log

    buf = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    log.configure("json", stream=buf)
    try:
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logging.getLogger("apscheduler.executors.default").exception(
                "Job %s raised calling https://snds.example/data?key=%s", "tick", "s3cret"
            )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "error"
    assert record["component"] == "apscheduler.executors.default"
    assert "ZeroDivisionError: boom" in record["exception"]
    assert "s3cret" not in lines[0]


# ----- F5a: a reload forgets what the plan dropped -----


def test_a_reload_that_drops_an_ip_answers_like_a_fresh_daemon(tmp_path: Path) -> None:
    """A reload that removes the warm pool IP makes `acquire` for it answer exactly as a fresh
    daemon on the new plan does (before: the old, here unlimited, limits went on granting)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "a", node="t"), clock)
    d.start()
    warm: dict[str, object] = {"op": "acquire", "ip": "198.51.100.10", "domain": "gmail.com"}
    assert send(d, warm)[0]["granted"] == 1
    plan.write_text(PLAN.replace("ips: [198.51.100.10]", "ips: [198.51.100.20]"))
    assert d.reload(clock.t)["ok"] is True
    dropped = send(d, warm)
    fresh = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "b", node="t"), clock)
    fresh.start()
    assert dropped == send(fresh, warm)
    assert dropped[0]["ok"] is False and "not a sending IP" in str(dropped[0]["error"])
    assert send(d, {**warm, "ip": "198.51.100.20"})[0]["granted"] == 1
    d.store.close()
    fresh.store.close()


def test_a_reload_that_drops_a_pool_answers_like_a_fresh_daemon(tmp_path: Path) -> None:
    """A reload that renames the pool makes `pick` from the old name answer exactly as a
    fresh daemon on the new plan does (before: the dropped pool went on picking)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "a", node="t"), clock)
    d.start()
    old = send(d, {"op": "pick", "pool": "tx", "domain": "gmail.com"})
    assert old[0]["ok"] is True, old
    plan.write_text(re.sub(r"\btx\b", "tx2", PLAN))
    assert d.reload(clock.t)["ok"] is True
    dropped = send(d, {"op": "pick", "pool": "tx", "domain": "gmail.com"})
    fresh = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "b", node="t"), clock)
    fresh.start()
    assert dropped == send(fresh, {"op": "pick", "pool": "tx", "domain": "gmail.com"})
    assert dropped[0]["ok"] is False and "pool" in str(dropped[0]["error"])
    assert send(d, {"op": "pick", "pool": "tx2", "domain": "gmail.com"})[0]["ok"] is True
    d.store.close()
    fresh.store.close()


# ----- F4d: an unreadable snapshot -----


def test_an_unreadable_snapshot_is_a_warning_and_today_comes_from_the_tallies(
    plan_file: Path, state: Path
) -> None:
    """A counter snapshot that cannot be read is logged as a warning (before: `info`, and the
    day's budget was granted again); today's grants are taken from the stored tallies, so
    the cap still holds."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    assert send(d, acquire(60))[0]["granted"] == 60
    d.flush(clock.t)
    d.store.save_snapshot(b"not a snapshot", clock.t)
    d.store.close()
    clock.t += 1_000
    with structlog.testing.capture_logs() as logs:
        d2 = make(plan_file, state, clock)
    unreadable = [e for e in logs if e.get("action") == "snapshot_unreadable"]
    assert unreadable and unreadable[0]["log_level"] == "warning"
    assert any(e["event"] == "counters_from_tallies" for e in logs)
    granted = sum(int(r["granted"]) for r in send(d2, *(acquire(10) for _ in range(10))))  # type: ignore[call-overload]
    assert granted <= 40
    d2.store.close()


# ----- found by the soak test -----


def test_a_reload_just_after_midnight_does_not_delay_the_day_roll(
    plan_file: Path, state: Path
) -> None:
    """A reload that lands after an hour boundary but before the tick that rolls it leaves the
    roll to that tick (before: the reload moved the next boundary an hour on, and the
    midnight day roll waited an hour)."""
    clock = FakeClock(ms("2026-11-02T23:59:00"))
    d = make(plan_file, state, clock)
    clock.t = ms("2026-11-03T00:00:30")
    assert d.reload(clock.t)["ok"] is True
    d.tick(clock.t + 500)
    assert d.store.get_meta("last_rolled_day:daemon-test") == "2026-11-02"
    d.store.close()


def test_learned_routes_survive_the_hour_roll(plan_file: Path, state: Path) -> None:
    """An MX-learned route stays across the hourly roll (before: every hour dropped all learned
    routes, so busy domains counted as `default` again and were looked up again); a reload
    still resets the table."""
    clock = FakeClock(ms("2026-11-02T10:59:00"))
    d = make(plan_file, state, clock)
    d.engine.set_route("example-hosted.test", "default", clock.t + 86_400_000)
    routes = d.engine.route_count()
    clock.t = ms("2026-11-02T11:00:01")
    d.tick(clock.t)
    assert d.engine.route_count() == routes
    assert d.engine.take_unresolved() == []
    d.reload(clock.t)
    assert d.engine.route_count() == routes - 1
    d.store.close()


def test_the_signal_http_client_is_built_before_serving(tmp_path: Path) -> None:
    """A plan with signal sources gets its HTTP client (TLS context, CA certificates) at
    start, not at the first poll on the serving loop (a start-up stall the soak measured)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        PLAN + "signals:\n  dnsbl: {zones: [zen.example.test], nameservers: ['127.0.0.1:9']}\n"
    )
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "s", node="t"), FakeClock(0))

    def client() -> object:
        """The poller's HTTP client, if built."""
        return d.poller._client

    assert client() is None
    d.start()
    assert client() is not None
    asyncio.run(d.poller.aclose())
    d.store.close()


def test_a_failing_upcall_gets_an_error_reply_and_is_logged() -> None:
    """An operation that raises is answered `internal error` (the client always gets its
    line, on either listener) and logged with its traceback."""

    class Failing:
        def __init__(self) -> None:
            self.logged: list[str] = []
            self.log = self

        def exception(self, event: str) -> None:
            self.logged.append(event)

        async def upcall_async(self, rest: bytes) -> dict[str, Any]:
            raise RuntimeError("boom")

    d = Failing()
    out = asyncio.run(answer_upcall(d, b'{"id":7,"op":"status"}'))  # type: ignore[arg-type]
    assert json.loads(out) == {"ok": False, "error": "internal error; see the daemon log"}
    assert d.logged == ["upcall_failed"]
