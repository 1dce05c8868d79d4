"""Signals close the loop: simulated weeks of a real daemon against loopback fakes.

Each scenario runs an in-process `Daemon` on SQLite with a clock the test moves, sends a full
day's mail through the core's protocol every day (acquire, then `delivered` reports), polls
the fake Google and Microsoft servers (real HTTP on 127.0.0.1) or a loopback DNS server, and
rolls the days at midnight, as `kiln run` would. Retry sleeps are skipped, not the retries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from dnsserver import DnsServer
from fakeapis import Failure, FakeGoogle, FakeSnds
from kiln.daemon import Daemon, DaemonConfig
from kiln.policyspec import RealtimeAction
from kiln.signals.poller import Poller

START = date(2026, 3, 1)
IPS = ["192.0.2.10", "192.0.2.12"]
STEPS = "\n".join(
    f"      - {{daily_cap: {100 * (i + 1)}, hourly_cap: {100 * (i + 1)}}}" for i in range(30)
)
PLAN = f"""\
name: scenario
timezone: UTC
pools:
  tx:
    ips: [198.51.100.10]
batches:
  b1:
    pool: tx
    ips: [{", ".join(IPS)}]
    schedule: s
    start_date: {START.isoformat()}
schedules:
  s:
    steps:
{STEPS}
    providers:
      google: {{scale: 1}}
      microsoft-consumer: {{scale: 1}}
    hourly: {{active_hours: 00-24}}
    max_message_rate: 100_000/s,max_burst=100_000
"""


class Clock:
    """A clock the test moves."""

    def __init__(self, t: datetime) -> None:
        self.t = t

    def now_ms(self) -> int:
        return int(self.t.timestamp() * 1000)

    def at(self, day: date, hour: int = 0, minute: int = 0, second: int = 0) -> int:
        self.t = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)
        return self.now_ms()


async def no_sleep(_s: float) -> None:
    """Retries happen; their waits do not."""


def send(d: Daemon, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Requests through the core's protocol, as the socket would pass them."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    served = d.engine.serve(data, d.clock.now_ms())
    assert served.consumed == len(data) and served.upcall is None
    return [json.loads(line) for line in served.reply.splitlines()]


def upcall(d: Daemon, **req: Any) -> dict[str, Any]:
    """An operator request (`automations`, `cancel`, `explain`, `status`)."""
    return d.upcall(json.dumps(req).encode(), d.clock.now_ms())


def step(d: Daemon, provider: str) -> int:
    """b1's step at `provider`."""
    state = d.states.get(("b1", provider))
    return 1 if state is None else state.step


def full_day(d: Daemon, providers: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """Every IP asks for its whole day's cap at each provider; what was granted is delivered.

    The daemon's 1 Hz flush runs first, as it would have in the hours before: it commits the
    engine's reservations for the limits now in force (a key resumed by a signal poll has no
    reservation until then)."""
    d.tick(d.clock.now_ms())
    granted: dict[tuple[str, str], int] = {}
    for provider in providers:
        for ip in IPS:
            cap = d.engine.usage(d.engine.key(ip, provider))["daily_cap"]
            (r,) = send(d, {"op": "acquire", "ip": ip, "provider": provider, "n": cap})
            n = r.get("granted", 0) if r.get("ok") else 0
            granted[(ip, provider)] = n
            if n:
                send(
                    d,
                    {"op": "report", "ip": ip, "provider": provider, "result": "delivered", "n": n},
                )
    d.tick(d.clock.now_ms())
    return granted


def midnight(d: Daemon, clock: Clock, day: date) -> None:
    """The local day `day` ends: the daemon rolls it."""
    clock.at(day, 23, 59, 59)
    d.tick(clock.now_ms())
    clock.at(day + timedelta(days=1), 0, 0, 5)
    d.tick(clock.now_ms())


def make(tmp_path: Path, clock: Clock, signals: str = "") -> Daemon:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN + signals)
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=tmp_path / "state", node="t"), clock)
    d.poller = Poller(d.plan, now_ms=clock.now_ms, sleep=no_sleep, timeout_s=2.0)
    d.start()
    return d


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def automations(d: Daemon, everything: bool = False) -> list[dict[str, Any]]:
    reply = upcall(d, op="automations", all=everything)
    assert reply["ok"]
    return list(reply["automations"])


