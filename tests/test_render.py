"""`kiln render pmta` and `kiln render kumomta` (kiln.mtarender, kiln.cli_render).

Golden files: tests/golden/render/PLAN.pmta.conf, PLAN.kiln-sources.toml and
PLAN.kiln-shaping.toml for every plan of schedules/, rendered at 10:00 local on the day after
the plan's earliest batch start. `KILN_UPDATE_GOLDEN=1` rewrites them.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonproc import REPO, running_daemon
from kiln import _core
from kiln.cli import main
from kiln.cli_render import DaemonSource, PlanSource, RenderError, Watcher, write_checked
from kiln.errors import KilnError
from kiln.mtarender import (
    HELD_KUMO_RATE,
    RenderOptions,
    check_kumomta,
    check_pmta,
    render_kumomta,
    render_pmta,
)
from kiln.mtashape import Shape, nominal_engine, shape_of
from kiln.planfile import load_plan
from kiln.schedule import Plan

GOLDEN = REPO / "tests" / "golden" / "render"
PLANS = sorted((REPO / "schedules").glob("*.yaml"))
HOSTNAME = "mta-{ip_dashed}.example.com"
KUMO = ("kiln-sources.toml", "kiln-shaping.toml")


def golden_at(plan: Plan) -> str:
    """10:00 local on the day after the plan's earliest batch start, ISO 8601 with offset."""
    first = min(b.start_date for b in plan.batches.values())
    day = first + timedelta(days=1)
    return datetime(day.year, day.month, day.day, 10, tzinfo=plan.zone).isoformat()


def ms_of(plan: Plan, day_offset: int, hour: int, minute: int = 0) -> int:
    """Epoch ms of `hour:minute` local, `day_offset` days after the earliest batch start."""
    first = min(b.start_date for b in plan.batches.values())
    day = first + timedelta(days=day_offset)
    moment = datetime(day.year, day.month, day.day, hour, minute, tzinfo=plan.zone)
    return int(moment.timestamp() * 1000)


