"""`kiln simulate`: the shipped scenarios say what they are about, the same inputs give the same
report, bad scenario files are located, and a real daemon fed the same day moves its ramps
the same way."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemonproc import DaemonProc
from kiln.cli import main
from kiln.simscenario import Scenario, load_scenario
from kiln.simulate import REPORT_FORMAT, REPORT_VERSION, simulate


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """`kiln simulate` configures the process's logging (quiet, errors only), as a command
    should; these tests run it in-process, so the next tests get the logging they had."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


SCENARIOS = Path(__file__).resolve().parent.parent / "schedules" / "scenarios"


def run_scenario(name: str, days: int | None = None) -> dict[str, Any]:
    """The report of a shipped scenario (its plan and days unless `days` is given)."""
    path = SCENARIOS / name
    scenario, _, _ = load_scenario(path)
    assert scenario.plan is not None and scenario.days is not None
    return simulate(path.parent / scenario.plan, scenario, days or scenario.days)


@pytest.fixture(scope="module")
def clean() -> dict[str, Any]:
    """The clean warm-up's report."""
    return run_scenario("clean-warmup.yaml")


def ramp(report: dict[str, Any], provider: str) -> dict[str, Any]:
    """The one ramp of `provider`."""
    (r,) = [r for r in report["ramps"] if r["provider"] == provider]
    return dict(r)


def test_every_shipped_scenario_loads_and_names_a_plan_in_schedules() -> None:
    files = sorted(SCENARIOS.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "clean-warmup.yaml",
        "gmail-rate-limit-day6.yaml",
        "snds-red-day9.yaml",
        "postmaster-outage.yaml",
        "dual-mta-cutover.yaml",
    }
    for f in files:
        scenario, _, _ = load_scenario(f)
        assert f.read_text().startswith("# ")
        assert scenario.plan is not None and (f.parent / scenario.plan).is_file()


def test_clean_warmup_reaches_full_volume_with_nothing_firing(clean: dict[str, Any]) -> None:
    assert clean["format"] == REPORT_FORMAT and clean["version"] == REPORT_VERSION
    assert clean["automations"] == []
    for r in clean["ramps"]:
        assert r["full_volume_day"] == r["steps"] + 1, r
        assert set(r["moves"]) <= {"advance", "done"}
    day1 = clean["daily"][0]
    assert day1["warming"] > 0 and day1["overflowed"] > 0 and day1["waited"] == 0
    # Overflow shrinks as the warming IPs take more.
    assert clean["daily"][10]["warming"] > day1["warming"]


def test_gmail_rate_limit_on_day_6_suspends_holds_and_delays_gmail(
    clean: dict[str, Any],
) -> None:
    report = run_scenario("gmail-rate-limit-day6.yaml")
    started = [a for a in report["automations"] if a["event"] == "start"]
    assert {(a["kind"], a["day"]) for a in started} == {("suspend", 6), ("hold", 6)}
    assert all("google" in a["scope"] for a in started)
    held = [m for m in report["ramp_moves"] if m["action"] == "hold"]
    assert [(m["day"], m["provider"]) for m in held] == [(6, "google")]
    assert "rate_limit_rep" in held[0]["reason"]
    assert ramp(report, "google")["full_volume_day"] == ramp(clean, "google")["full_volume_day"] + 1
    assert ramp(report, "default")["full_volume_day"] == ramp(clean, "default")["full_volume_day"]


def test_snds_red_on_day_9_pauses_the_microsoft_ramp_until_green_days() -> None:
    report = run_scenario("snds-red-day9.yaml", days=13)
    (start,) = [a for a in report["automations"] if a["event"] == "start"]
    assert (start["kind"], start["day"], start["rule"]) == ("pause", 9, "snds.filter_result")
    assert "192.0.2.31" in start["scope"] and "microsoft-consumer" in start["scope"]
    paused = [
        m["day"]
        for m in report["ramp_moves"]
        if m["provider"] == "microsoft-consumer" and m["action"] == "pause"
    ]
    assert paused == [9, 10, 11]
    assert [a["day"] for a in report["automations"] if a["event"] == "ended"] == [12]
    steps = [d["steps"]["wave-1/google"] for d in report["daily"]]
    assert steps == list(range(1, 14))  # Gmail is not touched


