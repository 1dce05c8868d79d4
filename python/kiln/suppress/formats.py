"""Suppression list import and export formats: the exports of SendGrid, Mailgun, Amazon SES,
Postmark and SparkPost, kiln's own CSV, and the tables written for MTAs.

`scan` reads one file as a stream of `ImportedEvent` (one suppression each) and
`ImportProblem` (one line it could not read, with file:line). It never holds the file in
memory: CSV is read line by line, JSON record by record (a top-level array, an object holding
the records, or JSON Lines), so a 5 GB export takes as little memory as a small one. It decides
nothing about what to keep: duplicates pass through, and a caller that must import all or
nothing collects the problems first. `write` writes the list back out (CSV, JSON Lines, a
Postfix access(5) table, a PowerMTA address list). docs/suppression.md describes every format.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import gzip
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, BinaryIO, Final, Literal, TextIO, cast, get_args

from kiln.suppress.address import AddressError, normalise

__all__ = [
    "EVENT_TYPES",
    "EXPORT_FORMATS",
    "EXPORT_KINDS",
    "SOURCES",
    "EventType",
    "ImportProblem",
    "ImportedEvent",
    "ListedAddress",
    "iso_time",
    "scan",
    "write",
]

EventType = Literal["hard_bounce", "complaint", "unsubscribe", "manual", "soft_bounce"]
#: Every event type a suppression can carry.
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)
#: The `source` names `scan` reads.
SOURCES: Final = ("sendgrid", "mailgun", "ses", "postmark", "sparkpost", "csv")
#: The formats `write` writes.
EXPORT_FORMATS: Final = ("csv", "jsonl", "postfix", "pmta")
#: Evidence text (a bounce reply, a description) is cut to this many characters.
EVIDENCE_TEXT_CHARS: Final = 500
#: A CSV line longer than this (bytes) is reported and skipped, never held in memory.
MAX_LINE_BYTES: Final = 1 << 20
#: A JSON record (one array element, one JSON Lines object) larger than this is refused.
MAX_RECORD_CHARS: Final = 1 << 20
#: JSON is read in pieces of this many characters.
READ_CHUNK_CHARS: Final = 1 << 16
#: Integer timestamps at or above this are milliseconds, below it seconds (1e11 s is the year
#: 5138; 1e11 ms is March 1973).
_MS_THRESHOLD: Final = 10**11


@dataclass(frozen=True, slots=True)
class ImportedEvent:
    """One suppression read from an import file.

    `address` is normalised (`kiln.suppress.address.normalise`); `at_ms` is the time the
    provider recorded (Unix milliseconds), None when the row has none; `scope` is None for a
    global suppression; `source` is `import:<provider>`; `evidence` holds the row's `line`, the
    export `kind`, the provider's `reason` text (at most 500 characters) and any other
    provider field worth keeping (status, code, origin, ip).
    """

    address: str
    event: EventType
    at_ms: int | None
    scope: str | None
    source: str
    evidence: dict[str, str | int]


@dataclass(frozen=True, slots=True)
class ImportProblem:
    """A line of an import file that gave no event (or the reason a whole file gave none).

    `line` is 1-based; 0 means the file as a whole (it could not be opened).
    """

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        """`file:line: message`, like kiln's other problems."""
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class ListedAddress:
    """One address on the live list, as `write` exports it: its latest event, when it was
    recorded and when it expires (Unix milliseconds; None: never), and its scope (None:
    global)."""

    address: str
    event: EventType
    at_ms: int | None
    expires_ms: int | None
    scope: str | None


# --------------------------------------------------------------------------------------------
# What each provider exports


_NOT_KEY: Final = re.compile(r"[^0-9a-z]")


@dataclass(frozen=True, slots=True)
class _Export:
    """One kind of export of one provider, recognised by its columns or JSON keys.

    Keys are compared normalised (`_key`): lower case, letters and digits only, so
    `EmailAddress`, `email_address` and `Email Address` are one key.
    """

    provider: str
    kind: str
    label: str
    address_key: str
    #: Keys that must be present to read this export at all.
    required: frozenset[str]
    #: Keys that tell this export apart from the provider's others (all must be present).
    marks: frozenset[str] = frozenset()
    #: Keys that must not be present (they belong to another export).
    absent: frozenset[str] = frozenset()
    #: Words in the file name that name this export when the columns alone cannot.
    hints: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1024)
def _key(name: str) -> str:
    """A column or JSON key compared loosely: lower case, letters and digits only."""
    return _NOT_KEY.sub("", name.strip().lower())


