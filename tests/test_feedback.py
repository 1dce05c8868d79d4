"""Delivery feedback: the signal fixtures parsed exactly, real files tailed through rotation."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from kiln.feedback import (
    ArfError,
    ArfMaildirReader,
    FeedbackEvent,
    FeedbackReader,
    FeedbackSource,
    FileTail,
    KumoLogReader,
    KumoParser,
    MessageIndex,
    PostfixLogReader,
    PostfixParser,
    PowerMtaLogReader,
    PowerMtaParser,
    SegmentCheckpoint,
    TailCheckpoint,
    parse_arf,
)
from kiln.feedback.postfix import strip_continuations
from kiln.feedback.wiring import READERS, feedback_reader
from kiln.planfile import load_plan
from kiln.policyspec import FeedbackSpec, KumoSpec, PathSpec, PostfixSpec, Signals

EXAMPLE_PLAN = (
    Path(__file__).resolve().parents[1] / "python" / "kiln" / "data" / "plans" / "example.yaml"
)

FIXTURES = Path(__file__).parent / "fixtures" / "signals"
NAMES = {"postfix-ip10": "192.0.2.10", "postfix-ip11": "192.0.2.11"}
#: 2026-03-10 14:10:00 UTC, shortly after the fixture lines.
NOW_MS = 1_773_151_800_000
GMAIL_421 = (
    "Gmail has detected an unusual rate of email originating from your IP address 192.0.2.10."
    " To protect our users from spam, email sent from your IP address has been temporarily"
    " rate limited. Please visit https://support.google.com/mail/?p=UnsolicitedRateLimitError"
    " to review our Bulk Email Senders Guidelines. x12si100qtb.59 - gsmtp"
)
ORIGINAL_ID = "20260310140209.abc@mail.example.com"


def ms(text: str) -> int:
    """Unix ms of an ISO time (UTC unless it says otherwise)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1000


def event(**fields: object) -> FeedbackEvent:
    """A FeedbackEvent with None/False defaults for what a test does not name."""
    base: dict[str, object] = {
        "ip": None,
        "recipient": None,
        "recipient_domain": None,
        "code": None,
        "enhanced": None,
        "text": None,
        "local": False,
        "command": None,
        "message_id": None,
    }
    base.update(fields)
    return FeedbackEvent(**base)  # type: ignore[arg-type]  # the test names the rest


def fixture_lines(name: str) -> list[str]:
    """A fixture file's lines, line endings kept."""
    return (FIXTURES / name).read_bytes().decode("utf-8").splitlines(keepends=True)


# ----- the fixtures, parsed exactly -----


def test_postfix_fixture() -> None:
    """Five status lines: sent, multi-line 421 deferral, 550 bounce, local timeout, expiry."""
    parser = PostfixParser(NAMES)
    events = [
        e for line in fixture_lines("postfix_maillog.txt") if (e := parser.parse(line, NOW_MS))
    ]
    common = {"source": "postfix"}
    assert [e.queue_id for e in events] == [
        "4B1C3D2E5F",
        "5C2D4E3F60",
        "7E4F6A5182",
        "8F5A7B6293",
        "9A6B8C73A4",
    ]
    events = [dataclasses.replace(e, queue_id=None) for e in events]
    assert events == [
        event(
            at_ms=ms("2026-03-10T14:02:11"),
            ip="192.0.2.10",
            recipient="alice@gmail.com",
            recipient_domain="gmail.com",
            result="delivered",
            code=250,
            enhanced="2.0.0",
            text="OK  1773151331 x12si99 - gsmtp",
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:05:40"),
            ip="192.0.2.10",
            recipient="bob@gmail.com",
            recipient_domain="gmail.com",
            result="deferred",
            code=421,
            enhanced="4.7.28",
            text=GMAIL_421,
            command=".",
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:06:15"),
            ip="192.0.2.10",
            recipient="nobody@example.org",
            recipient_domain="example.org",
            result="bounced",
            code=550,
            enhanced="5.1.1",
            text="<nobody@example.org>: Recipient address rejected: User unknown",
            command="RCPT TO",
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:07:30"),
            ip="192.0.2.11",
            recipient="dave@example.net",
            recipient_domain="example.net",
            result="deferred",
            enhanced="4.4.1",
            text=(
                "delivery temporarily suspended: connect to mx.example.net[203.0.113.80]:25:"
                " Connection timed out"
            ),
            local=True,
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:09:00"),
            result="expired",
            text="returned to sender",
            local=True,
            **common,
        ),
    ]
    assert parser.counters == {"lines": 7, "events": 5, "skipped": 2, "unmapped": 1}


