"""Suppression import and export formats (`kiln.suppress.formats`) and address normalisation
(`kiln.suppress.address`): every provider's sample export, the wrong-provider, encoding and
bad-line cases, bounded memory on a large file, exports that read back the same; the columnar
reading of large imports (`scan_batches`) against `scan`, and an import's way into the log
(`kiln.suppress.files`, `Store.suppress_bulk`) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import shutil
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.exc import DBAPIError

from kiln import _core
from kiln.store import Store, StoreError
from kiln.suppress.address import (
    MAX_ADDRESS_BYTES,
    AddressError,
    all_normal,
    is_normal,
    normalise,
)
from kiln.suppress.files import ImportRows, Scanned, hash_events, read_file
from kiln.suppress.formats import (
    BATCH_ROWS,
    MAX_LINE_BYTES,
    ImportedEvent,
    ImportProblem,
    ListedAddress,
    iso_time,
    scan,
    scan_batches,
    write,
)
from pgserver import create_database

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suppression"


def _ms(text: str) -> int:
    """An ISO 8601 time (UTC unless it says otherwise) as Unix milliseconds."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _split(
    items: list[ImportedEvent | ImportProblem],
) -> tuple[list[ImportedEvent], list[ImportProblem]]:
    """The events and the problems of one scan, each in file order."""
    events = [i for i in items if isinstance(i, ImportedEvent)]
    problems = [i for i in items if isinstance(i, ImportProblem)]
    return events, problems


def _read(
    source: str,
    path: Path,
    *,
    fold_case: bool = False,
    kind: str | None = None,
    scope: str | None = None,
) -> tuple[list[ImportedEvent], list[ImportProblem]]:
    """Scan `path` whole."""
    return _split(list(scan(source, path, fold_case=fold_case, kind=kind, scope=scope)))


# --------------------------------------------------------------------------------------------
# Every sample export


@pytest.mark.parametrize(
    ("source", "name", "counts", "problem_lines"),
    [
        ("sendgrid", "sendgrid_bounces.csv", {"hard_bounce": 9, "soft_bounce": 2}, [7]),
        ("sendgrid", "sendgrid_blocks.csv", {"soft_bounce": 10}, []),
        ("sendgrid", "sendgrid_spam_reports.json", {"complaint": 10}, []),
        ("sendgrid", "sendgrid_invalid_emails.json", {"hard_bounce": 10}, []),
        ("sendgrid", "sendgrid_unsubscribes.csv", {"unsubscribe": 10}, []),
        ("mailgun", "mailgun_bounces.json", {"hard_bounce": 9, "soft_bounce": 1}, []),
        ("mailgun", "mailgun_complaints.csv", {"complaint": 10}, []),
        ("mailgun", "mailgun_unsubscribes.json", {"unsubscribe": 11}, []),
        ("ses", "ses_suppressed.json", {"hard_bounce": 9, "complaint": 3}, []),
        ("ses", "ses_import.csv", {"hard_bounce": 6, "complaint": 4}, []),
        (
            "postmark",
            "postmark_dump.json",
            {"hard_bounce": 4, "complaint": 3, "unsubscribe": 2, "manual": 3},
            [],
        ),
        (
            "sparkpost",
            "sparkpost_suppressions.json",
            {"complaint": 2, "unsubscribe": 2, "hard_bounce": 3, "manual": 3},
            [],
        ),
        (
            "sparkpost",
            "sparkpost_suppressions.csv",
            {"unsubscribe": 2, "manual": 3, "hard_bounce": 3, "complaint": 2},
            [],
        ),
        ("sparkpost", "sparkpost_legacy_flags.csv", {"manual": 10}, []),
        (
            "csv",
            "kiln_events.csv",
            {"hard_bounce": 4, "complaint": 1, "unsubscribe": 3, "manual": 1, "soft_bounce": 1},
            [9, 10],
        ),
    ],
)
def test_every_sample_export_reads(
    source: str, name: str, counts: dict[str, int], problem_lines: list[int]
) -> None:
    """Each fixture gives the events its rows say and a problem (with file:line) for each bad
    row; every event is normalised, sourced `import:<provider>` and carries its line."""
    events, problems = _read(source, FIXTURES / name)
    assert Counter(e.event for e in events) == counts
    assert [p.line for p in problems] == problem_lines
    for event in events:
        assert event.source == f"import:{source}"
        assert event.address == normalise(event.address)
        assert isinstance(event.evidence["line"], int) and event.evidence["line"] >= 2
        assert len(str(event.evidence.get("reason", ""))) <= 500
    for problem in problems:
        assert str(problem).startswith(f"{FIXTURES / name}:{problem.line}: ")


def test_sendgrid_bounces_map_status_and_keep_duplicates() -> None:
    """A 4.x.x status is a soft bounce; the reason and status become evidence; the duplicated
    row passes twice (deduplication is the list's job); the bad address is one problem."""
    events, problems = _read("sendgrid", FIXTURES / "sendgrid_bounces.csv")
    by_address = {e.address: e for e in events}
    assert by_address["carol@example.net"].event == "soft_bounce"
    assert by_address["Bob.Smith@example.com"].event == "hard_bounce"
    alice = by_address["alice@example.com"]
    assert alice.at_ms == _ms("2026-03-01T08:00:00")
    assert alice.evidence == {
        "line": 2,
        "kind": "bounces",
        "reason": "550 5.1.1 The email account that you tried to reach does not exist",
        "status": "5.1.1",
    }
    assert [e.evidence["line"] for e in events if e.address == "heidi@example.com"] == [9, 10]
    assert len(problems) == 1
    assert "frank@@example.com" in problems[0].message
    assert "more than one @" in problems[0].message


