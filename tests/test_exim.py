"""kiln beside a real Exim (Debian's exim4-daemon-light, unpacked by `make system-deps` into
.cache/exim4 and run with its own configuration, spool and log in a temporary folder), with
the router and transport `kiln exim-config` prints, delivering to an SMTP sink on loopback
from the IPs kiln picks (127.0.0.x). Never skipped: a missing Exim is a failure.

One test, in steps, on a drill clock that reaches midnight during it: messages to three
providers; each key's daily cap holds at the sink, what does not fit waits in Exim's queue,
and leaves when the next day opens; with kiln killed nothing leaves, and after a restart the
waiting mail goes. Then the suppression list: refused at RCPT by the ACL
`--reject-suppressed` adds, failed (returned to the sender) by the router when listed after
the message was queued, and accepted at RCPT while kiln is down, to be failed once it is back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemonproc import REPO, DaemonProc, stored_counts
from kiln.exim import EximConfig, exim_config
from kiln.planfile import load_plan
from smtpsink import SmtpSink

EXIM = REPO / ".cache" / "exim4" / "usr" / "sbin" / "exim4"
EXIM_USER = "Debian-exim"
#: Two warming IPs (the only IPs of the pool), each capped at 5 a day per provider.
IPS = ("127.0.0.2", "127.0.0.3")
#: The envelope sender of every test message: Exim returns failed recipients to it (through
#: kiln's routers like any remote address, so a bounce reaches the sink).
SENDER = "sender@example.com"
DAILY_CAP = 5
DOMAINS = {"gmail.com": "google", "yahoo.com": "yahoo", "outlook.com": "microsoft-consumer"}
PER_DOMAIN = 14  # 10 fit in a day (2 IPs x 5), 4 wait for the next
PLAN = f"""\
name: exim-e2e
timezone: UTC
providers:
  google: {{domains: [gmail.com]}}
  yahoo: {{domains: [yahoo.com]}}
  microsoft-consumer: {{domains: [outlook.com]}}
pools:
  tx:
    ips: []
batches:
  b1:
    pool: tx
    ips: [{", ".join(IPS)}]
    schedule: s
    start_date: 2026-11-01
schedules:
  s:
    steps:
      - {{daily_cap: {DAILY_CAP}, hourly_cap: {DAILY_CAP}}}
    hourly:
      active_hours: 00-24
    max_message_rate: 1_000/s,max_burst=1_000
"""
#: The drill clock: a minute of plan time before midnight, 10 times faster than real time.
CLOCK_START = "2026-11-10T23:59:00+00:00"
CLOCK_SPEED = 10


def _exim_main_section(folder: Path) -> str:
    """The test instance's own settings: binary, spool, log, users."""
    return (
        f"exim_path = {folder / 'exim4'}\n"
        "keep_environment =\n"
        "primary_hostname = kiln-e2e.test\n"
        f"spool_directory = {folder / 'spool'}\n"
        f"log_file_path = {folder / 'log'}/%slog\n"
        f"exim_user = {EXIM_USER}\n"
        f"exim_group = {EXIM_USER}\n"
        "domainlist local_domains = localhost\n"
        "qualify_domain = example.com\n"
    )


def _whole_config(folder: Path, rendered: EximConfig) -> str:
    """The test instance's configuration: its own settings, then what `kiln exim-config`
    rendered (its ACL statement, when there is one, in a RCPT ACL that accepts the rest),
    then a retry rule."""
    acl = ""
    if rendered.acl:
        acl = "acl_smtp_rcpt = acl_check_rcpt\nbegin acl\nacl_check_rcpt:\n" + rendered.acl
        acl += "  accept\n"
    return (
        _exim_main_section(folder)
        + acl
        + "begin routers\n"
        + rendered.routers
        + "begin transports\n"
        + rendered.transports
        + "begin retry\n* * F,1h,1m\n"
    )