def test_powermta_fixture() -> None:
    """CRLF, a quoted comma list and a quoted dsnDiag with a comma: three events for .10."""
    parser = PowerMtaParser()
    lines = (FIXTURES / "pmta_acct.csv").read_bytes().decode().split("\n")
    events = [e for line in lines if (e := parser.feed(line))]
    common = {"ip": "192.0.2.10", "source": "powermta"}
    assert events == [
        event(
            at_ms=ms("2026-03-10T14:02:11"),
            recipient="alice@gmail.com",
            recipient_domain="gmail.com",
            result="delivered",
            code=250,
            enhanced="2.0.0",
            text="OK  1773151331 x12si99 - gsmtp",
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:03:02"),
            recipient="nobody@example.org",
            recipient_domain="example.org",
            result="bounced",
            code=550,
            enhanced="5.1.1",
            text="<nobody@example.org>: Recipient address rejected: User unknown",
            **common,
        ),
        event(
            at_ms=ms("2026-03-10T14:05:40"),
            recipient="bob@gmail.com",
            recipient_domain="gmail.com",
            result="deferred",
            code=421,
            enhanced="4.7.28",
            text=(
                "Gmail has detected an unusual rate of email originating from your IP address"
                " 192.0.2.10. To protect our users from spam, email sent from your IP address"
                " has been temporarily rate limited. x12si100qtb.59 - gsmtp"
            ),
            **common,
        ),
    ]
    assert parser.counters["headers"] == 1 and parser.counters["bad"] == 0
    assert parser.header is not None and parser.header[14] == "dlvSourceIp"


def test_kumomta_fixture() -> None:
    """Delivery, 421 deferral, 550 bounce for .12, and the Yahoo complaint without an IP."""
    parser = KumoParser()
    events = [parser.parse(line) for line in fixture_lines("kumomta_log.jsonl")]
    common = {"source": "kumomta"}
    assert events == [
        event(
            at_ms=1773151331000,
            ip="192.0.2.10",
            recipient="alice@gmail.com",
            recipient_domain="gmail.com",
            result="delivered",
            code=250,
            enhanced="2.0.0",
            text="OK  1773151331 x12si99 - gsmtp",
            command=".",
            **common,
        ),
        event(
            at_ms=1773151540000,
            ip="192.0.2.10",
            recipient="bob@gmail.com",
            recipient_domain="gmail.com",
            result="deferred",
            code=421,
            enhanced="4.7.28",
            text=GMAIL_421,
            command=".",
            **common,
        ),
        event(
            at_ms=1773151752000,
            ip="192.0.2.12",
            recipient="carol@gmail.com",
            recipient_domain="gmail.com",
            result="bounced",
            code=550,
            enhanced="5.7.1",
            text=(
                "This message is likely suspicious due to the very low reputation of the sending"
                " IP address. To best protect our users from spam, the message has been blocked."
                " x12si101qtb.60 - gsmtp"
            ),
            command=".",
            **common,
        ),
        event(
            at_ms=1773220502000,
            recipient="someone@yahoo.com",
            recipient_domain="yahoo.com",
            result="complaint",
            text="abuse",
            message_id=ORIGINAL_ID,
            **common,
        ),
    ]
    assert parser.counters == {"lines": 4, "events": 4}


