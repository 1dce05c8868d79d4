"""contrib/kumomta/ (the module and the example policy) run by Debian's Lua 5.1 with redis-lua
against a real kiln, under tests/kumomta/shim.lua (KumoMTA itself cannot be installed here):
routing by kiln's pick with overflow to warm IPs, 451 when no IP has room, retries held to the
caps through `CL.THROTTLE kiln/IP/DOMAIN`, outcomes reported back, suppressed recipients
refused, kiln down."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from daemonproc import DaemonProc, stored_counts

REPO = Path(__file__).resolve().parent.parent
LUA = shutil.which("lua5.1") or "/usr/bin/lua5.1"
WARM = "192.0.2.1"
NEW = ["192.0.2.10", "192.0.2.11"]
COLD = ["192.0.2.20"]
CAP = 3  # each warming IP's daily cap at Google

PLAN = f"""\
name: kumomta-lua
timezone: UTC
providers:
  google: {{domains: [gmail.com]}}
pools:
  main:
    ips: [{WARM}]
  cold:
    ips: []
batches:
  new:
    pool: main
    ips: [{", ".join(NEW)}]
    schedule: s
    start_date: 2026-11-01
  colder:
    pool: cold
    ips: [{", ".join(COLD)}]
    schedule: s
    start_date: 2026-11-01
schedules:
  s:
    steps:
      - {{daily_cap: {CAP}, hourly_cap: {CAP}}}
      - {{daily_cap: {CAP}, hourly_cap: {CAP}}}
    hourly:
      active_hours: 00-24
    max_message_rate: 1_000/s,max_burst=1_000
"""


def drive(
    d: DaemonProc | None,
    folder: Path,
    lines: list[str],
    pool: str = "main",
    when_down: str = "defer",
    scope: str | None = None,
) -> list[list[str]]:
    """Run the example policy on `lines` (tests/kumomta/drive.lua); its answers, split. The
    policy's pool, when_down and scope are set as a user would edit them (a copy in
    `folder`)."""
    policy = (REPO / "contrib" / "kumomta" / "policy.lua").read_text()
    assert "pool = 'main'" in policy
    changed = folder / "policy.lua"
    settings = f"pool = '{pool}', when_down = '{when_down}'"
    if scope is not None:
        settings += f", scope = '{scope}'"
    changed.write_text(policy.replace("pool = 'main'", settings))
    sock = d.state_dir / "resp.sock" if d is not None else folder / "no-kiln.sock"
    env = {
        **os.environ,
        "LUA_PATH": f"{REPO / 'contrib' / 'kumomta'}/?.lua;{REPO / 'tests' / 'kumomta'}/?.lua;;",
        "KILN_POLICY": str(changed),
        "KILN_NODE": f"redis+unix://{sock}",
    }
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and script)
            [LUA, str(REPO / "tests" / "kumomta" / "drive.lua")],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        changed.unlink()
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


@pytest.fixture
def daemon(tmp_path: Path) -> DaemonProc:
    """A daemon on the test plan, at noon of a warm-up day (stopped by the test)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    return DaemonProc(plan, args=["--clock-start", "2026-11-03T12:00:00Z"]).start()