def log(d: Daemon, kind: str | None = None) -> list[Any]:
    d.flush(d.clock.now_ms())
    return d.store.decisions(kind=kind, limit=100_000)


# ----- SNDS -----


def snds_row(ip: str, day: date, colour: str) -> str:
    when = f"{day.month}/{day.day}/{day.year}"
    return (
        f"{ip},{when} 6:02 AM,{when} 11:58 PM,1000,1000,1000,{colour},< 0.1%,,,0,"
        f"mail.example.com,bounce@example.com,\r\n"
    )


def test_snds_red_pauses_that_ips_microsoft_ramp_until_green_days(tmp_path: Path) -> None:
    """Day 9: SNDS says RED for .12 (yesterday). Within that poll .12 gets no microsoft
    grants and the ramp stops advancing; after 3 GREEN days it resumes and advances."""

    async def scenario() -> None:
        with FakeSnds(fixtures=False) as snds:
            key_file = tmp_path / "snds.key"
            key_file.write_text(snds.key + "\n")
            clock = Clock(datetime(2026, 3, 1, 6, tzinfo=UTC))
            d = make(
                tmp_path,
                clock,
                f"""signals:
  snds: {{key_file: snds.key, base_url: "{snds.base_url}", days_back: 1}}
policy:
  signals: {{snds_resume_green_days: 3}}
""",
            )
            ms = "microsoft-consumer"
            steps: dict[int, int] = {}
            try:
                for n in range(1, 16):
                    day = START + timedelta(days=n - 1)
                    yesterday = day - timedelta(days=1)
                    red = n == 9
                    rows = "".join(
                        snds_row(ip, yesterday, "RED" if red and ip == IPS[1] else "GREEN")
                        for ip in IPS
                    )
                    snds.set_data(yesterday, rows)
                    clock.at(day, 6)
                    assert await d.poll_source("snds")
                    clock.at(day, 10)
                    granted = full_day(d, ("google", ms))
                    paused = 9 <= n < 12
                    assert (granted[(IPS[1], ms)] == 0) == paused, n
                    assert granted[(IPS[0], ms)] > 0 and granted[(IPS[1], "google")] > 0
                    if n == 9:
                        (a,) = automations(d)
                        assert a["kind"] == "pause" and a["ip"] == IPS[1] and a["provider"] == ms
                        assert a["rule"] == "snds.filter_result"
                        (r,) = send(d, {"op": "acquire", "ip": IPS[1], "provider": ms})
                        assert r["ok"] and not r["granted"] and r["reason"] == "paused"
                        explained = upcall(d, op="explain", ip=IPS[1], provider=ms)
                        assert explained["paused"] and any(a["id"] in w for w in explained["why"])
                    midnight(d, clock, day)
                    steps[n] = step(d, ms)
                # Advances on days 1-8, paused on 9-11, advances again from day 12.
                assert [steps[n] for n in range(1, 9)] == list(range(2, 10))
                assert steps[9] == steps[10] == steps[11] == 9
                assert steps[12] == 10 and steps[15] == 13
                assert step(d, "google") == 16
                assert automations(d) == []
                lifecycle = [e.action for e in log(d, "automation")]
                assert lifecycle == ["pause:start", "pause:ended"]
                moves = [e for e in log(d, "ramp") if e.subject == f"b1/{ms}"]
                assert [e.action for e in moves[8:11]] == ["pause"] * 3
            finally:
                await d.poller.aclose()
                d.store.close()

    run(scenario)


# ----- push-back replies -----

GMAIL_428 = (
    "421-4.7.28 Gmail has detected an unusual rate of email originating from your IP address "
    "192.0.2.10. To protect our users from spam, email sent from your IP address has been "
    "421-4.7.28 temporarily rate limited. - gsmtp"
)


