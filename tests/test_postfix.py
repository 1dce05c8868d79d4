"""kiln beside a real Postfix (Debian's postfix 3.7, a private instance: tests/postfixproc.py)
with the lines `kiln postfix-config` prints: the queue manager asks kiln's transport table
for every recipient, mail leaves through one smtp transport per sending IP (bound to
127.0.0.x) to an SMTP sink that records the source address, recipient and Message-ID.
Never skipped: a missing Postfix is a failure (`make system-deps` installs it).

The main test runs on a drill clock (60x) that reaches midnight during it: smtp-source sends
2,000 messages to four providers, more than the pool may carry in a day for each. Each key's
daily cap holds at the sink, the pool overflows in pick's order, the rest waits in Postfix's
deferred queue and in kiln's release queue, kiln is killed (nothing leaves; new mail waits)
and restarted (the held recipients are still there), and at midnight the held mail is
released, each message once.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from daemonproc import REPO, DaemonProc, stored_counts
from kiln import _core
from kiln.clock import SystemClock
from kiln.daemon.postfix import PostfixGate, PostfixSettings
from kiln.planfile import load_plan
from kiln.postfix import postfix_config
from kiln.records import Held
from postfixproc import POSTFIX, SMTP_SOURCE, Postfix
from smtpsink import Delivery, SmtpSink

#: The pool's warming IPs, then its overflow pool's.
TX_IPS = ("127.0.0.2", "127.0.0.3")
SPILL_IPS = ("127.0.0.4", "127.0.0.5")
TX_CAP, SPILL_CAP = 60, 120
DOMAINS = {
    "gmail.com": "google",
    "yahoo.com": "yahoo",
    "outlook.com": "microsoft-consumer",
    "icloud.com": "apple",
}
#: Messages per domain: 2,000 in all, each more than a day's allowance for its provider.
VOLUME = {"gmail.com": 300, "yahoo.com": 600, "outlook.com": 600, "icloud.com": 500}
#: Google gets half the caps (the schedule's provider scale).
SCALE = {"google": 0.5}
CLOCK_START = "2026-11-10T23:30:00+00:00"
MIDNIGHT = "2026-11-11T00:00:00+00:00"
CLOCK_SPEED = 60
LATE = 10  # messages sent while kiln is down
# Each schedule repeats its step, so day two (step 2) has day one's caps.

PLAN = f"""\
name: postfix-e2e
timezone: UTC
providers:
  google: {{domains: [gmail.com]}}
  yahoo: {{domains: [yahoo.com]}}
  microsoft-consumer: {{domains: [outlook.com]}}
  apple: {{domains: [icloud.com]}}
pools:
  tx:
    ips: []
    overflow: spill
  spill:
    ips: []
batches:
  b1:
    pool: tx
    ips: [{", ".join(TX_IPS)}]
    schedule: small
    start_date: 2026-11-01
  b2:
    pool: spill
    ips: [{", ".join(SPILL_IPS)}]
    schedule: larger
    start_date: 2026-11-01
schedules:
  small:
    steps:
      - {{daily_cap: {TX_CAP}, hourly_cap: {TX_CAP}}}
      - {{daily_cap: {TX_CAP}, hourly_cap: {TX_CAP}}}
      - {{daily_cap: {TX_CAP}, hourly_cap: {TX_CAP}}}
      - {{daily_cap: {TX_CAP}, hourly_cap: {TX_CAP}}}
      - {{daily_cap: {TX_CAP}, hourly_cap: {TX_CAP}}}
    providers:
      google: {{scale: {SCALE["google"]}}}
    hourly:
      active_hours: 00-24
    max_message_rate: 1_000/s,max_burst=1_000
  larger:
    steps:
      - {{daily_cap: {SPILL_CAP}, hourly_cap: {SPILL_CAP}}}
      - {{daily_cap: {SPILL_CAP}, hourly_cap: {SPILL_CAP}}}
      - {{daily_cap: {SPILL_CAP}, hourly_cap: {SPILL_CAP}}}
      - {{daily_cap: {SPILL_CAP}, hourly_cap: {SPILL_CAP}}}
      - {{daily_cap: {SPILL_CAP}, hourly_cap: {SPILL_CAP}}}
    providers:
      google: {{scale: {SCALE["google"]}}}
    hourly:
      active_hours: 00-24
    max_message_rate: 1_000/s,max_burst=1_000
signals:
  feedback:
    postfix:
      path: {{maillog}}
      syslog_names:
{{names}}
"""


def _plan(maillog: Path, names: str) -> str:
    """The plan, reading Postfix's log at `maillog` with these syslog-name lines."""
    return PLAN.replace("{maillog}", str(maillog)).replace("{names}", names)