def test_kiln_routes_overflows_rejects_and_holds_retries(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    try:
        n = 2 * CAP + 4
        lines = [f"msg m{i} user{i}@gmail.com" for i in range(n)]
        answers = drive(daemon, tmp_path, [*lines, "retry m0", f"retry m{n - 1}"])
        routed, retries = answers[:n], answers[n:]
        assert [r[1] for r in routed] == ["routed"] * n, routed
        # Each warming IP exactly at its cap, then the pool's warm IP carries the rest.
        assert [r[2] for r in routed[: 2 * CAP]].count(NEW[0]) == CAP
        assert Counter(r[2] for r in routed) == {NEW[0]: CAP, NEW[1]: CAP, WARM: 4}
        # Each message leaves through the single-source pool of its IP; the first attempt
        # was paid at reception and is not delayed.
        for _, _, ip, pool, delayed in routed:
            assert pool == "kiln-" + ip.replace(".", "-") and delayed == "false"
        # A retry of mail on a full warming IP is delayed by kiln's wait: until the next day
        # begins, 12 hours after noon. On the warm IP it goes at once.
        assert retries[0][:3] == ["m0", "retry", "true"]
        assert abs(int(retries[0][3]) - 12 * 3600) <= 60, retries[0]
        assert retries[1][:3] == [f"m{n - 1}", "retry", "false"]
        # A pool with only warming IPs: once full, reception says why and the sender retries.
        cold = drive(
            daemon, tmp_path, [f"msg c{i} u{i}@gmail.com" for i in range(CAP + 1)], pool="cold"
        )
        assert [r[1] for r in cold[:CAP]] == ["routed"] * CAP
        assert cold[CAP][1:3] == ["rejected", "451"]
        assert cold[CAP][3] == "4.7.0 kiln: waiting for room at google in pool cold (daily_cap)"
        # Outcomes go back to kiln; no log record is queued.
        logged = drive(
            daemon,
            tmp_path,
            [
                "msg r1 a@gmail.com",
                "log r1 Delivery 250 2.0.0 OK",
                "msg r2 b@gmail.com",
                "log r2 Bounce 550 5.1.1 The email account that you tried to reach does not exist",
                "msg r3 c@gmail.com",
                "log r3 TransientFailure 421 4.7.0 Try again later",
            ],
            pool="main",
        )
        assert [r[1:] for r in logged[1::2]] == [["logged", "false"]] * 3
        # An unknown pool is a mistake in the policy: 451 with kiln's reason.
        wrong = drive(daemon, tmp_path, ["msg w1 a@gmail.com"], pool="nope")
        assert wrong[0][1:3] == ["rejected", "451"] and "unknown pool 'nope'" in wrong[0][3]
    finally:
        daemon.stop()
    day = dt.date(2026, 11, 3).isoformat()
    assert stored_counts(daemon.state_dir, day, "delivered") == {(WARM, "google"): 1}
    assert stored_counts(daemon.state_dir, day, "bounced") == {(WARM, "google"): 1}
    assert stored_counts(daemon.state_dir, day, "deferred") == {(WARM, "google"): 1}
    granted = stored_counts(daemon.state_dir, day, "granted")
    assert granted[(NEW[0], "google")] == CAP and granted[(COLD[0], "google")] == CAP
    daemon.cleanup()


def test_suppressed_recipients_are_refused_and_charge_nothing(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    """A recipient on kiln's suppression list is refused at reception with 550 5.7.1 and the
    event, and no IP is charged: listed globally, listed for the policy's scope, or any
    recipient of an SMTP batch. One listed for another scope is routed."""
    try:
        with daemon.client() as c:
            for address, fields in [
                ("gone@gmail.com", {"event": "hard_bounce"}),
                ("left@gmail.com", {"event": "unsubscribe", "scope": "news"}),
            ]:
                assert c.request("suppress", action="add", address=address, **fields)["ok"]
        answers = drive(
            daemon,
            tmp_path,
            [
                "msg s1 gone@GMail.com",
                "msg s2 left@gmail.com",
                "msg s3 ok@gmail.com,gone@gmail.com",
                "msg s4 ok@gmail.com",
            ],
            pool="cold",
            scope="news",
        )
        assert answers[0] == [
            "s1",
            "rejected",
            "550",
            "5.7.1 kiln: gone@GMail.com is on the suppression list (hard_bounce)",
        ]
        assert answers[1][1:] == [
            "rejected",
            "550",
            "5.7.1 kiln: left@gmail.com is on the suppression list (unsubscribe)",
        ]
        assert answers[2][1:] == [
            "rejected",
            "550",
            "5.7.1 kiln: gone@gmail.com is on the suppression list (hard_bounce)",
        ]
        assert answers[3][:2] == ["s4", "routed"] and answers[3][2] == COLD[0]
        # Without the scope, the one listed for `news` goes.
        other = drive(daemon, tmp_path, ["msg s5 left@gmail.com"], pool="cold")
        assert other[0][:3] == ["s5", "routed", COLD[0]]
    finally:
        daemon.stop()
    day = dt.date(2026, 11, 3).isoformat()
    assert stored_counts(daemon.state_dir, day, "granted") == {(COLD[0], "google"): 2}
    daemon.cleanup()


def test_when_kiln_is_down_mail_waits_or_passes(tmp_path: Path) -> None:
    down = drive(None, tmp_path, ["msg d1 a@gmail.com"])
    assert down[0][1:] == [
        "rejected",
        "451",
        "4.4.3 kiln: the warm-up scheduler did not answer; try again later",
    ]
    passed = drive(None, tmp_path, ["msg d1 a@gmail.com"], when_down="pass")
    assert passed[0][1:] == ["routed", "nil", "nil", "false"]
