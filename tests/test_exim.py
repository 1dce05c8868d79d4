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
And the transport's reports name the recipient: one the remote server does not know (550
5.1.1 at RCPT) is listed as a hard bounce, and the router fails it from then on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socketserver
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemonproc import REPO, DaemonProc, stored_counts
from kiln.errors import KilnError
from kiln.exim import DEFAULT_TRANSPORT, EximConfig, exim_config, transport_name
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


def test_exim_defers_a_grant_on_an_ip_it_has_no_transport_for(folder: Path) -> None:
    """A configuration rendered from a plan that knows only the first IP, beside a daemon
    whose plan has both. Of two messages (Exim's queue run takes them in any order), the
    first routed is picked on the first IP and leaves from it; the other is picked on the
    second IP (then the less used), which has no transport, so `kiln_send` declines and
    `kiln_defer` defers it, naming the IP. Nothing leaves from the other IP or the host's
    default address."""
    d = _daemon(folder)
    narrow = folder / "one-ip.yaml"
    narrow.write_text(PLAN.replace(", ".join(IPS), IPS[0]))
    with SmtpSink() as sink:
        rendered = exim_config(
            load_plan(narrow), "tx", d.socket, smarthost=f"127.0.0.1:{sink.port}"
        )
        assert transport_name(IPS[1]) not in rendered.text()
        exim = Exim(folder, _whole_config(folder, rendered))
        try:
            d.start()
            exim.submit("first@gmail.com", "first@e2e")
            exim.submit("second@gmail.com", "second@e2e")
            exim.queue_run()
            ((source, (sent,)),) = [(x.source_ip, x.recipients) for x in sink.taken()]
            assert source == IPS[0] and exim.queued() == 1, exim.mainlog()[-2000:]
            (waiting,) = {"first@gmail.com", "second@gmail.com"} - {sent}
            assert (
                f"{waiting} R=kiln_defer defer (-1): kiln: IP {IPS[1]} was granted but"
                " kiln_send did not take it (no transport for that IP here"
            ) in exim.mainlog(), exim.mainlog()[-2000:]
        finally:
            d.cleanup()


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