def _cap(ip: str, provider: str) -> int:
    base = TX_CAP if ip in TX_IPS else SPILL_CAP
    return int(base * SCALE.get(provider, 1.0))


def _allowance(provider: str) -> int:
    return sum(_cap(ip, provider) for ip in TX_IPS + SPILL_IPS)


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _now_ms(d: DaemonProc) -> tuple[int, float]:
    """The daemon's clock, and the monotonic time it was read at."""
    with d.client() as c:
        t0 = time.monotonic()
        now = int(c.request("status")["now_ms"])
        return now, (t0 + time.monotonic()) / 2


def _queue(d: DaemonProc) -> dict[tuple[str, str], int]:
    with d.client() as c:
        reply = c.request("queue")
    assert reply["ok"], (reply, d.log()[-3000:])
    return {(q["pool"], q["provider"]): q["waiting"] for q in reply["queues"]}


def _wait(
    what: str, check: Callable[[], bool], timeout_s: float, why: Callable[[], object]
) -> None:
    """Poll `check` until true; past `timeout_s`, fail saying `what` and `why()`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s: {why()}")
        time.sleep(0.2)


def _key(x: Delivery) -> tuple[str, str]:
    return x.source_ip, DOMAINS[x.recipients[0].split("@")[1]]


def _held_order(log: str) -> list[str]:
    """Recipients in the order Postfix first deferred them on kiln's word."""
    seen: dict[str, None] = {}
    for m in re.finditer(r"to=<([^>]+)>.*status=deferred \(kiln: waiting for room", log):
        seen.setdefault(m[1], None)
    return list(seen)


def test_postfix_routes_by_kilns_pick_holds_caps_and_releases_held_mail(folder: Path) -> None:
    """The whole path, in steps (see the module doc)."""
    assert POSTFIX.exists() and SMTP_SOURCE.exists(), "run `make system-deps` (as root)"
    run_dir = folder / "run"
    run_dir.mkdir(mode=0o755)
    state = folder / "state"
    state.mkdir()
    sock = run_dir / "postfix.sock"
    pf = Postfix()
    ips = TX_IPS + SPILL_IPS
    names = "\n".join(f'        "postfix/kiln-{ip}": "{ip}"' for ip in ips)
    plan_path = folder / "plan.yaml"
    plan_path.write_text(_plan(pf.maillog, names))
    with SmtpSink() as sink:
        nexthop = f"[127.0.0.1]:{sink.port}"
        rendered = postfix_config(load_plan(plan_path), "tx", sock, nexthop=nexthop, retry_s=10)
        pf.configure(master_cf=rendered.master_cf, main_cf=rendered.main_cf)
        args = [
            "--postfix-socket",
            str(sock),
            "--postfix-nexthop",
            nexthop,
            "--postfix-release",
            pf.release_command(),
            "--socket-group",
            "postfix",
            "--clock-start",
            CLOCK_START,
            "--clock-speed",
            str(CLOCK_SPEED),
        ]
        d = DaemonProc(plan_path, state_dir=state, args=args)
        try:
            d.start()
            with pf:
                _run(d, pf, sink)
        finally:
            d.cleanup()
            pf.cleanup()