def test_arf_fixture() -> None:
    """Yahoo's field set: Version 0.1, Received-Date, no Source-IP, placeholder auth result."""
    data = (FIXTURES / "arf_yahoo.eml").read_bytes()
    report = parse_arf(data)
    assert report.feedback_type == "abuse"
    assert report.version == "0.1"
    assert report.user_agent == "Yahoo!-Mail-Feedback/2.0"
    assert report.arrival_ms == ms("2026-03-10T14:02:11")
    assert report.original_mail_from == "bounce+8f3a@mail.example.com"
    assert report.original_rcpt_to == ("someone@yahoo.com",)
    assert report.source_ip is None
    assert report.authentication_results == ()
    assert report.reported_domains == ("mail.example.com",)
    assert report.message_id == ORIGINAL_ID
    assert report.dkim_domain == "mail.example.com"
    assert report.from_domain == "mail.example.com"
    assert report.event(NOW_MS) == event(
        at_ms=ms("2026-03-11T09:14:58"),
        recipient="someone@yahoo.com",
        recipient_domain="yahoo.com",
        result="complaint",
        text="abuse",
        message_id=ORIGINAL_ID,
        source="arf",
    )
    assert parse_arf(data.replace(b"\n", b"\r\n")) == report


# ----- Postfix -----


def test_postfix_year_rollover_and_rfc3339() -> None:
    """A December line read in January is last year's; a January line in late December next
    year's; rsyslog's RFC 3339 stamps carry their own year and zone."""
    parser = PostfixParser(NAMES)
    tail = (
        "mta1 postfix-ip10/smtp[1]: ABCDE12345: to=<a@b.example>,"
        " relay=mx.b.example[203.0.113.9]:25, delay=1, delays=0/0/0/1, dsn=2.0.0,"
        " status=sent (250 ok)"
    )
    new_year_ms = ms("2027-01-01T00:00:30")
    dec = parser.parse("Dec 31 23:59:58 " + tail, new_year_ms)
    assert dec is not None and dec.at_ms == ms("2026-12-31T23:59:58")
    jan = parser.parse("Jan  1 00:00:02 " + tail, ms("2026-12-31T23:59:59"))
    assert jan is not None and jan.at_ms == ms("2027-01-01T00:00:02")
    padded = parser.parse("Mar  9 14:02:11 " + tail, NOW_MS)
    assert padded is not None and padded.at_ms == ms("2026-03-09T14:02:11")
    rfc = parser.parse("2026-03-10T14:06:02.512331+02:00 " + tail, 0)
    assert rfc is not None and rfc.at_ms == ms("2026-03-10T12:06:02") + 512
    assert rfc.ip == "192.0.2.10" and rfc.code == 250 and rfc.text == "ok"
    assert parser.parse("Feb 30 10:00:00 " + tail, NOW_MS) is None
    assert parser.counters["bad"] == 1


def test_postfix_orig_to_conn_use_and_message_id() -> None:
    """orig_to= and conn_use= are read past; cleanup's message-id follows the queue id."""
    parser = PostfixParser(NAMES)
    lines = [
        "Mar 10 14:02:10 mta1 postfix/cleanup[11]: 4B1C3D2E5F: message-id=<Abc.1@mail.example.com>",
        "Mar 10 14:02:11 mta1 postfix-ip11/smtp[12]: 4B1C3D2E5F: to=<Eve@Gmail.COM>,"
        " orig_to=<eve-alias@example.com>, relay=gmail-smtp-in.l.google.com[198.51.100.26]:25,"
        " conn_use=3, delay=0.7, delays=0/0/0.3/0.4, dsn=4.7.0, status=deferred (host"
        " gmail-smtp-in.l.google.com[198.51.100.26] said: 421-4.7.0 [192.0.2.11  15] Our system"
        " has detected 421-4.7.0 unusual traffic 421 4.7.0 from your IP - gsmtp (in reply to"
        " MAIL FROM command))",
        "Mar 10 14:02:12 mta1 postfix/qmgr[13]: 4B1C3D2E5F: removed",
        "Mar 10 14:02:13 mta1 postfix-ip11/smtp[12]: 4B1C3D2E5F: to=<x@y.example>, relay=none,"
        " delay=0, delays=0/0/0/0, dsn=5.4.4, status=bounced (Host or domain name not found)",
    ]
    deferred, bounced = [e for line in lines if (e := parser.parse(line, NOW_MS))]
    assert deferred.recipient == "eve@gmail.com" and deferred.recipient_domain == "gmail.com"
    assert deferred.ip == "192.0.2.11" and deferred.command == "MAIL FROM"
    assert (deferred.code, deferred.enhanced) == (421, "4.7.0")
    assert (
        deferred.text
        == "[192.0.2.11  15] Our system has detected unusual traffic from your IP - gsmtp"
    )
    assert deferred.message_id == "Abc.1@mail.example.com" and not deferred.local
    assert bounced.local and bounced.message_id is None and bounced.code is None