def test_two_gmail_421_4_7_28_in_an_hour_suspend_the_key_and_hold_the_day(
    tmp_path: Path,
) -> None:
    clock = Clock(datetime(2026, 3, 1, 8, tzinfo=UTC))
    d = make(tmp_path, clock)
    try:
        for n in range(1, 3):
            day = START + timedelta(days=n - 1)
            clock.at(day, 9)
            full_day(d, ("google",))
            if n == 2:
                for minute in (5, 40):
                    clock.at(day, 10, minute)
                    send(
                        d,
                        {
                            "op": "report",
                            "ip": IPS[0],
                            "domain": "gmail.com",
                            "result": "deferred",
                            "code": 421,
                            "enhanced": "4.7.28",
                            "text": GMAIL_428,
                        },
                    )
                    d.tick(clock.now_ms())
                clock.at(day, 10, 41)
                (sus,) = [a for a in automations(d) if a["kind"] == "suspend"]
                info = d.guard.rules[sus["rule"]]
                assert info.threshold_count <= 2
                assert sus["ip"] == IPS[0] and sus["provider"] == "google"
                action = (
                    d.plan.policy.realtime_action("rate_limit_rep")
                    if info.action == "default"
                    else info.action
                )
                assert isinstance(action, RealtimeAction) and action.suspend is not None
                # Re-armed by the second reply: its time plus the rule's duration.
                assert sus["expires_ms"] == clock.at(day, 10, 40) + action.suspend
                assert sus["matches"] == 2
                clock.at(day, 10, 41)
                (r,) = send(d, {"op": "acquire", "ip": IPS[0], "provider": "google"})
                assert not r["granted"] and r["reason"] == "suspended"
                (other,) = send(d, {"op": "acquire", "ip": IPS[1], "provider": "default"})
                assert other["granted"] == 1
                # It ends by itself at its expiry, and the key is free again.
                clock.t = datetime.fromtimestamp(sus["expires_ms"] / 1000 + 1, tz=UTC)
                d.tick(clock.now_ms())
                assert not [a for a in automations(d) if a["kind"] == "suspend"]
                assert d.engine.usage(d.engine.key(IPS[0], "google"))["suspended_until_ms"] == 0
            midnight(d, clock, day)
        assert step(d, "google") == 2  # day 1 advanced, day 2 held
        held = [e for e in log(d, "ramp") if e.subject == "b1/google"][-1]
        assert held.action == "hold" and "rate_limit_rep" in held.reason
    finally:
        d.store.close()


def test_replies_from_providers_without_a_plan_row_still_meet_their_rules(
    tmp_path: Path,
) -> None:
    """Yahoo has no row in this plan, so its mail counts as `default`; Yahoo's own rules
    still classify its replies and suspend the (IP, default) key."""
    clock = Clock(datetime(2026, 3, 2, 10, tzinfo=UTC))
    d = make(tmp_path, clock)
    try:
        (route,) = send(d, {"op": "route", "domain": "yahoo.com"})
        assert route["provider"] == "default"
        text = (
            "[TSS04] Messages from 192.0.2.12 temporarily deferred due to unexpected volume or "
            "user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
        )
        report = {"op": "report", "ip": IPS[1], "domain": "yahoo.com", "result": "deferred"}
        send(d, report | {"code": 421, "enhanced": "4.7.0", "text": text})
        d.tick(clock.now_ms())
        (sus,) = [a for a in automations(d) if a["kind"] == "suspend"]
        assert (sus["ip"], sus["provider"]) == (IPS[1], "default")
        assert d.guard.rules[sus["rule"]] is not None and "yahoo" in sus["rule"].lower()
    finally:
        d.store.close()


def test_cancel_lifts_a_suspension_and_is_logged(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 3, 2, 10, tzinfo=UTC))
    d = make(tmp_path, clock)
    try:
        report = {
            "op": "report",
            "ip": IPS[0],
            "provider": "google",
            "result": "bounced",
            "code": 550,
            "enhanced": "5.7.1",
            "text": (
                "[192.0.2.10 1] Our system has detected an unusual rate of unsolicited mail "
                "originating from your IP address. To protect our users from spam, mail sent "
                "from your IP address has been blocked. - gsmtp"
            ),
        }
        send(d, report)
        d.tick(clock.now_ms())
        (sus,) = [a for a in automations(d) if a["kind"] == "suspend"]
        assert upcall(d, op="cancel", automation="A999")["ok"] is False
        reply = upcall(d, op="cancel", automation=sus["id"], by="alice")
        assert reply["ok"] and reply["automation"]["state"] == "cancelled"
        (r,) = send(d, {"op": "acquire", "ip": IPS[0], "provider": "google"})
        assert r["granted"] == 1
        again = upcall(d, op="cancel", automation=sus["id"])
        assert again["ok"] is False and "not active" in again["error"]
        cancelled = [e for e in log(d, "automation") if e.action == "suspend:cancelled"]
        assert cancelled and "alice" in cancelled[0].reason
    finally:
        d.store.close()