def test_bom_crlf_and_file_name_hint() -> None:
    """sendgrid_blocks.csv starts with a UTF-8 BOM and ends lines with CRLF; its columns are
    those of bounces, and the file name says blocks: soft bounces, reason kept."""
    events, problems = _read("sendgrid", FIXTURES / "sendgrid_blocks.csv")
    assert problems == []
    assert events[0].address == "oscar@example.com"
    assert events[0].at_ms == _ms("2026-03-06T09:00:00")
    assert {e.evidence["kind"] for e in events} == {"blocks"}
    assert "\r" not in str(events[0].evidence["status"])


def test_kind_names_the_export_outright(tmp_path: Path) -> None:
    """Without a telling file name, bounces are assumed; `kind` says blocks instead."""
    copy = tmp_path / "export.csv"
    shutil.copy(FIXTURES / "sendgrid_blocks.csv", copy)
    events, _ = _read("sendgrid", copy)
    assert {e.evidence["kind"] for e in events} == {"bounces"}
    assert Counter(e.event for e in events) == {"hard_bounce": 7, "soft_bounce": 3}
    events, _ = _read("sendgrid", copy, kind="blocks")
    assert {e.event for e in events} == {"soft_bounce"}
    with pytest.raises(ValueError, match="no export kind 'spam'"):
        list(scan("sendgrid", copy, kind="spam"))


def test_sendgrid_json_shapes() -> None:
    """Spam reports keep the sending IP; invalid emails are hard bounces; `created` is Unix
    seconds."""
    events, _ = _read("sendgrid", FIXTURES / "sendgrid_spam_reports.json")
    assert events[0].evidence == {"line": 2, "kind": "spam_reports", "ip": "192.0.2.10"}
    assert events[0].at_ms == _ms("2026-03-01T10:00:00")
    events, _ = _read("sendgrid", FIXTURES / "sendgrid_invalid_emails.json")
    assert events[5].address == "pat@exampel.com"
    assert events[5].evidence["reason"] == "Known bad domain"


def test_mailgun_tags_scope_unsubscribes() -> None:
    """An unsubscribe from `*` is global; from named tags, one scoped event per tag."""
    events, _ = _read("mailgun", FIXTURES / "mailgun_unsubscribes.json")
    scopes = [(e.address, e.scope) for e in events if e.scope is not None]
    assert scopes == [
        ("val@example.net", "tag:newsletter"),
        ("xena@example.com", "tag:newsletter"),
        ("xena@example.com", "tag:promotions"),
        ("adam@example.com", "tag:promotions"),
    ]
    bounces, _ = _read("mailgun", FIXTURES / "mailgun_bounces.json")
    assert bounces[0].at_ms == _ms("2026-03-01T06:00:00")  # RFC 2822, UTC
    assert bounces[7].event == "soft_bounce" and bounces[7].evidence["code"] == "421"
    assert bounces[8].address == "ian@example.net"


def test_ses_times_as_numbers_or_iso() -> None:
    """LastUpdateTime is a Unix time (fractions kept to the millisecond) in the API's JSON and
    an ISO string in the CLI's; the bulk-import CSV has no time at all."""
    events, _ = _read("ses", FIXTURES / "ses_suppressed.json")
    assert events[1].at_ms == _ms("2026-03-01T01:30:00") + 250
    assert events[5].at_ms == _ms("2026-03-01T07:30:00") + 123
    assert events[3].event == "complaint"
    imported, _ = _read("ses", FIXTURES / "ses_import.csv")
    assert {e.at_ms for e in imported} == {None}


def test_postmark_manual_suppression_by_origin() -> None:
    """ManualSuppression is an unsubscribe from the recipient, a manual entry from the
    customer or an admin; CreatedAt keeps its offset, 7 fraction digits included."""
    events, _ = _read("postmark", FIXTURES / "postmark_dump.json")
    origins = {(e.evidence["origin"], e.event) for e in events if "Manual" in str(e.evidence)}
    assert origins == {("Recipient", "unsubscribe"), ("Customer", "manual"), ("Admin", "manual")}
    assert events[0].at_ms == _ms("2026-03-01T00:58:33-05:00")
    assert events[3].at_ms == _ms("2026-03-04T03:58:33-05:00") + 123


def test_sparkpost_type_and_legacy_flags_scope() -> None:
    """`type` scopes a suppression to one stream; the older flags do too, and both flags set
    (or neither) is global."""
    events, _ = _read("sparkpost", FIXTURES / "sparkpost_suppressions.json")
    assert (events[0].event, events[0].scope) == ("complaint", "stream:non_transactional")
    assert (events[2].event, events[2].scope) == ("hard_bounce", "stream:transactional")
    assert events[0].evidence["sparkpost_source"] == "Spam Complaint"
    legacy, _ = _read("sparkpost", FIXTURES / "sparkpost_legacy_flags.csv")
    assert [e.scope for e in legacy[:3]] == [
        None,
        "stream:non_transactional",
        "stream:transactional",
    ]