def _keys(*names: str) -> frozenset[str]:
    """A frozen set of normalised keys."""
    return frozenset(_key(n) for n in names)


_PROVIDER_NAMES: Final = {
    "sendgrid": "SendGrid",
    "mailgun": "Mailgun",
    "ses": "Amazon SES",
    "postmark": "Postmark",
    "sparkpost": "SparkPost",
    "csv": "kiln CSV",
}

#: Every export `scan` reads, per provider, most specific first.
_EXPORTS: Final[dict[str, tuple[_Export, ...]]] = {
    "sendgrid": (
        _Export(
            "sendgrid",
            "spam_reports",
            "SendGrid spam reports",
            "email",
            _keys("email"),
            marks=_keys("ip"),
            hints=("spam",),
        ),
        _Export(
            "sendgrid",
            "bounces",
            "SendGrid bounces",
            "email",
            _keys("email"),
            marks=_keys("reason", "status"),
            hints=("bounce",),
        ),
        _Export(
            "sendgrid",
            "blocks",
            "SendGrid blocks",
            "email",
            _keys("email"),
            marks=_keys("reason", "status"),
            hints=("block",),
        ),
        _Export(
            "sendgrid",
            "invalid_emails",
            "SendGrid invalid emails",
            "email",
            _keys("email"),
            marks=_keys("reason"),
            absent=_keys("status", "ip"),
            hints=("invalid",),
        ),
        _Export(
            "sendgrid",
            "unsubscribes",
            "SendGrid unsubscribes",
            "email",
            _keys("email"),
            absent=_keys("reason", "status", "ip", "event"),
            hints=("unsub", "suppression", "group"),
        ),
    ),
    "mailgun": (
        _Export(
            "mailgun",
            "bounces",
            "Mailgun bounces",
            "address",
            _keys("address"),
            marks=_keys("error"),
            absent=_keys("event"),
            hints=("bounce",),
        ),
        _Export(
            "mailgun",
            "bounces",
            "Mailgun bounces",
            "address",
            _keys("address"),
            marks=_keys("code"),
            absent=_keys("event"),
            hints=("bounce",),
        ),
        _Export(
            "mailgun",
            "unsubscribes",
            "Mailgun unsubscribes",
            "address",
            _keys("address"),
            marks=_keys("tags"),
            absent=_keys("event"),
            hints=("unsub",),
        ),
        _Export(
            "mailgun",
            "complaints",
            "Mailgun complaints",
            "address",
            _keys("address"),
            absent=_keys("code", "error", "tags", "event"),
            hints=("complain", "spam"),
        ),
    ),
    "ses": (
        _Export(
            "ses",
            "suppressed_destinations",
            "Amazon SES account-level suppression list",
            "emailaddress",
            _keys("emailaddress", "reason"),
            absent=_keys("suppressionreason"),
        ),
    ),
    "postmark": (
        _Export(
            "postmark",
            "suppressions",
            "Postmark suppression dump",
            "emailaddress",
            _keys("emailaddress", "suppressionreason"),
        ),
    ),
    "sparkpost": (
        _Export(
            "sparkpost",
            "suppression_list",
            "SparkPost suppression list",
            "recipient",
            _keys("recipient"),
        ),
    ),
    "csv": (_Export("csv", "events", "kiln CSV", "address", _keys("address", "event")),),
}
#: The export kinds each provider has, for a caller that names one (`scan(kind=...)`).
EXPORT_KINDS: Final = {p: tuple(dict.fromkeys(e.kind for e in ex)) for p, ex in _EXPORTS.items()}
#: The JSON key holding the records, per provider (None: a top-level array).
_CONTAINERS: Final = {
    "items": "mailgun",
    "suppresseddestinationsummaries": "ses",
    "suppressions": "postmark",
    "results": "sparkpost",
}


def _detect(provider: str, keys: frozenset[str], hint: str, kind: str | None) -> _Export | None:
    """The export of `provider` that a file with these keys (and this file name) is, if any.

    The columns decide first; the file name (`hint`) only chooses among exports that the
    columns cannot tell apart (SendGrid's bounces and blocks), or names an export whose telling
    column is missing when the columns point to no export with a telling column at all.
    """
    readable = [e for e in _EXPORTS[provider] if e.required <= keys]
    if kind is not None:
        return next((e for e in readable if e.kind == kind), None)
    allowed = [e for e in readable if not (e.absent & keys)]
    fitting = [e for e in allowed if e.marks <= keys]
    named = [e for e in allowed if any(h in hint for h in e.hints)]
    for export in fitting:
        if export in named:
            return export
    if named and not any(e.marks for e in fitting):
        return named[0]
    return fitting[0] if fitting else None


