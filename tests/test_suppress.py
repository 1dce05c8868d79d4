"""The suppression list in the daemon (kiln.suppress.live, rust/src/suppress): operator adds
and removes are durable before the reply, `acquire` and `pick` deny a suppressed address and
charge nothing, the live set is the fold of the append-only log and survives a restart with or
without its snapshot."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemonproc import DaemonProc, running_daemon
from kiln.cli import main
from kiln.client import ClientError
from kiln.daemon import Daemon, DaemonConfig
from kiln.duration import parse_ms
from kiln.errors import ConfigError
from kiln.policyspec import SoftBounceRule
from kiln.records import SuppressionEvent
from kiln.suppress.files import FoldColumns
from kiln.suppress.live import SNAPSHOT_FILE, read_key_file, without_addresses
from kiln.suppress.soft import SoftBounces
from test_daemon import PLAN, FakeClock, make, ms, send
from test_protocol import anytime_plan

IP = "192.0.2.10"


def op(d: Daemon, clock: FakeClock, **req: Any) -> dict[str, Any]:
    """An operator request, answered as the socket would."""
    return d.upcall(json.dumps(req).encode(), clock.t)


def acquire_for(address: str, **more: Any) -> dict[str, Any]:
    return {"op": "acquire", "ip": IP, "address": address, **more}


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def feedback_plan(tmp_path: Path, suppression: str = "") -> tuple[Path, Path]:
    """(plan, Postfix log) of a plan reading the log, with this `suppression` section."""
    log = tmp_path / "mail.log"
    log.write_text("")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        PLAN
        + "signals:\n  feedback:\n"
        + f"    postfix: {{path: {log}, syslog_names: {{postfix-ip10: {IP}}}}}\n"
        + suppression
    )
    return plan, log


def test_an_added_address_is_denied_until_removed(plan_file: Path, tmp_path: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    added = op(d, clock, op="suppress", action="add", address=" Ann@Example.ORG ", reason="asked")
    assert added["ok"] and added["address"] == "Ann@example.org", added
    first = send(d, acquire_for("Ann@EXAMPLE.org"), acquire_for("ann@example.org"))
    assert first[0] == {
        "ok": True,
        "granted": 0,
        "reason": "suppressed",
        "event": "manual",
        "retry_after_ms": None,
    }
    assert first[1]["granted"] == 1  # the local part is kept as given
    checked = op(d, clock, op="check", addresses=["Ann@example.org", "x@y.org", "nope"])
    assert checked["suppressed"] == {
        "Ann@example.org": "manual",
        "x@y.org": None,
        "nope": "invalid",
    }
    removed = op(d, clock, op="suppress", action="remove", address="Ann@example.org")
    assert removed["ok"] and removed["event"] == "remove"
    assert send(d, acquire_for("Ann@example.org"))[0]["granted"] == 1
    history = op(d, clock, op="suppress", action="history", address="Ann@example.org")
    assert [e["event"] for e in history["events"]] == ["manual", "remove"]
    assert history["listed"] == 0
    d.store.close()
    # The log is append-only in the database itself.
    with (
        sqlite3.connect(tmp_path / "state" / "kiln.db") as db,
        pytest.raises(sqlite3.Error, match="append-only"),
    ):
        db.execute("DELETE FROM kiln_suppression")
    db.close()


def test_soft_bounces_expire_and_scopes_are_apart(plan_file: Path, tmp_path: Path) -> None:
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    assert op(d, clock, op="suppress", action="add", address="s@x.org", event="soft_bounce")[
        "error"
    ].startswith("for:")
    soft = op(
        d,
        clock,
        op="suppress",
        action="add",
        address="s@x.org",
        event="soft_bounce",
        **{"for": "1h"},
    )
    assert soft["ok"]
    op(d, clock, op="suppress", action="add", address="n@x.org", event="unsubscribe", scope="news")
    assert send(d, acquire_for("s@x.org"))[0]["reason"] == "suppressed"
    assert send(d, acquire_for("n@x.org", scope="news"))[0]["event"] == "unsubscribe"
    assert send(d, acquire_for("n@x.org", scope="billing"))[0]["granted"] == 1
    clock.t += 3_600_000
    assert send(d, acquire_for("s@x.org"))[0]["granted"] == 1
    for bad, error in (
        ({"address": "no-at"}, "no @"),
        ({"address": "a@" + "x" * 330 + ".org"}, "address"),
        ({"address": "a@x.org", "event": "spam"}, "event:"),
        ({}, "address: missing"),
    ):
        reply = op(d, clock, op="suppress", action="add", **bad)
        assert not reply["ok"] and error in reply["error"], (bad, reply)
    d.store.close()


HARD = st.sampled_from(["hard_bounce", "complaint", "unsubscribe", "manual"])
WHO = st.integers(0, 5)
#: One step of the operator's and the importer's hands on the list, and of time.
STEP = st.one_of(
    st.tuples(st.just("add"), WHO, HARD),
    st.tuples(st.just("remove"), WHO, st.just("")),
    st.tuples(st.just("soft"), WHO, st.sampled_from(["1h", "2h"])),
    st.tuples(st.just("advance"), st.sampled_from([30, 90]), st.just("")),
    st.tuples(
        st.just("import"), st.lists(st.tuples(WHO, HARD), min_size=1, max_size=4), st.just("")
    ),
    st.tuples(st.just("restart"), st.booleans(), st.just("")),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(STEP, min_size=1, max_size=20))
def test_the_live_set_is_the_fold_of_the_log_across_restarts(
    plan_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, Any, str]],
) -> None:
    """Adds, removes, soft bounces that expire, imports of addresses listed already or not,
    time passing, and restarts (with the snapshot saved, or as after a SIGKILL, without it)
    in any order: the list always answers as a model where each address's last event holds
    (a soft bounce until its expiry)."""
    state = tmp_path_factory.mktemp("state")
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    model: dict[str, tuple[str, int | None]] = {}  # address -> (event, expires_ms)
    addresses = [f"user{i}@example.com" for i in range(6)]

    def expected() -> dict[str, str | None]:
        return {
            a: e if (t is None or t > clock.t) else None
            for a in addresses
            for e, t in [model.get(a, (None, None))]
        }

    for kind, what, more in steps:
        if kind == "advance":
            clock.t += what * 60_000
        elif kind == "restart":
            if what:
                d.suppression.save_snapshot()
                assert (state / SNAPSHOT_FILE).exists()
            d.store.close()  # with no snapshot saved, as after a SIGKILL
            d = make(plan_file, state, clock)
        elif kind == "import":
            export = state.parent / f"{state.name}.csv"
            export.write_text("address,event\n" + "".join(f"{addresses[w]},{e}\n" for w, e in what))
            reply = op(
                d, clock, op="suppress_file", action="import", path=str(export), **{"from": "csv"}
            )
            assert reply["ok"], reply
            for w, e in what:
                model[addresses[w]] = (e, None)
        else:
            address = addresses[what]
            fields: dict[str, Any] = {"address": address}
            if kind == "soft":
                fields |= {"event": "soft_bounce", "for": more}
            elif kind == "add":
                fields["event"] = more
            reply = op(
                d, clock, op="suppress", action="remove" if kind == "remove" else "add", **fields
            )
            assert reply["ok"], reply
            if kind == "remove":
                model.pop(address, None)
            elif kind == "soft":
                model[address] = ("soft_bounce", clock.t + parse_ms(more))
            else:
                model[address] = (more, None)
        assert op(d, clock, op="check", addresses=addresses)["suppressed"] == expected(), kind
    d.store.close()
    again = make(plan_file, state, clock)
    assert op(again, clock, op="check", addresses=addresses)["suppressed"] == expected()
    again.store.close()


def test_an_import_leaves_out_only_rows_that_change_nothing(
    plan_file: Path, tmp_path: Path
) -> None:
    """Each address's last row in the file holds, as if every row were folded in order: a
    row is left out only when the address's previous event (an earlier row, or the list at
    its first row) is the same."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    assert op(d, clock, op="suppress", action="add", address="y@x.org", event="complaint")["ok"]
    export = tmp_path / "kiln.csv"
    export.write_text(
        "address,event\n"
        "x@x.org,complaint\nx@x.org,hard_bounce\nx@x.org,complaint\nx@x.org,complaint\n"
        "y@x.org,complaint\ny@x.org,hard_bounce\ny@x.org,complaint\n"
    )
    reply = op(d, clock, op="suppress_file", action="import", path=str(export), **{"from": "csv"})
    assert reply["ok"], reply
    assert (reply["imported"], reply["duplicates_in_file"], reply["already_listed"]) == (5, 1, 1)
    checked = op(d, clock, op="check", addresses=["x@x.org", "y@x.org"])["suppressed"]
    assert checked == {"x@x.org": "complaint", "y@x.org": "complaint"}
    d.store.close()


