"""The daemon: ramps that roll at the plan's midnight, restarts that keep counts and steps,
reloads that keep the running plan on errors, signals, socket access and MX lookups."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemonproc import DaemonProc, running_daemon
from dnsserver import DnsServer
from kiln.daemon import Daemon, DaemonConfig
from kiln.records import RampState
from kiln.store import Store

PLAN = """\
name: daemon-test
timezone: UTC
pools:
  tx:
    ips: [198.51.100.10]
batches:
  b1:
    pool: tx
    ips: [192.0.2.10]
    schedule: s
    start_date: 2026-11-01
schedules:
  s:
    steps:
      - {daily_cap: 100, hourly_cap: 100}
      - {daily_cap: 200, hourly_cap: 200}
      - {daily_cap: 400, hourly_cap: 400}
    hourly:
      active_hours: 00-24
    max_message_rate: 1_000/s,max_burst=1_000
"""


def ms(text: str) -> int:
    """Epoch ms of an ISO time in UTC."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


class FakeClock:
    """A clock the test moves."""

    def __init__(self, now_ms: int) -> None:
        self.t = now_ms

    def now_ms(self) -> int:
        """The time the test set."""
        return self.t


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    """The test plan on disk."""
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def make(plan_file: Path, state: Path, clock: FakeClock) -> Daemon:
    """A started in-process daemon (no socket) on SQLite in `state`."""
    d = Daemon(DaemonConfig(plan_path=plan_file, state_dir=state, node="t"), clock)
    d.start()
    return d


def send(d: Daemon, *requests: dict[str, object]) -> list[dict[str, object]]:
    """Requests through the core's protocol, as the socket would pass them."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    served = d.engine.serve(data, d.clock.now_ms())
    assert served.upcall is None and served.consumed == len(data)
    return [json.loads(line) for line in served.reply.splitlines()]


def acquire(n: int = 1) -> dict[str, object]:
    """An acquire for the batch IP at Gmail."""
    return {"op": "acquire", "ip": "192.0.2.10", "domain": "gmail.com", "n": n}


def delivered(n: int) -> dict[str, object]:
    """A delivery report for the batch IP at Gmail."""
    return {
        "op": "report",
        "ip": "192.0.2.10",
        "domain": "gmail.com",
        "result": "delivered",
        "n": n,
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state folder."""
    return tmp_path / "state"