def _a(noun: str) -> str:
    """`noun` with its indefinite article."""
    return f"{'an' if noun[:1] in 'AEIOU' else 'a'} {noun}"


def _misfit(provider: str, keys: frozenset[str], shown: str, container: str | None) -> str:
    """Why a file is not an export of `provider`: whose export it looks like, if anyone's, or
    which required column it lacks.

    A file that has the provider's address column is taken to be the provider's export with a
    column missing, unless another provider's export matches on more than an address column.
    """
    other = _CONTAINERS.get(_key(container or ""))
    name = _PROVIDER_NAMES[provider]
    if other is not None and other != provider:
        return (
            f"this looks like {_a(_PROVIDER_NAMES[other])} export (records under {container!r}),"
            f" not {name}; import it with --from {other}"
        )
    has_address = any(e.address_key in keys for e in _EXPORTS[provider])
    for candidate in _EXPORTS:
        if candidate == provider:
            continue
        export = _detect(candidate, keys, "", None)
        if export is not None and (not has_address or len(export.required) > 1):
            return (
                f"this looks like {_a(export.label)} export ({shown}), not {name};"
                f" import it with --from {candidate}"
            )
    missing = min((sorted(e.required - keys) for e in _EXPORTS[provider]), key=len)
    if missing:
        return (
            f"not a {name} export: {shown}; missing required"
            f" {'column' if len(missing) == 1 else 'columns'} {', '.join(missing)}"
            " (names compared case-insensitively, ignoring '_' and spaces)"
        )
    return f"not a {name} export: {shown} match none of its exports"


# --------------------------------------------------------------------------------------------
# Rows to events


class _RowError(ValueError):
    """A row that cannot become an event; the message says why."""


@dataclass(frozen=True, slots=True)
class _Mapped:
    """What one row says: its event, raw time, scope and evidence (before the address)."""

    event: EventType
    at: object
    scope: str | None
    reason: object = None
    extra: tuple[tuple[str, object], ...] = ()


def _text(value: object) -> str:
    """A field as text ('' for None); JSON lists and objects as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _map_sendgrid(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """SendGrid: bounces (a 4.x.x status is a soft bounce), blocks (soft bounces), invalid
    emails (hard bounces), spam reports (complaints), unsubscribes (global or a group)."""
    at, reason, status = row.get("created"), row.get("reason"), _text(row.get("status"))
    extra = (("status", status),) if status else ()
    match export.kind:
        case "bounces":
            soft = status.startswith("4")
            return [_Mapped("soft_bounce" if soft else "hard_bounce", at, None, reason, extra)]
        case "blocks":
            return [_Mapped("soft_bounce", at, None, reason, extra)]
        case "invalid_emails":
            return [_Mapped("hard_bounce", at, None, reason)]
        case "spam_reports":
            return [_Mapped("complaint", at, None, None, (("ip", _text(row.get("ip"))),))]
        case _:
            group = _text(row.get("groupname")) or _text(row.get("groupid"))
            when = at if at is not None else row.get("createdat")
            return [_Mapped("unsubscribe", when, f"group:{group}" if group else None)]


def _mailgun_tags(value: object) -> list[str]:
    """Mailgun's unsubscribe `tags`: a JSON list, or its text in a CSV cell (`["*"]`, `a,b`)."""
    if isinstance(value, list):
        items = [_text(v) for v in value]
    else:
        items = re.split(r"[,\s]+", re.sub(r"[\[\]\"']", " ", _text(value)))
    return [t for t in items if t]


