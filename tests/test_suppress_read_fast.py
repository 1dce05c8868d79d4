"""The fast reading of import files (`kiln.suppress.formats` with the core's
`split_csv_lines`, `evidence_json`, `unix_times_ms` and `all_normal_addresses`) against the
plain Python reading it stands in for: `csv.reader`, `json.dumps`, `address.all_normal` and
the Python column code. Each core call may leave a case to Python; whatever it takes must
come out as Python would make it, so every comparison here is exact."""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln import _core
from kiln.suppress import formats
from kiln.suppress.address import all_normal
from kiln.suppress.files import read_file
from kiln.suppress.formats import EVIDENCE_TEXT_CHARS, EventBatch, scan_batches

#: Pieces of CSV lines that reach every corner: delimiters, quotes, line breaks, white space
#: Python strips (and some it does not), NUL, bytes that are not UTF-8, long runs.
_PIECES = [
    b"a",
    b"Bob",
    b"x@example.com",
    b"Y@Example.COM",
    b"hard_bounce",
    b"manual",
    b"1700000000",
    b"2026-03-01T09:00:00Z",
    b"5.1.1",
    b"4.2.2",
    b",",
    b";",
    b"\t",
    b'"',
    b'""',
    b"\n",
    b"\r\n",
    b"\r",
    b" ",
    b"\xc2\xa0",  # NO-BREAK SPACE: Python strips it
    b"\x1c",  # FILE SEPARATOR: Python strips it too
    b"\xe2\x80\x8b",  # ZERO WIDTH SPACE: Python does not strip it
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b"\x00",
    b"\xff",
    b"\xe2\x82",  # a UTF-8 sequence cut short
    b"@",
    b"<z@example.com>",
    b"z" * 600,
]
_BODY = st.lists(st.sampled_from(_PIECES), max_size=60).map(b"".join)

_HEADERS = {
    "csv": b"address,event,at,reason,scope\n",
    "sendgrid": b"created,email,reason,status\n",
    "mailgun": b"address,code,error,created_at\n",
    "postmark": b"EmailAddress,SuppressionReason,Origin,CreatedAt\n",
    "sparkpost": b"recipient,type,source,description,created\n",
    "ses": b"EmailAddress,Reason,LastUpdateTime\n",
}


def _python_only() -> contextlib.AbstractContextManager[Any]:
    """`formats` with a core that leaves every case to Python."""
    core = SimpleNamespace(
        split_csv_lines=lambda data, start, *_: (0, start, [], []),
        evidence_json=lambda *_: None,
        unix_times_ms=lambda _: None,
        all_normal_addresses=all_normal,
    )
    return mock.patch.object(formats, "_core", core)


def _batches(source: str, path: Path, rows: int) -> list[EventBatch]:
    """Every batch of the file."""
    return list(scan_batches(source, path, rows=rows))


@contextlib.contextmanager
def _file(data: bytes) -> Iterator[Path]:
    """`data` in a file of its own."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bounces.csv"
        path.write_bytes(data)
        yield path


@given(st.sampled_from(sorted(_HEADERS)), _BODY, st.sampled_from([1, 3, 4096]))
def test_fast_reading_gives_what_python_gives(source: str, body: bytes, rows: int) -> None:
    """Any CSV body, however broken, reads to the same batches (events, evidence, problems
    with their lines, batch boundaries) with the core as with Python alone."""
    with _file(_HEADERS[source] + body) as path:
        fast = _batches(source, path, rows)
        with _python_only():
            slow = _batches(source, path, rows)
    assert fast == slow


@given(_BODY, st.sampled_from([1, 2, 7, 64]))
def test_fast_reading_is_the_same_in_any_block_size(body: bytes, block: int) -> None:
    """Blocks ending anywhere (inside a quoted field, between CR and LF) change nothing."""
    with _file(_HEADERS["csv"] + body) as path:
        fast = _batches("csv", path, 5)
        with mock.patch.object(formats, "CSV_BLOCK_BYTES", block), _python_only():
            slow = _batches("csv", path, 5)
    assert fast == slow


@given(
    st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
    st.sampled_from([",", ";", "\t"]),
    st.integers(min_value=1, max_value=5),
)
def test_split_lines_are_what_csv_reads(data: bytes, delimiter: str, width: int) -> None:
    """The lines the core takes split as `csv.reader` splits them (padded with None, cut
    to `width`), `trimmed` is true only where `str.strip` changes no cell, and it takes no
    line that is not UTF-8, blank, or more than one record."""
    rows, end, columns, trimmed = _core.split_csv_lines(data, 0, delimiter, width, 99, 1 << 17)
    taken = data[:end].decode("utf-8")
    lines = _lines(taken)
    assert len(lines) == rows
    read = list(csv.reader(lines, delimiter=delimiter))
    assert len(read) == rows
    for n, cells in enumerate(read):
        assert any(c.strip() for c in cells)
        padded = [*cells[:width], *[None] * (width - len(cells))]
        assert [column[n] for column in columns] == padded
    for column, clean in zip(columns, trimmed, strict=True):
        assert clean == all(c is not None and c.strip() == c for c in column)


def _lines(text: str) -> list[str]:
    """`text` split after each `\\n` only, as import files are."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