def test_postmaster_outage_holds_gmail_only(clean: dict[str, Any]) -> None:
    report = run_scenario("postmaster-outage.yaml")
    held = [m for m in report["ramp_moves"] if m["action"] == "hold"]
    assert [(m["day"], m["provider"]) for m in held] == [
        (4, "google"),
        (5, "google"),
        (6, "google"),
    ]
    assert all("postmaster is stale" in m["reason"] for m in held)
    assert ramp(report, "google")["full_volume_day"] == ramp(clean, "google")["full_volume_day"] + 3
    assert ramp(report, "default")["full_volume_day"] == ramp(clean, "default")["full_volume_day"]


def test_dual_mta_cutover_moves_the_stream_to_the_new_ips() -> None:
    report = run_scenario("dual-mta-cutover.yaml")
    (r,) = report["ramps"]
    assert r["full_volume_day"] is not None and report["automations"] == []
    first, last = report["daily"][0], report["daily"][r["full_volume_day"] - 2]
    # 5% of the stream on day 1, most of it by the last step; the old MTA takes the rest.
    assert first["warming"] < first["overflowed"]
    assert last["warming"] > last["overflowed"]
    assert sum(d["waited"] for d in report["daily"]) == 0


def test_the_same_inputs_give_byte_identical_json(tmp_path: Path) -> None:
    path = SCENARIOS / "gmail-rate-limit-day6.yaml"
    outputs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        args = ["simulate", "--events", str(path), "--days", "8", "--format", "json"]
        assert main([*args, "--out", str(out)]) == 0
        outputs.append((out / "report.json").read_bytes())
        assert (out / "simulate.png").read_bytes().startswith(b"\x89PNG")
        page = (out / "simulate.html").read_text()
        assert "<svg" in page and "src=" not in page and "<link" not in page
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["days"] == 8