def _map_mailgun(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """Mailgun: bounces (a 4xx code is a soft bounce), complaints, unsubscribes (tag `*` or
    no tag: global; otherwise one event per tag, scoped `tag:<tag>`)."""
    at = row.get("createdat")
    match export.kind:
        case "bounces":
            code = _text(row.get("code"))
            event: EventType = "soft_bounce" if code.startswith("4") else "hard_bounce"
            return [_Mapped(event, at, None, row.get("error"), (("code", code),) if code else ())]
        case "complaints":
            return [_Mapped("complaint", at, None)]
        case _:
            tags = _mailgun_tags(row.get("tags"))
            if not tags or "*" in tags:
                return [_Mapped("unsubscribe", at, None)]
            return [_Mapped("unsubscribe", at, f"tag:{t}") for t in dict.fromkeys(tags)]


def _map_ses(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """Amazon SES: Reason BOUNCE (SES lists hard bounces only) or COMPLAINT."""
    reason = _text(row.get("reason")).upper()
    events: dict[str, EventType] = {"BOUNCE": "hard_bounce", "COMPLAINT": "complaint"}
    if reason not in events:
        raise _RowError(f"unknown SES Reason {reason!r} (expected BOUNCE or COMPLAINT)")
    return [_Mapped(events[reason], row.get("lastupdatetime"), None, None, (("reason", reason),))]


def _map_postmark(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """Postmark: HardBounce, SpamComplaint, ManualSuppression (an unsubscribe when its Origin
    is Recipient, an operator's suppression when Customer or Admin)."""
    reason = _text(row.get("suppressionreason"))
    origin = _text(row.get("origin"))
    extra = (("reason", reason), ("origin", origin))
    match reason.lower():
        case "hardbounce":
            event: EventType = "hard_bounce"
        case "spamcomplaint":
            event = "complaint"
        case "manualsuppression":
            event = "unsubscribe" if origin.lower() == "recipient" else "manual"
        case _:
            raise _RowError(
                f"unknown Postmark SuppressionReason {reason!r}"
                " (expected HardBounce, SpamComplaint or ManualSuppression)"
            )
    return [_Mapped(event, row.get("createdat"), None, None, extra)]


_SPARKPOST_SOURCES: Final[dict[str, EventType]] = {
    "spam complaint": "complaint",
    "list unsubscribe": "unsubscribe",
    "unsubscribe link": "unsubscribe",
    "bounce rule": "hard_bounce",
    "manually added": "manual",
    "compliance": "manual",
}


def _flag(value: object) -> bool:
    """A SparkPost boolean column (`true`, `1`, `yes`, or a JSON true)."""
    return value is True or _text(value).lower() in {"true", "1", "yes", "y"}


def _map_sparkpost(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """SparkPost: the event from `source` (unknown or missing: manual), the scope from `type`
    (or the older `transactional` / `non_transactional` flags): one stream, or global."""
    source = _text(row.get("source"))
    event = _SPARKPOST_SOURCES.get(source.lower(), "manual")
    kind = _text(row.get("type")).lower()
    if kind in {"transactional", "non_transactional"}:
        scope: str | None = f"stream:{kind}"
    else:
        flags = [k for k in ("transactional", "nontransactional") if _flag(row.get(k))]
        scope = "stream:non_transactional" if flags == ["nontransactional"] else None
        if flags == ["transactional"]:
            scope = "stream:transactional"
    at = row.get("created") or row.get("updated")
    extra = (("sparkpost_source", source),) if source else ()
    return [_Mapped(event, at, scope, row.get("description"), extra)]


def _map_csv(export: _Export, row: dict[str, object]) -> list[_Mapped]:
    """kiln's own CSV: `address,event[,at][,expires_at][,scope][,reason]`."""
    event = _text(row.get("event")).lower()
    if event not in EVENT_TYPES:
        raise _RowError(f"unknown event {event!r} (expected one of {', '.join(EVENT_TYPES)})")
    extra: tuple[tuple[str, object], ...] = ()
    expires = _text(row.get("expiresat"))
    if expires:
        expires_ms = _time_ms(expires)
        extra = (("expires_ms", expires_ms),) if expires_ms is not None else ()
    scope = _text(row.get("scope")) or None
    return [_Mapped(cast(EventType, event), row.get("at"), scope, row.get("reason"), extra)]


_MAPPERS: Final[dict[str, Callable[[_Export, dict[str, object]], list[_Mapped]]]] = {
    "sendgrid": _map_sendgrid,
    "mailgun": _map_mailgun,
    "ses": _map_ses,
    "postmark": _map_postmark,
    "sparkpost": _map_sparkpost,
    "csv": _map_csv,
}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LONG_FRACTION: Final = re.compile(r"(\.\d{6})\d+")


def _time_ms(value: object) -> int | None:
    """A provider timestamp as Unix milliseconds (None when empty).

    Reads Unix seconds or milliseconds (numbers or digit strings, see `_MS_THRESHOLD`),
    ISO 8601 (`2019-12-17T08:58:33-05:00`, `2014-12-06 08:34:48`, a `Z` suffix, up to 7
    fraction digits) and RFC 2822 (`Fri, 21 Oct 2011 11:02:55 UTC`). A time without a zone is
    UTC. Raises `_RowError` for anything else.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = _text(value)
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return _text_time_ms(text)
    if number != number or abs(number) > 1e16:  # NaN or absurd
        raise _RowError(f"timestamp {value!r} is out of range")
    return round(number) if abs(number) >= _MS_THRESHOLD else round(number * 1000)


#: RFC 2822 as Mailgun writes it, read without the general parser's cost.
_RFC2822: Final = re.compile(
    r"(?:[A-Za-z]{3}, )?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) (UTC|GMT|[+-]\d{4})"
)
_MONTHS: Final = {
    m: n
    for n, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}


def _rfc2822_ms(text: str) -> int | None:
    """The common RFC 2822 form (`Fri, 21 Oct 2011 11:02:55 UTC`, or a `+hhmm` zone) as Unix
    milliseconds; None for any other text (the general parser then tries it)."""
    found = _RFC2822.fullmatch(text)
    month = _MONTHS.get(found[2].lower(), 0) if found else 0
    if found is None or not month:
        return None
    day, year, hour, minute, second = (int(found[i]) for i in (1, 3, 4, 5, 6))
    zone = found[7]
    offset_min = (
        0 if zone in {"UTC", "GMT"} else int(zone[0] + "1") * (int(zone[1:3]) * 60 + int(zone[3:]))
    )
    try:
        when = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    return (when - _EPOCH) // timedelta(milliseconds=1) - offset_min * 60_000


def _text_time_ms(text: str) -> int:
    """An ISO 8601 or RFC 2822 time as Unix milliseconds, or `_RowError`."""
    when: datetime | None = None
    if not text[:1].isdigit() and (fast_ms := _rfc2822_ms(text)) is not None:
        return fast_ms
    if text[:1].isdigit():
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(_LONG_FRACTION.sub(r"\1", text))
    if when is None:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            when = _us_time(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(milliseconds=1)


#: Month-first forms that US providers' web apps print (`03/01/2026 08:00:00`, `... 8:00 AM`).
_US_FORMATS: Final = (
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %I:%M %p",
    "%m/%d/%Y",
)


def _us_time(text: str) -> datetime:
    """A month-first US-style time (no zone), or `_RowError`."""
    for form in _US_FORMATS:
        try:
            return datetime.strptime(text, form)  # zone-less: the caller reads it as UTC
        except ValueError:
            continue
    raise _RowError(
        f"unreadable timestamp {text!r} (expected Unix seconds, ISO 8601, RFC 2822 or MM/DD/YYYY)"
    )


# --------------------------------------------------------------------------------------------
# Reading files


class _FileError(Exception):
    """The file as a whole cannot be read further; `line` is where reading stopped."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _open(path: Path) -> IO[bytes]:
    """The file as bytes, gzip-decompressed when it starts with the gzip magic number."""
    raw = path.open("rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.close()
        return cast(IO[bytes], gzip.open(path, "rb"))
    raw.seek(0)
    return raw


def _first_char(raw: IO[bytes]) -> str:
    """The first character that is not white space (a BOM skipped), without consuming it."""
    head = raw.read(4096)
    raw.seek(0)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise _FileError(1, "the file is UTF-16; convert it to UTF-8 first")
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    return chr(text[0]) if text else ""


class _Lines:
    """The lines of a CSV file as text, one at a time, with the lines that could not be read
    (invalid UTF-8, too long) remembered by number until their row claims them."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.number = 0
        self.bad: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        """Each line, decoded; a bad line is replaced (and noted in `bad`)."""
        while True:
            data = self._raw.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            self.number += 1
            if self.number == 1:
                data = data.removeprefix(codecs.BOM_UTF8)
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                while (more := self._raw.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                    pass
                self.bad[self.number] = f"line longer than {MAX_LINE_BYTES} bytes, skipped"
                yield "\n"
                continue
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as exc:
                shown = data.decode("utf-8", errors="replace").rstrip("\r\n")
                self.bad[self.number] = (
                    f"invalid UTF-8 at byte {exc.start + 1} of the line (shown with"
                    f" replacement characters): {_cut(shown, 200)!r}"
                )
                yield shown + "\n"

    def claim(self, first: int, last: int) -> str | None:
        """The problem of the first bad line among lines first..last, forgetting them all."""
        found = None
        for n in range(first, last + 1):
            message = self.bad.pop(n, None)
            if found is None and message is not None:
                found = message
        return found


def _delimiter(line: str) -> str:
    """The header line's delimiter: a comma, or a semicolon or tab when it has no comma."""
    if "," in line:
        return ","
    for candidate in (";", "\t"):
        if candidate in line:
            return candidate
    return ","


def _csv_rows(raw: IO[bytes]) -> Iterator[tuple[int, dict[str, object] | str, list[str]]]:
    """(line, row or problem, header) for each row of a CSV file after its header.

    The row maps normalised column names to cells; a problem is a message for that line.
    The header is the first non-blank line.
    """
    lines = _Lines(raw)
    source = iter(lines)
    first = next(source, None)
    if first is None:
        raise _FileError(1, "the file is empty")
    reader = csv.reader(itertools.chain([first], source), delimiter=_delimiter(first))
    header: list[str] | None = None
    columns: list[str] = []
    keys: list[str] = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            lines.claim(start, reader.line_num)
            yield reader.line_num, f"unreadable CSV: {exc}", columns
            continue
        bad = lines.claim(start, reader.line_num)
        if header is None:
            if bad is not None:
                raise _FileError(start, f"header: {bad}")
            if not any(c.strip() for c in cells):
                continue
            header = cells
            columns = [c.strip() for c in cells]
            keys = [_key(c) for c in cells]
            yield start, {"__header__": keys}, columns
            continue
        if bad is not None:
            yield start, bad, columns
            continue
        if not any(c.strip() for c in cells):
            continue
        row: dict[str, object] = {}
        for key, cell in zip(keys, cells, strict=False):
            row.setdefault(key, cell)
        yield start, row, columns


class _JsonReader:
    """JSON records read piece by piece from a text stream: the elements of a top-level array,
    of the record array inside a top-level object (`items`, `results`...), or each object of
    JSON Lines. Memory holds one record at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._line = 1
        self._counted = 0
        self._decoder = json.JSONDecoder()
        #: Whether any text read so far holds U+FFFD, the mark of undecodable bytes.
        self.replaced = False

    def line(self) -> int:
        """The line number of the current position."""
        self._line += self._buf.count("\n", self._counted, self._pos)
        self._counted = self._pos
        return self._line

    def _fill(self) -> bool:
        """Read more text into the buffer, dropping what was consumed; False at the end."""
        if self._eof:
            return False
        self.line()
        chunk = self._stream.read(READ_CHUNK_CHARS)
        self.replaced = self.replaced or "\ufffd" in chunk
        self._buf = self._buf[self._pos :] + chunk
        self._pos = self._counted = 0
        if not chunk:
            self._eof = True
        return bool(chunk)

    def peek(self) -> str:
        """The next character that is not white space ('' at the end), not consumed."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def take(self, expected: str) -> None:
        """Consume the character `expected`, or raise `_FileError`."""
        found = self.peek()
        if found != expected:
            raise _FileError(
                self.line(),
                f"malformed JSON: expected {expected!r}, found {found or 'the end of the file'!r}",
            )
        self._pos += 1

    def value(self) -> object:
        """Decode the next JSON value whole (at most `MAX_RECORD_CHARS`)."""
        self.peek()
        while True:
            try:
                found, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if len(self._buf) - self._pos <= MAX_RECORD_CHARS and self._fill():
                    continue  # the value may go on in the next piece
                self._pos = exc.pos
                raise _FileError(
                    self.line(),
                    f"malformed JSON ({exc.msg}), or a record over {MAX_RECORD_CHARS} characters",
                ) from None
            if end == len(self._buf) and self._fill():
                continue  # a number or literal may go on in the next piece
            self._pos = end
            return found

    def records(self) -> Iterator[tuple[int, str | None, object]]:
        """(line, container key or None, record) for every record of the stream."""
        while first := self.peek():
            if first == "[":
                yield from self._array(None)
            elif first == "{":
                yield from self._object()
            else:
                raise _FileError(self.line(), f"malformed JSON: unexpected {first!r}")

    def _array(self, container: str | None) -> Iterator[tuple[int, str | None, object]]:
        """The elements of the array starting here."""
        self.take("[")
        while (ahead := self.peek()) != "]":
            if ahead == ",":
                self._pos += 1
                continue
            if not ahead:
                raise _FileError(self.line(), "malformed JSON: the file ends inside an array")
            line = self.line()
            yield line, container, self.value()
        self._pos += 1

    def _object(self) -> Iterator[tuple[int, str | None, object]]:
        """A top-level object: its record array streamed, or the object itself as a record."""
        line = self.line()
        self.take("{")
        fields: dict[str, object] = {}
        streamed = False
        while (ahead := self.peek()) != "}":
            if ahead == ",":
                self._pos += 1
                continue
            if not ahead:
                raise _FileError(self.line(), "malformed JSON: the file ends inside an object")
            name = self.value()
            if not isinstance(name, str):
                raise _FileError(self.line(), "malformed JSON: an object key is not a string")
            self.take(":")
            if _key(name) in _CONTAINERS and self.peek() == "[":
                streamed = True
                yield from self._array(name)
            else:
                fields[name] = self.value()
        self._pos += 1
        if not streamed:
            yield line, None, fields


def _json_rows(
    raw: IO[bytes], provider: str
) -> Iterator[tuple[int, dict[str, object] | str, str | None]]:
    """(line, row or problem, container key) for every JSON record of the file."""
    stream = io.TextIOWrapper(cast(BinaryIO, raw), encoding="utf-8-sig", errors="replace")
    try:
        reader = _JsonReader(stream)
        for line, container, record in reader.records():
            if isinstance(record, str) and provider == "sendgrid":
                record = {"email": record}  # an unsubscribe group's members: bare addresses
            if not isinstance(record, dict):
                yield line, f"a record is a JSON {type(record).__name__}, not an object", container
                continue
            row = {_key(k): v for k, v in record.items()}
            if reader.replaced and any("\ufffd" in _text(v) for v in row.values()):
                shown = _cut(json.dumps(record, ensure_ascii=False), 200)
                yield (
                    line,
                    f"invalid UTF-8 in this record (shown with replacements): {shown}",
                    container,
                )
                continue
            yield line, row, container
    finally:
        stream.detach()  # the caller closes the file


def _cut(text: str, limit: int = EVIDENCE_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters (an ellipsis marks a cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def scan(
    source: str,
    path: Path,
    *,
    fold_case: bool = False,
    kind: str | None = None,
    scope: str | None = None,
) -> Iterator[ImportedEvent | ImportProblem]:
    """Every suppression event of the export `path` from `source` (one of `SOURCES`), and a
    problem for every line that gave none, in file order.

    CSV (by header, case-insensitive, BOM allowed, extra columns ignored, `,` `;` or tab) and
    JSON (a top-level array, the provider's object holding its records, or JSON Lines) are
    told apart by the first character; gzip-compressed files are read as they are. The export
    kind (bounces, spam reports...) is found from the columns or keys, then from words in the
    file name; `kind` (one of `EXPORT_KINDS[source]`) names it outright. A file that is not an
    export of `source` gives one problem naming what it looks like, and nothing else.
    `fold_case` folds the local part of every address; `scope` applies to every event whose
    row does not carry a scope of its own.
    """
    if source not in _EXPORTS:
        raise ValueError(f"unknown import source {source!r}; expected one of {', '.join(SOURCES)}")
    if kind is not None and kind not in EXPORT_KINDS[source]:
        raise ValueError(f"{source} has no export kind {kind!r}: {', '.join(EXPORT_KINDS[source])}")
    shown = str(path)
    try:
        raw = _open(path)
    except OSError as exc:
        yield ImportProblem(shown, 0, f"cannot read the file: {exc.strerror or exc}")
        return
    with raw:
        try:
            yield from _scan_open(source, path, raw, fold_case, kind, scope)
        except _FileError as exc:
            yield ImportProblem(shown, exc.line, exc.message)
        except OSError as exc:  # a truncated gzip stream, a read error
            yield ImportProblem(shown, 0, f"cannot read the file: {exc}")


def _scan_open(
    source: str,
    path: Path,
    raw: IO[bytes],
    fold_case: bool,
    kind: str | None,
    scope: str | None,
) -> Iterator[ImportedEvent | ImportProblem]:
    """`scan` on an open file."""
    shown, hint, label = str(path), path.name.lower(), f"import:{source}"
    mapper = _MAPPERS[source]
    export: _Export | None = None
    if _first_char(raw) in {"[", "{"}:
        if source == "csv":
            raise _FileError(1, "this is JSON; kiln's csv import reads CSV (address,event,...)")
        for line, row, container in _json_rows(raw, source):
            if isinstance(row, str):
                yield ImportProblem(shown, line, row)
                continue
            if export is None:
                keys = frozenset(row)
                export = _detect(source, keys, hint, kind)
                if export is None or _CONTAINERS.get(_key(container or ""), source) != source:
                    shown_keys = "keys " + ", ".join(sorted(row)) if row else "no keys"
                    raise _FileError(line, _misfit(source, keys, shown_keys, container))
            yield from _row_items(export, mapper, row, line, shown, label, fold_case, scope)
        return
    for line, row, columns in _csv_rows(raw):
        if isinstance(row, str):
            yield ImportProblem(shown, line, row)
            continue
        header = row.get("__header__")
        if isinstance(header, list):
            keys = frozenset(str(k) for k in header)
            export = _detect(source, keys, hint, kind)
            if export is None:
                listed = (
                    "columns " + ", ".join(c for c in columns if c) if columns else "no columns"
                )
                raise _FileError(line, _misfit(source, keys, listed, None))
            continue
        assert export is not None  # the header comes first
        yield from _row_items(export, mapper, row, line, shown, label, fold_case, scope)


def _row_items(
    export: _Export,
    mapper: Callable[[_Export, dict[str, object]], list[_Mapped]],
    row: dict[str, object],
    line: int,
    shown: str,
    label: str,
    fold_case: bool,
    scope: str | None,
) -> list[ImportedEvent | ImportProblem]:
    """The events one row gives (usually one; a Mailgun unsubscribe from several tags gives
    one per tag), or the row's one problem."""
    raw_address = _text(row.get(export.address_key))
    if not raw_address:
        return [
            ImportProblem(shown, line, f"no address (the {export.address_key!r} field is empty)")
        ]
    try:
        address = normalise(raw_address, fold_case=fold_case)
        mapped = mapper(export, row)
        times = [_time_ms(m.at) for m in mapped]
    except (AddressError, _RowError) as exc:
        return [ImportProblem(shown, line, str(exc))]
    items: list[ImportedEvent | ImportProblem] = []
    for m, at_ms in zip(mapped, times, strict=True):
        evidence: dict[str, str | int] = {"line": line, "kind": export.kind}
        reason = _text(m.reason)
        if reason:
            evidence["reason"] = _cut(reason)
        for name, value in m.extra:
            if isinstance(value, int) and not isinstance(value, bool):
                evidence[name] = value
            elif text := _text(value):
                evidence.setdefault(name, _cut(text))
        items.append(ImportedEvent(address, m.event, at_ms, m.scope or scope, label, evidence))
    return items


# --------------------------------------------------------------------------------------------
# Writing


def iso_time(time_ms: int | None) -> str:
    """Unix milliseconds as ISO 8601 UTC (`2026-03-10T14:02:11Z`, milliseconds shown only when
    not zero); '' for None. `scan` reads it back to the same millisecond."""
    if time_ms is None:
        return ""
    when = _EPOCH + timedelta(milliseconds=time_ms)
    fraction = f".{time_ms % 1000:03d}" if time_ms % 1000 else ""
    return when.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _mta_key(entry: ListedAddress) -> str | None:
    """The address as an MTA table key (Postfix folds keys to lower case before lookup), or
    None when such a table cannot hold it: white space (a quoted local part) or a leading `#`
    (a comment line)."""
    key = entry.address.lower()
    if re.search(r"\s", key) or key.startswith("#"):
        return None
    return key


def write(
    fmt: str, entries: Iterable[ListedAddress], out: TextIO, *, now_ms: int | None = None
) -> int:
    """Write `entries` to `out` in the format `fmt` (one of `EXPORT_FORMATS`); return how many
    were written. One pass over `entries`, nothing held in memory.

    - `csv`: header `address,event,at,expires_at,scope`, times as ISO 8601 UTC (`iso_time`);
      `scan("csv", ...)` reads it back.
    - `jsonl`: one object a line: `address`, `event`, `at_ms`, `expires_ms`, `scope`.
    - `postfix`: an access(5) table for `check_recipient_access`, one
      `address REJECT 5.7.1 ...` line per address.
    - `pmta`: one address a line (see docs/suppression.md on what is confirmed).

    With `now_ms`, entries that expired by then are left out. The MTA tables hold global
    suppressions only (an MTA cannot tell a stream or tenant apart), and leave out addresses a
    table line cannot hold (white space in a quoted local part, a leading `#`): kiln's own
    send-time check still covers those.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}"
        )
    live = (e for e in entries if now_ms is None or e.expires_ms is None or e.expires_ms > now_ms)
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["address", "event", "at", "expires_at", "scope"])
        for entry in live:
            writer.writerow(
                [
                    entry.address,
                    entry.event,
                    iso_time(entry.at_ms),
                    iso_time(entry.expires_ms),
                    entry.scope or "",
                ]
            )
            count += 1
        return count
    if fmt == "jsonl":
        for entry in live:
            record = {
                "address": entry.address,
                "event": entry.event,
                "at_ms": entry.at_ms,
                "expires_ms": entry.expires_ms,
                "scope": entry.scope,
            }
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
        return count
    for entry in live:
        key = _mta_key(entry) if entry.scope is None else None
        if key is None:
            continue
        if fmt == "postfix":
            out.write(f"{key} REJECT 5.7.1 Recipient address suppressed ({entry.event})\n")
        else:
            out.write(f"{key}\n")
        count += 1
    return count