def test_strip_continuations() -> None:
    """Continuation prefixes without enhanced codes, and replies without any, read cleanly."""
    assert strip_continuations("550-Go away 550-really 550 now") == (
        550,
        None,
        "Go away really now",
    )
    assert strip_continuations("250 2.0.0 Ok: queued") == (250, "2.0.0", "Ok: queued")
    assert strip_continuations("no code here") == (None, None, "no code here")


# ----- PowerMTA -----


PMTA_HEADER = "type,timeLogged,rcpt,dsnStatus,dsnDiag,dsnMta,dlvSourceIp,header_Message-Id"


def test_powermta_quotes_line_breaks_and_times(tmp_path: Path) -> None:
    """A quoted line break and doubled quotes continue one record; Unix seconds work too."""
    path = tmp_path / "acct.csv"
    path.write_bytes(
        (
            PMTA_HEADER + "\r\n"
            "b,1773151382,x@example.org,5.7.1 (delivery not authorized),"
            '"smtp;550 5.7.1 line one\r\n'
            'line ""two"", done",mx.example.org (203.0.113.25),192.0.2.11,<m1@mail.example.com>\r\n'
            "t,2026-03-10 09:05:40-0500,y@example.org,4.4.1,"
            "smtp;451 4.4.1 [internal] no MX reachable"
            ",,192.0.2.11,\r\n"
            "r,2026-03-10 14:05:40+0000,z@example.org,,,,,\r\n"
            "zz,2026-03-10 14:05:40+0000,z@example.org,,,,,\r\n"
            "d,not a time,z@example.org,,,,,\r\n"
        ).encode()
    )
    with PowerMtaLogReader(path, start="beginning") as reader:
        bounced, deferred = reader.poll(NOW_MS)
        assert reader.counters["ignored"] == 2 and reader.counters["bad"] == 1
    assert bounced.at_ms == 1773151382000 and bounced.ip == "192.0.2.11"
    assert bounced.text == 'line one line "two", done' and bounced.enhanced == "5.7.1"
    assert bounced.message_id == "m1@mail.example.com" and not bounced.local
    assert deferred.at_ms == ms("2026-03-10T14:05:40") and deferred.local
    assert (deferred.code, deferred.enhanced) == (451, "4.4.1")


def test_powermta_header_reread_after_rotation(tmp_path: Path) -> None:
    """The rotated-in file has another column order: its own header maps it."""
    path = tmp_path / "acct.csv"
    path.write_text(
        "type,timeLogged,rcpt,dlvSourceIp,dsnDiag\n"
        "d,1773151331,a@x.example,192.0.2.10,smtp;250 ok\n"
    )
    with PowerMtaLogReader(path, start="beginning") as reader:
        assert [e.ip for e in reader.poll(NOW_MS)] == ["192.0.2.10"]
        os.rename(path, tmp_path / "acct.csv.1")
        path.write_text(
            "type,dlvSourceIp,dsnDiag,rcpt,timeLogged\n"
            "t,192.0.2.12,smtp;421 slow,b@y.example,1773151332\n"
        )
        (deferred,) = reader.poll(NOW_MS)
        assert (deferred.ip, deferred.recipient, deferred.code) == (
            "192.0.2.12",
            "b@y.example",
            421,
        )
        # Appended to both files: each keeps its own header.
        with (tmp_path / "acct.csv.1").open("a") as old:
            old.write("b,1773151333,c@x.example,192.0.2.10,smtp;550 no\n")
        with path.open("a") as new:
            new.write("d,192.0.2.12,smtp;250 ok,d@y.example,1773151334\n")
        assert [(e.ip, e.result) for e in reader.poll(NOW_MS)] == [
            ("192.0.2.10", "bounced"),
            ("192.0.2.12", "delivered"),
        ]
        checkpoint = reader.checkpoint()
    # A restart mid-file reads the header from the file's first line.
    with path.open("a") as new:
        new.write("b,192.0.2.12,smtp;550 5.1.1 gone,e@y.example,1773151335\n")
    with PowerMtaLogReader(path, checkpoint=checkpoint) as restarted:
        (bounced,) = restarted.poll(NOW_MS)
    assert (bounced.ip, bounced.enhanced, bounced.recipient) == (
        "192.0.2.12",
        "5.1.1",
        "e@y.example",
    )