def test_bad_scenario_files_are_located(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "plan: "
        + str(SCENARIOS.parent / "example.yaml")
        + "\ndays: 5\n"
        + "traffic:\n  profil: flat\n"
        + "outcomes:\n  - {provider: gmail, bounce_percent: 150}\n"
        + "replies:\n  - {day: 9, hour: 10, provider: google, code: 421, text: x,\n"
        + "     ips: [203.0.113.9]}\n"
    )
    assert main(["simulate", "--events", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4:3: traffic.profil: unknown key 'profil'; did you mean 'profile'?" in err
    assert f"{bad}:6:23:" in err and "outcomes[0].bounce_percent: must be at most 100" in err
    fixed = bad.read_text().replace("profil:", "profile:").replace("150", "1")
    bad.write_text(fixed)
    assert main(["simulate", "--events", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:6:" in err and "outcomes[0].provider: unknown provider 'gmail'" in err
    assert "did you mean 'google'?" in err
    assert f"{bad}:8:" in err and "replies[0].day: day 9 is after the last simulated day (5)" in err
    assert f"{bad}:9:" in err and "replies[0].ips[0]: '203.0.113.9' is not a sending IP" in err


def test_traffic_spec_and_missing_inputs(capsys: Any) -> None:
    plan = str(SCENARIOS.parent / "example.yaml")
    assert main(["simulate", "--config", plan]) == 1
    assert "--days" in capsys.readouterr().err
    assert main(["simulate", "--config", plan, "--days", "2", "--traffic", "gmail=5"]) == 1
    assert "did you mean 'google'?" in capsys.readouterr().err
    args = ["simulate", "--config", plan, "--days", "2", "--traffic", "google=100;profile=flat"]
    assert main([*args, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offered_per_day"] == [
        {"pool": "transactional", "provider": "google", "messages": 100}
    ]
    assert sum(d["offered"] for d in report["daily"]) == 2 * 96  # rounded per hour


# ----- the same day through a real daemon's socket -----

DAY1 = date(2026, 11, 2)
TWIN_PLAN = """\
# A small plan for the simulated-vs-real comparison.
name: twin
timezone: UTC
pools:
  tx: {}
batches:
  b1:
    pool: tx
    ips: [192.0.2.10, 192.0.2.11]
    schedule: s
    start_date: 2026-11-02
schedules:
  s:
    steps:
      - {daily_cap: 240, hourly_cap: 240}
      - {daily_cap: 480, hourly_cap: 480}
      - {daily_cap: 960, hourly_cap: 960}
      - {daily_cap: 1_920, hourly_cap: 1_920}
    providers:
      google: {scale: 0.5}
    hourly: {active_hours: 00-24}
    max_message_rate: 100_000/s,max_burst=100_000
"""
SPEED = 20_000.0


def _split(n: int) -> list[int]:
    """`n` over the batch's two IPs."""
    return [n - n // 2, n // 2]


def test_a_simulated_day_and_a_real_daemon_make_the_same_ramp_moves(tmp_path: Path) -> None:
    """Two days: the simulation's traffic and outcomes per provider, sent to a real `kiln run`
    through its socket on a fast clock, give the same steps and moves at each day roll.
    2's bounces keep the Gmail ramp from advancing in both."""
    plan = tmp_path / "twin.yaml"
    plan.write_text(TWIN_PLAN)
    scenario = Scenario.model_validate(
        {
            "outcomes": [
                {"bounce_percent": 0.5, "complaint_percent": 0.0, "deferred_percent": 2.0},
                {"provider": "google", "from_day": 2, "to_day": 2, "bounce_percent": 3.0},
            ]
        }
    )
    report = simulate(plan, scenario, 2)
    sim_moves = {
        (m["day"], m["provider"]): (m["action"], m["to_step"]) for m in report["ramp_moves"]
    }
    assert sim_moves[(2, "google")][0] != "advance" and sim_moves[(2, "default")][0] == "advance"
    start = datetime(DAY1.year, DAY1.month, DAY1.day, 0, 0, 1, tzinfo=UTC)
    args = ["--clock-start", start.isoformat(), "--clock-speed", str(SPEED)]
    d = DaemonProc(plan, args=args)
    try:
        d.start()
        for day in (1, 2):
            figures = report["daily"][day - 1]["providers"]
            with d.mta_client() as c:
                for provider, f in figures.items():
                    for ip, n in zip(
                        ("192.0.2.10", "192.0.2.11"), _split(f["warming"]), strict=True
                    ):
                        r = c.request("acquire", ip=ip, provider=provider, n=n)
                        assert r["granted"] == n, r
                    for result, key in (
                        ("delivered", "delivered"),
                        ("bounced", "bounced"),
                        ("deferred", "deferred"),
                        ("complaint", "complaints"),
                    ):
                        for ip, n in zip(("192.0.2.10", "192.0.2.11"), _split(f[key]), strict=True):
                            if n:
                                c.request("report", ip=ip, provider=provider, result=result, n=n)
            real = _moves_after_roll(d, day)
            for provider, (action, step) in real.items():
                assert sim_moves[(day, provider)] == (action, step), (day, provider)
    finally:
        d.cleanup()


def _moves_after_roll(d: DaemonProc, day: int) -> dict[str, tuple[str, int]]:
    """(action, step) per provider once the daemon rolled simulated `day`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with d.client() as c:
            out = {}
            for provider in ("google", "default"):
                e = c.request("explain", ip="192.0.2.10", provider=provider)
                last = e.get("last_move")
                if last is None or f"2026-11-0{day + 2}" not in last["at"]:
                    break
                out[provider] = (last["action"], e["step"])
            else:
                return out
        time.sleep(0.1)
    raise AssertionError(f"the daemon did not roll day {day}")