@given(
    st.lists(
        st.tuples(st.text(max_size=8), st.text(max_size=EVIDENCE_TEXT_CHARS + 3)),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=4, max_size=4),
)
def test_evidence_json_is_what_json_dumps_writes(
    texts: list[tuple[str, str]], numbers: list[int | None]
) -> None:
    """The core's evidence is `json.dumps(..., sort_keys=True)` of the same fields, texts
    cut to `EVIDENCE_TEXT_CHARS`; where it gives up (a lone surrogate), Python builds it."""
    names = list(dict.fromkeys(n for n, _ in texts if n not in {"kind", "line", "expires_ms"}))
    columns = [(name, [v for n, v in texts if n == name][:1] * 4) for name in names]
    lines = [2, 3, 10**12, 5]
    built = formats._evidence_json("bounces", lines, columns, [("expires_ms", numbers)])
    for row, line in enumerate(lines):
        fields: dict[str, object] = {"kind": "bounces", "line": line}
        for name, values in columns:
            if values[row]:
                fields[name] = formats._cut(values[row])
        if numbers[row] is not None:
            fields["expires_ms"] = numbers[row]
        assert built[row] == json.dumps(fields, sort_keys=True)


def test_evidence_json_leaves_lone_surrogates_and_big_ints_to_python() -> None:
    """A text the core cannot read as UTF-8, or an int past 64 bits, gives None."""
    assert _core.evidence_json("k", [1], [("r", ["\ud800"])], [], 500) is None
    assert _core.evidence_json("k", [1], [], [("n", [2**64])], 500) is None
    assert formats._evidence_json("k", [1], [("r", ["\ud800"])], []) == [
        json.dumps({"kind": "k", "line": 1, "r": "\ud800"}, sort_keys=True)
    ]


_TIME_TEXT = st.lists(
    st.sampled_from(["", " ", "0", "17", "1700000000", "100000000000", "9" * 15, "9" * 16]),
    max_size=4,
).map("".join) | st.text(max_size=6)


@given(st.lists(_TIME_TEXT, max_size=6))
def test_unix_times_are_read_as_python_reads_them(texts: list[str]) -> None:
    """Where the core reads a column of Unix times, Python's reading of it is the same."""
    read = _core.unix_times_ms(texts)
    with _python_only():
        python = formats._unix_times_ms(texts)
    if read is not None:
        assert read == python


@given(
    st.lists(
        st.sampled_from(["a@b.c", "A.b+c@x-y.example_1.com", "a@B.c", "a@-b", "@x"])
        | st.text(max_size=12),
        max_size=5,
    )
)
def test_normal_addresses_are_told_as_python_tells_them(texts: list[str]) -> None:
    """The core's column check agrees with `address.all_normal`."""
    assert _core.all_normal_addresses(texts) == all_normal(texts)


def test_normal_address_lengths() -> None:
    """Labels of 63 and addresses of 255 characters are the bounds, as in Python."""
    label = "b" * 63
    for text in [f"a@{label}", f"a@{label}b", "a" * 190 + f"@{label}", "a" * 191 + f"@{label}"]:
        assert _core.all_normal_addresses([text]) == all_normal([text])


@pytest.mark.parametrize(
    "body",
    [
        b'1700000000,a@example.com,"two\nlines",5.1.1\n1700000001,b@example.com,x,4.0.0\n',
        b"1700000000,a@example.com,\xff,5.1.1\n1700000001,b@example.com,x,4.0.0\n",
        b"\n\n1700000000,a@example.com,x,5.1.1\n , , \n1700000001,b@example.com,x,4.0.0",
        b"1700000000,a@example.com,x\r,5.1.1\n1700000001,b@example.com,x,4.0.0\r\n",
    ],
)
def test_read_file_is_the_same_either_way(tmp_path: Path, body: bytes) -> None:
    """`read_file` (what an import runs) gives the same parts and problems with the core
    splitting the easy lines as with Python reading every line."""
    path = tmp_path / "bounces.csv"
    path.write_bytes(_HEADERS["sendgrid"] + body)
    fast_read, fast_out = read_file("sendgrid", path)
    with _python_only():
        slow_read, slow_out = read_file("sendgrid", path)
    assert fast_read == slow_read
    assert fast_out == slow_out