# ----- KumoMTA -----


def kumo_record(kind: str, **fields: object) -> str:
    """One KumoMTA log line."""
    record: dict[str, object] = {
        "type": kind,
        "recipient": "r@gmail.com",
        "timestamp": 1773151331,
        "response": {"code": 250, "enhanced_code": None, "content": "ok"},
        "source_address": None,
        "egress_source": None,
        "peer_address": None,
    }
    record.update(fields)
    return json.dumps(record) + "\n"


def test_kumomta_zstd_segments_ipv6_and_fallback(tmp_path: Path) -> None:
    """A zstd segment is read once a newer one exists; IPv6 sources lose brackets and port;
    records without a source address use the egress_source table; bad lines are counted."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    first = "".join(
        [
            kumo_record("Delivery", source_address={"address": "[2001:db8::10]:25"}),
            kumo_record("Reception"),
            "not json\n",
            kumo_record(
                "TransientFailure",
                egress_source="ip11",
                response={"code": 451, "content": "KumoMTA internal: no MX answered"},
            ),
            kumo_record("SomethingNew"),
            kumo_record(
                "Expiration",
                source_address={"address": "192.0.2.12:0", "protocol": "haproxy"},
                response={
                    "code": 551,
                    "enhanced_code": {"class": 5, "subject": 4, "detail": 7},
                    "content": "KumoMTA internal: message expired",
                    "command": "RCPT TO:<r@gmail.com>",
                },
            ),
        ]
    )
    (log_dir / "20260310-140000").write_bytes(zstandard.ZstdCompressor().compress(first.encode()))
    reader = KumoLogReader(log_dir, egress_sources={"ip11": "192.0.2.11"}, start="beginning")
    assert reader.poll(NOW_MS) == []  # the only segment is still being written
    (log_dir / "20260310-150000").write_text(
        kumo_record("Bounce", source_address={"address": "192.0.2.10:4000"}) + '{"type": "Deli'
    )
    events = reader.poll(NOW_MS)
    assert [(e.result, e.ip, e.local, e.enhanced, e.command) for e in events] == [
        ("delivered", "2001:db8::10", False, None, None),
        ("deferred", "192.0.2.11", True, None, None),
        ("expired", "192.0.2.12", True, "5.4.7", "RCPT TO"),
        ("bounced", "192.0.2.10", False, None, None),
    ]
    assert reader.counters["bad"] == 1 and reader.counters["ignored"] == 2
    assert reader.poll(NOW_MS) == []
    with (log_dir / "20260310-150000").open("a") as segment:
        segment.write('very", "timestamp": 1773151400, "recipient": "z@y.example"}\n')
    (later,) = reader.poll(NOW_MS)
    assert later.recipient == "z@y.example" and later.ip is None
    checkpoint = SegmentCheckpoint.from_dict(json.loads(json.dumps(reader.checkpoint().to_dict())))
    restarted = KumoLogReader(log_dir, checkpoint=checkpoint)
    assert restarted.poll(NOW_MS) == []
    fresh = KumoLogReader(log_dir)  # start="end": history is not replayed
    assert fresh.poll(NOW_MS) == []


# ----- ARF attribution -----


def write_maildir_message(maildir: Path, name: str, data: bytes) -> None:
    """Deliver one message the maildir way: tmp/ then rename into new/."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    (maildir / "tmp" / name).write_bytes(data)
    os.rename(maildir / "tmp" / name, maildir / "new" / name)