def test_a_sigkill_loses_no_event_the_daemon_said_it_recorded(plan_file: Path) -> None:
    """A real `kiln run` takes adds and removes from three connections at once and is
    SIGKILLed in the middle of them: after a restart every address whose add was answered
    `ok` is listed and every one whose remove was answered is not (the event is durable
    before the reply). What was in flight when it died may have landed or not."""
    d = DaemonProc(plan_file)
    seeded = [f"seed{i}@example.org" for i in range(400)]
    added: list[str] = []
    removed: list[str] = []
    refused: list[dict[str, Any]] = []
    stop = threading.Event()

    def writer(action: str, addresses: Iterator[str], acked: list[str]) -> None:
        with contextlib.suppress(OSError, ClientError, ValueError), d.client() as c:
            for address in addresses:
                if stop.is_set():
                    return
                reply = c.request("suppress", action=action, address=address, event="complaint")
                if not reply["ok"]:
                    refused.append(reply)
                    return
                acked.append(address)

    try:
        d.start()
        with d.client() as c:
            replies = c.many(
                {"op": "suppress", "action": "add", "address": a, "event": "complaint"}
                for a in seeded
            )
        assert all(r["ok"] for r in replies)
        threads = [
            threading.Thread(target=writer, args=args)
            for args in (
                ("add", (f"a{i}@example.org" for i in itertools.count()), added),
                ("add", (f"b{i}@example.net" for i in itertools.count()), added),
                ("remove", iter(seeded), removed),
            )
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(added) < 300 or len(removed) < 100:
            assert time.monotonic() < deadline, (len(added), len(removed))
            time.sleep(0.01)
        d.kill()
        stop.set()
        for t in threads:
            t.join(10)
        assert refused == []
        assert len(removed) < len(seeded)  # killed while removes were still coming
        d.start()
        with d.client() as c:
            listed = c.request("check", addresses=added + removed)["suppressed"]
        assert [a for a in added if listed[a] != "complaint"] == []
        assert [a for a in removed if listed[a] is not None] == []
    finally:
        stop.set()
        d.cleanup()


def test_hard_bounces_and_complaints_from_mta_logs_are_suppressed(tmp_path: Path) -> None:
    plan, log = feedback_plan(tmp_path)
    clock = FakeClock(ms("2026-03-10T14:10:00"))
    d = make(plan, tmp_path / "state", clock)
    line = (
        "Mar 10 14:06:{s:02d} mta1 postfix-ip10/smtp[21992]: 7E4F6A518{s}: to=<{to}>, "
        "relay=mx.example.org[203.0.113.25]:25, delay=0.9, delays=0.02/0.01/0.45/0.42, "
        "dsn={dsn}, status={status} (host mx.example.org[203.0.113.25] said: {reply} "
        "(in reply to RCPT TO command))\n"
    )
    with log.open("a") as f:
        f.write(
            line.format(
                s=1,
                to="nobody@example.org",
                dsn="5.1.1",
                status="bounced",
                reply="550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown",
            )
        )
        f.write(
            line.format(
                s=2,
                to="full@example.org",
                dsn="4.2.2",
                status="deferred",
                reply="452 4.2.2 Mailbox full",
            )
        )
        f.write(
            line.format(
                s=3,
                to="spam@example.org",
                dsn="5.7.1",
                status="bounced",
                reply="554 5.7.1 Message rejected as spam",
            )
        )
    d.ingest(clock.t)
    checked = op(
        d,
        clock,
        op="check",
        addresses=["nobody@example.org", "full@example.org", "spam@example.org"],
    )
    # A hard bounce is suppressed; a deferral and a content block say nothing of the person.
    assert checked["suppressed"] == {
        "nobody@example.org": "hard_bounce",
        "full@example.org": None,
        "spam@example.org": None,
    }
    history = op(d, clock, op="suppress", action="history", address="nobody@example.org")
    assert history["events"][0]["source"] == "mta log (postfix)"
    assert history["events"][0]["evidence"]["ip"] == IP
    d.store.close()


def test_mailbox_full_three_times_is_a_soft_bounce_until_the_hold_ends(tmp_path: Path) -> None:
    """The default soft-bounce rule, from the Postfix log: 4.2.2 three times within three
    days lists the recipient for seven days; other deferrals never count."""
    plan, log = feedback_plan(tmp_path)
    clock = FakeClock(ms("2026-03-10T14:10:00"))
    d = make(plan, tmp_path / "state", clock)
    line = (
        "Mar {day} 14:06:01 mta1 postfix-ip10/smtp[21992]: 7E4F6A51{day}: to=<{to}>, "
        "relay=mx.example.org[203.0.113.25]:25, delay=0.9, delays=0.02/0.01/0.45/0.42, "
        "dsn={dsn}, status=deferred (host mx.example.org[203.0.113.25] said: {reply})\n"
    )
    for day in (8, 9, 10):
        with log.open("a") as f:
            f.write(
                line.format(day=day, to="full@example.org", dsn="4.2.2", reply="452 4.2.2 Full")
            )
            f.write(
                line.format(
                    day=day, to="busy@example.org", dsn="4.7.0", reply="421 4.7.0 Try later"
                )
            )
        d.ingest(clock.t)
        listed = op(d, clock, op="check", addresses=["full@example.org", "busy@example.org"])
        assert listed["suppressed"] == {
            "full@example.org": "soft_bounce" if day == 10 else None,
            "busy@example.org": None,
        }, day
    (event,) = op(d, clock, op="suppress", action="history", address="full@example.org")["events"]
    assert event["source"] == "mta log (postfix)"
    assert event["evidence"]["failures"] == 3 and event["evidence"]["enhanced"] == "4.2.2"
    held_until = ms("2026-03-10T14:06:01") + 7 * 86_400_000
    assert event["expires_ms"] == held_until
    clock.t = held_until
    assert op(d, clock, op="check", addresses=["full@example.org"])["suppressed"] == {
        "full@example.org": None
    }
    d.store.close()


def reported(d: Daemon, clock: FakeClock, **req: Any) -> dict[str, Any]:
    """A `report` naming its recipient: the core hands the line up, the daemon answers."""
    data = json.dumps({"op": "report", **req}).encode() + b"\n"
    served = d.engine.serve(data, clock.t)
    assert served.reply == b"" and served.upcall is not None, served.reply
    return d.upcall(served.upcall, clock.t)


def test_reports_naming_the_recipient_feed_the_list(plan_file: Path, tmp_path: Path) -> None:
    """`report` with `address`: counted as any report, then judged by the list's rules; the
    reply names what was listed. `unsubscribe` needs only the address (and a scope)."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    key = {"ip": IP, "domain": "gmail.com"}
    provider = send(d, {"op": "route", "domain": "gmail.com"})[0]["provider"]
    gone = reported(
        d,
        clock,
        **key,
        result="bounced",
        code=550,
        enhanced="5.1.1",
        text="no such user",
        address="Gone@Gmail.com",
        id=4,
    )
    assert gone == {
        "id": 4,
        "ok": True,
        "provider": provider,
        "address": "Gone@gmail.com",
        "suppressed": "hard_bounce",
    }
    fine = reported(d, clock, **key, result="delivered", address="fine@gmail.com")
    assert fine["ok"] and fine["suppressed"] is None
    # The domain may come from the address alone.
    blocked = reported(
        d,
        clock,
        ip=IP,
        result="bounced",
        code=554,
        enhanced="5.7.1",
        text="spam",
        address="x@gmail.com",
    )
    assert blocked["provider"] == provider and blocked["suppressed"] is None
    out = reported(
        d, clock, result="unsubscribe", address="u@example.org", scope="news", text="one-click"
    )
    assert out == {"ok": True, "address": "u@example.org", "suppressed": "unsubscribe"}
    complained = reported(d, clock, **key, result="complaint", address="c@gmail.com")
    assert complained["suppressed"] == "complaint"
    # Counted as reports without an address are (the unsubscribe is about no IP).
    tallies = {(t[0], t[1]): t[2:] for t in d.engine.take_tallies()}
    assert tallies == {(IP, provider): (0, 1, 0, 2, 1)}
    assert send(d, acquire_for("Gone@gmail.com"))[0]["reason"] == "suppressed"
    assert send(d, acquire_for("u@example.org", scope="news"))[0]["event"] == "unsubscribe"
    assert send(d, acquire_for("u@example.org"))[0]["granted"] == 1
    (event,) = op(d, clock, op="suppress", action="history", address="u@example.org", scope="news")[
        "events"
    ]
    assert event["source"] == "report" and event["evidence"] == {"text": "one-click"}
    for bad, error in (
        ({"result": "unsubscribe", "address": "u@x.org", "n": 2}, "n: not a field"),
        ({"result": "unsubscribe", "address": "nope"}, "address: no @"),
        ({**key, "result": "bounced", "address": "a@"}, "address"),
        ({**key, "result": "sent", "address": "a@x.org"}, "result: must be"),
        ({"ip": "203.0.113.1", "result": "delivered", "address": "a@x.org"}, "ip:"),
    ):
        reply = reported(d, clock, **bad)
        assert not reply["ok"] and error in reply["error"], (bad, reply)
    d.store.close()


def test_an_arf_complaint_lists_its_recipient(tmp_path: Path) -> None:
    """A complaint from the ARF maildir (Yahoo's feedback loop) puts Original-Rcpt-To on the
    list, whether or not kiln can tell which IP sent the message."""
    maildir = tmp_path / "arf"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    arf = (Path(__file__).resolve().parent / "fixtures" / "signals" / "arf_yahoo.eml").read_bytes()
    (maildir / "new" / "1.arf").write_bytes(arf)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN + f"signals:\n  feedback:\n    arf_maildir: {maildir}\n")
    clock = FakeClock(ms("2026-03-10T14:10:00"))
    d = make(plan, tmp_path / "state", clock)
    d.ingest(clock.t)
    checked = op(d, clock, op="check", addresses=["someone@yahoo.com"])
    assert checked["suppressed"] == {"someone@yahoo.com": "complaint"}
    (event,) = op(d, clock, op="suppress", action="history", address="someone@yahoo.com")["events"]
    assert event["source"] == "mta log (arf)"
    d.store.close()


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suppression"


def test_import_verify_and_export_through_the_daemon(plan_file: Path, tmp_path: Path) -> None:
    clock = FakeClock(ms("2026-03-02T10:00:00"))  # the export's soft bounces still hold
    d = make(plan_file, tmp_path / "state", clock)
    bounces = FIXTURES / "sendgrid_bounces.csv"
    sendgrid = {"op": "suppress_file", "path": str(bounces), "from": "sendgrid"}
    before = op(d, clock, action="verify", **sendgrid)
    assert before["ok"] and not before["verified"] and before["missing_count"] > 0
    # Line 7 holds no address: nothing is imported unless told to skip it.
    refused = op(d, clock, action="import", **sendgrid)
    assert not refused["ok"] and refused["problem_count"] == 1, refused
    assert ":7:" in refused["problems"][0] and d.engine.suppress_stats()[0] == 0
    imported = op(d, clock, action="import", skip_bad=True, **sendgrid)
    assert imported["ok"], imported
    assert imported["imported"] == before["missing_count"] > 0
    assert imported["per_type"].get("hard_bounce", 0) > 0
    assert send(d, acquire_for("Bob.Smith@example.com"))[0]["reason"] == "suppressed"
    after = op(d, clock, action="verify", **sendgrid)
    assert after["missing_count"] == 0 and after["problem_count"] == 1
    # Importing again adds nothing: every address is already listed for the same reason.
    again = op(d, clock, action="import", skip_bad=True, **sendgrid)
    assert again["imported"] == 0 and again["already_listed"] == imported["imported"]
    # The wrong provider's file is named once and nothing is imported.
    listed = d.engine.suppress_stats()[0]
    wrong = op(
        d,
        clock,
        op="suppress_file",
        action="import",
        path=str(FIXTURES / "sendgrid_export_actually_mailgun.csv"),
        **{"from": "sendgrid"},
    )
    assert not wrong["ok"] and wrong["problem_count"] == 1 and "Mailgun" in wrong["problems"][0]
    assert d.engine.suppress_stats()[0] == listed
    # The export reads back as the list.
    out = tmp_path / "list.csv"
    exported = op(d, clock, op="suppress_file", action="export", path=str(out), format="csv")
    assert exported["written"] == listed
    back = op(d, clock, op="suppress_file", action="verify", path=str(out), **{"from": "csv"})
    assert back["verified"] is True and back["rows"] == listed
    relative = op(d, clock, op="suppress_file", action="export", path="list.csv")
    assert not relative["ok"] and "absolute" in relative["error"]
    d.store.close()


def test_kiln_suppress_against_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(anytime_plan(tmp_path)) as d:
        where = ["--state-dir", str(d.state_dir)]
        assert main(["suppress", "add", "Ann@Example.org", "--reason", "phone", *where]) == 0
        assert "Ann@example.org: manual recorded" in capsys.readouterr().out
        assert main(["suppress", "check", "Ann@example.org", "bob@example.org", *where]) == 0
        out = capsys.readouterr().out
        assert "Ann@example.org: manual" in out and "bob@example.org: not suppressed" in out
        export = FIXTURES / "sendgrid_unsubscribes.csv"
        assert main(["suppress", "verify", "--from", "sendgrid", str(export), *where]) == 2
        assert "NOT all suppressed" in capsys.readouterr().out
        assert main(["suppress", "import", "--from", "sendgrid", str(export), *where]) == 0
        assert main(["suppress", "verify", "--from", "sendgrid", str(export), *where]) == 0
        assert "every address is suppressed" in capsys.readouterr().out
        target = tmp_path / "out" / "list.csv"
        target.parent.mkdir()
        assert main(["suppress", "export", str(target), *where]) == 0
        assert "Ann@example.org,manual" in target.read_text()
        with d.mta_client() as m:
            r = m.request("acquire", ip=IP, address="Ann@example.org")
            assert r["reason"] == "suppressed", r


RULE = SoftBounceRule.model_validate(
    {"statuses": ["4.2.2"], "failures": 3, "within": "1h", "hold": "1d"}
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["4.2.2", "4.7.0", None]), st.integers(0, 40)),
        max_size=60,
    )
)
def test_soft_bounce_counts_match_a_naive_model(
    steps: list[tuple[int, str | None, int]],
) -> None:
    """A rule lists a recipient exactly when its matching failures since the last listing,
    within the period, reach the count; other statuses never count; the bound on followed
    recipients forgets the least recently heard of."""
    soft = SoftBounces([RULE], max_tracked=3)
    model: dict[int, list[int]] = {}
    order: list[int] = []
    t = 0
    for who, status, gap_min in steps:
        t += gap_min * 60_000
        got = soft.failed(who, status, t)
        want = None
        if status == "4.2.2":
            if who not in model and len(model) >= 3:
                del model[order.pop(0)]
            if who in order:
                order.remove(who)
            order.append(who)
            times = [x for x in model.get(who, []) if x > t - 3_600_000] + [t]
            model[who] = times
            if len(times) >= 3:
                want = t + 86_400_000
                del model[who]
                order.remove(who)
        assert (got.expires_ms if got else None) == want, (steps, who, t)
    assert len(soft) == len(model) <= 3


# ----- hashed-only mode and the key file (docs/suppression.md, "Hashed-only mode") -----

#: Every address the fixture export names, the unreadable one too (its line is never kept).
EXPORT_ADDRESSES = [
    "alice@example.com",
    "Bob.Smith@example.com",
    "carol@example.net",
    "dave@example.org",
    "erin@example.com",
    "frank@@example.com",
    "grace@xn--bcher-kva.example",
    "heidi@example.com",
    "ivan@example.net",
    "judy@example.org",
    "mallory@example.com",
]
#: What the operator, the reports and the MTA log put on the list.
FED_ADDRESSES = ["Ann.Lee@example.org", "Gone@gmail.com", "u@example.org", "nobody@example.org"]


def feed_every_writer(d: Daemon, clock: FakeClock, log: Path) -> None:
    """An import, an operator's add, reports (a bounce and an unsubscribe) and an MTA-log
    bounce, each with the address in its evidence text too."""
    sendgrid = {"path": str(FIXTURES / "sendgrid_bounces.csv"), "from": "sendgrid"}
    imported = op(d, clock, op="suppress_file", action="import", skip_bad=True, **sendgrid)
    assert imported["ok"] and imported["imported"] == 10, imported
    verified = op(d, clock, op="suppress_file", action="verify", **sendgrid)
    assert verified["missing_count"] == 0 and verified["rows"] == 11, verified
    clock.t = ms("2026-03-10T14:10:00")
    added = op(
        d,
        clock,
        op="suppress",
        action="add",
        address=" Ann.Lee@Example.ORG ",
        reason="asked by ANN.LEE@example.org on the phone",
    )
    assert added["ok"] and added["address"] == "Ann.Lee@example.org", added
    gone = reported(
        d,
        clock,
        ip=IP,
        domain="gmail.com",
        result="bounced",
        code=550,
        enhanced="5.1.1",
        text="550 5.1.1 <Gone@Gmail.com>: no such user",
        address="Gone@Gmail.com",
    )
    assert gone["suppressed"] == "hard_bounce", gone
    out = reported(
        d, clock, result="unsubscribe", address="u@example.org", text="one click by u@example.org"
    )
    assert out["suppressed"] == "unsubscribe", out
    log.write_text(
        "Mar 10 14:06:01 mta1 postfix-ip10/smtp[21992]: 7E4F6A5181: to=<nobody@example.org>, "
        "relay=mx.example.org[203.0.113.25]:25, delay=0.9, delays=0.02/0.01/0.45/0.42, "
        "dsn=5.1.1, status=bounced (host mx.example.org[203.0.113.25] said: 550 5.1.1 "
        "<nobody@example.org>: Recipient address rejected: User unknown (in reply to RCPT TO "
        "command))\n"
    )
    d.ingest(clock.t)


def _cell_text(cell: object) -> str:
    """A database cell as text: binary ones decoded, and decompressed too where they are
    zlib data (the text columns of the log's import batches)."""
    if not isinstance(cell, bytes):
        return str(cell)
    try:
        return zlib.decompress(cell).decode("utf-8", "replace")
    except zlib.error:
        return cell.decode("utf-8", "replace")


def logged_addresses(state: Path) -> list[str]:
    """Each logged event's address as the state's SQLite database holds it: rows of the log,
    then the events of its import batches ("import" events are bookkeeping)."""
    with sqlite3.connect(state / "kiln.db") as db:
        kept = [
            r[0] for r in db.execute("SELECT address FROM kiln_suppression WHERE event != 'import'")
        ]
        for (packed,) in db.execute("SELECT address FROM kiln_suppression_batch"):
            kept += zlib.decompress(packed).decode().split("\n")
    db.close()
    return kept


def address_hits(state: Path, addresses: list[str]) -> set[str]:
    """The addresses found, case-insensitively, in any column of any table of the state's
    SQLite database (compressed ones decompressed), or anywhere in its files' bytes (the
    database, its WAL)."""
    found = set()
    with sqlite3.connect(state / "kiln.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert "kiln_suppression" in tables
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 (its own names)
                for cell in row:
                    text = _cell_text(cell)
                    found |= {a for a in addresses if a.lower() in text.lower()}
    db.close()
    for path in state.glob("kiln.db*"):
        data = path.read_bytes().lower()
        found |= {a for a in addresses if a.lower().encode() in data}
    return found


@pytest.mark.parametrize("hashed_only", [True, False])
def test_hashed_only_keeps_no_address_at_rest(tmp_path: Path, hashed_only: bool) -> None:
    """With `suppression.hashed_only`, no writer leaves an address in the database (the
    import, an operator's add, reports, the MTA log), while check, verify, history and the
    send-time check still work and export is refused. Without it, the same search finds
    every address (so the search itself can fail)."""
    plan, log = feedback_plan(
        tmp_path, f"suppression:\n  hashed_only: {str(hashed_only).lower()}\n"
    )
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-03-02T10:00:00"))  # the export's soft bounces still hold
    d = make(plan, state, clock)
    feed_every_writer(d, clock, log)
    checked = op(d, clock, op="check", addresses=[*FED_ADDRESSES, "Bob.Smith@example.com"])
    assert checked["suppressed"] == {
        "Ann.Lee@example.org": "manual",
        "Gone@gmail.com": "hard_bounce",
        "u@example.org": "unsubscribe",
        "nobody@example.org": "hard_bounce",
        "Bob.Smith@example.com": "hard_bounce",
    }
    assert send(d, acquire_for("Ann.Lee@example.org"))[0]["reason"] == "suppressed"
    (bob,) = op(d, clock, op="suppress", action="history", address="Bob.Smith@Example.com")[
        "events"
    ]
    fingerprint = d.engine.suppress_fingerprint("Bob.Smith@example.com")[1]
    assert bob["fingerprint"] == f"{fingerprint:016x}" and bob["event"] == "hard_bounce"
    (ann,) = op(d, clock, op="suppress", action="history", address="Ann.Lee@example.org")["events"]
    (nobody,) = op(d, clock, op="suppress", action="history", address="nobody@example.org")[
        "events"
    ]
    target = tmp_path / "list.csv"
    exported = op(d, clock, op="suppress_file", action="export", path=str(target))
    listing = op(d, clock, op="suppress", action="list", limit=1000)["events"]
    assert len(listing) == 14
    d.store.close()
    kept = logged_addresses(state)
    assert len(kept) == 14
    hits = address_hits(state, EXPORT_ADDRESSES + FED_ADDRESSES)
    if hashed_only:
        assert hits == set()
        assert set(kept) == {""} and {e["address"] for e in listing} == {""}
        assert bob["address"] == "" and bob["evidence"]["reason"] == (
            "550 5.1.1 <address>: Recipient address rejected: User unknown"
        )
        assert ann["evidence"] == {"reason": "asked by <address> on the phone"}
        assert "<address>: Recipient address rejected" in nobody["evidence"]["text"]
        assert not exported["ok"] and "suppression.hashed_only" in exported["error"]
        assert not target.exists()
    else:
        assert hits == set(EXPORT_ADDRESSES + FED_ADDRESSES) - {"frank@@example.com"}
        assert "" not in kept and bob["address"] == "Bob.Smith@example.com"
        assert ann["evidence"] == {"reason": "asked by ANN.LEE@example.org on the phone"}
        assert exported["ok"] and exported["written"] > 0 and target.exists()


def test_hashed_only_warns_of_addresses_written_before_it(tmp_path: Path) -> None:
    """Turning the mode on rewrites nothing: the start says the log still holds addresses."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))

    def warnings() -> list[str]:
        with capture_logs() as logs:
            d = make(plan, state, clock)
        op(d, clock, op="suppress", action="add", address="ann@example.org")
        d.store.close()
        return [e["event"] for e in logs if e["log_level"] == "warning"]

    assert "suppression_addresses_kept" not in warnings()  # the mode is off
    plan.write_text(PLAN + "suppression:\n  hashed_only: true\n")
    assert "suppression_addresses_kept" in warnings()  # the first row keeps its address
    with sqlite3.connect(state / "kiln.db") as db:
        assert [r[0] for r in db.execute("SELECT address FROM kiln_suppression")] == [
            "ann@example.org",
            "",
        ]
    db.close()


def test_hashed_only_warns_of_addresses_between_hashed_events(tmp_path: Path) -> None:
    """On, off, on again: the log's first and last events keep no address, the one between
    does, and the start still says so (the store records that an address was written, by
    the operator's append and by an import alike)."""
    plan = tmp_path / "plan.yaml"
    hashed = PLAN + "suppression:\n  hashed_only: true\n"
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))

    def start_then_add(text: str, address: str) -> list[str]:
        plan.write_text(text)
        with capture_logs() as logs:
            d = make(plan, state, clock)
        assert op(d, clock, op="suppress", action="add", address=address)["ok"]
        d.store.close()
        return [e["event"] for e in logs if e["log_level"] == "warning"]

    assert "suppression_addresses_kept" not in start_then_add(hashed, "a@example.org")
    assert "suppression_addresses_kept" not in start_then_add(hashed, "b@example.org")
    start_then_add(PLAN, "c@example.org")  # the mode off: this one keeps its address
    assert "suppression_addresses_kept" in start_then_add(hashed, "d@example.org")
    assert "suppression_addresses_kept" in start_then_add(hashed, "e@example.org")
    with sqlite3.connect(state / "kiln.db") as db:
        kept = [r[0] for r in db.execute("SELECT address FROM kiln_suppression ORDER BY id")]
    db.close()
    assert kept == ["", "", "c@example.org", "", ""]

    imported = tmp_path / "import"
    for hashed_only in (True, False):
        plan.write_text(hashed if hashed_only else PLAN)
        d = make(plan, imported / str(hashed_only), clock)
        export = tmp_path / "unsubscribes.csv"
        export.write_text("created,email\n1700000000,x@example.org\n")
        reply = op(
            d, clock, op="suppress_file", action="import", path=str(export), **{"from": "sendgrid"}
        )
        assert reply["ok"] and reply["imported"] == 1, reply
        assert d.store.suppress_kept_addresses() is not hashed_only
        d.store.close()


def test_export_after_hashed_only_mode_is_refused_or_partial_never_silent(
    tmp_path: Path,
) -> None:
    """Addresses listed while hashed-only mode was on have no address in the log. Once the
    mode is off again, an export refuses (naming how many, writing nothing) rather than
    pass the others off as the whole list; asked for a partial export, it writes the others
    and counts those left out."""
    plan = tmp_path / "plan.yaml"
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    plan.write_text(PLAN + "suppression:\n  hashed_only: true\n")
    d = make(plan, state, clock)
    for a in ("ann@example.org", "bob@example.org"):
        assert op(d, clock, op="suppress", action="add", address=a)["ok"]
    d.store.close()
    plan.write_text(PLAN)
    d = make(plan, state, clock)
    assert op(d, clock, op="suppress", action="add", address="cy@example.org")["ok"]
    assert op(d, clock, op="suppress", action="remove", address="bob@example.org")["ok"]
    target = tmp_path / "list.csv"
    refused = op(d, clock, op="suppress_file", action="export", path=str(target))
    assert not refused["ok"] and not target.exists()
    assert "1 of the 2 listed addresses" in refused["error"], refused
    partial = op(d, clock, op="suppress_file", action="export", path=str(target), partial=True)
    assert partial["ok"] and partial["written"] == 1 and partial["left_out_hashed"] == 1
    assert "cy@example.org" in target.read_text() and "ann" not in target.read_text()
    wrong = op(d, clock, op="suppress_file", action="export", path=str(target), partial="yes")
    assert not wrong["ok"] and "partial" in wrong["error"]


def write_key(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


KEY_A = "00112233445566778899aabbccddeeff"
KEY_B = "ffeeddccbbaa99887766554433221100"


def meta(state: Path) -> dict[str, str]:
    with sqlite3.connect(state / "kiln.db") as db:
        found = dict(db.execute("SELECT key, value FROM kiln_meta").fetchall())
    db.close()
    return found


def refused_start(plan: Path, state: Path, clock: FakeClock) -> str:
    """The error a start gives (the store is closed after it)."""
    d = Daemon(DaemonConfig(plan_path=plan, state_dir=state, node="t"), clock)
    try:
        with pytest.raises(ConfigError) as caught:
            d.start()
    finally:
        d.store.close()
    return str(caught.value)


def test_a_key_file_keeps_the_key_out_of_the_store(tmp_path: Path) -> None:
    """`suppression.key_file`: the key is never written to the store; a restart with the
    same key file sees the same list; another key, or none, refuses to start."""
    key_file = write_key(tmp_path / "suppression.key", KEY_A)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN + f"suppression:\n  key_file: {key_file}\n  hashed_only: true\n")
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan, state, clock)
    assert op(d, clock, op="suppress", action="add", address="ann@example.org")["ok"]
    d.store.close()
    stored = meta(state)
    assert "suppression_key" not in stored and "suppression_key_check" in stored
    assert KEY_A not in stored["suppression_key_check"]
    assert not any(KEY_A.encode() in p.read_bytes() for p in state.glob("kiln.db*"))
    again = make(plan, state, clock)
    listed = op(again, clock, op="check", addresses=["ann@example.org", "bob@example.org"])
    assert listed["suppressed"] == {"ann@example.org": "manual", "bob@example.org": None}
    again.store.close()
    write_key(key_file, KEY_B)
    error = refused_start(plan, state, clock)
    assert "suppression.key_file" in error and "suppression_key" in error, error
    plan.write_text(PLAN + "suppression:\n  hashed_only: true\n")
    error = refused_start(plan, state, clock)
    assert "suppression.key_file" in error, error
    assert "suppression_key" not in meta(state)  # the refused starts made no key either


def test_a_key_moves_from_the_store_to_a_key_file(tmp_path: Path) -> None:
    """A store that kept its key: a key file with the same key takes over (the store's copy
    is erased); another key refuses to start, naming both settings."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan, state, clock)
    assert op(d, clock, op="suppress", action="add", address="ann@example.org")["ok"]
    d.store.close()
    key = meta(state)["suppression_key"]
    assert len(key) == 32
    key_file = write_key(tmp_path / "k", KEY_A if key != KEY_A else KEY_B)
    plan.write_text(PLAN + f"suppression:\n  key_file: {key_file}\n")
    error = refused_start(plan, state, clock)
    assert "suppression.key_file" in error and "suppression_key" in error, error
    assert meta(state)["suppression_key"] == key
    write_key(key_file, key.upper())
    moved = make(plan, state, clock)
    assert op(moved, clock, op="check", addresses=["ann@example.org"])["suppressed"] == {
        "ann@example.org": "manual"
    }
    moved.store.close()
    assert meta(state)["suppression_key"] == ""


def test_key_files_are_read_from_the_plan_folder_and_checked(tmp_path: Path) -> None:
    write_key(tmp_path / "k.hex", KEY_A.upper())
    assert read_key_file("k.hex", tmp_path) == KEY_A
    with pytest.raises(ConfigError, match="relative"):
        read_key_file("k.hex", None)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file("missing.hex", tmp_path)
    write_key(tmp_path / "open.hex", KEY_A, 0o644)
    with pytest.raises(ConfigError, match="0644"):
        read_key_file(str(tmp_path / "open.hex"), None)
    for bad in ("", KEY_A[:-1], KEY_A + "0", "zz" * 16, f"{KEY_A}\n{KEY_B}"):
        write_key(tmp_path / "bad.hex", bad)
        with pytest.raises(ConfigError, match="32 hexadecimal"):
            read_key_file("bad.hex", tmp_path)


def test_evidence_keeps_no_address() -> None:
    """Fields that are addresses are dropped; addresses in text become `<address>`, the
    known ones in any case and even with spaces in a quoted local part."""
    evidence = {
        "text": "550 5.1.1 <Bob.Smith@Example.COM>: unknown; cc x@y.org",
        "recipient": " <ann@example.org> ",
        "reason": 'asked by "Ann Lee"@EXAMPLE.org, ok',
        "copies": ["c@example.org", "kept", {"to": "d@example.org", "n": 2}],
        "code": 550,
        "ip": "192.0.2.10",
        "none": None,
    }
    assert without_addresses(evidence, ['"Ann Lee"@example.org']) == {
        "text": "550 5.1.1 <address>: unknown; cc <address>",
        "reason": "asked by <address>, ok",
        "copies": ["kept", {"n": 2}],
        "code": 550,
        "ip": "192.0.2.10",
        "none": None,
    }
    assert without_addresses({"text": "no address here", "at": "x @ y"}) == {
        "text": "no address here",
        "at": "x @ y",
    }


def test_an_import_may_fold_the_local_parts_case(plan_file: Path, tmp_path: Path) -> None:
    """`fold_case` (`kiln suppress import|verify --fold-case`) lists an export's addresses
    with their local parts lower-cased; without it the case is kept."""
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, tmp_path / "state", clock)
    export = tmp_path / "kiln.csv"
    export.write_text("address,event\nAnn.Lee@Example.ORG,unsubscribe\n")
    base = {"op": "suppress_file", "path": str(export), "from": "csv"}
    assert op(d, clock, **base, action="import", fold_case=True)["ok"]
    checked = op(d, clock, op="check", addresses=["ann.lee@example.org", "Ann.Lee@example.org"])
    assert checked["suppressed"] == {
        "ann.lee@example.org": "unsubscribe",
        "Ann.Lee@example.org": None,
    }
    assert op(d, clock, **base, action="verify", fold_case=True)["verified"] is True
    assert op(d, clock, **base, action="verify")["verified"] is False
    reply = op(d, clock, **base, action="import", fold_case="yes")
    assert reply == {"ok": False, "error": "fold_case: true or false"}
    d.store.close()


def test_an_event_written_while_an_import_is_folded_stays_the_last_word(
    plan_file: Path, tmp_path: Path
) -> None:
    """An import is folded a batch at a time while the loop serves others: a `remove` logged
    after the import's events is not undone by the import's later batches, a snapshot taken
    meanwhile claims no log id past the import's start, and a restart gives the same set."""
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan_file, state, clock)
    live = d.suppression
    assert op(d, clock, op="suppress", action="add", address="old@x.org")["ok"]
    before = live.last_id
    live.begin_import()
    with pytest.raises(ValueError, match="another import"):
        live.begin_import()
    addresses = ["a@x.org", "b@x.org"]
    events = [
        SuppressionEvent(clock.t, fp, address, "unsubscribe", "import")
        for address, fp, _ in live.engine.suppress_fingerprints([(a, "") for a in addresses])
        if address is not None
    ]
    assert d.store.suppress_bulk(events) == 2
    import_last = d.store.suppress_last_id()
    # Logged after the import's events, folded before them.
    assert op(d, clock, op="suppress", action="remove", address="a@x.org")["ok"]
    assert live.take_snapshot()[0] == before < live.last_id
    live.imported_columns(FoldColumns.of_events(events), import_last)
    live.end_import(folded=True)
    want = {"a@x.org": None, "b@x.org": "unsubscribe", "old@x.org": "manual"}
    assert op(d, clock, op="check", addresses=list(want))["suppressed"] == want
    assert live.take_snapshot()[0] == live.last_id > import_last
    # An import whose fold did not finish: snapshots keep to the log id before it for good.
    live.begin_import()
    live.end_import(folded=False)
    assert op(d, clock, op="suppress", action="add", address="c@x.org")["ok"]
    floor = live.take_snapshot()[0]
    assert floor < live.last_id
    live.save_snapshot()
    d.store.close()
    again = make(plan_file, state, clock)
    want["c@x.org"] = "manual"
    assert op(again, clock, op="check", addresses=list(want))["suppressed"] == want
    assert again.suppression.take_snapshot()[0] == again.suppression.last_id
    again.store.close()