def test_kiln_csv_times_scopes_and_idna() -> None:
    """kiln's CSV reads ISO times with offsets and milliseconds and Unix seconds, keeps the
    scope column, and IDNA-encodes a Unicode domain."""
    events, problems = _read("csv", FIXTURES / "kiln_events.csv")
    by_line = {e.evidence["line"]: e for e in events}
    assert by_line[3].at_ms == _ms("2026-03-01T09:00:00") + 250
    assert by_line[4].at_ms == 1_772_355_600_000 and by_line[4].scope == "marketing"
    assert by_line[5].at_ms is None
    assert by_line[6].at_ms == _ms("2026-03-02T09:00:00")
    assert by_line[7].address == "Frank@example.com"
    assert by_line[8].address == "grace@xn--bcher-kva.example"
    assert "unknown event 'bounce'" in problems[0].message
    assert "unreadable timestamp 'yesterday'" in problems[1].message


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ("1772352000", _ms("2026-03-01T08:00:00")),
        ("1772352000.5", _ms("2026-03-01T08:00:00") + 500),
        ("1772352000123", _ms("2026-03-01T08:00:00") + 123),
        ("2026-03-01T08:00:00Z", _ms("2026-03-01T08:00:00")),
        ("2026-03-01 03:00:00-05:00", _ms("2026-03-01T08:00:00")),
        ("2026-03-01T08:00:00.1234567+00:00", _ms("2026-03-01T08:00:00") + 123),
        ("2026-03-01 08:00:00", _ms("2026-03-01T08:00:00")),
        ("Sun, 01 Mar 2026 08:00:00 GMT", _ms("2026-03-01T08:00:00")),
        ("Sun, 01 Mar 2026 09:00:00 +0100", _ms("2026-03-01T08:00:00")),
        ("03/01/2026 08:00:00", _ms("2026-03-01T08:00:00")),
        ("03/01/2026 8:00 AM", _ms("2026-03-01T08:00:00")),
        ("", None),
    ],
)
def test_timestamp_forms(tmp_path: Path, at: str, expected: int | None) -> None:
    """Every documented time form reads to the same millisecond; zone-less times are UTC."""
    path = tmp_path / "times.csv"
    path.write_text(f'address,event,at\na@example.com,manual,"{at}"\n')
    (event,) = scan("csv", path)
    assert isinstance(event, ImportedEvent)
    assert event.at_ms == expected


def test_scope_and_fold_case_options() -> None:
    """`scope` fills in rows without one; `fold_case` lower-cases local parts."""
    events, _ = _read(
        "csv", FIXTURES / "kiln_events.csv", scope="domain:example.com", fold_case=True
    )
    by_line = {e.evidence["line"]: e for e in events}
    assert by_line[2].scope == "domain:example.com"
    assert by_line[4].scope == "marketing"
    assert by_line[7].address == "frank@example.com"


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("source", "name", "line", "looks_like"),
    [
        ("sendgrid", "sendgrid_export_actually_mailgun.csv", 1, "a Mailgun bounces export"),
        ("mailgun", "sendgrid_spam_reports.json", 2, "a SendGrid spam reports export"),
        ("mailgun", "sendgrid_bounces.csv", 1, "a SendGrid bounces export"),
        ("ses", "postmark_dump.json", 3, "a Postmark export"),
        ("postmark", "ses_suppressed.json", 3, "an Amazon SES export"),
        ("sparkpost", "mailgun_bounces.json", 3, "a Mailgun export"),
        ("sendgrid", "sparkpost_suppressions.csv", 1, "a SparkPost suppression list export"),
        ("mailgun", "kiln_events.csv", 1, "a kiln CSV export"),
    ],
)
def test_a_wrong_providers_export_is_one_problem(
    source: str, name: str, line: int, looks_like: str
) -> None:
    """An export from another provider gives one problem naming what it looks like and the
    `--from` to use, and no event: never one bad line per row."""
    items = list(scan(source, FIXTURES / name))
    assert len(items) == 1
    problem = items[0]
    assert isinstance(problem, ImportProblem)
    assert problem.line == line
    assert f"this looks like {looks_like}" in problem.message
    assert "import it with --from" in problem.message


def test_a_missing_column_is_one_problem() -> None:
    """A CSV without a required column names it (header names compared loosely)."""
    items = list(scan("csv", FIXTURES / "missing_column.csv"))
    assert items == [
        ImportProblem(
            str(FIXTURES / "missing_column.csv"),
            1,
            "not a kiln CSV export: columns Address, At, Scope; missing required column event"
            " (names compared case-insensitively, ignoring '_' and spaces)",
        )
    ]


def test_mixed_encodings_are_problems_for_their_lines_only() -> None:
    """Latin-1 and cp1252 lines in a UTF-8 file are problems showing the line with
    replacement characters; the UTF-8 lines around them, accents included, import."""
    events, problems = _read("csv", FIXTURES / "mixed_encoding.csv")
    assert [p.line for p in problems] == [4, 6]
    assert "invalid UTF-8 at byte 2" in problems[0].message
    assert "j\ufffdrgen@example.de" in problems[0].message
    assert len(events) == 8
    assert "zo\u00eb@example.nl" in {e.address for e in events}


def test_missing_file_empty_file_and_utf16(tmp_path: Path) -> None:
    """A file that cannot be read, an empty one and a UTF-16 one are each one problem."""
    gone = tmp_path / "gone.csv"
    (missing,) = scan("csv", gone)
    assert str(missing).startswith(f"{gone}:0: cannot read the file")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert [str(p) for p in scan("csv", empty)] == [f"{empty}:1: the file is empty"]
    wide = tmp_path / "wide.csv"
    wide.write_bytes("address,event\na@example.com,manual\n".encode("utf-16"))
    (problem,) = scan("csv", wide)
    assert isinstance(problem, ImportProblem)
    assert "UTF-16" in problem.message


def test_over_long_line_is_skipped_not_held(tmp_path: Path) -> None:
    """A line over the limit is one problem; reading goes on after it."""
    path = tmp_path / "long.csv"
    with path.open("wb") as out:
        out.write(b"address,event,reason\n")
        out.write(b"a@example.com,manual," + b"x" * (MAX_LINE_BYTES + 10) + b"\n")
        out.write(b"b@example.com,manual,short\n")
    events, problems = _read("csv", path)
    assert [p.line for p in problems] == [2]
    assert "longer than" in problems[0].message
    assert [e.address for e in events] == ["b@example.com"]