def test_arf_attributed_through_the_message_index(tmp_path: Path) -> None:
    """No Source-IP: the complaint gets the IP of the Postfix delivery with the same Message-ID;
    processed reports move to cur/, a malformed one moves aside."""
    log = tmp_path / "mail.log"
    log.write_text(
        f"Mar 10 14:02:10 mta1 postfix/cleanup[1]: 4B1C3D2E5F: message-id=<{ORIGINAL_ID}>\n"
        + "".join(fixture_lines("postfix_maillog.txt"))
    )
    maildir = tmp_path / "fbl"
    write_maildir_message(maildir, "1.arf", (FIXTURES / "arf_yahoo.eml").read_bytes())
    write_maildir_message(maildir, "2.bad", b"Subject: hello\n\njust a message\n")
    sources: list[FeedbackSource] = [
        PostfixLogReader(log, NAMES, start="beginning"),
        ArfMaildirReader(maildir),
    ]
    with FeedbackReader(sources, index=MessageIndex(max_entries=10)) as reader:
        events = reader.poll(NOW_MS)
        complaint = events[-1]
        assert complaint.result == "complaint" and complaint.source == "arf"
        assert complaint.ip == "192.0.2.10" and complaint.recipient_domain == "yahoo.com"
        assert events[0].message_id == ORIGINAL_ID
        assert sorted(p.name for p in (maildir / "cur").iterdir()) == ["1.arf:2,S"]
        assert list((maildir / "new").iterdir()) == []
        assert [p.name for p in (maildir / ".kiln-bad" / "cur").iterdir()] == ["2.bad:2,S"]
        assert reader.poll(NOW_MS) == []
        counters = reader.counters()
        assert counters["arf"] == {"messages": 2, "events": 1, "bad": 1}
        assert counters["reader"] == {"attributed_complaints": 1}
        assert set(reader.checkpoints()) == {"postfix", "arf"}


def test_arf_base64_part_and_source_ip() -> None:
    """A base64 part 3 is decoded; a Source-IP is used as it is."""
    data = (FIXTURES / "arf_yahoo.eml").read_bytes()
    marker = b"Content-Type: message/rfc822\nContent-Disposition: inline\n\n"
    head, _, rest = data.partition(marker)
    original, _, _ = rest.partition(b"\n------=_Part_7310_1773220498--")
    encoded = (
        head.replace(b"Reported-Domain:", b"Source-IP: 192.0.2.11\nX-Extra: 1\nReported-Domain:")
        + b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(original)
        + b"\n------=_Part_7310_1773220498--\n"
    )
    for data_variant in (encoded, encoded.replace(b"\n", b"\r\n")):
        report = parse_arf(data_variant)
        assert report.message_id == ORIGINAL_ID and report.dkim_domain == "mail.example.com"
        assert report.source_ip == "192.0.2.11" and report.extensions == {"x-extra": ("1",)}
        assert report.event(NOW_MS).ip == "192.0.2.11"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Subject: x\n\nbody\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\n\n--b--\n",
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n--b\n"
        b"Content-Type: text/plain\n\nno report part\n--b--\n",
    ],
)
def test_arf_rejects_what_is_not_a_report(data: bytes) -> None:
    """Messages that are not feedback reports raise ArfError, nothing else."""
    with pytest.raises(ArfError):
        parse_arf(data)


# ----- tailing -----


@pytest.fixture
def log_path(tmp_path: Path) -> Iterator[Path]:
    """A log path in a fresh directory (the file does not exist yet)."""
    yield tmp_path / "mail.log"


def lines_of(tail: FileTail, now_ms: int = 0) -> list[str]:
    """Every line of one read, batches flattened."""
    return [line for batch in tail.read(now_ms) for line in batch.lines]


def test_tail_append_partial_and_missing_file(log_path: Path) -> None:
    """A missing path is waited for; partial lines wait for their line feed."""
    with FileTail(log_path) as tail:
        assert lines_of(tail) == []
        log_path.write_text("one\ntw")
        assert lines_of(tail) == ["one"]  # a file that appears later is read from its start
        assert lines_of(tail) == []
        with log_path.open("a") as f:
            f.write("o\nthree\r\n")
        assert lines_of(tail) == ["two", "three\r"]
        assert tail.checkpoint().current is not None
        assert tail.checkpoint().current.offset == log_path.stat().st_size  # type: ignore[union-attr]