def compare_golden(name: str, text: str) -> None:
    """`text` equals the golden file `name` (rewritten instead with KILN_UPDATE_GOLDEN=1)."""
    path = GOLDEN / name
    if os.environ.get("KILN_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with KILN_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from its golden file"


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("plan_path", PLANS, ids=lambda p: p.stem)
def test_golden_files(
    plan_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Both renders of every shipped plan, through the `kiln` command, equal their golden
    files exactly and pass their own checks."""
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_path)
    rel = str(plan_path.relative_to(REPO))
    common = ["--config", rel, "--at", golden_at(plan), "--hostname", HOSTNAME]
    pmta = tmp_path / "kiln.conf"
    assert main(["render", "pmta", *common, "--out", str(pmta)]) == 0
    assert main(["render", "kumomta", *common, "--out", str(tmp_path / "kumo")]) == 0
    assert check_pmta(pmta.read_text()) == []
    files = {n: (tmp_path / "kumo" / n).read_text() for n in KUMO}
    assert check_kumomta(files) == []
    compare_golden(f"{plan.name}.pmta.conf", pmta.read_text())
    for n in KUMO:
        compare_golden(f"{plan.name}.{n}", files[n])
    # Standard output carries the same text.
    capsys.readouterr()
    assert main(["render", "pmta", *common]) == 0
    assert capsys.readouterr().out == pmta.read_text()
    assert main(["render", "kumomta", *common]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"# ---- {n} ----\n{files[n]}" for n in KUMO)


# ---------------------------------------------------------------- the rule, independently


def dashed(ip: str) -> str:
    """`192-0-2-10`, `2001-db8--1`."""
    return ipaddress.ip_address(ip).compressed.replace(".", "-").replace(":", "-")


def expected_per_hour(u: dict[str, Any], now_ms: int, local_hour: int) -> int | None:
    """The rule of kiln.mtashape's docstring, from a key's usage: min(hourly cap, daily cap //
    active hours, daily room, rate per hour), each scaled by the multiplier; 0 when closed."""
    ppm = int(u["multiplier"] * 1_000_000 + 0.5)
    mask = u["active_hours"]
    if (
        u["retired"]
        or u["paused"]
        or ppm == 0
        or (u["suspended_until_ms"] or 0) > now_ms
        or (mask is not None and not (mask >> local_hour) & 1)
    ):
        return 0
    found: list[int] = []
    if u["hourly_cap"] is not None:
        found.append(u["hourly_cap"] * ppm // 1_000_000)
    if u["daily_cap"] is not None:
        daily = u["daily_cap"] * ppm // 1_000_000
        hours = 24 if mask is None else max(bin(mask).count("1"), 1)
        found += [daily // hours, max(daily - u["day_used"], 0)]
    if u["rate_count"]:
        found.append(u["rate_count"] * ppm * 3_600_000 // (1_000_000 * u["rate_period_ms"]))
    return min(found) if found else None


def pmta_rates(text: str) -> dict[tuple[str, str], str]:
    """(vmta, domain target) -> max-msg-rate argument, read from a PowerMTA file."""
    rates: dict[tuple[str, str], str] = {}
    vmta = target = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("<virtual-mta "):
            vmta = line[len("<virtual-mta ") : -1]
        elif line.startswith("<domain "):
            target = line[len("<domain ") : -1]
        elif line.startswith("max-msg-rate "):
            rates[(vmta, target)] = line.split()[1]
    return rates


def per_hour_of(rate: str) -> float:
    """Messages per hour of `0`, `N/h` or `N/d`."""
    if rate == "0":
        return 0.0
    count, unit = rate.split(",")[0].split("/")
    return int(count) / (24.0 if unit == "d" else 1.0)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Plan, _core.Engine, int]:
    """A shipped plan, an instant over its ramp, and its nominal engine after random grants,
    pauses, slow-downs and suspensions."""
    plan = PLANS_LOADED[draw(st.sampled_from(sorted(PLANS_LOADED)))]
    now = ms_of(
        plan,
        draw(st.integers(0, 40)),
        draw(st.integers(0, 23)),
        draw(st.integers(0, 59)),
    )
    engine = nominal_engine(plan, now)
    keys = [engine.key(k.ip, k.provider) for k in shape_of(engine, plan, now).keys]
    for _ in range(draw(st.integers(0, 12))):
        key = draw(st.sampled_from(keys))
        op = draw(st.sampled_from(["acquire", "pause", "slow", "suspend"]))
        if op == "acquire":
            engine.acquire(key, draw(st.integers(1, 400)), now)
        elif op == "pause":
            engine.pause(key)
        elif op == "slow":
            engine.set_multiplier(key, draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.77, 1.0])))
        else:
            engine.suspend(key, now + draw(st.integers(-3_600_000, 3_600_000)))
    return plan, engine, now


PLANS_LOADED = {p.stem: load_plan(p) for p in PLANS}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_rendered_rates_are_the_rule_and_never_exceed_the_daily_cap(
    scenario: tuple[Plan, _core.Engine, int],
) -> None:
    """For every warming (IP, provider) key, the rate in both renders, read back from the text,
    is what the engine's usage implies; over the key's active hours it never exceeds the
    daily cap (KumoMTA's held `1/d` aside: at most one message a day, documented)."""
    plan, engine, now = scenario
    shape = shape_of(engine, plan, now)
    options = RenderOptions(hostname=HOSTNAME)
    pmta = render_pmta(shape, options)
    kumo = render_kumomta(shape, options)
    assert check_pmta(pmta) == []
    assert check_kumomta(kumo) == []
    p_rates = pmta_rates(pmta)
    shaping = tomllib.loads(kumo["kiln-shaping.toml"])
    local_hour = plan.local_time(now).hour
    for k in shape.keys:
        u = engine.usage(engine.key(k.ip, k.provider))
        want = expected_per_hour(u, now, local_hour)
        prov = shape.providers.get(k.provider)
        # PowerMTA: providers with domains under their macro, `default` under `*`.
        target = "*" if k.provider == "default" else f"$kiln-{k.provider}"
        got_p = p_rates.get((f"kiln-{dashed(k.ip)}", target))
        if want is None or (prov is not None and not prov.domains):
            assert got_p is None, (k, got_p)
        else:
            assert got_p == ("0" if want == 0 else f"{want}/h"), (k, u, got_p)
        # KumoMTA: providers with MX suffixes, else per domain; `default` is not expressible.
        got_k: list[str] = []
        if prov is not None and prov.mx_suffixes:
            block = shaping["provider"][f"kiln-{k.provider}"]
            limits = block.get("sources", {}).get(f"kiln-{dashed(k.ip)}")
            got_k = [] if limits is None else [limits["provider_max_message_rate"]]
        elif prov is not None:
            got_k = [
                shaping[d]["sources"][f"kiln-{dashed(k.ip)}"]["max_message_rate"]
                for d in prov.domains
                if f"kiln-{dashed(k.ip)}" in shaping[d].get("sources", {})
            ]
        if k.provider == "default" or want is None:
            assert got_k == [], (k, got_k)
        else:
            assert got_k, k
            for rate in got_k:
                assert rate == (HELD_KUMO_RATE if want == 0 else f"{want}/h"), (k, rate)
        # Over the day's active hours, never more than the daily cap.
        if u["daily_cap"] is not None and want is not None:
            daily = u["daily_cap"] * int(u["multiplier"] * 1_000_000 + 0.5) // 1_000_000
            mask = u["active_hours"]
            hours = 24 if mask is None else bin(mask).count("1")
            assert per_hour_of(got_p or "0") * hours <= daily
            for rate in got_k:
                if rate != HELD_KUMO_RATE:
                    assert per_hour_of(rate) * hours <= daily


# ---------------------------------------------------------------- odd plans


ODD_PLAN = """\
name: odd
timezone: Asia/Tokyo
pools:
  main:
    ips: [198.51.100.7]
batches:
  v6:
    pool: main
    ips: ["2001:db8::1", 192.0.2.77]
    schedule: s
    start_date: 2027-05-01
schedules:
  s:
    steps:
      - {warmup_day: 1, daily_cap: 240}
      - {warmup_day: 2, daily_cap: 480}
    providers:
      yahoo-jp: {scale: 0.5}
      microsoft-365: {scale: 0.5}
    hourly:
      active_hours: 08-20
    after_last_step: uncapped
"""


def odd_plan(tmp_path: Path) -> Path:
    """A plan with an IPv6 address, a provider known by domain only (yahoo-jp) and one known
    by MX suffix only (microsoft-365)."""
    path = tmp_path / "odd.yaml"
    path.write_text(ODD_PLAN)
    return path


def test_ipv6_and_providers_with_only_domains_or_only_mx_suffixes(tmp_path: Path) -> None:
    """IPv6 names and addresses; yahoo-jp as a domain block in KumoMTA and a macro in
    PowerMTA; microsoft-365 as a provider block in KumoMTA and under `<domain *>` (said in
    a comment) in PowerMTA."""
    plan = load_plan(odd_plan(tmp_path))
    now = ms_of(plan, 1, 10)
    shape = shape_of(nominal_engine(plan, now), plan, now)
    opts = RenderOptions(hostname=HOSTNAME)
    pmta = render_pmta(shape, opts)
    assert check_pmta(pmta) == []
    assert "<virtual-mta kiln-2001-db8--1>" in pmta
    assert "smtp-source-host 2001:db8::1 mta-2001-db8--1.example.com" in pmta
    assert "domain-macro kiln-yahoo-jp yahoo.co.jp" in pmta
    assert "microsoft-365 has no domains" in pmta
    kumo = render_kumomta(shape, opts)
    assert check_kumomta(kumo) == []
    sources = tomllib.loads(kumo["kiln-sources.toml"])
    assert sources["source"]["kiln-2001-db8--1"]["source_address"] == "2001:db8::1"
    assert sources["pool"]["kiln-2001-db8--1"] == {"kiln-2001-db8--1": {"weight": 1}}
    shaping = tomllib.loads(kumo["kiln-shaping.toml"])
    assert shaping["yahoo.co.jp"]["mx_rollup"] is False
    assert shaping["yahoo.co.jp"]["sources"]["kiln-2001-db8--1"] == {
        "max_message_rate": "20/h",
        "connection_limit": 2,
    }
    assert shaping["provider"]["kiln-microsoft-365"]["match"] == [
        {"MXSuffix": ".mail.protection.outlook.com"},
        {"MXSuffix": ".mx.microsoft"},
    ]
    # {ip} cannot name an IPv6 host; the error says what to use.
    with pytest.raises(KilnError, match="ip_dashed"):
        render_pmta(shape, RenderOptions(hostname="{ip}.example.com"))
    with pytest.raises(KilnError, match="EHLO"):
        render_pmta(shape, RenderOptions())


# ---------------------------------------------------------------- bad input


def test_bad_input_exits_1_with_the_reason(tmp_path: Path, capsys: Any) -> None:
    """An unknown pool, a plan with mistakes (its own error lines), a daemon that does not
    answer, and option mistakes: exit 1 and one clear message."""
    example = str(REPO / "schedules" / "example.yaml")
    assert main(["render", "kumomta", "--config", example, "--pool", "nope"]) == 1
    assert "pool 'nope' is not in plan 'example'; its pools: transactional, shared" in (
        capsys.readouterr().err
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(ODD_PLAN.replace("timezone: Asia/Tokyo", "timezone: Mars/Olympus"))
    assert main(["render", "kumomta", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"the plan {bad} has mistakes" in err and f"{bad}:2:" in err
    state = tmp_path / "state"
    assert main(["render", "kumomta", "--daemon", "--state-dir", str(state)]) == 1
    assert "looked for the operator socket at" in capsys.readouterr().err
    assert main(["render", "pmta", "--config", example, "--watch"]) == 1
    assert "--watch needs --out" in capsys.readouterr().err
    assert main(["render", "pmta", "--config", example]) == 1
    assert "--hostname" in capsys.readouterr().err


def test_a_render_that_fails_its_check_keeps_the_old_file(tmp_path: Path) -> None:
    """write_checked writes FILE.tmp, checks it and leaves FILE as it was on a problem."""
    out = tmp_path / "kiln.conf"
    out.write_text("# the old file\n")
    bad = "<virtual-mta kiln-1>\n    max-msg-rate 0/hours\n"

    def check(files: dict[Path, str]) -> list[str]:
        """check_pmta of each file."""
        return [p for text in files.values() for p in check_pmta(text)]

    with pytest.raises(RenderError) as e:
        write_checked({out: bad}, check)
    assert out.read_text() == "# the old file\n"
    assert not (tmp_path / "kiln.conf.tmp").exists()
    assert any("max-msg-rate needs" in p for p in e.value.problems)
    assert any("never closed" in p for p in e.value.problems)
    bad_kumo = {"kiln-sources.toml": '[pool."p"."nobody"]\n', "kiln-shaping.toml": ""}
    assert check_kumomta(bad_kumo) == [
        "kiln-sources.toml: pool 'p' names source 'nobody', which is not defined"
    ]
    zero = (
        '[provider."x"]\nmatch = []\n'
        '[provider."x".sources."s"]\nprovider_max_message_rate = "0/h"\n'
    )
    assert check_kumomta({"kiln-sources.toml": "", "kiln-shaping.toml": zero}) == [
        "kiln-shaping.toml: provider 'x' source 's': rate '0/h' is not N/h (N >= 1) or 1/d"
    ]


# ---------------------------------------------------------------- the watch


class EngineSource:
    """The caps of an engine the test changes (pause, slow-down), as the daemon's would be."""

    kind = "live"

    def __init__(self, plan: Plan, engine: _core.Engine) -> None:
        self.plan = plan
        self.engine = engine

    def fetch(self, now_ms: int) -> tuple[Shape, str]:
        """The engine's shape now."""
        return shape_of(self.engine, self.plan, now_ms), ""


def watcher(
    tmp_path: Path, source: Any, reload_command: str | None, mta: str = "pmta"
) -> tuple[Watcher, list[str]]:
    """A watch writing into `tmp_path`, and the lines it logged."""
    logged: list[str] = []
    out = tmp_path / ("kiln.conf" if mta == "pmta" else "kumo")
    out.parent.mkdir(exist_ok=True)
    if mta == "kumomta":
        out.mkdir(exist_ok=True)
    w = Watcher(
        mta=mta,
        source=source,
        options=RenderOptions(hostname=HOSTNAME, source=source.kind),
        out=out,
        log=logged.append,
        reload_command=reload_command,
        reload_timeout_s=5,
    )
    return w, logged


def test_watch_rerenders_on_hour_roll_and_limit_changes_and_reloads(tmp_path: Path) -> None:
    """Same hour and limits: nothing; an hour roll re-renders (and writes only if the text
    changed: leaving the active hours does); a pause writes; each write runs the reload
    command once."""
    plan = PLANS_LOADED["example"]
    marks = tmp_path / "reloads"
    engine = nominal_engine(plan, ms_of(plan, 1, 0))
    w, logged = watcher(tmp_path, EngineSource(plan, engine), f"echo x >> {marks}")
    w.poll(ms_of(plan, 1, 20, 5))
    first = w.out.read_text()
    assert "max-msg-rate 20/h" in first and w.writes == 1 and marks.read_text() == "x\n"
    w.poll(ms_of(plan, 1, 20, 40))  # same hour, same limits
    assert w.writes == 1 and logged[-1].startswith("ran reload")
    w.poll(ms_of(plan, 1, 21, 0))  # hour roll, same rates: rendered, not written
    assert w.writes == 1 and "unchanged (hour" in logged[-1]
    w.poll(ms_of(plan, 1, 22, 0))  # outside the active hours: every rate 0
    assert w.writes == 2 and "max-msg-rate 20/h" not in w.out.read_text()
    assert "hour 2026-12-02T21 -> 2026-12-02T22" in logged[-2]
    w.poll(ms_of(plan, 2, 10, 0))
    engine.pause(engine.key("192.0.2.10", "google"))
    w.poll(ms_of(plan, 2, 10, 1))  # a pause: the limits' fingerprint changes
    assert w.writes == 4 and "limits changed" in logged[-2]
    assert "held (paused)" in w.out.read_text()
    assert marks.read_text() == "x\n" * 4


def pending(w: Watcher) -> bool:
    """Whether the watch will run the reload command again at its next poll."""
    return w.reload_pending


def test_watch_survives_failing_reloads_and_an_unreachable_daemon(tmp_path: Path) -> None:
    """A reload command that fails is logged and run again at the next poll until it works;
    a daemon that does not answer is logged once and the watch goes on; `run` stops on its
    stop event."""
    plan = PLANS_LOADED["example"]
    flag = tmp_path / "ok"
    cmd = f"test -e {flag} || {{ echo not yet >&2; exit 3; }}"
    w, logged = watcher(
        tmp_path, EngineSource(plan, nominal_engine(plan, ms_of(plan, 1, 0))), cmd, "kumomta"
    )
    w.poll(ms_of(plan, 1, 10))
    assert w.writes == 1 and pending(w)
    assert "exited 3: not yet; trying again" in logged[-1]
    w.poll(ms_of(plan, 1, 10, 1))
    assert w.reloads == 2 and pending(w)
    flag.touch()
    w.poll(ms_of(plan, 1, 10, 2))
    assert not pending(w) and logged[-1].startswith("ran reload command")
    w.reload_command = "sleep 5"
    w.reload_timeout_s = 0.2
    w.poll(ms_of(plan, 1, 11, 30))
    w.poll(ms_of(plan, 1, 22, 0))
    assert "did not end in 0.2 s" in logged[-1]
    # An unreachable daemon: logged once, never raised; `run` ends on its stop event.
    gone, glog = watcher(tmp_path / "d", DaemonSource(tmp_path / "none.sock"), None)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        """Record the sleep; stop after three."""
        slept.append(seconds)
        if len(slept) == 3:
            gone.stop.set()

    gone.run(lambda: ms_of(plan, 1, 10), sleep, 7.0)
    assert slept == [7.0, 7.0, 7.0]
    assert len(glog) == 1 and "cannot reach the kiln daemon" in glog[0]
    assert not gone.out.exists()


def test_watch_rerenders_when_the_plan_file_changes(tmp_path: Path) -> None:
    """With --config the plan is read again when its text changes; a version with mistakes
    is logged with its own lines and the last good one stays."""
    path = odd_plan(tmp_path)
    logged: list[str] = []
    source = PlanSource(path, logged.append)
    w, wlog = watcher(tmp_path, source, None)
    plan = load_plan(path)
    w.poll(ms_of(plan, 1, 10))
    assert "max-msg-rate 20/h" in w.out.read_text()
    path.write_text(ODD_PLAN.replace("daily_cap: 480", "daily_cap: 960"))
    w.poll(ms_of(plan, 1, 10, 5))
    assert "max-msg-rate 80/h" in w.out.read_text() and "plan file changed" in wlog[-1]
    path.write_text(ODD_PLAN.replace("daily_cap: 480", "daily_cap: -1"))
    w.poll(ms_of(plan, 1, 10, 6))
    assert "has mistakes; the last good one stays" in logged[0]
    assert any(f"{path}:" in line for line in logged[1:])
    assert "max-msg-rate 80/h" in w.out.read_text() and w.writes == 2


def test_watch_of_a_live_daemon_and_sigterm(tmp_path: Path) -> None:
    """`kiln render kumomta --daemon --watch` renders the running daemon's live caps (its
    ramp's step and today's use: what its `caps` op says) and ends with exit 0 on SIGTERM."""
    start = ["--clock-start", "2026-12-03T10:00:00+01:00"]
    with running_daemon(args=start) as proc:
        with proc.mta_client() as c:
            assert c.request("acquire", ip="192.0.2.10", provider="google", n=5)["granted"]
        with proc.client() as c:
            caps = c.request("caps")
        live = {(k["ip"], k["provider"]): k["per_hour"] for k in caps["keys"]}
        out = tmp_path / "kumo"
        cmd = [sys.executable, "-m", "kiln", "render", "kumomta", "--daemon"]
        cmd += ["--socket", str(proc.operator_socket), "--out", str(out)]
        cmd += ["--watch", "--interval", "0.2", "--reload-command", f"echo r >> {tmp_path}/r"]
        watch = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)  # noqa: S603
        try:
            shaping = out / "kiln-shaping.toml"
            deadline = time.monotonic() + 20
            while not shaping.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert shaping.exists(), "the watch wrote nothing"
            doc = tomllib.loads(shaping.read_text())
            google = doc["provider"]["kiln-google"]["sources"]
            for ip in ("192.0.2.10", "192.0.2.11"):
                rate = google[f"kiln-{dashed(ip)}"]["provider_max_message_rate"]
                assert rate == f"{live[(ip, 'google')]}/h"
            text = shaping.read_text()
            assert "live caps from the running daemon" in text
            # A new daemon's ramps start at step 1 (75 a day at Google), whatever the date.
            assert "192.0.2.10 -> google, batch tx-2026-12: hourly_cap; daily cap 75, " in text
            assert "hourly cap 5, used today 5" in text
            watch.send_signal(signal.SIGTERM)
            _, err = watch.communicate(timeout=10)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        assert watch.returncode == 0, err
        assert "stopped" in err and (tmp_path / "r").read_text() == "r\n"