def test_a_full_day_advances_at_local_midnight_and_is_logged(plan_file: Path, state: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    # Day 1: the default row's cap is 100; 95 delivered is more than 90%.
    assert send(d, acquire(95))[0]["granted"] == 95
    assert send(d, acquire(6))[0]["reason"] == "daily_cap"
    send(d, delivered(95))
    clock.t = ms("2026-11-02T23:59:59")
    d.tick(clock.t)
    assert d.store.decisions(kind="ramp") == []  # the day has not ended yet
    clock.t = ms("2026-11-03T00:00:01")
    d.tick(clock.t)
    assert d.states[("b1", "default")].step == 2
    # The new day's cap is in force at once: 200 may go, the 201st may not.
    assert send(d, acquire(200))[0]["granted"] == 200
    assert send(d, acquire())[0]["reason"] == "daily_cap"
    d.flush(clock.t)
    log = d.store.decisions(kind="ramp", subject="b1/default")
    assert [(e.action, e.evidence["day"]) for e in log] == [("advance", "2026-11-02")]
    assert log[0].evidence["delivered"] == 95
    d.store.close()


def test_grants_without_delivery_reports_hold_the_ramp(plan_file: Path, state: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    send(d, acquire(100))
    send(d, delivered(90))  # exactly 90%: holds
    clock.t = ms("2026-11-03T00:30:00")
    d.tick(clock.t)
    assert d.states[("b1", "default")].step == 1
    d.flush(clock.t)
    (entry,) = d.store.decisions(kind="ramp", subject="b1/default")
    assert entry.action == "hold" and "90" in entry.reason
    d.store.close()


def test_days_missed_while_down_are_rolled_once_at_start(plan_file: Path, state: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    send(d, acquire(100))
    send(d, delivered(100))
    d.flush(clock.t)
    d.store.close()
    clock.t = ms("2026-11-05T08:00:00")  # down for three midnights
    d2 = make(plan_file, state, clock)
    days = [e.evidence["day"] for e in d2.store.decisions(kind="ramp", subject="b1/default")]
    assert days == ["2026-11-02", "2026-11-03", "2026-11-04"]
    assert d2.states[("b1", "default")].step == 2  # advanced once, then held on idle days
    d2.roll_days(clock.t)  # idempotent
    assert len(d2.store.decisions(kind="ramp", subject="b1/default")) == 3
    d2.store.close()


def test_restart_restores_counters_and_positions(plan_file: Path, state: Path) -> None:
    """After a clean stop (final flush: exact counters, nothing reserved) a restart grants
    exactly what the caps still allow."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    send(d, acquire(60))
    d.flush(clock.t, final=True)
    d.store.close()
    clock.t += 5_000
    d2 = make(plan_file, state, clock)
    assert send(d2, acquire(40))[0]["granted"] == 40
    assert send(d2, acquire())[0]["reason"] == "daily_cap"
    d2.store.close()


def test_a_crash_restart_charges_the_reservation_and_never_overshoots(
    plan_file: Path, state: Path
) -> None:
    """After a crash (the last flush reserved ahead), the restart counts each key's reserved
    block as used: whatever was granted after the snapshot, the day's total stays within the
    cap; the price is at most the block left unsent."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    send(d, acquire(30))
    d.flush(clock.t)  # reserves ahead of the next grants
    granted_after = sum(
        int(r["granted"])  # type: ignore[call-overload]
        for r in send(d, *(acquire(5) for _ in range(4)))
    )
    assert granted_after > 0
    d.store.close()  # crash: no final flush
    clock.t += 5_000
    d2 = make(plan_file, state, clock)
    again = sum(
        int(r["granted"])  # type: ignore[call-overload]
        for r in send(d2, *(acquire(1) for _ in range(100)))
    )
    assert 30 + granted_after + again <= 100
    used = d2.engine.usage(d2.engine.key("192.0.2.10", "default"))["day_used"]
    assert used == 100  # the reserved block was charged
    d2.store.close()


def test_reload_keeps_the_running_plan_on_errors(plan_file: Path, state: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    plan_file.write_text(PLAN.replace("daily_cap: 100,", "daily_cap: -5,"))
    reply = d.reload(clock.t)
    assert reply["ok"] is False
    assert any("plan.yaml:" in p and "daily_cap" in p for p in reply["problems"]), reply
    assert send(d, acquire(100))[0]["granted"] == 100  # old caps still in force
    plan_file.write_text(
        PLAN.replace("daily_cap: 100, hourly_cap: 100", "daily_cap: 150, hourly_cap: 150")
    )
    assert d.reload(clock.t) == {"ok": True, "plan": "daemon-test"}
    assert send(d, acquire(50))[0]["granted"] == 50
    assert send(d, acquire())[0]["reason"] == "daily_cap"
    d.flush(clock.t)
    actions = [e.action for e in d.store.decisions(kind="reload")]
    assert actions == ["reload_failed", "reloaded"]
    d.store.close()


def test_status_and_limits_answer_from_python(plan_file: Path, state: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    send(d, acquire(7))
    status = d.upcall(b'{"op":"status","id":"s"}', clock.t)
    assert status["id"] == "s"
    row = next(r for r in status["ramps"] if r["provider"] == "default")
    assert (row["step"], row["steps"], row["daily_cap"], row["day_used"]) == (1, 3, 100, 7)
    limits = d.upcall(b'{"op":"limits","ip":"192.0.2.10","domain":"gmail.com"}', clock.t)
    assert limits["daily_cap"] == 100 and limits["day_used"] == 7 and limits["step"] == 1
    assert limits["rate"] == "1_000/s,max_burst=1_000"
    bad = d.upcall(b'{"op":"limits","ip":"192.0.2.10","provider":"nope"}', clock.t)
    assert bad["ok"] is False and "unknown provider" in bad["error"]
    d.store.close()


# ----- the real process -----

RESTART_PLAN = PLAN.replace(
    "{daily_cap: 100, hourly_cap: 100}", "{daily_cap: 1_000, hourly_cap: 1_000}"
).replace("start_date: 2026-11-01", "start_date: 2020-01-01")


SIGKILL_PLAN = (
    PLAN.replace("{daily_cap: 100, hourly_cap: 100}", "{daily_cap: 6_000, hourly_cap: 6_000}")
    .replace("start_date: 2026-11-01", "start_date: 2020-01-01")
    .replace("max_message_rate: 1_000/s,max_burst=1_000", "max_message_rate: 2_000/s,max_burst=100")
)


def _pipelined_grants(path: Path, batches: int, per_batch: int = 200) -> tuple[int, str]:
    """Acquires pipelined at full speed on one connection; (granted, last denial reason)."""
    line = b'{"op":"acquire","ip":"192.0.2.10","domain":"gmail.com"}\n'
    granted, reason = 0, ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        for _ in range(batches):
            sock.sendall(line * per_batch)
            for _ in range(per_batch):
                reply = json.loads(reader.readline())
                granted += reply["granted"]
                if not reply["granted"]:
                    reason = reply["reason"]
    return granted, reason


def test_sigkill_at_full_speed_never_overshoots_a_cap(tmp_path: Path) -> None:
    """Acquires pipelined at full speed, SIGKILL mid-day, restart: the day's grants before and
    after the kill never exceed the cap (before: a crash could grant up to one snapshot
    interval of traffic twice, 2x the cap at full speed). The price is bounded: at most the
    reserved block (2 snapshot intervals of the key's rate, its burst and a floor) goes
    unsent."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(SIGKILL_PLAN)
    cap, interval_ms, rate_per_s, burst = 6_000, 200, 2_000, 100
    d = DaemonProc(plan, args=["--snapshot-interval-ms", str(interval_ms)])
    try:
        d.start()
        before = 0
        deadline = time.monotonic() + 20
        while before < cap // 2 and time.monotonic() < deadline:
            before += _pipelined_grants(d.socket, batches=1)[0]
        assert cap // 2 <= before < cap
        d.kill()
        d.start()
        after = 0
        deadline = time.monotonic() + 30
        reason = ""
        while reason != "daily_cap" and time.monotonic() < deadline:
            got, reason = _pipelined_grants(d.socket, batches=1)
            after += got
            assert reason in ("", "rate", "reservation", "daily_cap"), reason
        assert reason == "daily_cap"
        total = before + after
        block = 2 * interval_ms * rate_per_s // 1000 + burst + 10
        assert total <= cap, (before, after)
        assert total >= cap - block, (before, after, block)
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_positions_survive_sigkill_and_sigterm_removes_the_socket(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(RESTART_PLAN)
    d = DaemonProc(plan)
    try:
        d.state_dir.mkdir(exist_ok=True)
        with Store.sqlite(d.state_dir / "kiln.db") as store:
            store.save_positions(
                "daemon-test",
                {("b1", "default"): RampState(step=3)},
                ms("2026-11-01T00:00:00"),
            )
        for stop in ("kill", "term"):
            d.start()
            with d.client() as c:
                ramp = next(r for r in c.request("status")["ramps"] if r["provider"] == "default")
            assert (ramp["step"], ramp["daily_cap"]) == (3, 400), ramp
            if stop == "kill":
                d.kill()
                assert d.socket.exists()  # left behind; the next start replaces it
            else:
                assert d.stop() == 0
                assert not d.socket.exists()
        assert '"event": "kiln stopped cleanly"' in d.log()
    finally:
        d.cleanup()


def test_sighup_with_a_broken_plan_keeps_serving(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(RESTART_PLAN)
    with running_daemon(plan) as d:
        plan.write_text(RESTART_PLAN + "\nnot: [valid\n")
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload_failed" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload_failed" in d.log()
        with d.client() as c:
            assert c.request("acquire", ip="192.0.2.10", domain="gmail.com")["granted"] == 1


def test_socket_mode_and_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    with running_daemon(args=["--socket-mode", "0600", "--socket-group", group]) as d:
        st = d.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == grp.getgrnam(group).gr_gid
    with running_daemon() as d:
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660


def test_a_second_daemon_on_the_same_socket_refuses_to_start(tmp_path: Path) -> None:
    with running_daemon() as d:
        other = DaemonProc(state_dir=d.state_dir)
        other.log_path = d.state_dir / "other.log"
        try:
            other.start()  # the ping is answered by the first daemon
            assert other.proc is not None
            assert other.proc.wait(20) == 1
        finally:
            other.kill()
        assert "another kiln daemon is listening" in other.log()
        with d.client() as c:
            assert c.request("ping") == {"ok": True}


def test_unknown_domains_are_resolved_by_mx_in_the_background() -> None:
    with DnsServer() as dns:
        dns.mx("corp.example", ["ASPMX.L.GOOGLE.COM.", "alt1.aspmx.l.google.com"])
        dns.mx("nomail.example", ["."])
        with running_daemon(args=["--nameserver", f"127.0.0.1:{dns.port}"]) as d, d.client() as c:
            first = c.request("route", domain="corp.example")
            assert first["provider"] == "default" and first["resolved"] is False
            deadline = time.monotonic() + 10
            while c.request("route", domain="corp.example")["provider"] != "google":
                assert time.monotonic() < deadline, "MX lookup never landed"
                time.sleep(0.05)
            grant = c.request("acquire", ip="192.0.2.10", domain="corp.example")
            assert grant["provider"] == "google"
            c.request("route", domain="nomail.example")
            while c.request("route", domain="nomail.example")["provider"] is not None:
                assert time.monotonic() < deadline, "null MX never landed"
                time.sleep(0.05)
            denied = c.request("acquire", ip="192.0.2.10", domain="nomail.example")
            assert denied["reason"] == "null_mx"
            assert dns.count("corp.example") == 1


def test_the_daemon_runs_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    from pgserver import create_database

    url = create_database(postgres_url, "kiln_daemon")
    plan = tmp_path / "plan.yaml"
    plan.write_text(RESTART_PLAN)
    d = DaemonProc(plan, args=["--database-url", url])
    try:
        d.start()
        with d.client() as c:
            assert c.request("acquire", ip="192.0.2.10", domain="gmail.com", n=400)["granted"]
        assert d.stop() == 0
        d.start()
        with d.client() as c:
            assert c.request("acquire", ip="192.0.2.10", domain="gmail.com", n=601)["granted"] == 0
            assert c.request("acquire", ip="192.0.2.10", domain="gmail.com", n=600)["granted"]
        assert d.stop() == 0
        with Store(url) as store:
            today = datetime.now(UTC).date()
            assert store.counts(today)[("192.0.2.10", "default")].granted == 1_000
    finally:
        d.cleanup()


def test_plan_errors_stop_kiln_run_before_anything_starts(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(PLAN).replace("timezone: UTC", "timezone: Mars/Base"))
    d = DaemonProc(plan)
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
        assert "Mars/Base" in d.log()
        assert not d.socket.exists()
    finally:
        d.cleanup()