def test_tail_start_end_skips_history(log_path: Path) -> None:
    """Without a checkpoint, `start="end"` reads only what is written afterwards."""
    log_path.write_text("old\npartial")
    with FileTail(log_path) as tail:
        assert lines_of(tail) == []
        with log_path.open("a") as f:
            f.write(" line\nnew\n")
        assert lines_of(tail) == ["partial line", "new"]


def test_tail_start_end_means_from_when_the_tail_was_made(log_path: Path) -> None:
    """Lines written after the tail is made but before its first read are read (an MTA that
    logs while the daemon starts loses nothing); what was there before is not."""
    log_path.write_text("history\n")
    with FileTail(log_path) as tail:
        with log_path.open("a") as f:
            f.write("first delivery\n")
        assert lines_of(tail) == ["first delivery"]


def test_tail_rename_rotation_while_old_still_written(log_path: Path) -> None:
    """After a rename the old file is finished first, still followed while its writer appends,
    and closed after drain_ms of silence."""
    rotated = log_path.with_name("mail.log.1")
    log_path.write_text("a1\n")
    with FileTail(log_path, start="beginning", drain_ms=1000) as tail:
        assert lines_of(tail, 0) == ["a1"]
        with log_path.open("a", buffering=1) as old:
            old.write("a2\n")
            os.rename(log_path, rotated)
            old.write("a3\n")
            log_path.write_text("b1\n")
            assert lines_of(tail, 100) == ["a2", "a3", "b1"]
            old.write("a4 without newline")
        with log_path.open("a") as new:
            new.write("b2\n")
        assert lines_of(tail, 200) == ["b2"]  # old went quiet at 200
        assert len(tail.checkpoint().draining) == 1
        assert lines_of(tail, 1199) == []
        assert lines_of(tail, 1200) == ["a4 without newline"]  # drained, then closed
        assert tail.checkpoint().draining == ()
        assert tail.counters["rotations"] == 1


def test_tail_copytruncate(log_path: Path) -> None:
    """A truncated file (copytruncate) is read again from its start."""
    log_path.write_text("a1\na2\n")
    with FileTail(log_path, start="beginning") as tail:
        assert lines_of(tail) == ["a1", "a2"]
        with log_path.open("r+") as f:
            f.truncate(0)
        with log_path.open("a") as f:
            f.write("b\n")
        assert lines_of(tail) == ["b"]
        assert tail.counters["truncations"] == 1


def test_tail_checkpoint_restore_no_loss_no_repeat(log_path: Path) -> None:
    """Restarting from a checkpoint continues exactly, even across a rotation meanwhile."""
    log_path.write_text("1\n2\n")
    with FileTail(log_path, start="beginning") as tail:
        assert lines_of(tail) == ["1", "2"]
        with log_path.open("a") as f:
            f.write("3\n4")  # "4" is not finished when the daemon stops
        assert lines_of(tail) == ["3"]
        saved = TailCheckpoint.from_dict(json.loads(json.dumps(tail.checkpoint().to_dict())))
    with log_path.open("a") as f:
        f.write("\n5\n")
    os.rename(log_path, log_path.with_name("mail.log.1"))
    log_path.write_text("6\n")
    with FileTail(log_path, checkpoint=saved, drain_ms=0) as restarted:
        assert lines_of(restarted, 0) == ["4", "5", "6"]
        assert lines_of(restarted, 1) == []
        assert restarted.checkpoint().draining == ()
    with pytest.raises(ValueError, match="checkpoint"):
        FileTail(log_path.with_name("other.log"), checkpoint=saved)


