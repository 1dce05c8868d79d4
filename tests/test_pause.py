"""Operator pauses (`pause`, `resume`, `kiln pause`, `kiln resume`): automations like policy's,
in force at once, holding the ramp, ended by resume or cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemonproc import running_daemon
from kiln.cli import main
from kiln.daemon import Daemon
from test_daemon import PLAN, FakeClock, acquire, delivered, make, ms, send
from test_protocol import anytime_plan


def op(d: Daemon, clock: FakeClock, **req: Any) -> dict[str, Any]:
    """An operator request, answered as the socket would."""
    return d.upcall(json.dumps(req).encode(), clock.t)


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def test_a_pause_denies_at_once_holds_the_ramp_and_resume_lifts_it(
    plan_file: Path, tmp_path: Path
) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    # A day that would advance the ramp (as in test_daemon): 95 granted, 95 delivered.
    assert send(d, acquire(95))[0]["granted"] == 95
    send(d, delivered(95))
    clock.t = ms("2026-11-02T23:00:00")
    paused = op(d, clock, op="pause", batch="b1", reason="list import went wrong", by="ana")
    assert paused["ok"], paused
    a = paused["automation"]
    assert (a["kind"], a["batch"], a["provider"], a["expires_ms"]) == ("pause", "b1", None, None)
    assert send(d, acquire())[0]["reason"] == "paused"
    listed = op(d, clock, op="automations")["automations"]
    assert [x["id"] for x in listed] == [a["id"]]
    # The day ends paused: the ramp does not move.
    clock.t = ms("2026-11-03T00:00:01")
    d.tick(clock.t)
    assert d.states[("b1", "default")].step == 1
    # Resuming another scope says which pause touches it.
    wrong = op(d, clock, op="resume", ip="192.0.2.10", provider="default")
    assert not wrong["ok"] and a["id"] in wrong["error"], wrong
    resumed = op(d, clock, op="resume", batch="b1", by="ana")
    assert resumed["ok"] and [x["id"] for x in resumed["automations"]] == [a["id"]]
    assert send(d, acquire())[0]["granted"] == 1
    d.flush(clock.t)
    log = d.store.decisions(kind="automation")
    assert [e.action for e in log] == ["pause:start", "pause:ended"]
    assert "list import went wrong" in log[0].reason and "ana" in log[1].reason
    d.store.close()


def test_a_timed_pause_ends_by_itself_and_can_be_cancelled(plan_file: Path, tmp_path: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    timed = op(d, clock, op="pause", ip="192.0.2.10", **{"for": "30m"}, reason="r")
    assert timed["ok"] and timed["automation"]["expires_ms"] == clock.t + 30 * 60_000
    assert send(d, acquire())[0]["reason"] == "paused"
    clock.t += 31 * 60_000
    d.tick(clock.t)
    assert send(d, acquire())[0]["granted"] == 1
    again = op(d, clock, op="pause", ip="192.0.2.10", reason="r")
    assert op(d, clock, op="cancel", automation=again["automation"]["id"])["ok"]
    assert send(d, acquire())[0]["granted"] == 1
    for bad, error in (
        ({"ip": "192.0.2.10"}, "reason:"),
        ({"ip": "192.0.2.99", "reason": "r"}, "not a sending IP"),
        ({"ip": "192.0.2.10", "batch": "b1", "reason": "r"}, "give ip or batch"),
        ({"ip": "192.0.2.10", "provider": "gmail", "reason": "r"}, "unknown provider"),
        ({"ip": "192.0.2.10", "for": "-1h", "reason": "r"}, "for:"),
    ):
        reply = op(d, clock, op="pause", **bad)
        assert not reply["ok"] and error in reply["error"], (bad, reply)
    d.store.close()


def test_kiln_pause_and_resume_against_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_daemon(anytime_plan(tmp_path)) as d:
        where = ["--state-dir", str(d.state_dir)]
        assert (
            main(["pause", "192.0.2.10", "google", "--for", "2h", "--reason", "spike", *where]) == 0
        )
        out = capsys.readouterr().out
        assert "192.0.2.10 x google paused until" in out, out
        with d.mta_client() as c:
            r = c.request("acquire", ip="192.0.2.10", domain="gmail.com")
            assert r["reason"] == "paused", r
        assert main(["resume", "tx-2026-12", *where]) == 1
        assert "no live pause of batch tx-2026-12" in capsys.readouterr().err
        assert main(["resume", "192.0.2.10", "google", *where]) == 0
        assert "resumed" in capsys.readouterr().out
        with d.mta_client() as c:
            assert c.request("acquire", ip="192.0.2.10", domain="gmail.com")["granted"] == 1