def test_unknown_source_is_a_programming_error() -> None:
    """Sources are a closed set: a typo is a ValueError, not a problem in the file."""
    with pytest.raises(ValueError, match="unknown import source 'sendgird'"):
        list(scan("sendgird", FIXTURES / "sendgrid_bounces.csv"))


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"items": [{"address": "a@example.com"},\n{"address": ', 2, "malformed JSON"),
        ('{"items": [{"address": "a@example.com"}\n\n{"address": "b@x"}', 3, "malformed JSON"),
        ('[{"email": "a@example.com"}, 42]', 1, "a record is a JSON int, not an object"),
    ],
)
def test_malformed_json_names_its_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    """Broken JSON is a problem at the line where reading stopped."""
    path = tmp_path / "bad.json"
    path.write_text(text)
    source = "mailgun" if "items" in text else "sendgrid"
    problems = [i for i in scan(source, path) if isinstance(i, ImportProblem)]
    assert problems[-1].line == line
    assert message in problems[-1].message


def test_json_lines_and_gzip(tmp_path: Path) -> None:
    """JSON Lines (SES's bulk-import shape) and a gzip-compressed export read as the plain
    file would."""
    lines = [
        {"emailAddress": "one@example.com", "reason": "BOUNCE"},
        {"emailAddress": "two@example.com", "reason": "COMPLAINT"},
        {"emailAddress": "three@example.com", "reason": "BOGUS"},
    ]
    path = tmp_path / "ses.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    events, problems = _read("ses", path)
    assert [(e.address, e.event, e.evidence["line"]) for e in events] == [
        ("one@example.com", "hard_bounce", 1),
        ("two@example.com", "complaint", 2),
    ]
    assert [(p.line, "BOGUS" in p.message) for p in problems] == [(3, True)]
    packed = tmp_path / "postmark.json.gz"
    packed.write_bytes(gzip.compress((FIXTURES / "postmark_dump.json").read_bytes()))
    assert list(scan("postmark", packed)) == list(scan("postmark", FIXTURES / "postmark_dump.json"))