# ----- Postmaster Tools -----


def pm_day(day: date, spam_ratio: float) -> dict[str, Any]:
    return {
        "name": f"domains/mail.example.com/trafficStats/{day:%Y%m%d}",
        "userReportedSpamRatio": spam_ratio,
        "domainReputation": "HIGH",
    }


def postmaster_signals(google: FakeGoogle, tmp_path: Path) -> str:
    (tmp_path / "google.json").write_text(json.dumps(google.credentials_json()))
    (tmp_path / "google.json").chmod(0o600)
    return f"""signals:
  postmaster:
    credentials: google.json
    domains: [mail.example.com]
    api: [v1]
    base_url: "{google.base_url}"
    token_url: "{google.token_url}"
    days_back: 1
"""


def test_postmaster_spam_rate_steps_down_with_an_alert_and_good_weeks_advance(
    tmp_path: Path,
) -> None:
    """0.08% for a week: google advances every day. Then 0.35%: one step down, logged at
    warning level, and the same reading only holds the next day."""

    async def scenario() -> None:
        with FakeGoogle(fixtures=False) as google:
            clock = Clock(datetime(2026, 3, 1, 6, tzinfo=UTC))
            d = make(tmp_path, clock, postmaster_signals(google, tmp_path))
            google.set_compliance("mail.example.com", None)
            try:
                for n in range(1, 11):
                    day = START + timedelta(days=n - 1)
                    yesterday = day - timedelta(days=1)
                    google.set_traffic_stats(
                        "mail.example.com",
                        yesterday,
                        pm_day(yesterday, 0.0035 if n == 9 else 0.0008),
                    )
                    if n == 10:  # no new data: the 0.35% reading is still the newest
                        google.set_traffic_stats("mail.example.com", yesterday, None)
                    clock.at(day, 6)
                    assert await d.poll_source("postmaster"), d.guard.signals.health
                    clock.at(day, 10)
                    full_day(d, ("google",))
                    before = step(d, "google")
                    midnight(d, clock, day)
                    after = step(d, "google")
                    if n <= 8:
                        assert after == before + 1, n
                    elif n == 9:
                        assert after == before - 1
                    else:
                        assert after == before  # held: already stepped down for it
                moves = [e for e in log(d, "ramp") if e.subject == "b1/google"]
                assert moves[-2].action == "step_down" and "0.35%" in moves[-2].reason
                assert moves[-1].action == "hold" and "already stepped down" in moves[-1].reason
                (down,) = [a for a in automations(d, everything=True) if a["kind"] == "step_down"]
                assert down["state"] == "applied" and down["rule"] == "postmaster.spam_rate"
            finally:
                await d.poller.aclose()
                d.store.close()

    run(scenario)


