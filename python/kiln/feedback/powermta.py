"""PowerMTA accounting CSV -> `FeedbackEvent`s (format: docs/signals.md, "Wire formats").

The file is RFC 4180: the first line is a header naming the columns (configurable, so
columns are always found by name), values with commas, quotes or line breaks are quoted.
`PowerMtaParser.feed()` takes one physical line at a time and holds a record back until its
quotes balance, so a quoted line break simply continues the record. A line whose first field
is `type` is a (new) header; `reset()` forgets the header when the tail moves to a new file.

Record types: `d` delivered, `b` bounced (`bounceCat` `message-expired`: expired), `t`/`tq`
deferred, `rb` bounced, `rs` by its `dsnAction`, `f` complaint; others (`r`, ...) are ignored.
The sending IP is `dlvSourceIp` (`repSourceIp` on `f` rows that lack it).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo

from kiln.feedback.events import (
    FeedbackEvent,
    Result,
    normal_enhanced,
    normal_ip,
    normal_message_id,
    one_line,
    split_recipient,
    to_ms,
)

__all__ = ["PowerMtaParser"]

_MAX_RECORD_LINES = 64
_MAX_RECORD_CHARS = 256 * 1024
_DIAG = re.compile(
    r"^(?:(?P<kind>[A-Za-z-]+);)?\s*(?P<code>[2-5]\d\d)(?:[ -](?P<enh>[2-5]\.\d{1,3}\.\d{1,3})\b)?"
    r"(?P<text>.*)$",
    re.S,
)
_STATUS = re.compile(r"^\s*(?P<enh>[2-5]\.\d{1,3}\.\d{1,3})\b")
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d %H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z")
_SIMPLE: Mapping[str, Result] = {
    "d": "delivered",
    "b": "bounced",
    "t": "deferred",
    "tq": "deferred",
    "rb": "bounced",
    "f": "complaint",
}
_ACTIONS: Mapping[str, Result] = {"failed": "bounced", "delayed": "deferred"}


def parse_time(text: str, tz: tzinfo = UTC) -> int | None:
    """A PowerMTA time (offset datetime or Unix seconds) in Unix ms, or None."""
    value = text.strip()
    if not value:
        return None
    if value.replace(".", "", 1).isdigit():
        try:
            return round(float(value) * 1000)
        except ValueError:  # pragma: no cover - isdigit() said it was a number
            return None
    for fmt in _TIME_FORMATS:
        try:
            return to_ms(datetime.strptime(value, fmt))
        except ValueError:
            continue
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return to_ms(moment)


class PowerMtaParser:
    """Reads accounting records one physical line at a time.

    `counters`: `lines`, `records`, `events`, `headers` (header lines read), `ignored`
    (record types that are not outcomes), `no_header` (records before any header), `bad`
    (records without a usable type or time, or quoting that never balanced).
    """

    def __init__(self, *, tz: tzinfo = UTC, counters: Counter[str] | None = None) -> None:
        """`tz` is used only for times written without an offset; `counters` may be shared."""
        self._tz = tz
        self._columns: dict[str, int] | None = None
        self._names: tuple[str, ...] | None = None
        self._pending: list[str] = []
        self._quotes = 0
        self.counters: Counter[str] = counters if counters is not None else Counter()

    @property
    def header(self) -> tuple[str, ...] | None:
        """The column names in use, or None before a header was read."""
        return self._names

    def reset(self) -> None:
        """Forget the header and any half-read record: a new file starts."""
        if self._pending:
            self.counters["bad"] += 1
        self._columns = None
        self._names = None
        self._pending = []
        self._quotes = 0

    def feed(self, line: str) -> FeedbackEvent | None:
        """Take one line (without its line feed); return the event it completes, if any.

        Never raises: what cannot be read is counted.
        """
        self.counters["lines"] += 1
        self._pending.append(line)
        self._quotes += line.count('"')
        if self._quotes % 2:
            if (
                len(self._pending) >= _MAX_RECORD_LINES
                or sum(map(len, self._pending)) > _MAX_RECORD_CHARS
            ):
                self._pending = []
                self._quotes = 0
                self.counters["bad"] += 1
            return None
        text = "\n".join(self._pending)
        self._pending = []
        self._quotes = 0
        if not text.strip():
            return None
        try:
            rows = list(csv.reader([text.rstrip("\r")], strict=False))
        except csv.Error:
            self.counters["bad"] += 1
            return None
        if len(rows) != 1:
            self.counters["bad"] += 1
            return None
        return self.record(rows[0])

    def record(self, row: list[str]) -> FeedbackEvent | None:
        """The event of one parsed CSV record (or None: header, ignored or bad)."""
        self.counters["records"] += 1
        first = row[0].strip().lstrip("\ufeff") if row else ""
        if first.lower() == "type":
            self._names = tuple(name.strip().lstrip("\ufeff") for name in row)
            self._columns = {}
            for i, name in enumerate(self._names):
                self._columns.setdefault(name.lower(), i)
            self.counters["headers"] += 1
            return None
        if self._columns is None:
            self.counters["no_header"] += 1
            return None
        event = self._event(row)
        if event is not None:
            self.counters["events"] += 1
        return event

    def _get(self, row: list[str], name: str) -> str:
        """The value of column `name` (case-insensitive), or "" if absent."""
        assert self._columns is not None
        index = self._columns.get(name.lower())
        if index is None or index >= len(row):
            return ""
        return row[index].strip()

    def _event(self, row: list[str]) -> FeedbackEvent | None:
        """Build the event of a data record."""
        kind = row[0].strip().lower()
        result: Result | None
        if kind == "rs":
            result = _ACTIONS.get(self._get(row, "dsnAction").lower())
        else:
            result = _SIMPLE.get(kind)
        if result is None:
            self.counters["ignored"] += 1
            return None
        at_ms = parse_time(self._get(row, "timeLogged"), self._tz)
        if at_ms is None:
            self.counters["bad"] += 1
            return None
        if result == "bounced" and self._get(row, "bounceCat").lower() == "message-expired":
            result = "expired"
        status = _STATUS.match(self._get(row, "dsnStatus"))
        enhanced = normal_enhanced(status["enh"]) if status else None
        diag = self._get(row, "dsnDiag")
        code: int | None = None
        text: str | None = diag or None
        parsed = _DIAG.match(diag)
        if parsed is not None:
            code = int(parsed["code"])
            enhanced = normal_enhanced(parsed["enh"]) or enhanced
            text = parsed["text"].strip() or None
        elif diag and ";" in diag:
            text = diag.split(";", 1)[1].strip() or None
        remote = self._get(row, "dsnMta") or self._get(row, "dlvDestinationIp")
        local = result != "complaint" and (
            "[internal]" in diag.lower() or (not remote and result != "delivered")
        )
        ip = normal_ip(self._get(row, "dlvSourceIp"))
        if ip is None and result == "complaint":
            ip = normal_ip(self._get(row, "repSourceIp"))
        recipient, domain = split_recipient(self._get(row, "rcpt") or self._get(row, "orcpt"))
        message_id = normal_message_id(self._get(row, "header_Message-Id"))
        return FeedbackEvent(
            at_ms=at_ms,
            ip=ip,
            recipient=recipient,
            recipient_domain=domain,
            result=result,
            code=code,
            enhanced=enhanced,
            text=one_line(text),
            local=local,
            command=None,
            message_id=message_id,
            source="powermta",
        )