def _exim_rejecting_suppressed(
    folder: Path, d: DaemonProc, sink: SmtpSink, scope: str = ""
) -> Exim:
    """A private Exim with kiln's routers and its RCPT ACL (`reject_suppressed`, checking
    `scope`'s list too), relaying to `sink`."""
    rendered = exim_config(
        load_plan(d.plan),
        "tx",
        d.socket,
        smarthost=f"127.0.0.1:{sink.port}",
        reject_suppressed=True,
        scope=scope,
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


def test_exim_with_a_scope_enforces_that_scopes_list_too(folder: Path) -> None:
    """`scope="news"`: the ACL refuses a recipient on the `news` list at RCPT, the router
    fails one listed for `news` after its message was queued, and a recipient listed for
    another scope is delivered."""
    d = _daemon(folder)
    with SmtpSink() as sink:
        exim = _exim_rejecting_suppressed(folder, d, sink, scope="news")
        try:
            d.start()
            with d.client() as c:
                for address, scope in (("news@gmail.com", "news"), ("bill@gmail.com", "billing")):
                    reply = c.request(
                        "suppress", action="add", address=address, event="unsubscribe", scope=scope
                    )
                    assert reply["ok"], reply
            replies = exim.smtp(["news@gmail.com", "bill@gmail.com"], "scoped@e2e")
            assert replies[3:5] == [f"{REFUSED} (unsubscribe)", "250 Accepted"], replies
            exim.submit(["late@yahoo.com", "erin@yahoo.com"], "queued@e2e")
            with d.client() as c:
                reply = c.request("suppress", action="add", address="late@yahoo.com", scope="news")
                assert reply["ok"], reply
            exim.queue_run()
            _until(lambda: len(sink.taken()) == 3, exim, "two copies and the bounce")
            assert sorted(x.recipients for x in sink.taken()) == [
                ("bill@gmail.com",),
                ("erin@yahoo.com",),
                (SENDER,),
            ], exim.mainlog()[-2000:]
            assert f"** late@yahoo.com R=kiln_pick: {FAILED} (manual)" in exim.mainlog()
            assert exim.queued() == 0
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


#: A recipient the remote server does not know (kiln keeps its local part's case), and the
#: server's reply to its RCPT.
UNKNOWN = "Gone@gmail.com"
USER_UNKNOWN = f"550 5.1.1 <{UNKNOWN}>: Recipient address rejected: User unknown"


@dataclass
class RefusingSink(SmtpSink):
    """The SMTP sink as a server that does not know one recipient: a RCPT for `unknown` (in
    any case) is answered `reply` and counted in `refused`; the rest of the session is the
    sink's own. (The sink offers no PIPELINING, so the client waits for each reply.)"""

    unknown: str = ""
    reply: str = ""
    refused: int = 0

    def _refuses(self, line: bytes) -> bool:
        """Whether `line` is a RCPT for the unknown recipient."""
        verb, _, rest = line.partition(b":")
        return verb.strip().upper() == b"RCPT TO" and (
            rest.strip().strip(b"<>").decode(errors="replace").lower() == self.unknown.lower()
        )

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The sink's session, on a reader that holds back (and answers here) the unknown
        recipient's RCPT commands; a message's lines are passed on whatever they say."""
        passed = asyncio.StreamReader()

        async def pump() -> None:
            in_data = False
            try:
                while line := await reader.readline():
                    if not in_data and self._refuses(line):
                        with self._lock:
                            self.refused += 1
                        writer.write(self.reply.encode() + b"\r\n")
                        await writer.drain()
                        continue
                    if in_data:
                        in_data = line != b".\r\n"
                    else:
                        in_data = line.strip().upper() == b"DATA"
                    passed.feed_data(line)
            except (ConnectionError, ValueError):
                pass
            finally:
                passed.feed_eof()

        pumping = asyncio.create_task(pump())
        try:
            await super()._session(passed, writer)
        finally:
            pumping.cancel()

    def refusals(self) -> int:
        """RCPT commands refused so far."""
        with self._lock:
            return self.refused


def test_exim_lists_a_recipient_the_remote_server_does_not_know(folder: Path) -> None:
    """The transport's reports name the recipient: a message to a recipient the remote server
    refuses at RCPT with 550 5.1.1 and to one it takes. kiln lists the refused one, its local
    part's case kept, as a hard bounce from a `report` with the reply's code and enhanced
    status (the reports still count), and not the one delivered nor the sender its bounce
    went to; a later message to the listed recipient is failed by `kiln_pick` (returned to
    the sender) and never reaches the remote server."""
    d = _daemon(folder)
    state = d.state_dir
    sink = RefusingSink(unknown=UNKNOWN, reply=USER_UNKNOWN)
    with sink:
        rendered = exim_config(
            load_plan(d.plan), "tx", d.socket, smarthost=f"127.0.0.1:{sink.port}"
        )
        exim = Exim(folder, _whole_config(folder, rendered))
        try:
            d.start()
            day = datetime.fromtimestamp(_plan_now_ms(d) / 1000, tz=UTC).date().isoformat()
            exim.submit([UNKNOWN, "bob@gmail.com"], "unknown@e2e")
            exim.queue_run()
            _until(lambda: len(sink.taken()) == 2, exim, "the bounce to the sender")
            assert sorted(
                (x.recipients, x.message_id == "<unknown@e2e>") for x in sink.taken()
            ) == [(("bob@gmail.com",), True), ((SENDER,), False)], exim.mainlog()[-2000:]
            assert sink.refusals() == 1

            with d.client() as c:
                checked = c.request(
                    "check", addresses=[UNKNOWN, UNKNOWN.lower(), "bob@gmail.com", SENDER]
                )
                history = c.request("suppress", action="history", address=UNKNOWN)
            assert checked["suppressed"] == {
                UNKNOWN: "hard_bounce",
                UNKNOWN.lower(): None,
                "bob@gmail.com": None,
                SENDER: None,
            }, (checked, d.log()[-1500:])
            (event,) = history["events"]
            assert (event["event"], event["source"]) == ("hard_bounce", "report"), event
            evidence = event["evidence"]
            assert (evidence.get("code"), evidence.get("enhanced")) == (550, "5.1.1"), event
            assert evidence.get("ip") in IPS, event
            assert "User unknown" in evidence.get("text", ""), event
            picked = str(evidence.get("ip"))
            assert f"** {UNKNOWN} R=kiln_send T={transport_name(picked)}" in exim.mainlog()

            # Listed: the next message to it is failed when routed, before any connection.
            exim.submit(UNKNOWN, "again@e2e")
            exim.queue_run()
            _until(lambda: len(sink.taken()) == 3, exim, "the second bounce to the sender")
            assert sink.taken()[2].recipients == (SENDER,), exim.mainlog()[-2000:]
            assert f"** {UNKNOWN} R=kiln_pick: {FAILED} (hard_bounce)" in exim.mainlog()
            assert sink.refusals() == 1
            assert exim.queued() == 0
            d.stop()
            # The reports naming their recipients were counted like any other: the bounce for
            # the IP in the evidence, the copy to bob and the two bounces to the sender.
            assert stored_counts(state, day, "bounced") == {(evidence.get("ip"), "google"): 1}
            delivered: Counter[str] = Counter()
            for (_, provider), n in stored_counts(state, day, "delivered").items():
                delivered[provider] += n
            assert delivered == {"google": 1, "default": 2}, delivered
            # Each recipient left from the IP kiln picked and charged for it: Gone and bob, one
            # message to one host, were picked on the two IPs (the least used first), so they
            # went through two transports, each bound to its IP, and bob's copy left from the
            # other IP.
            granted = stored_counts(state, day, "granted")
            assert {ip for ip, provider in granted if provider == "google"} == set(IPS)
            (bob,) = [x for x in sink.taken() if x.recipients == ("bob@gmail.com",)]
            assert bob.source_ip != picked and bob.source_ip in IPS
            assert (bob.source_ip, "google") in stored_counts(state, day, "delivered")
            outcomes = Counter(stored_counts(state, day, "delivered"))
            outcomes.update(stored_counts(state, day, "bounced"))
            assert granted == dict(outcomes)
        finally:
            d.cleanup()


def test_exim_config_names_the_socket_pool_and_smarthost() -> None:
    """`kiln exim-config` renders for the plan's pool, refuses an unknown one, and sends
    everything to a smarthost only when asked (else MX lookups). Its pick names the recipient
    (case kept) and a suppressed reply fails it. One transport per IP kiln may pick for the
    pool (its own and its overflow pool's), bound to that IP and reporting for it, and
    `kiln_send` sends a granted reply through its IP's transport (by a table of exactly
    those IPs). The RCPT ACL statement comes only with `--reject-suppressed`."""
    plan = load_plan(REPO / "schedules" / "example.yaml")
    pool = next(iter(plan.pools))
    assert (pool, plan.pools[pool].overflow) == ("transactional", "shared")
    rendered = exim_config(plan, pool, Path("/run/kiln/kiln.sock"))
    text = rendered.text()
    assert "driver = dnslookup" in text and "manualroute" not in text
    assert '"pool":"' + pool + '"' in text and "/run/kiln/kiln.sock" in text
    pick = rendered.routers.split("\nkiln_send:")[0]
    assert '"address":"' in pick and "caseful_local_part" in pick and "allow_fail" in pick
    assert '"reason":"suppressed"' in pick and f":fail: {FAILED} (" in pick
    # The transport's reports name the recipient as the pick does (the same lines, from a
    # caseful local part: kiln_send, whose local part the transport's events see, is caseful
    # too) and give the enhanced status code.
    send = rendered.routers.split("\nkiln_send:")[1].split("\nkiln_defer:")[0]
    assert "\n  caseful_local_part\n" in send
    address_lines = [
        x.strip() for x in pick.splitlines() if "$local_part" in x or '@$domain"}}' in x
    ]
    report = rendered.transports.split("event_action = ")[1]
    assert len(address_lines) == 3 and all(x in report for x in address_lines), address_lines
    assert '"op":"report"' in report and '"enhanced":"${if match{$event_data}' in report
    # The batch's two warming IPs, the pool's two warm ones, then its overflow pool's.
    ips = ["192.0.2.10", "192.0.2.11", "198.51.100.10", "198.51.100.11", "198.51.100.20"]
    blocks = _transport_blocks(rendered.transports)
    assert list(blocks) == [f"kiln_smtp_{ip.replace('.', '_')}" for ip in ips]
    for ip in ips:
        block = blocks[transport_name(ip)]
        assert f"\n  driver = smtp\n  interface = {ip}\n" in block, block
        assert f'"op":"report","ip":"{ip}",' in block and "$address_data" not in block
    assert "max_rcpt" not in text and DEFAULT_TRANSPORT not in text
    table = [(ip, transport_name(ip)) for ip in ips]
    condition, transport = send.split("\n  condition = ")[1].split("\n  transport = ")
    assert condition.startswith('${if match{$address_data}{\\N^\\{.*"granted":[1-9]\\N}')
    assert _table(condition) == table and condition.endswith("{yes}{no}}}}")
    assert transport.startswith("${extract{${extract jsons{ip}{$address_data}}}")
    assert _table(transport) == table and transport.endswith("{$value}fail}\n")
    # Pool `shared` overflows nowhere: its one IP.
    shared = exim_config(plan, "shared", Path("/run/kiln/kiln.sock"))
    assert list(_transport_blocks(shared.transports)) == [transport_name("198.51.100.20")]
    assert _table(shared.routers.split("\n  transport = ")[1]) == [
        ("198.51.100.20", "kiln_smtp_198_51_100_20")
    ]
    # --when-down default-ip: kiln's silence reads as a grant on `default`, which the table
    # sends through a transport with no interface (the host's default address) that reports
    # nothing (no IP of the plan to report for).
    down = exim_config(plan, pool, Path("/run/kiln/kiln.sock"), when_down="default-ip")
    down_blocks = _transport_blocks(down.transports)
    assert list(down_blocks) == [*blocks, DEFAULT_TRANSPORT]
    assert "interface" not in down_blocks[DEFAULT_TRANSPORT]
    assert "event_action" not in down_blocks[DEFAULT_TRANSPORT]
    assert '{\\{"ok":true,"granted":1,"ip":"default","error":"kiln unreachable"\\}}' in down.routers
    assert _table(down.routers.split("\n  transport = ")[1]) == [
        *table,
        ("default", DEFAULT_TRANSPORT),
    ]
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
    # An IPv6 smarthost: route_list's host list is colon-separated, so its colons double.
    v6 = exim_config(plan, pool, Path("/s"), smarthost="[2001:db8::25]:2525").text()
    assert "route_list = * 2001::db8::::25\n" in v6 and "port = 2525" in v6
    assert "allow_localhost" not in relayed
    done = _exim_config_cli("--pool", "nope")
    assert done.returncode == 1 and "is not in plan" in done.stderr
    done = _exim_config_cli("--pool", pool, "--socket", "/run/kiln/kiln.sock")
    assert done.returncode == 0 and done.stdout == text, done.stderr
    done = _exim_config_cli(
        "--pool", pool, "--socket", "/run/kiln/kiln.sock", "--reject-suppressed"
    )
    assert done.returncode == 0 and done.stdout == refusing.text(), done.stderr
    # A scope: both the router's pick and the ACL's check name it; nothing else changes.
    scoped = exim_config(
        plan, pool, Path("/run/kiln/kiln.sock"), reject_suppressed=True, scope="news"
    )
    assert scoped.transports == refusing.transports
    assert scoped.routers == refusing.routers.replace(
        '"domain":"$domain"', '"domain":"$domain","scope":"news"'
    )
    assert scoped.routers != refusing.routers
    assert scoped.acl == refusing.acl.replace('"]\\}', '"],"scope":"news"\\}')
    assert '"scope":"news"' in scoped.acl
    done = _exim_config_cli(
        "--pool", pool, "--socket", "/run/kiln/kiln.sock", "--reject-suppressed", "--scope", "news"
    )
    assert done.returncode == 0 and done.stdout == scoped.text(), done.stderr
    for bad in ("stream:news", "a b", 'x"}', "$sender_address_domain", "-x", "x" * 129):
        with pytest.raises(KilnError, match="scope"):
            exim_config(plan, pool, Path("/s"), scope=bad)
        done = _exim_config_cli("--pool", pool, f"--scope={bad}")
        assert done.returncode == 1 and "scope" in done.stderr, (bad, done.stderr)


#: A plan with IPv6 IPs: pool `tx` (a batch's IPv4 IP, a warm IPv6 one) overflows to `spill`;
#: pool `other` is no part of `tx`'s chain.
V6_PLAN = """\
name: exim-v6
timezone: UTC
pools:
  tx:
    ips: ["2001:db8::10"]
    overflow: spill
  spill:
    ips: ["192.0.2.20", "2001:DB8:0::20"]
  other:
    ips: ["192.0.2.99"]
batches:
  b1:
    pool: tx
    ips: ["192.0.2.10"]
    schedule: s
    start_date: 2026-11-01
schedules:
  s:
    steps:
      - {daily_cap: 5}
"""
#: What the stand-in for kiln answers a pick, by the recipient's local part: a grant on that
#: IP (one outside the plan for `stray`), or a denial.
FAKE_PICKS = {
    "four": "192.0.2.10",
    "six": "2001:db8::10",
    "spilt": "2001:db8::20",
    "other": "192.0.2.99",
    "stray": "203.0.113.9",
}


class _FakePick(socketserver.StreamRequestHandler):
    """A stand-in for kiln's MTA socket: answers one `pick` per connection (`FAKE_PICKS`)."""

    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        ip = FAKE_PICKS.get(str(request.get("address", "")).split("@")[0])
        reply: dict[str, object] = (
            {"ok": True, "granted": 1, "reason": "granted", "ip": ip}
            if ip
            else {"ok": True, "granted": 0, "reason": "daily_cap"}
        )
        self.wfile.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")


def test_exim_routes_each_granted_ip_to_its_own_transport_ipv6_included(folder: Path) -> None:
    """On a plan with IPv6 IPs and an overflow pool, the real Exim routes (`-bt`, with a
    stand-in for kiln answering each pick) a grant on each IP of the pool's chain to that IP's
    transport, bound to it (IPv6 in a `<;` list); a grant on an IP of another pool, or outside
    the plan, and a denial reach `kiln_defer`, which defers them."""
    assert EXIM.exists(), f"{EXIM} is missing: run `make system-deps` (as root)"
    plan_path = folder / "plan.yaml"
    plan_path.write_text(V6_PLAN)
    rendered = exim_config(
        load_plan(plan_path), "tx", folder / "pick.sock", smarthost="127.0.0.1:25"
    )
    blocks = _transport_blocks(rendered.transports)
    assert list(blocks) == [
        "kiln_smtp_192_0_2_10",
        "kiln_smtp_2001_db8__10",
        "kiln_smtp_192_0_2_20",
        "kiln_smtp_2001_db8__20",
    ]
    assert "\n  interface = <; 2001:db8::10\n" in blocks["kiln_smtp_2001_db8__10"]
    assert '"op":"report","ip":"2001:db8::20",' in blocks["kiln_smtp_2001_db8__20"]
    assert "\n  interface = 192.0.2.20\n" in blocks["kiln_smtp_192_0_2_20"]
    exim = Exim(folder, _whole_config(folder, rendered))
    server = socketserver.UnixStreamServer(str(folder / "pick.sock"), _FakePick)
    (folder / "pick.sock").chmod(0o666)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        done = subprocess.run(  # noqa: S603 (the unpacked Debian binary, our arguments)
            [str(exim.binary), "-C", str(exim.conf), "-bt"]
            + [
                f"{local}@gmail.com" for local in ("four", "six", "spilt", "other", "stray", "full")
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    routed = done.stdout
    for local, name in [
        ("four", "kiln_smtp_192_0_2_10"),
        ("six", "kiln_smtp_2001_db8__10"),
        ("spilt", "kiln_smtp_2001_db8__20"),
    ]:
        assert f"{local}@gmail.com\n  router = kiln_send, transport = {name}\n" in routed, routed
    for local, ip in [("other", "192.0.2.99"), ("stray", "203.0.113.9")]:
        assert (
            f"{local}@gmail.com cannot be resolved at this time: kiln: IP {ip} was granted but"
            " kiln_send did not take it (no transport for that IP here or no host for gmail.com)"
        ) in routed, routed
    assert (
        "full@gmail.com cannot be resolved at this time: kiln: no IP of pool tx has room for"
        " gmail.com now"
    ) in routed, routed


def test_exim_md_lists_what_exim_config_prints() -> None:
    """docs/integrations/exim.md shows what `kiln exim-config` prints for the example plan's
    pool `transactional`, exactly: the routers, the transports (without their `event_action`,
    which the page leaves out) and the `--reject-suppressed` ACL statement."""
    plan = load_plan(REPO / "schedules" / "example.yaml")
    rendered = exim_config(
        plan, "transactional", Path("/run/kiln/kiln.sock"), reject_suppressed=True
    )
    listings = _listings((REPO / "docs" / "integrations" / "exim.md").read_text())
    transports = "\n".join(
        b.split("  # kiln: every outcome")[0]
        for b in _transport_blocks(rendered.transports).values()
    )
    assert "event_action" in rendered.transports and "event_action" not in transports
    for shown in (rendered.routers, transports, rendered.acl):
        assert shown in listings, shown


def _listings(page: str) -> list[str]:
    """The contents of a Markdown page's code blocks that name no language."""
    found: list[str] = []
    block: list[str] | None = None
    bare = False
    for line in page.splitlines(keepends=True):
        if line.startswith("```"):
            if block is None:
                block, bare = [], line.strip() == "```"
            else:
                if bare:
                    found.append("".join(block))
                block = None
        elif block is not None:
            block.append(line)
    return found


def _transport_blocks(transports: str) -> dict[str, str]:
    """The rendered transports by name (each block from its `NAME:` line)."""
    blocks = transports.rstrip("\n").split("\n\n")
    return {b.split(":\n", 1)[0]: b + "\n" for b in blocks}


def _table(expansion: str) -> list[tuple[str, str]]:
    """The (IP, transport) pairs of `kiln_send`'s table in an expansion, in order."""
    return re.findall(r"([0-9A-Za-z.:]+)=(kiln_smtp_[0-9A-Za-z_]+)", expansion)


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