def test_postfix_reader_checkpoint(log_path: Path) -> None:
    """A Postfix reader restored from its checkpoint emits each event exactly once."""
    lines = fixture_lines("postfix_maillog.txt")
    log_path.write_text("".join(lines[:3]))
    reader = PostfixLogReader(log_path, NAMES, start="beginning")
    first = reader.poll(NOW_MS)
    saved = reader.checkpoint()
    reader.close()
    with log_path.open("a") as f:
        f.write("".join(lines[3:]))
    with PostfixLogReader(log_path, NAMES, checkpoint=saved) as restarted:
        rest = restarted.poll(NOW_MS)
    assert [e.result for e in first + rest] == [
        "delivered",
        "deferred",
        "bounced",
        "deferred",
        "expired",
    ]


# ----- parsers never raise -----


@given(st.text(max_size=300))
def test_line_parsers_never_raise(line: str) -> None:
    """Arbitrary text is skipped and counted by every line parser, never an exception."""
    postfix = PostfixParser(NAMES)
    postfix.parse(line, NOW_MS)
    assert postfix.counters["lines"] == 1
    kumo = KumoParser()
    kumo.parse(line)
    assert kumo.counters["lines"] == 1
    pmta = PowerMtaParser()
    pmta.feed(PMTA_HEADER)
    for piece in line.split("\n"):
        pmta.feed(piece)


@given(
    st.sampled_from(
        [
            "Mar 10 14:02:11 h postfix-ip10/smtp[1]: ABCDEF: ",
            "2026-03-10T14:06:02Z h x/smtp: Q1234: ",
        ]
    ),
    st.lists(
        st.sampled_from(
            [
                "to=<",
                "a@b>",
                ", ",
                "relay=none",
                "dsn=4.0.0",
                "status=",
                "sent",
                "deferred",
                " (",
                ")",
                "said: ",
                "host x[1.2.3.4] ",
                "421-4.7.0 ",
                "421 ",
                "(in reply to ",
                " command)",
                "expired",
            ]
        ),
        max_size=20,
    ),
)
def test_postfix_never_raises_on_near_miss_lines(prefix: str, tokens: list[str]) -> None:
    """Lines built from Postfix's own tokens parse or are skipped, never raise."""
    parser = PostfixParser(NAMES)
    result = parser.parse(prefix + "".join(tokens), NOW_MS)
    assert result is None or result.source == "postfix"


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=10,
    ),
    st.sampled_from(["Delivery", "Bounce", "Feedback", "TransientFailure", "Expiration", "OOB"]),
    st.sampled_from(
        ["response", "source_address", "feedback_report", "timestamp", "headers", "recipient"]
    ),
)
def test_kumomta_never_raises_on_odd_values(value: object, kind: str, key: str) -> None:
    """Any JSON value in any known key of a known type is tolerated."""
    record = json.loads(kumo_record(kind))
    record[key] = value
    KumoParser().parse(json.dumps(record))


@given(st.binary(max_size=400))
def test_arf_never_raises_other_errors(data: bytes) -> None:
    """Arbitrary bytes are either a report or an ArfError."""
    try:
        parse_arf(data)
    except ArfError:
        pass


def test_events_are_frozen() -> None:
    """A FeedbackEvent cannot be changed after it is made."""
    e = event(at_ms=0, result="delivered", source="postfix")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.ip = "192.0.2.1"  # type: ignore[misc]  # the point of the test


def test_reader_table_covers_every_feedback_key(tmp_path: Path) -> None:
    """`READERS` has one entry per key of the plan's feedback section, and a plan naming
    every key gets one reader each, relative paths read from the plan's folder."""
    assert set(READERS) == set(FeedbackSpec.model_fields)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(EXAMPLE_PLAN.read_text())
    plan = load_plan(plan_file)
    spec = FeedbackSpec(
        postfix=PostfixSpec(path="logs/mail.log", syslog_names={"postfix-ip1": "192.0.2.10"}),
        powermta=PathSpec(path="/var/log/pmta/acct.csv"),
        kumomta=KumoSpec(log_dir="kumo"),
        arf_maildir="arf",
    )
    plan = plan.model_copy(update={"signals": Signals(feedback=spec)})
    reader = feedback_reader(plan)
    assert reader is not None
    kinds = [type(s) for s in reader.sources]
    assert kinds == [PostfixLogReader, PowerMtaLogReader, KumoLogReader, ArfMaildirReader]
    assert feedback_reader(plan.model_copy(update={"signals": Signals()})) is None
