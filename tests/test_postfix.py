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

Suppressed recipients never reach the sink: kiln's transport table bounces them (5.7.1, kiln's
reason) while the message's other recipients are delivered and charged; with
`kiln postfix-config --reject-suppressed`, smtpd refuses them at RCPT TO.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import REPO, DaemonProc, stored_counts
from kiln import _core
from kiln.clock import SystemClock
from kiln.daemon.postfix import PostfixGate, PostfixSettings
from kiln.errors import KilnError
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
    scoped = postfix_config(
        plan, pool, Path("/run/kiln/postfix.sock"), reject_suppressed=True, scope="news.example"
    )
    assert scoped.text() == strict.text().replace(
        f"postfix.sock:{pool}\n", f"postfix.sock:{pool}/news.example\n"
    ).replace("kiln.suppressed,", "kiln.suppressed/news.example,")
    assert "kiln.suppressed/news.example," in scoped.main_cf
    for bad_scope in ("stream:news", "a,b", "$x", "a b"):
        with pytest.raises(KilnError, match="scope"):
            postfix_config(plan, pool, Path("/s"), scope=bad_scope)
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


# ---- Suppressed recipients (docs/suppression.md, "Enforced at send time") ----

KILN = REPO / ".venv" / "bin" / "kiln"
#: The plan's providers, and `default` for the senders' domain (its non-delivery notices).
PROVIDER_OF = {**DOMAINS, "example.com": "default"}
#: A fixed clock (real speed) at midday: a test never straddles kiln's midnight.
NOON = "2026-11-10T12:00:00+00:00"
#: What kiln's answers say after the event (rust/src/socketmap).
LISTED = "kiln: the recipient is on the suppression list"