class Exim:
    """One private Exim instance: submit, run the queue, count what waits."""

    def __init__(self, folder: Path, config: str) -> None:
        self.folder = folder
        # Exim re-executes itself as its own user, who may not enter the checkout (CI clones
        # it into a private temporary folder): a copy beside the configuration.
        self.binary = folder / "exim4"
        shutil.copy2(EXIM, self.binary)
        self.conf = folder / "exim.conf"
        self.conf.write_text(config)
        self.conf.chmod(0o644)
        for sub in ("spool", "log"):
            (folder / sub).mkdir()
            shutil.chown(folder / sub, EXIM_USER, EXIM_USER)

    def _run(self, *args: str, stdin: bytes = b"") -> None:
        done = subprocess.run(  # noqa: S603 (the unpacked Debian binary, our arguments)
            [str(self.binary), "-C", str(self.conf), *args],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr, self.mainlog())

    def submit(self, recipient: str | Sequence[str], message_id: str) -> None:
        """Queue one message to one or more recipients (no delivery attempt yet)."""
        body = f"Subject: e2e\nMessage-ID: <{message_id}>\n\nhello\n".encode()
        rcpts = [recipient] if isinstance(recipient, str) else list(recipient)
        self._run("-odq", "-f", SENDER, *rcpts, stdin=body)

    def smtp(self, recipients: Sequence[str], message_id: str | None) -> list[str]:
        """One SMTP session on Exim's standard input (`-bs`, the message queued only): EHLO,
        MAIL, a RCPT per recipient, DATA and the message (unless `message_id` is None), QUIT.
        Exim's final reply line to each, after its greeting: [greeting, EHLO, MAIL, RCPT...,
        DATA, message, QUIT]."""
        lines = ["EHLO client.test", f"MAIL FROM:<{SENDER}>"]
        lines += [f"RCPT TO:<{r}>" for r in recipients]
        if message_id is not None:
            lines += ["DATA", f"Subject: e2e\r\nMessage-ID: <{message_id}>\r\n\r\nhello\r\n."]
        lines.append("QUIT")
        done = subprocess.run(  # noqa: S603 (the unpacked Debian binary, our arguments)
            [str(self.binary), "-C", str(self.conf), "-odq", "-bs"],
            input="".join(line + "\r\n" for line in lines).encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (done.stdout, done.stderr, self.mainlog())
        replies = done.stdout.decode(errors="replace").splitlines()
        return [r.rstrip("\r") for r in replies if len(r) > 3 and r[3] == " "]

    def queue_run(self) -> None:
        """One forced queue run: every waiting address is routed (asks kiln) now."""
        self._run("-qff")

    def queued(self) -> int:
        """Messages still in the queue."""
        done = subprocess.run(  # noqa: S603
            [str(self.binary), "-C", str(self.conf), "-bpc"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(done.stdout.strip())

    def mainlog(self) -> str:
        """Exim's main log so far."""
        path = self.folder / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""


def _daemon(folder: Path, *args: str) -> DaemonProc:
    """A daemon (not started) on the test plan, its MTA socket where Exim's user reaches it."""
    assert EXIM.exists(), f"{EXIM} is missing: run `make system-deps` (as root)"
    plan_path = folder / "plan.yaml"
    plan_path.write_text(PLAN)
    sock_dir = folder / "run"
    sock_dir.mkdir(mode=0o755)
    state = folder / "state"
    state.mkdir()
    socket = sock_dir / "kiln.sock"
    d = DaemonProc(
        plan_path,
        state_dir=state,
        args=["--socket", str(socket), "--socket-group", EXIM_USER, *args],
    )
    d.socket = socket
    return d


def _plan_now_ms(d: DaemonProc) -> int:
    """The daemon's clock, from `status`."""
    with d.client() as c:
        return int(c.request("status")["now_ms"])


def test_exim_sends_from_kilns_pick_holds_the_caps_and_waits_without_kiln(folder: Path) -> None:
    """The whole path, in steps (see the module doc)."""
    d = _daemon(folder, "--clock-start", CLOCK_START, "--clock-speed", str(CLOCK_SPEED))
    plan_path, state = d.plan, d.state_dir
    with SmtpSink() as sink:
        rendered = exim_config(
            load_plan(plan_path), "tx", d.socket, smarthost=f"127.0.0.1:{sink.port}"
        )
        exim = Exim(folder, _whole_config(folder, rendered))
        try:
            d.start()
            submitted = [
                (f"u{i}@{domain}", f"m{i}.{domain}@e2e")
                for domain in DOMAINS
                for i in range(PER_DOMAIN)
            ]
            for rcpt, mid in submitted:
                exim.submit(rcpt, mid)
            assert _plan_now_ms(d) < _ms(CLOCK_START) + 50_000, "the day ended too soon"
            exim.queue_run()

            # Day one: each (IP, provider) got exactly its cap; the rest waits in the queue.
            first = sink.taken()
            per_key = Counter((x.source_ip, DOMAINS[x.recipients[0].split("@")[1]]) for x in first)
            assert per_key == {(ip, p): DAILY_CAP for ip in IPS for p in DOMAINS.values()}, (
                per_key,
                exim.mainlog()[-3000:],
            )
            assert exim.queued() == len(submitted) - len(first)
            with d.client() as c:  # kiln counted what the sink saw
                for ip in IPS:
                    for provider in DOMAINS.values():
                        used = c.request("limits", ip=ip, provider=provider)["day_used"]
                        assert used == DAILY_CAP, (ip, provider, used)

            # The next day opens: the waiting mail leaves at the next queue run.
            deadline = time.monotonic() + 30
            # Past the first tick after midnight (1 s real, 10 s here): the day has rolled, so
            # the reports that follow count for the new day.
            while _plan_now_ms(d) < _ms("2026-11-11T00:00:25+00:00"):
                assert time.monotonic() < deadline, "the drill clock did not reach midnight"
                time.sleep(0.5)
            exim.queue_run()
            everything = sink.taken()
            ids = [x.message_id for x in everything]
            assert len(ids) == len(set(ids)) == len(submitted), exim.mainlog()[-3000:]
            assert sorted(str(i) for i in ids) == sorted(f"<{mid}>" for _, mid in submitted)
            assert exim.queued() == 0

            # kiln stopped: nothing leaves, the mail waits in Exim's queue; back, it goes.
            stopped_ms = _plan_now_ms(d)
            d.stop()
            # Each delivery reached kiln as a report (the transport's event_action), counted
            # on the day it happened (read from the store once kiln let go of it).
            assert _delivered(state, "2026-11-10") == per_key, exim.mainlog()[-2000:]
            day_two = Counter(
                (x.source_ip, DOMAINS[x.recipients[0].split("@")[1]])
                for x in everything[len(first) :]
            )
            assert _delivered(state, "2026-11-11") == day_two
            exim.submit("late@gmail.com", "late@e2e")
            exim.queue_run()
            assert len(sink.taken()) == len(submitted)
            assert exim.queued() == 1
            assert "kiln: no IP of pool tx has room" in exim.mainlog()
            _restart(d, stopped_ms + 2_000)
            exim.queue_run()
            assert [x.message_id for x in sink.taken()][len(submitted) :] == ["<late@e2e>"], (
                exim.mainlog()[-1500:]
            )
            assert exim.queued() == 0

            # kiln killed (SIGKILL): nothing leaves either. (Back up, it charges each key
            # its reserved block first, docs/core.md "Reservations": with caps this small
            # that is the rest of the day, so the mail waits for the next one.)
            d.kill()
            exim.submit("later@yahoo.com", "later@e2e")
            exim.queue_run()
            assert len(sink.taken()) == len(submitted) + 1
            assert exim.queued() == 1
        finally:
            d.cleanup()


def _delivered(state: Path, day: str) -> dict[tuple[str, str], int]:
    """What kiln's store counts as delivered on `day`, per (IP, provider)."""
    return stored_counts(state, day, "delivered")


def _iso(ms: int) -> str:
    """RFC 3339 of epoch ms, UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _restart(d: DaemonProc, stopped_ms: int) -> None:
    """Start `d` again with its clock just past where it stopped (it never goes back)."""
    d.args[d.args.index("--clock-start") + 1] = _iso(stopped_ms + 1_000)
    d.start()


def _ms(iso: str) -> int:
    """Epoch ms of an ISO time."""
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def test_exim_reports_a_deferral_with_its_reply(folder: Path) -> None:
    """A 451 (quotes and a backslash in its text) reaches kiln as a `deferred` report for the
    IP kiln picked, through the transport's event_action; the message waits in the queue."""
    d = _daemon(folder)
    plan_path, state = d.plan, d.state_dir
    with SmtpSink(defer_prefix="slow") as sink:
        rendered = exim_config(
            load_plan(plan_path), "tx", d.socket, smarthost=f"127.0.0.1:{sink.port}"
        )
        exim = Exim(folder, _whole_config(folder, rendered))
        try:
            d.start()
            exim.submit("slow@gmail.com", "slow@e2e")
            exim.queue_run()
            assert sink.taken() == [] and exim.queued() == 1
            with d.client() as c:
                day = datetime.fromtimestamp(
                    int(c.request("status")["now_ms"]) / 1000, tz=UTC
                ).date()
            assert "Slow down" in exim.mainlog()
            d.stop()
            deferred = stored_counts(state, day.isoformat(), "deferred")
            assert deferred == {(IPS[0], "google"): 1}, d.log()[-1500:]
        finally:
            d.cleanup()


@pytest.mark.parametrize("when_down", ["defer", "default-ip"])
def test_exim_while_kiln_is_down_defers_or_sends_from_the_default_address(
    folder: Path, when_down: str
) -> None:
    """No daemon at all: with `--when-down defer` (the default) the message waits in
    Exim's queue; with `default-ip` it leaves from the host's default address (here
    127.0.0.1), never from an IP of the plan."""
    assert EXIM.exists(), f"{EXIM} is missing: run `make system-deps` (as root)"
    plan_path = folder / "plan.yaml"
    plan_path.write_text(PLAN)
    with SmtpSink() as sink:
        rendered = exim_config(
            load_plan(plan_path),
            "tx",
            folder / "nobody-listens.sock",
            smarthost=f"127.0.0.1:{sink.port}",
            when_down=when_down,
        )
        exim = Exim(folder, _whole_config(folder, rendered))
        exim.submit("down@gmail.com", "down@e2e")
        exim.queue_run()
        if when_down == "defer":
            assert sink.taken() == [] and exim.queued() == 1
        else:
            assert [(x.source_ip, x.message_id) for x in sink.taken()] == [
                ("127.0.0.1", "<down@e2e>")
            ], exim.mainlog()[-1500:]
            assert exim.queued() == 0


#: What the ACL answers a suppressed recipient at RCPT, and the text the router fails one
#: with (each followed by the event in brackets).
REFUSED = "550 5.7.1 kiln: the recipient is on the suppression list"
FAILED = "5.7.1 kiln: the recipient is on the suppression list"


def _suppress(d: DaemonProc, address: str, event: str = "manual") -> None:
    """Put `address` on kiln's global suppression list (the operator socket)."""
    with d.client() as c:
        reply = c.request("suppress", action="add", address=address, event=event, reason="e2e")
    assert reply["ok"] and reply["event"] == event, reply


def _until(done: Callable[[], bool], exim: Exim, what: str) -> None:
    """Run Exim's queue until `done()` (a bounce is delivered by a process of its own, which
    may finish after the queue run that failed the address); 30 s at most."""
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, (what, exim.mainlog()[-3000:])
        time.sleep(0.3)
        exim.queue_run()


def _day_used(d: DaemonProc, provider: str) -> int:
    """What kiln charged today for `provider`, over both IPs."""
    with d.client() as c:
        return sum(int(c.request("limits", ip=ip, provider=provider)["day_used"]) for ip in IPS)


def _exim_rejecting_suppressed(folder: Path, d: DaemonProc, sink: SmtpSink) -> Exim:
    """A private Exim with kiln's routers and its RCPT ACL (`reject_suppressed`), relaying
    to `sink`."""
    rendered = exim_config(
        load_plan(d.plan),
        "tx",
        d.socket,
        smarthost=f"127.0.0.1:{sink.port}",
        reject_suppressed=True,
    )
    return Exim(folder, _whole_config(folder, rendered))


def test_exim_refuses_suppressed_recipients_at_rcpt_and_fails_those_listed_later(
    folder: Path,
) -> None:
    """With `reject_suppressed`: an SMTP submission gets 550 5.7.1 and the event at RCPT for
    each listed recipient (its local part's case kept, a quoted one quoted) and 250 for
    another, whose copy alone reaches the sink. A message queued before one of its recipients
    was listed: the router fails that recipient (Exim returns it to the sender: the bounce
    reaches the sink), the other recipient's copy arrives, nothing waits in the queue, and
    kiln charged only what was sent."""
    d = _daemon(folder)
    with SmtpSink() as sink:
        exim = _exim_rejecting_suppressed(folder, d, sink)
        try:
            d.start()
            _suppress(d, "Ann@gmail.com")
            _suppress(d, '"Carol Smith"@gmail.com', "complaint")
            replies = exim.smtp(
                ["Ann@gmail.com", "bob@gmail.com", '"Carol Smith"@gmail.com'], "smtp@e2e"
            )
            assert replies[3:6] == [
                f"{REFUSED} (manual)",
                "250 Accepted",
                f"{REFUSED} (complaint)",
            ], (replies, exim.mainlog()[-2000:])
            assert replies[7].startswith("250 OK id="), replies
            exim.queue_run()
            assert [(x.recipients, x.message_id) for x in sink.taken()] == [
                (("bob@gmail.com",), "<smtp@e2e>")
            ], exim.mainlog()[-2000:]
            assert exim.queued() == 0

            # Listed after the message was queued: failed when routed, never delivered.
            exim.submit(["Dave@yahoo.com", "erin@yahoo.com"], "queued@e2e")
            _suppress(d, "Dave@yahoo.com", "unsubscribe")
            exim.queue_run()
            _until(lambda: len(sink.taken()) == 3, exim, "the bounce to the sender")
            later = sink.taken()[1:]
            assert sorted((x.recipients, x.message_id == "<queued@e2e>") for x in later) == [
                (("erin@yahoo.com",), True),
                ((SENDER,), False),
            ], exim.mainlog()[-2000:]
            assert f"** Dave@yahoo.com R=kiln_pick: {FAILED} (unsubscribe)" in exim.mainlog()
            assert exim.queued() == 0
            # One pick charged per copy sent; the refused and failed recipients cost nothing.
            assert (_day_used(d, "google"), _day_used(d, "yahoo")) == (1, 1)
        finally:
            d.cleanup()


def test_exim_acl_refuses_nothing_while_kiln_is_down_and_the_router_holds_the_mail(
    folder: Path,
) -> None:
    """With `reject_suppressed`, a listed recipient refused at RCPT while kiln is up is
    accepted while kiln is down; the message waits in Exim's queue, and once kiln is back the
    router fails the recipient (the bounce goes to the sender): it never reaches the sink."""
    d = _daemon(folder)
    with SmtpSink() as sink:
        exim = _exim_rejecting_suppressed(folder, d, sink)
        try:
            d.start()
            _suppress(d, "frank@gmail.com")
            up = exim.smtp(["frank@gmail.com"], None)
            assert up[3] == f"{REFUSED} (manual)", up

            d.stop()
            down = exim.smtp(["frank@gmail.com"], "down@e2e")
            assert down[3] == "250 Accepted" and down[5].startswith("250 OK id="), down
            exim.queue_run()
            assert sink.taken() == [] and exim.queued() == 1
            assert "kiln: no IP of pool tx has room" in exim.mainlog()

            d.start()
            exim.queue_run()
            _until(lambda: len(sink.taken()) >= 1, exim, "the bounce to the sender")
            assert [x.recipients for x in sink.taken()] == [(SENDER,)], exim.mainlog()[-2000:]
            assert f"** frank@gmail.com R=kiln_pick: {FAILED} (manual)" in exim.mainlog()
            assert exim.queued() == 0
        finally:
            d.cleanup()


def test_exim_config_names_the_socket_pool_and_smarthost() -> None:
    """`kiln exim-config` renders for the plan's pool, refuses an unknown one, and sends
    everything to a smarthost only when asked (else MX lookups). Its pick names the recipient
    (case kept) and a suppressed reply fails it; the RCPT ACL statement comes only with
    `--reject-suppressed`."""
    plan = load_plan(REPO / "schedules" / "example.yaml")
    pool = next(iter(plan.pools))
    rendered = exim_config(plan, pool, Path("/run/kiln/kiln.sock"))
    text = rendered.text()
    assert "driver = dnslookup" in text and "manualroute" not in text
    assert '"pool":"' + pool + '"' in text and "/run/kiln/kiln.sock" in text
    pick = rendered.routers.split("\nkiln_send:")[0]
    assert '"address":"' in pick and "caseful_local_part" in pick and "allow_fail" in pick
    assert '"reason":"suppressed"' in pick and f":fail: {FAILED} (" in pick
    assert rendered.acl == "" and "RCPT ACL" not in text and '"op":"check"' not in text
    refusing = exim_config(plan, pool, Path("/run/kiln/kiln.sock"), reject_suppressed=True)
    assert refusing.routers == rendered.routers
    assert refusing.transports == rendered.transports
    assert refusing.acl.lstrip().startswith("# kiln: refuse") and "\n  deny\n" in refusing.acl
    assert '"op":"check"' in refusing.acl and "/run/kiln/kiln.sock" in refusing.acl
    assert f"message = {REFUSED} ($acl_m_kiln_event)" in refusing.acl
    assert refusing.text() == (
        "# ---- put this in your RCPT ACL (the one acl_smtp_rcpt names), before its first"
        " accept ----\n" + refusing.acl + "\n" + text
    )
    relayed = exim_config(plan, pool, Path("/s"), smarthost="relay.example:2525").text()
    assert "route_list = * relay.example" in relayed and "port = 2525" in relayed
    assert "allow_localhost" not in relayed
    done = _exim_config_cli("--pool", "nope")
    assert done.returncode == 1 and "is not in plan" in done.stderr
    done = _exim_config_cli("--pool", pool, "--socket", "/run/kiln/kiln.sock")
    assert done.returncode == 0 and done.stdout == text, done.stderr
    done = _exim_config_cli(
        "--pool", pool, "--socket", "/run/kiln/kiln.sock", "--reject-suppressed"
    )
    assert done.returncode == 0 and done.stdout == refusing.text(), done.stderr


def _exim_config_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`kiln exim-config --config schedules/example.yaml ARGS`, as installed in .venv."""
    return subprocess.run(  # noqa: S603
        [
            os.fspath(REPO / ".venv" / "bin" / "kiln"),
            "exim-config",
            "--config",
            str(REPO / "schedules" / "example.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