def _run(d: DaemonProc, pf: Postfix, sink: SmtpSink) -> None:
    """The steps, with kiln and Postfix running."""
    for i, (domain, n) in enumerate(VOLUME.items()):
        pf.submit(n, f"user@{domain}", sessions=5)
        if i == 1:  # Postfix restarts its resolvers mid-traffic: their connections close
            pf.run("postfix", "reload")
    day_one = sum(_allowance(p) for p in DOMAINS.values())
    held = {("tx", DOMAINS[dom]): n - _allowance(DOMAINS[dom]) for dom, n in VOLUME.items()}

    # Day one: every key reaches its cap exactly; the rest waits, each recipient once.
    _wait(
        "day one's allowance delivered",
        lambda: len(sink.taken()) >= day_one,
        60,
        lambda: (len(sink.taken()), pf.log()[-2000:]),
    )
    _wait(
        "every waiting recipient held by kiln",
        lambda: _queue(d) == held,
        30,
        lambda: (_queue(d), held),
    )
    time.sleep(1.5)  # the flush after the last hold (1 Hz) has written it
    shown = subprocess.run(  # noqa: S603 (our own command)
        [str(REPO / ".venv" / "bin" / "kiln"), "queue", "--socket", str(d.operator_socket)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    for (pool, provider), n in held.items():  # due when the next day opens
        row = rf"^{pool}\s+{provider}\s+{n}\s+\S+\s+{MIDNIGHT[:10]}T00:00:0\dZ$"
        assert re.search(row, shown.stdout, re.M), shown.stdout
    first = sink.taken()
    assert len(first) == day_one
    per_key = Counter(_key(x) for x in first)
    assert per_key == {(ip, p): _cap(ip, p) for ip in TX_IPS + SPILL_IPS for p in DOMAINS.values()}
    now, at = _now_ms(d)
    assert now < _ms(MIDNIGHT) - 60_000, f"day one ran too late: {_iso(now)}"

    # kiln killed: new mail waits in Postfix's queue, nothing leaves.
    d.kill()
    killed_at = time.monotonic()
    pf.submit(LATE, "late@gmail.com", sessions=1)
    time.sleep(3)
    assert len(sink.taken()) == day_one
    assert "transport_maps lookup failure" in pf.log()
    # Back (the clock goes on from where it was): the held recipients are still held.
    restart_ms = now + int((time.monotonic() - at + 1) * 1000 * CLOCK_SPEED)
    d.args[d.args.index("--clock-start") + 1] = _iso(restart_ms)
    d.start()
    assert _queue(d) == held, "held recipients lost in the restart"
    down_s = time.monotonic() - killed_at

    # Midnight: the held mail (and the late mail, once Postfix retried it) leaves.
    now, at = _now_ms(d)
    midnight_at = at + (_ms(MIDNIGHT) - now) / 1000 / CLOCK_SPEED
    total = sum(VOLUME.values()) + LATE
    _wait(
        "all mail delivered",
        lambda: len(sink.taken()) >= total,
        max(0.0, midnight_at - time.monotonic()) + 60,
        lambda: (len(sink.taken()), _queue(d), pf.log()[-3000:]),
    )
    time.sleep(1)
    everything = sink.taken()
    ids = [x.message_id for x in everything]
    assert len(ids) == len(set(ids)) == total, "a message delivered twice, or one lost"
    assert all(x.message_id for x in everything)
    assert pf.queued() == 0
    assert _queue(d) == {}

    before = [x for x in everything if x.at < midnight_at]
    after = [x for x in everything if x.at >= midnight_at]
    assert len(before) == day_one, ("mail left before midnight while kiln had no room", down_s)
    # Day two: within the caps, warming tier first, released as the day opened.
    day_two = Counter(_key(x) for x in after)
    for provider in DOMAINS.values():
        for ip in TX_IPS + SPILL_IPS:
            assert day_two[(ip, provider)] <= _cap(ip, provider), (ip, provider, day_two)
        if any(day_two[(ip, provider)] for ip in SPILL_IPS):
            assert all(day_two[(ip, provider)] == _cap(ip, provider) for ip in TX_IPS)
    assert min(x.at for x in after) - midnight_at < 5, "held mail not released at midnight"
    # In the order it was held (roughly: deliveries run in parallel).
    order = {r: i for i, r in enumerate(_held_order(pf.log()))}
    for provider in DOMAINS.values():
        mine = sorted(
            (order[x.recipients[0]], x.at)
            for x in after
            if _key(x)[1] == provider and x.recipients[0] in order
        )
        half = len(mine) // 2
        assert statistics.mean(t for _, t in mine[:half]) <= statistics.mean(
            t for _, t in mine[half:]
        ), provider
    # kiln's own counts agree with the sink's: what it granted today, and the deliveries it
    # read from Postfix's log each day (stored once kiln stops).
    with d.client() as c:
        for ip in TX_IPS + SPILL_IPS:
            for provider in DOMAINS.values():
                used = c.request("limits", ip=ip, provider=provider)["day_used"]
                assert used == day_two[(ip, provider)], (ip, provider, used, day_two)
    time.sleep(1.5)  # the log reader's last second
    d.stop()
    assert stored_counts(d.state_dir, MIDNIGHT[:10], "delivered") == day_two
    day_one_key = Counter(_key(x) for x in before)
    assert stored_counts(d.state_dir, CLOCK_START[:10], "delivered") == day_one_key


def test_postfix_without_kiln_defers_and_sends_nothing(folder: Path) -> None:
    """No daemon at all: every lookup fails, so Postfix defers the mail (nothing leaves a
    planned IP without kiln's word) and keeps it queued."""
    pf = Postfix()
    plan_path = folder / "plan.yaml"
    names = '        "postfix/kiln-127.0.0.2": "127.0.0.2"'
    plan_path.write_text(_plan(pf.maillog, names))
    with SmtpSink() as sink:
        rendered = postfix_config(
            load_plan(plan_path), "tx", folder / "nobody.sock", nexthop=f"[127.0.0.1]:{sink.port}"
        )
        pf.configure(master_cf=rendered.master_cf, main_cf=rendered.main_cf)
        try:
            with pf:
                pf.submit(5, "down@gmail.com", sessions=1)
                _wait(
                    "Postfix deferring",
                    lambda: "status=deferred" in pf.log(),
                    30,
                    lambda: pf.log()[-2000:],
                )
                time.sleep(1)
                assert sink.taken() == []
                assert pf.queued() == 5
        finally:
            pf.cleanup()


def test_postfix_config_renders_transports_for_every_ip_and_refuses_bad_input() -> None:
    """`kiln postfix-config`: one bound transport per IP of the plan, the queue manager's
    own resolver on kiln's socket, the retry settings; unknown pool and bad values refused."""
    plan = load_plan(REPO / "schedules" / "example.yaml")
    pool = next(iter(plan.pools))
    text = postfix_config(plan, pool, Path("/run/kiln/postfix.sock"), retry_s=30).text()
    for ip in plan.all_ips():
        assert f"kiln-{ip} unix" in text and f"smtp_bind_address={ip}" in text
        assert f'"postfix/kiln-{ip}": "{ip}"' in text
    assert f"transport_maps=socketmap:unix:/run/kiln/postfix.sock:{pool}" in text
    assert "-o rewrite_service_name=kiln-rewrite" in text
    assert "minimal_backoff_time = 30s" in text
    assert "check_recipient_access" not in text  # suppressed mail bounces at routing
    strict = postfix_config(plan, pool, Path("/run/kiln/postfix.sock"), reject_suppressed=True)
    assert (
        "smtpd_recipient_restrictions = check_recipient_access "
        "socketmap:unix:/run/kiln/postfix.sock:kiln.suppressed," in strict.text()
    )
    v6 = load_plan(REPO / "schedules" / "example.yaml")
    v6.batches[next(iter(v6.batches))].ips.append("2001:db8::10")
    master = postfix_config(v6, pool, Path("/s")).master_cf
    assert "kiln-2001-db8--10 unix" in master and "smtp_bind_address6=2001:db8::10" in master
    assert "smtp_bind_address=2001:db8::10" not in master
    kiln = os.fspath(REPO / ".venv" / "bin" / "kiln")
    for bad, message in (
        (["--pool", "nope"], "is not in plan"),
        (["--pool", pool, "--retry", "5"], "retry must be"),
        (["--pool", pool, "--nexthop", "a b"], "nexthop must be"),
        (["--pool", pool], ""),
    ):
        done = subprocess.run(  # noqa: S603
            [kiln, "postfix-config", "--config", str(REPO / "schedules" / "example.yaml"), *bad],
            capture_output=True,
            text=True,
            check=False,
        )
        if message:
            assert done.returncode == 1 and message in done.stderr, (bad, done.stderr)
        else:
            assert done.returncode == 0 and "kiln-rewrite" in done.stdout, done.stderr


def test_postfix_gate_holds_once_releases_in_order_and_never_reuses_a_queued_id() -> None:
    """The integration's own code against a real engine: a recipient logged twice is held
    once; the queue releases in arrival order, one hand-back per message, each grant kept
    for its recipient's lookup; after a restore whose queue holds an id without its row, new
    holds take fresh ids."""
    engine = _core.Engine()
    engine.pin_thread()
    engine.define_pool("tx", [("192.0.2.10", 1, False)])
    engine.postfix_configure([("192.0.2.10", "kiln-192.0.2.10")], "")
    google = engine.provider("google")
    engine.enqueue(1, engine.pool("tx"), google)  # restored from a snapshot, row lost
    d = SimpleNamespace(engine=engine, clock=SystemClock(), warn_repeated=lambda *a, **k: None)
    gate = PostfixGate(d, PostfixSettings(Path("/nonexistent")))  # type: ignore[arg-type]
    try:
        gate.restore({})
        now = SystemClock().now_ms()
        waits = [
            Held("Q1", "a@gmail.com", "tx", "google", now),
            Held("Q1", "b@gmail.com", "tx", "google", now),
            Held("Q2", "c@gmail.com", "tx", "google", now),
        ]
        assert gate.hold(waits) == 3
        assert gate.hold(waits[:1]) == 0  # the same log line read again
        assert 1 not in gate.held and len(gate.held) == 3
        assert engine.queued() == 4
        assert gate.release(now) == ["Q1", "Q2"]
        assert engine.queued() == 0 and gate.held == {}
        assert all(engine.postfix_prepaid(h.recipient) == 1 for h in waits)
        assert set(gate.take_changes().values()) == {None}
    finally:
        gate.close()