def _rendered(plan_path: Path, sock: Path, nexthop: str, *flags: str) -> dict[str, str]:
    """`kiln postfix-config` for pool tx, the real command: its parts by the file they go to
    (`master.cf`, `main.cf`, `kiln's plan`)."""
    done = subprocess.run(  # noqa: S603 (our own command)
        [
            *(str(KILN), "postfix-config", "--config", str(plan_path), "--pool", "tx"),
            *("--socket", str(sock), "--nexthop", nexthop, "--retry", "10", *flags),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    parts = re.split(r"^# ---- (master\.cf|main\.cf|kiln's plan)\b.*\n", done.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@contextlib.contextmanager
def _suppressing(folder: Path, *flags: str) -> Iterator[tuple[DaemonProc, Postfix, SmtpSink]]:
    """kiln (`--postfix`, on a fixed clock) and a private Postfix configured by `kiln
    postfix-config FLAGS`, delivering to a sink; stopped and removed afterwards."""
    assert POSTFIX.exists(), "run `make system-deps` (as root)"
    run_dir = folder / "run"
    run_dir.mkdir(mode=0o755)
    state = folder / "state"
    state.mkdir()
    sock = run_dir / "postfix.sock"
    pf = Postfix()
    names = "\n".join(f'        "postfix/kiln-{ip}": "{ip}"' for ip in TX_IPS + SPILL_IPS)
    plan_path = folder / "plan.yaml"
    plan_path.write_text(_plan(pf.maillog, names))
    with SmtpSink() as sink:
        nexthop = f"[127.0.0.1]:{sink.port}"
        rendered = _rendered(plan_path, sock, nexthop, *flags)
        pf.configure(master_cf=rendered["master.cf"], main_cf=rendered["main.cf"])
        args = ["--postfix-socket", str(sock), "--postfix-nexthop", nexthop]
        args += ["--postfix-release", pf.release_command(), "--socket-group", "postfix"]
        d = DaemonProc(plan_path, state_dir=state, args=[*args, "--clock-start", NOON])
        try:
            d.start()
            with pf:
                yield d, pf, sink
        finally:
            d.cleanup()
            pf.cleanup()


def _suppress(d: DaemonProc, action: str, address: str, **fields: str) -> None:
    """Add or remove `address` through the operator socket; recorded once it answers."""
    with d.client() as c:
        reply = c.request("suppress", action=action, address=address, **fields)
    event = "remove" if action == "remove" else fields.get("event", "manual")
    assert reply["ok"] and reply["event"] == event, reply


def _suppress_cli(d: DaemonProc, address: str, event: str) -> None:
    """`kiln suppress add` with the test's state folder."""
    done = subprocess.run(  # noqa: S603 (our own command)
        [
            *(str(KILN), "suppress", "add", address, "--event", event),
            *("--state-dir", str(d.state_dir), "--reason", "test"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)


def _message(sender: str, message_id: str) -> str:
    return (
        f"From: <{sender}>\r\nTo: undisclosed-recipients:;\r\nSubject: suppression e2e\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello.\r\n"
    )


def _copies(sink: SmtpSink) -> list[tuple[str, str, str | None]]:
    """Every recipient copy the sink took: (sending IP, recipient, Message-ID)."""
    return [(x.source_ip, r, x.message_id) for x in sink.taken() for r in x.recipients]


def _per_key(copies: list[tuple[str, str, str | None]]) -> Counter[tuple[str, str]]:
    return Counter((ip, PROVIDER_OF[r.rsplit("@", 1)[1].lower()]) for ip, r, _ in copies)


def _day_used(d: DaemonProc) -> Counter[tuple[str, str]]:
    """What kiln charged today per (IP, provider) (`limits`), non-zero ones only."""
    used: Counter[tuple[str, str]] = Counter()
    with d.client() as c:
        for ip in TX_IPS + SPILL_IPS:
            for provider in set(PROVIDER_OF.values()):
                n = int(c.request("limits", ip=ip, provider=provider)["day_used"])
                if n:
                    used[(ip, provider)] = n
    return used


def _messages_total(d: DaemonProc, result: str) -> Counter[tuple[str, str]]:
    """kiln's `kiln_messages_total` for `result` per (IP, provider), from /metrics."""
    text = httpx.get(d.http_url() + "/metrics", timeout=10).text
    return Counter(
        {
            (s.labels["ip"], s.labels["provider"]): int(s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "kiln_messages_total" and s.labels.get("result") == result and s.value
        }
    )


def test_postfix_bounces_suppressed_recipients_and_delivers_the_rest(folder: Path) -> None:
    """The transport table's answer for a listed recipient (the default configuration):
    Postfix accepts the message, bounces that recipient with 5.7.1 and kiln's text, returns a
    notice to the sender, and delivers the message's other recipients; nothing is charged for
    a suppressed recipient. A scoped entry does not stop mail routed without a scope."""
    with _suppressing(folder) as (d, pf, sink):
        main_cf = (pf.conf / "main.cf").read_text()
        assert "check_recipient_access" not in main_cf  # smtpd refuses no one: routing does
        _suppress(d, "add", "gone@gmail.com", event="hard_bounce")
        _suppress(d, "add", "Ann@yahoo.com", event="complaint")
        _suppress(d, "add", "gone3@gmail.com")  # manual, the default
        _suppress(d, "add", "news@gmail.com", event="unsubscribe", scope="news")
        _suppress_cli(d, "left@yahoo.com", "unsubscribe")
        bounced = {  # as the envelope has them, and the event
            "gone@gmail.com": "hard_bounce",
            "Ann@YAHOO.com": "complaint",  # the domain's case does not matter
            "left@yahoo.com": "unsubscribe",
            "gone3@gmail.com": "manual",
        }
        messages = {  # Message-ID: (sender, recipients); sent over SMTP
            "<m1@kiln.test>": (
                "s1@example.com",
                ["ok1@gmail.com", "gone@gmail.com", "ok2@yahoo.com", "Ann@YAHOO.com"],
            ),
            "<m2@kiln.test>": ("s2@example.com", ["left@yahoo.com"]),
            "<m3@kiln.test>": ("s3@example.com", ["ok3@gmail.com"]),
            "<m4@kiln.test>": ("s4@example.com", ["news@gmail.com"]),
        }
        for mid, (sender, rcpts) in messages.items():
            with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
                assert s.sendmail(sender, rcpts, _message(sender, mid)) == {}
        # And one through sendmail(1) (maildrop, pickup): the same routing.
        mid, sender = "<m5@kiln.test>", "s5@example.com"
        rcpts = ["gone3@gmail.com", "ok4@yahoo.com"]
        messages[mid] = (sender, rcpts)
        done = subprocess.run(  # noqa: S603 (Debian's sendmail, our arguments)
            [str(POSTFIX.parent / "sendmail"), "-C", str(pf.conf), "-f", sender, "--", *rcpts],
            input=_message(sender, mid).replace("\r\n", "\n"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr

        wanted = {
            (r, mid) for mid, (_, rcpts) in messages.items() for r in rcpts if r not in bounced
        }
        noticed = sorted(s for s, rcpts in messages.values() if set(rcpts) & set(bounced))
        _wait(
            "every recipient delivered or bounced, every notice sent, the queue empty",
            lambda: (
                len(_copies(sink)) >= len(wanted) + len(noticed)
                and pf.log().count("status=bounced") >= len(bounced)
                and pf.queued() == 0
            ),
            30,
            lambda: (_copies(sink), pf.queued(), pf.log()[-3000:]),
        )
        copies = _copies(sink)
        log = pf.log()
        senders = {s for s, _ in messages.values()}
        # The sink: each unsuppressed recipient's copy once, nothing for a suppressed one...
        delivered = [(r, mid) for _, r, mid in copies if r not in senders]
        assert sorted(delivered) == sorted(wanted), copies
        assert not {r for _, r, _ in copies} & set(bounced), copies
        # ...and one non-delivery notice to each sender whose message had a suppressed one.
        assert sorted(r for _, r, _ in copies if r in senders) == noticed, copies
        # Postfix's log: each suppressed recipient bounced at routing with 5.7.1 and why.
        for rcpt, event in bounced.items():
            line = (
                rf"to=<{re.escape(rcpt)}>, relay=none, .*, dsn=5\.7\.1, "
                rf"status=bounced \({LISTED} \({event}\)\)$"
            )
            assert len(re.findall(line, log, re.M)) == 1, (rcpt, log[-3000:])
            assert not re.search(rf"to=<{re.escape(rcpt)}>.*status=sent", log), rcpt
        assert log.count("status=bounced") == len(bounced)
        # kiln charged exactly what left: no suppressed recipient counted against a cap.
        used = _day_used(d)
        assert used == _per_key(copies), (used, copies)
        assert sum(n for (_, p), n in used.items() if p != "default") == len(wanted)
        # And its log reader counts the deliveries per IP, and no bounce against any IP.
        _wait(
            "kiln counted every delivery from Postfix's log",
            lambda: _messages_total(d, "delivered") == _per_key(copies),
            20,
            lambda: (_messages_total(d, "delivered"), _per_key(copies)),
        )
        assert _messages_total(d, "bounced") == Counter()


def test_postfix_with_a_scope_enforces_that_scopes_list_too(folder: Path) -> None:
    """`kiln postfix-config --scope news --reject-suppressed`: smtpd's access table and the
    transport table check the `news` list as well as the global one, and not another
    scope's. `news@` is refused at RCPT TO; `Ann@` (a capital: smtpd asks `ann@`, which is
    not listed) is accepted and bounced by the transport table when routed; `bill@`, listed
    for `billing`, is delivered."""
    with _suppressing(folder, "--reject-suppressed", "--scope", "news") as (d, pf, sink):
        main_cf = (pf.conf / "main.cf").read_text()
        assert ":kiln.suppressed/news," in main_cf, main_cf
        assert (pf.conf / "master.cf").read_text().count("postfix.sock:tx/news\n") == 1
        _suppress(d, "add", "news@gmail.com", event="unsubscribe", scope="news")
        _suppress(d, "add", "Ann@gmail.com", event="unsubscribe", scope="news")
        _suppress(d, "add", "bill@gmail.com", event="unsubscribe", scope="billing")
        sender = "s1@example.com"
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
            s.ehlo("client.kiln.test")
            assert s.mail(sender)[0] == 250
            code, text = s.rcpt("news@gmail.com")
            assert code // 100 == 5 and f"{LISTED} (unsubscribe)".encode() in text, (code, text)
            assert s.rcpt("Ann@gmail.com")[0] == 250
            assert s.rcpt("bill@gmail.com")[0] == 250
            assert s.data(_message(sender, "<n1@kiln.test>"))[0] == 250
        _wait(
            "bill@ delivered and the notice for Ann@ sent",
            lambda: len(_copies(sink)) >= 2 and pf.queued() == 0,
            30,
            lambda: (_copies(sink), pf.log()[-3000:]),
        )
        assert sorted(r for _, r, _ in _copies(sink)) == ["bill@gmail.com", sender]
        routed = r"to=<Ann@gmail\.com>, relay=none, .*, dsn=5\.7\.1, status=bounced"
        assert re.search(rf"{routed} \({LISTED} \(unsubscribe\)\)$", pf.log(), re.M)


def test_postfix_reject_suppressed_refuses_them_at_rcpt(folder: Path) -> None:
    """`kiln postfix-config --reject-suppressed`: smtpd asks kiln's access table at RCPT TO
    and refuses a listed recipient with 5.7.1; the others of the message are accepted and
    delivered; taken off the list, the address is accepted at the next RCPT; an address
    smtpd lets through (see the capitals below) still bounces at routing; with kiln down,
    smtpd answers 451 4.3.5 (senders retry)."""
    with _suppressing(folder, "--reject-suppressed") as (d, pf, sink):
        main_cf = (pf.conf / "main.cf").read_text()
        assert re.search(
            r"^smtpd_recipient_restrictions = check_recipient_access "
            rf"socketmap:unix:{re.escape(str(folder))}/run/postfix\.sock:kiln\.suppressed,",
            main_cf,
            re.M,
        ), main_cf
        _suppress_cli(d, "gone@gmail.com", "hard_bounce")
        _suppress(d, "add", "Ann@yahoo.com", event="complaint")
        sender = "s1@example.com"
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
            s.ehlo("client.kiln.test")
            assert s.mail(sender)[0] == 250
            code, text = s.rcpt("gone@gmail.com")
            assert code // 100 == 5 and text.startswith(b"5.7.1 "), (code, text)
            assert f"{LISTED} (hard_bounce)".encode() in text, text
            assert s.rcpt("ok@gmail.com")[0] == 250
            assert s.data(_message(sender, "<r1@kiln.test>"))[0] == 250
            _wait(
                "the accepted recipient delivered",
                lambda: len(_copies(sink)) >= 1 and pf.queued() == 0,
                30,
                lambda: (_copies(sink), pf.log()[-3000:]),
            )
            assert [(r, m) for _, r, m in _copies(sink)] == [("ok@gmail.com", "<r1@kiln.test>")]
            log = pf.log()
            assert re.search(
                rf"reject: RCPT from \S+: 5\d\d 5\.7\.1 <gone@gmail\.com>: .*{LISTED}", log
            ), log[-3000:]
            assert "to=<gone@gmail.com>, relay" not in log  # never queued, so no bounce either

            _suppress(d, "remove", "gone@gmail.com")
            assert s.mail(sender)[0] == 250
            assert s.rcpt("gone@gmail.com")[0] == 250  # the very next RCPT
            assert s.data(_message(sender, "<r2@kiln.test>"))[0] == 250
        _wait(
            "the address taken off the list delivered",
            lambda: len(_copies(sink)) >= 2 and pf.queued() == 0,
            30,
            lambda: (_copies(sink), pf.log()[-3000:]),
        )
        assert [(r, m) for _, r, m in _copies(sink)] == [
            ("ok@gmail.com", "<r1@kiln.test>"),
            ("gone@gmail.com", "<r2@kiln.test>"),
        ]

        # Listed with a capital in the local part: smtpd folds the whole key to lower case
        # before it asks (`ann@yahoo.com`), and the list keeps the local part's case, so today
        # smtpd lets it through and the transport table (asked with the address as written)
        # bounces it. Either way it is refused with kiln's reason and never delivered.
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
            assert s.mail("s3@example.com")[0] == 250
            code, text = s.rcpt("Ann@Yahoo.COM")
            assert s.rcpt("ok3@gmail.com")[0] == 250
            assert s.data(_message("s3@example.com", "<r3@kiln.test>"))[0] == 250
        notice = ["s3@example.com"] if code == 250 else []
        _wait(
            "the third message delivered",
            lambda: len(_copies(sink)) >= 3 + len(notice) and pf.queued() == 0,
            30,
            lambda: (code, text, _copies(sink), pf.log()[-3000:]),
        )
        if code == 250:
            routed = r"to=<Ann@Yahoo\.COM>, relay=none, .*, dsn=5\.7\.1, status=bounced"
            assert re.search(rf"{routed} \({LISTED} \(complaint\)\)$", pf.log(), re.M)
        else:
            assert code // 100 == 5 and text.startswith(b"5.7.1 "), (code, text)
            assert f"{LISTED} (complaint)".encode() in text, text
        copies = _copies(sink)
        assert sorted(r for _, r, _ in copies[2:]) == sorted(["ok3@gmail.com", *notice]), copies
        assert _day_used(d) == _per_key(copies)

        d.kill()  # kiln down: smtpd cannot ask, so it defers every recipient
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
            assert s.mail("s4@example.com")[0] == 250
            code, text = s.rcpt("ok@gmail.com")
            assert code == 451 and text.startswith(b"4.3.5 "), (code, text)