def test_postmaster_500_for_three_days_holds_google_and_nothing_advances(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        with FakeGoogle(fixtures=False) as google:
            clock = Clock(datetime(2026, 3, 1, 6, tzinfo=UTC))
            d = make(tmp_path, clock, postmaster_signals(google, tmp_path))
            try:
                steps = {}
                for n in range(1, 9):
                    day = START + timedelta(days=n - 1)
                    yesterday = day - timedelta(days=1)
                    google.set_traffic_stats(
                        "mail.example.com", yesterday, pm_day(yesterday, 0.0005)
                    )
                    down = 4 <= n <= 6
                    if down:
                        google.fail_path("/domains", Failure.server_error())
                    else:
                        google.clear_failures()
                    for hour in (0, 6, 12, 18):
                        clock.at(day, hour, 30)
                        good = await d.poll_source("postmaster")
                        assert good == (not down)
                    clock.at(day, 19)
                    full_day(d, ("google",))
                    midnight(d, clock, day)
                    steps[n] = (step(d, "google"), step(d, "default"))
                google_steps = [steps[n][0] for n in range(1, 9)]
                # The rolls of days 4, 5 and 6 find no good reading within a day: they hold.
                assert google_steps == [2, 3, 4, 4, 4, 4, 5, 6]
                held = [e for e in log(d, "ramp") if e.subject == "b1/google"][3:6]
                assert all(e.action == "hold" and "postmaster is stale" in e.reason for e in held)
                h = d.guard.signals.health["postmaster"]
                assert h.failures == 0 and h.last_error is None
            finally:
                await d.poller.aclose()
                d.store.close()

    run(scenario)


# ----- blocklists -----


def test_dnsbl_listing_pauses_every_provider_until_clean(tmp_path: Path) -> None:
    async def scenario() -> None:
        with DnsServer() as dns:
            clock = Clock(datetime(2026, 3, 2, 6, tzinfo=UTC))
            d = make(
                tmp_path,
                clock,
                f"""signals:
  dnsbl: {{zones: [zen.spamhaus.org], nameservers: ["127.0.0.1:{dns.port}"]}}
""",
            )
            try:
                dns.set("10.2.0.192.zen.spamhaus.org", "A", ["127.0.0.2"])
                assert await d.poll_source("dnsbl")
                (a,) = automations(d)
                assert a["ip"] == IPS[0] and a["provider"] is None and a["kind"] == "pause"
                for provider in ("google", "microsoft-consumer", "default"):
                    (r,) = send(d, {"op": "acquire", "ip": IPS[0], "provider": provider})
                    assert r["reason"] == "paused"
                    (r,) = send(d, {"op": "acquire", "ip": IPS[1], "provider": provider})
                    assert r["granted"] == 1
                # A resolver error answer is never clean: the pause stays.
                dns.set("10.2.0.192.zen.spamhaus.org", "A", ["127.255.255.254"])
                assert await d.poll_source("dnsbl")
                assert automations(d)
                dns.set("10.2.0.192.zen.spamhaus.org", "A", [])
                assert await d.poll_source("dnsbl")
                assert automations(d) == []
                (r,) = send(d, {"op": "acquire", "ip": IPS[0], "provider": "google"})
                assert r["granted"] == 1
            finally:
                await d.poller.aclose()
                d.store.close()

    run(scenario)


# ----- MTA logs -----

MAILLOG = Path(__file__).parent / "fixtures" / "signals" / "postfix_maillog.txt"


def test_postfix_log_lines_count_as_reports_and_push_back_suspends(tmp_path: Path) -> None:
    """The daemon follows a Postfix log: `status=sent` counts as delivered, the Gmail 421
    4.7.28 deferral is classified in the core and suspends (192.0.2.10, google), the remote
    550 5.1.1 counts as a bounce, and the local timeout fires no rule."""
    log_file = tmp_path / "mail.log"
    log_file.write_text("")
    clock = Clock(datetime(2026, 3, 10, 13, tzinfo=UTC))
    signals = """signals:
  feedback:
    postfix:
      path: mail.log
      syslog_names: {postfix-ip10: 192.0.2.10, postfix-ip11: 192.0.2.12}
"""
    d = make(tmp_path, clock, signals)
    try:
        d.tick(clock.now_ms())
        with log_file.open("a") as f:
            f.write(MAILLOG.read_text())
        clock.at(date(2026, 3, 10), 14, 10)
        d.tick(clock.now_ms())
        counts = d.store.counts(date(2026, 3, 10))
        gmail = counts[(IPS[0], "google")]
        assert gmail.delivered >= 1 and gmail.deferred >= 1
        assert sum(c.bounced for c in counts.values()) >= 1
        sus = [a for a in automations(d) if a["kind"] == "suspend"]
        assert [(a["ip"], a["provider"]) for a in sus] == [(IPS[0], "google")]
        (r,) = send(d, {"op": "acquire", "ip": IPS[0], "provider": "google"})
        assert r["reason"] == "suspended"
        pushback = d.store.pushback(date(2026, 3, 10))
        assert {k[2] for k in pushback} == {"rate_limit_rep", "hard_bounce"}
        # A restart resumes the log where it was: lines written while the daemon was down
        # are read, those read before are not counted twice.
        d.store.close()
        with log_file.open("a") as f:
            f.write(
                "Mar 10 14:09:00 mta1 postfix-ip10/smtp[21999]: 9A8B7C6D5E: to=<carol@gmail.com>, "
                "relay=gmail-smtp-in.l.google.com[198.51.100.26]:25, delay=0.5, "
                "delays=0.01/0.01/0.2/0.28, dsn=2.0.0, status=sent (250 2.0.0 OK - gsmtp)\n"
            )
        d = make(tmp_path, clock, signals)
        before = d.store.counts(date(2026, 3, 10))[(IPS[0], "google")]
        d.tick(clock.now_ms())
        after = d.store.counts(date(2026, 3, 10))[(IPS[0], "google")]
        assert after.delivered == before.delivered + 1
        assert (after.deferred, after.bounced) == (before.deferred, before.bounced)
    finally:
        d.store.close()


# ----- secrets -----


def test_the_snds_key_never_reaches_logs_the_store_or_the_api(tmp_path: Path, capsys: Any) -> None:
    async def scenario() -> None:
        with FakeSnds(fixtures=False) as snds:
            (tmp_path / "snds.key").write_text("not-the-key-5d1f0c\n")
            clock = Clock(datetime(2026, 3, 2, 6, tzinfo=UTC))
            d = make(
                tmp_path,
                clock,
                f"""signals:
  snds: {{key_file: snds.key, base_url: "{snds.base_url}", days_back: 1}}
""",
            )
            try:
                snds.wrong_key = "html"
                assert not await d.poll_source("snds")
                snds.wrong_key = "404"
                assert not await d.poll_source("snds")
                d.flush(clock.now_ms())
                health = d.guard.signals.health["snds"]
                assert health.failures == 2 and health.last_error
                api = json.dumps(upcall(d, op="explain", ip=IPS[0], provider="default"))
                stored = json.dumps([e.evidence for e in d.store.decisions(limit=10_000)])
                meta = d.store.get_meta("signals:scenario") or ""
                out = capsys.readouterr()
                for text in (api, stored, meta, out.out, out.err, health.last_error):
                    assert "not-the-key-5d1f0c" not in text
                assert "snds" in api
            finally:
                await d.poller.aclose()
                d.store.close()

    run(scenario)


# ----- a live daemon and the CLI -----


def test_cli_lists_explains_and_cancels_automations_of_a_live_daemon(
    capsys: Any,
) -> None:
    from daemonproc import running_daemon
    from kiln.cli import main
    from kiln.client import Client

    with running_daemon() as proc:
        sock = str(proc.operator_socket)
        with Client(proc.socket) as c:
            classified = c.request("classify", text=GMAIL_428, domain="gmail.com")
            assert classified["class"] == "rate_limit_rep" and classified["scope"] == "ip"
            c.request(
                "report",
                ip=IPS[0],
                domain="gmail.com",
                result="deferred",
                code=421,
                enhanced="4.7.28",
                text=GMAIL_428,
            )
        deadline = datetime.now(tz=UTC) + timedelta(seconds=10)
        listed: list[Any] = []
        while not listed and datetime.now(tz=UTC) < deadline:  # the 1 Hz flush acts on it
            with Client(proc.operator_socket) as c:
                listed = [
                    a for a in c.request("automations")["automations"] if a["kind"] == "suspend"
                ]
        (sus,) = listed
        capsys.readouterr()
        assert main(["automations", "--socket", sock]) == 0
        out = capsys.readouterr().out
        assert sus["id"] in out and "suspend" in out and classified["rule"] in out
        assert main(["explain", IPS[0], "google", "--socket", sock]) == 0
        out = capsys.readouterr().out
        assert "SUSPENDED until" in out and f"kiln cancel {sus['id']}" in out
        assert main(["cancel", sus["id"], "--socket", sock]) == 0
        assert "cancelled" in capsys.readouterr().out
        assert main(["cancel", sus["id"], "--socket", sock]) == 1
        assert "not active" in capsys.readouterr().err
        with Client(proc.socket) as c:
            limits = c.request("limits", ip=IPS[0], provider="google")
        assert limits["suspended_until_ms"] is None