@pytest.mark.parametrize(
    "name",
    [
        "sendgrid_spam_reports.json",
        "mailgun_unsubscribes.json",
        "ses_suppressed.json",
        "postmark_dump.json",
        "sparkpost_suppressions.json",
    ],
)
def test_json_reads_the_same_in_tiny_pieces(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Records, numbers and strings cut across read pieces decode as when read whole."""
    source = name.split("_")[0]
    whole = list(scan(source, FIXTURES / name))
    monkeypatch.setattr("kiln.suppress.formats.READ_CHUNK_CHARS", 5)
    assert list(scan(source, FIXTURES / name)) == whole


# --------------------------------------------------------------------------------------------
# Large files


def test_a_large_csv_streams_in_bounded_memory(tmp_path: Path) -> None:
    """100,000 rows scan with a peak under 1 MiB: nothing is held per row."""
    path = tmp_path / "large.csv"
    rows = 100_000
    with path.open("w") as out:
        out.write("email,created,reason,status\n")
        for n in range(rows):
            out.write(f"user{n}@example{n % 97}.com,{1_772_352_000 + n},550 5.1.1 unknown,5.1.1\n")
    normalise("warm@b\u00fccher.example")  # load the IDNA tables before measuring
    tracemalloc.start()
    try:
        count = sum(1 for item in scan("sendgrid", path) if isinstance(item, ImportedEvent))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == rows
    assert peak_bytes < 1024 * 1024, f"peak {peak_bytes} bytes"


def test_a_large_json_array_streams_in_bounded_memory(tmp_path: Path) -> None:
    """A 20,000-record JSON export (records under `items`) streams record by record, across
    read-chunk boundaries, with the same bounded peak."""
    path = tmp_path / "bounces.json"
    records = 20_000
    with path.open("w") as out:
        out.write('{"items": [\n')
        for n in range(records):
            sep = ",\n" if n else ""
            out.write(
                f'{sep}  {{"address": "user{n}@example.com", "code": "550", "error": "no",'
                f' "created_at": "Mon, 02 Mar 2026 10:00:00 UTC"}}'
            )
        out.write('\n], "paging": {"next": "x"}}\n')
    tracemalloc.start()
    try:
        count, last_line = 0, 0
        for item in scan("mailgun", path):
            assert isinstance(item, ImportedEvent)
            count, last_line = count + 1, int(item.evidence["line"])
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == records
    assert last_line == records + 1
    assert peak_bytes < 1024 * 1024, f"peak {peak_bytes} bytes"


# --------------------------------------------------------------------------------------------
# Batches: the columns an import reads (scan_batches)


SAMPLES = [
    ("sendgrid", "sendgrid_bounces.csv"),
    ("sendgrid", "sendgrid_blocks.csv"),
    ("sendgrid", "sendgrid_spam_reports.json"),
    ("sendgrid", "sendgrid_invalid_emails.json"),
    ("sendgrid", "sendgrid_unsubscribes.csv"),
    ("sendgrid", "sendgrid_export_actually_mailgun.csv"),
    ("mailgun", "mailgun_bounces.json"),
    ("mailgun", "mailgun_complaints.csv"),
    ("mailgun", "mailgun_unsubscribes.json"),
    ("ses", "ses_suppressed.json"),
    ("ses", "ses_import.csv"),
    ("postmark", "postmark_dump.json"),
    ("sparkpost", "sparkpost_suppressions.json"),
    ("sparkpost", "sparkpost_suppressions.csv"),
    ("sparkpost", "sparkpost_legacy_flags.csv"),
    ("csv", "kiln_events.csv"),
    ("csv", "missing_column.csv"),
    ("csv", "mixed_encoding.csv"),
]


@pytest.mark.parametrize(("source", "name"), SAMPLES)
@pytest.mark.parametrize("rows", [1, 3, BATCH_ROWS])
def test_batches_hold_what_scan_yields(source: str, name: str, rows: int) -> None:
    """Batches of any size hold scan's events and problems in scan's order, and each event's
    evidence as the JSON text the log keeps (`json.dumps(..., sort_keys=True)`)."""
    path = FIXTURES / name
    batches = list(scan_batches(source, path, scope="stream:x", rows=rows))
    assert [i for b in batches for i in b.items()] == list(scan(source, path, scope="stream:x"))
    for batch in batches:
        assert len(batch.problems) == len(batch.problem_after)
        events = [i for i in batch.items() if isinstance(i, ImportedEvent)]
        assert batch.evidence == [json.dumps(e.evidence, sort_keys=True) for e in events]


def _awkward_csv() -> bytes:
    """A kiln CSV with everything a block boundary could cut badly."""
    rows = [
        b"\xef\xbb\xbfaddress,event,at,reason\r\n",  # 1: BOM, CRLF
        b"a@example.com,manual,1772352000,plain\r\n",  # 2
        b'b@example.com,manual,2026-03-01T09:00:00.250Z,"two\r\nlines, quoted"\r\n',  # 3-4
        b"\r\n",  # 5: blank
        b" , , , \n",  # 6: blank cells
        b"j\xf6rgen@example.de,manual,,latin-1\n",  # 7: not UTF-8
        b"C@Example.COM,unsubscribe,1772352000123,\n",  # 8
        b'd@example.com,complaint,,"a ""quoted"" word"\n',  # 9
        b"nobody,manual,,\n",  # 10: no @
        b"e@example.com,manual,yesterday,\n",  # 11: unreadable time
        b"f@example.com,hard_bounce,2019-12-17T08:58:33-05:00,no final line break",  # 12
    ]
    return b"".join(rows)


@pytest.mark.parametrize("block", [1, 2, 5, 17, 64])
def test_csv_reads_the_same_in_any_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """CSV is read a block at a time: quoted line breaks, CRLF, a BOM, bad and blank lines
    and a last line without a break read the same wherever a block ends."""
    path = tmp_path / "awkward.csv"
    path.write_bytes(_awkward_csv())
    whole = list(scan("csv", path))
    events, problems = _split(whole)
    assert [(e.address, e.evidence["line"]) for e in events] == [
        ("a@example.com", 2),
        ("b@example.com", 3),
        ("C@example.com", 8),
        ("d@example.com", 9),
        ("f@example.com", 12),
    ]
    assert events[1].evidence["reason"] == "two\r\nlines, quoted"
    assert events[1].at_ms == _ms("2026-03-01T09:00:00.250+00:00")
    assert events[2].at_ms == 1772352000123
    assert events[4].at_ms == _ms("2019-12-17T08:58:33-05:00")
    assert [p.line for p in problems] == [7, 10, 11]
    monkeypatch.setattr("kiln.suppress.formats.CSV_BLOCK_BYTES", block)
    assert list(scan("csv", path)) == whole
    assert [i for b in scan_batches("csv", path, rows=2) for i in b.items()] == whole


@given(
    st.lists(
        st.datetimes(
            min_value=datetime(1900, 1, 1),
            max_value=datetime(2200, 1, 1),
            timezones=st.one_of(st.none(), st.just(UTC), st.timezones()),
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["T", " "]),
)
def test_iso_times_read_to_the_millisecond(moments: list[datetime], sep: str) -> None:
    """ISO 8601 times as APIs write them (`Z`, an offset or none, a fraction or none) read
    as `datetime.fromisoformat` reads them, to the millisecond (floored)."""
    lines = ["address,event,at"]
    for n, moment in enumerate(moments):
        text = moment.isoformat(sep=sep, timespec="microseconds" if n % 2 else "seconds")
        if moment.tzinfo is not None and moment.utcoffset() == timedelta(0) and n % 3 == 0:
            text = text.removesuffix("+00:00") + "Z"
        lines.append(f"a{n}@example.com,manual,{text}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "times.csv"
        path.write_text("\n".join(lines) + "\n")
        events, problems = _read("csv", path)
    assert not problems
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for event, moment in zip(events, moments, strict=True):
        n = int(event.address[1:].split("@")[0])
        exact = moment if n % 2 else moment.replace(microsecond=0)
        aware = exact if exact.tzinfo is not None else exact.replace(tzinfo=UTC)
        assert event.at_ms == (aware - epoch) // timedelta(milliseconds=1)


def test_unix_time_columns_read_as_numbers(tmp_path: Path) -> None:
    """SendGrid's `created` as digits (seconds or milliseconds), empty cells among them, and
    one value that is no time: each reads as it says, the bad one a problem of its line."""
    path = tmp_path / "bounces.csv"
    path.write_text(
        "created,email,reason,status\n"
        "1772352000,a@example.com,r,5.1.1\n"
        ",b@example.com,r,5.1.1\n"
        "1772352000250,c@example.com,r,4.2.2\n"
        "0017,d@example.com,r,5.1.1\n"
    )
    events, problems = _read("sendgrid", path)
    assert [e.at_ms for e in events] == [1772352000000, None, 1772352000250, 17000]
    assert [e.event for e in events][2] == "soft_bounce" and not problems
    path.write_text(path.read_text() + "soon,e@example.com,r,5.1.1\n")
    events, problems = _read("sendgrid", path)
    assert [e.at_ms for e in events] == [1772352000000, None, 1772352000250, 17000]
    assert [(p.line, "unreadable timestamp 'soon'" in p.message) for p in problems] == [(6, True)]


def test_large_csv_batches_stream_in_bounded_memory(tmp_path: Path) -> None:
    """`scan_batches` holds one batch (`BATCH_ROWS` rows) at a time."""
    path = tmp_path / "large.csv"
    with path.open("w") as out:
        out.write("email,created,reason,status\n")
        for n in range(100_000):
            out.write(f"user{n}@example{n % 97}.com,{1_772_352_000 + n},550 5.1.1 unknown,5.1.1\n")
    normalise("warm@b\u00fccher.example")
    tracemalloc.start()
    try:
        count = sum(len(batch) for batch in scan_batches("sendgrid", path))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak_bytes < 8 * 1024 * 1024, f"peak {peak_bytes} bytes"


# --------------------------------------------------------------------------------------------
# Export formats


ENTRIES = [
    ListedAddress("alice@example.com", "hard_bounce", _ms("2026-03-01T08:00:00"), None, None),
    ListedAddress("Bob@example.com", "complaint", _ms("2026-03-01T09:00:00") + 250, None, None),
    ListedAddress("carol@example.net", "unsubscribe", None, None, "stream:marketing"),
    ListedAddress(
        "dave@example.org",
        "soft_bounce",
        _ms("2026-03-02T10:00:00"),
        _ms("2026-03-09T10:00:00"),
        None,
    ),
    ListedAddress('"e f"@example.com', "manual", _ms("2026-03-03T11:00:00"), None, None),
]


def test_csv_export_layout() -> None:
    """A header, then ISO 8601 UTC times with milliseconds only where there are some."""
    out = io.StringIO()
    assert write("csv", ENTRIES, out) == len(ENTRIES)
    text = out.getvalue()
    assert text.splitlines()[:3] == [
        "address,event,at,expires_at,scope",
        "alice@example.com,hard_bounce,2026-03-01T08:00:00Z,,",
        "Bob@example.com,complaint,2026-03-01T09:00:00.250Z,,",
    ]


def test_csv_round_trip(tmp_path: Path) -> None:
    """`write("csv")` then `scan("csv")` is the identity on what the list holds."""
    path = tmp_path / "list.csv"
    with path.open("w", newline="") as out:
        write("csv", ENTRIES, out)
    events, problems = _read("csv", path)
    assert problems == []
    assert [(e.address, e.event, e.at_ms, e.scope) for e in events] == [
        (e.address, e.event, e.at_ms, e.scope) for e in ENTRIES
    ]
    assert events[3].evidence["expires_ms"] == ENTRIES[3].expires_ms


@given(
    st.lists(
        st.builds(
            ListedAddress,
            st.sampled_from(["a@example.com", "B.c+tag@example.net", "d@xn--bcher-kva.example"]),
            st.sampled_from(["hard_bounce", "complaint", "unsubscribe", "manual", "soft_bounce"]),
            st.none() | st.integers(0, 4_102_444_800_000),
            st.none() | st.integers(0, 4_102_444_800_000),
            st.none() | st.sampled_from(["stream:marketing", "tenant:a,b", 'odd "scope"']),
        ),
        max_size=8,
    )
)
def test_csv_round_trip_property(entries: list[ListedAddress]) -> None:
    """Any entries survive a CSV export and import to the millisecond."""
    out = io.StringIO()
    write("csv", entries, out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    assert [(r[0], r[1], _back(r[2]), r[4] or None) for r in rows] == [
        (e.address, e.event, e.at_ms, e.scope) for e in entries
    ]


def _back(text: str) -> int | None:
    """An `iso_time` string back to milliseconds."""
    if not text:
        return None
    when = datetime.fromisoformat(text)
    return round(when.timestamp() * 1000)


def test_iso_time() -> None:
    """Milliseconds only when not zero; None is empty."""
    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1_772_352_000_007) == "2026-03-01T08:00:00.007Z"
    assert iso_time(None) == ""


def test_jsonl_export() -> None:
    """One compact object a line, times in milliseconds."""
    out = io.StringIO()
    assert write("jsonl", ENTRIES[:2], out) == 2
    first = json.loads(out.getvalue().splitlines()[0])
    assert first == {
        "address": "alice@example.com",
        "event": "hard_bounce",
        "at_ms": ENTRIES[0].at_ms,
        "expires_ms": None,
        "scope": None,
    }


def test_postfix_and_pmta_tables_hold_global_live_entries() -> None:
    """The MTA tables: global entries only, lower-case keys (Postfix folds lookups), expired
    entries dropped with `now_ms`, and no address a table line cannot hold."""
    out = io.StringIO()
    assert write("postfix", ENTRIES, out, now_ms=_ms("2026-03-10T00:00:00")) == 2
    assert out.getvalue() == (
        "alice@example.com REJECT 5.7.1 Recipient address suppressed (hard_bounce)\n"
        "bob@example.com REJECT 5.7.1 Recipient address suppressed (complaint)\n"
    )
    out = io.StringIO()
    assert write("pmta", ENTRIES, out) == 3
    assert out.getvalue() == "alice@example.com\nbob@example.com\ndave@example.org\n"
    with pytest.raises(ValueError, match="unknown export format 'exim'"):
        write("exim", ENTRIES, io.StringIO())


# --------------------------------------------------------------------------------------------
# Address normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" User@EXAMPLE.com ", "User@example.com"),
        ("<a@example.com>", "a@example.com"),
        ("Jos\u00e9@B\u00fccher.DE", "Jos\u00e9@xn--bcher-kva.de"),
        ("a@\u4f8b\u3048.\u30c6\u30b9\u30c8", "a@xn--r8jz45g.xn--zckzah"),
        ("a@b\u3002EXAMPLE", "a@b.example"),
        ('"a b@c"@Example.com', '"a b@c"@example.com'),
        ("a@example.com.", "a@example.com"),
        ("a@[192.0.2.1]", "a@[192.0.2.1]"),
        ("a@xn--bcher-kva.de", "a@xn--bcher-kva.de"),
        ("x@ex_ample.com", "x@ex_ample.com"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    """Trimmed, domain lower-cased and IDNA-encoded, local part as given."""
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("example.com", "no @"),
        ("a@@example.com", "more than one @"),
        ("a b@example.com", "white space in the local part"),
        ("a\x00b@example.com", "control character"),
        ("@example.com", "empty local part"),
        ("a@", "empty domain"),
        ("a@b..com", "empty label"),
        ("a@-b.com", "invalid domain label"),
        ('a"b@example.com', "unbalanced quote"),
        ("a@" + "b" * 64 + ".com", "over 63 bytes"),
        ("a@\u2603\u0301.com", "not valid IDNA"),
    ],
)
def test_normalise_refuses(text: str, message: str) -> None:
    """Every refusal is an AddressError (a ValueError) saying what is wrong."""
    with pytest.raises(AddressError, match=message):
        normalise(text)


def test_320_bytes_at_most() -> None:
    """320 bytes is accepted, 321 refused, counted in UTF-8 bytes after normalisation."""
    domain = ".".join(["d" * 60] * 4) + ".com"  # 248 bytes
    local = "l" * (MAX_ADDRESS_BYTES - len(domain) - 1)
    assert len(normalise(f"{local}@{domain}")) == MAX_ADDRESS_BYTES
    with pytest.raises(AddressError, match="321 bytes long, over the 320 byte limit"):
        normalise(f"{local}x@{domain}")
    with pytest.raises(AddressError, match="over the 320 byte limit"):
        normalise(f"{local[:-1]}\u00e9@{domain}")


_LABEL = st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789\u00fc\u00e9\u00f8\u00e5", min_size=1, max_size=12
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_LOCAL = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+_-\u00e9\u00c9",
    min_size=1,
    max_size=30,
)


@given(st.text(max_size=80))
def test_normalise_is_idempotent_on_any_text(text: str) -> None:
    """Whatever it accepts, it accepts again unchanged."""
    try:
        once = normalise(text)
    except AddressError:
        return
    assert normalise(once) == once
    assert len(once.encode()) <= MAX_ADDRESS_BYTES


@given(_LOCAL, _DOMAIN)
def test_domain_case_never_matters(local: str, domain: str) -> None:
    """Upper, lower or as generated, the domain normalises to one spelling, and normalising
    twice changes nothing."""
    once = normalise(f"{local}@{domain}")
    assert normalise(f"{local}@{domain.upper()}") == once
    assert normalise(f"{local}@{domain.lower()}") == once
    assert normalise(once) == once
    assert once.split("@")[0] == local


@given(_LOCAL, _DOMAIN)
def test_fold_case_makes_local_case_not_matter(local: str, domain: str) -> None:
    """With fold_case, `Bob@` and `bob@` are one address; without it, they stay two."""
    folded = normalise(f"{local}@{domain}", fold_case=True)
    assert normalise(f"{local.upper()}@{domain}", fold_case=True) == folded
    assert normalise(f"{local.lower()}@{domain}", fold_case=True) == folded
    assert normalise(folded, fold_case=True) == folded
    if local.upper() != local.lower():
        assert normalise(f"{local.upper()}@{domain}") != normalise(f"{local.lower()}@{domain}")


_PLAINISH = st.from_regex(r"[A-Za-z0-9.+_'!#-]{1,70}@[A-Za-z0-9_.\-\u00fc]{1,70}", fullmatch=True)


@given(st.one_of(_PLAINISH, st.text(max_size=40)), st.booleans())
def test_plain_addresses_take_a_short_path_to_the_same_answer(text: str, fold: bool) -> None:
    """An address with nothing to trim goes a shorter way; padded with spaces it goes the
    general one: the same address, or the same refusal. `is_normal` promises no change."""

    def outcome(candidate: str) -> str:
        try:
            return normalise(candidate, fold_case=fold)
        except AddressError as exc:
            return f"refused: {exc}"

    assert outcome(text) == outcome(f"  {text}\t")
    if is_normal(text):
        assert normalise(text) == text
    assert all_normal([text, "a@example.com"]) == is_normal(text)


# --------------------------------------------------------------------------------------------
# Imports into the log (kiln.suppress.files, Store.suppress_bulk)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A new store of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kiln.db'}"
    else:
        url = create_database(request.getfixturevalue("postgres_url"), f"kiln_{uuid4().hex[:16]}")
    with Store(url) as opened:
        yield opened


def _import(store: Store, engine: _core.Engine, source: str, path: Path, now_ms: int) -> Scanned:
    """The daemon's import steps: read, hash and deduplicate, write, fold."""
    read, scanned = read_file(source, path)
    scanned = asyncio.run(hash_events(engine, path, read, scanned, now_ms, yield_to_loop=False))
    assert store.suppress_bulk(scanned.events) == len(scanned.events)
    assert isinstance(scanned.events, ImportRows)
    for columns in scanned.events.fold_columns():
        columns.apply(engine)
    return scanned


def test_an_import_reaches_the_log_as_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each import's events land in the log as the sequence gives them (evidence, scopes,
    soft-bounce expiry), with their ids in file order, over several import batches; a
    repeated row and, on importing again, every listed address in its own scope are left out;
    the log's indexes stay."""
    monkeypatch.setattr("kiln.storebatch.BATCH_EVENTS", 3)
    engine = _core.Engine()
    engine.suppress_set_key(7, 8)
    now_ms = _ms("2026-03-02T10:00:00")  # the export's soft bounces still hold
    for source, name in [
        ("sendgrid", "sendgrid_bounces.csv"),
        ("sparkpost", "sparkpost_suppressions.csv"),
        ("mailgun", "mailgun_unsubscribes.json"),
    ]:
        path = FIXTURES / name
        events, problems = _read(source, path)
        distinct = {(e.address, e.scope or "", e.event) for e in events}
        before = store.suppress_last_id()
        first = _import(store, engine, source, path, now_ms)
        assert len(first.events) == len(distinct)
        assert first.duplicates == len(events) - len(distinct)
        assert first.problem_count == len(problems)
        logged = store.suppress_events(after_id=before, limit=10_000)
        assert [e.id for e in logged] == list(range(before + 1, before + 1 + len(logged)))
        # The import's `import` event comes right after its range, the next id after it.
        assert store.suppress_last_id() == before + len(logged) + 1
        for e in logged[::3]:  # each found again by its fingerprint, in any batch
            assert store.suppress_events(fingerprints=[e.fingerprint]) == [e]
        paged, after = [], before  # pages that end inside a batch go on after their last
        for _ in range(len(logged)):  # bounded: a page that repeats itself must fail
            page = store.suppress_events(after_id=after, limit=2)
            paged += page
            after = page[-1].id or after if page else after
        assert paged == logged
        middle = logged[len(logged) // 2].id or 0  # a fold from inside a batch: the rest
        folded = [c for c in store.suppress_fold_chunks(middle) if len(c)]
        assert sum(len(c) for c in folded) == before + len(logged) - middle
        assert folded[-1].last_id == before + len(logged)
        assert [replace(e, id=None) for e in logged] == list(first.events)
        assert [(e.address, e.scope, e.event) for e in logged] == list(
            dict.fromkeys((e.address, e.scope or "", e.event) for e in events)
        )
        again = _import(store, engine, source, path, now_ms)
        assert len(again.events) == 0 and again.already == len(first.events), again.summary()
    for verb in ("DELETE FROM", "UPDATE kiln_suppression_batch SET source = 'x' --"):
        with (
            pytest.raises(DBAPIError, match="append-only"),
            store._one_at_a_time("test"),
            store._engine.begin() as connection,
        ):
            connection.exec_driver_sql(f"{verb} kiln_suppression_batch")
    soft = store.suppress_events(event="soft_bounce")
    assert soft and all(e.expires_ms == e.at_ms + 3 * 86_400_000 for e in soft)
    with store._one_at_a_time("test"), store._engine.connect() as connection:
        indexes = {i["name"] for i in inspect(connection).get_indexes("kiln_suppression")}
    assert indexes == {"ix_kiln_suppression_at_ms", "ix_kiln_suppression_fingerprint"}


#: Triggers that make the database refuse a row of an import: its second batch row, or the
#: `import` event after its range.
_REFUSE = {
    "sqlite": {
        "batch": """CREATE TRIGGER refuse BEFORE INSERT ON kiln_suppression_batch
            WHEN NEW.first_id > 1 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END""",
        "marker": """CREATE TRIGGER refuse BEFORE INSERT ON kiln_suppression
            WHEN NEW.event = 'import' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END""",
    },
    "postgresql": {
        "function": """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused by the test'; END $$""",
        "batch": """CREATE TRIGGER refuse BEFORE INSERT ON kiln_suppression_batch
            FOR EACH ROW WHEN (NEW.first_id > 1) EXECUTE FUNCTION refuse()""",
        "marker": """CREATE TRIGGER refuse BEFORE INSERT ON kiln_suppression
            FOR EACH ROW WHEN (NEW.event = 'import') EXECUTE FUNCTION refuse()""",
    },
}


@pytest.mark.parametrize("refused", ["batch", "marker"])
def test_a_failed_import_writes_nothing(
    store: Store, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row the database refuses (a later batch row, or the `import` event after them)
    fails the whole import with a StoreError: the log keeps nothing of it, and takes the
    same import whole once the database accepts it."""
    monkeypatch.setattr("kiln.storebatch.BATCH_EVENTS", 1)
    engine = _core.Engine()
    engine.suppress_set_key(7, 8)
    path = FIXTURES / "sendgrid_unsubscribes.csv"
    read, scanned = read_file("sendgrid", path)
    scanned = asyncio.run(hash_events(engine, path, read, scanned, 1, yield_to_loop=False))
    assert isinstance(scanned.events, ImportRows)
    good = list(scanned.events)
    assert len(good) >= 2
    statements = _REFUSE[store._dialect]
    with store._one_at_a_time("test"), store._engine.begin() as connection:
        if "function" in statements:
            connection.exec_driver_sql(statements["function"])
        connection.exec_driver_sql(statements[refused])
    for events in (good, scanned.events):
        with pytest.raises(StoreError, match=r"import into the suppression log.*refused by"):
            store.suppress_bulk(events)
        assert store.suppress_last_id() == 0
        assert store.suppress_events() == []
    table = "kiln_suppression_batch" if refused == "batch" else "kiln_suppression"
    drop = "DROP TRIGGER refuse" + (f" ON {table}" if store._dialect == "postgresql" else "")
    with store._one_at_a_time("test"), store._engine.begin() as connection:
        connection.exec_driver_sql(drop)
    assert store.suppress_bulk(scanned.events) == len(good)
    assert [replace(e, id=None) for e in store.suppress_events(limit=100)] == good
