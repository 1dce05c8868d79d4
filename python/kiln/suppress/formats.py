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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, Literal, Protocol, TextIO, TypeVar, cast, get_args

from kiln import _core
from kiln.suppress.address import AddressError, normalise

__all__ = [
    "BATCH_ROWS",
    "EVENT_TYPES",
    "EXPORT_FORMATS",
    "EXPORT_KINDS",
    "SOURCES",
    "EventBatch",
    "EventType",
    "ImportProblem",
    "ImportedEvent",
    "ListedAddress",
    "iso_time",
    "scan",
    "scan_batches",
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
#: CSV is read in blocks of this many bytes (at most half of `MAX_LINE_BYTES`).
CSV_BLOCK_BYTES: Final = 1 << 17
#: Rows (records) in a batch of `scan_batches`, unless told otherwise.
BATCH_ROWS: Final = 4096
#: Rows in a batch when `scan` reads: small, as it makes an object per event anyway.
_SCAN_ROWS: Final = 256
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


@dataclass(slots=True)
class EventBatch:
    """The events of consecutive rows of one import file as columns (one entry per event, in
    file order) and the problems of those rows: what `scan_batches` yields, with nothing made
    per event but the entries of these lists.

    `evidence` holds each event's evidence as the JSON text the log keeps (keys sorted);
    `problem_after` says, for each problem, how many of the batch's events come before it.
    """

    source: str
    addresses: list[str] = field(default_factory=list)
    events: list[EventType] = field(default_factory=list)
    at_ms: list[int | None] = field(default_factory=list)
    scopes: list[str | None] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    problems: list[ImportProblem] = field(default_factory=list)
    problem_after: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        """How many events."""
        return len(self.addresses)

    def items(self) -> Iterator[ImportedEvent | ImportProblem]:
        """The events and problems in file order, as `scan` yields them."""
        shown = 0
        for before, problem in zip(self.problem_after, self.problems, strict=True):
            yield from self._events(shown, before)
            shown = before
            yield problem
        yield from self._events(shown, len(self))

    def _events(self, start: int, stop: int) -> Iterator[ImportedEvent]:
        """Events start..stop as objects."""
        for i in range(start, stop):
            evidence: dict[str, str | int] = json.loads(self.evidence[i])
            yield ImportedEvent(
                self.addresses[i],
                self.events[i],
                self.at_ms[i],
                self.scopes[i],
                self.source,
                evidence,
            )


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


_HARD: Final[EventType] = "hard_bounce"
_SOFT: Final[EventType] = "soft_bounce"
_COMPLAINT: Final[EventType] = "complaint"
_UNSUBSCRIBE: Final[EventType] = "unsubscribe"
_MANUAL: Final[EventType] = "manual"


class _Table:
    """Consecutive rows of one file, read a column at a time by key (`_key`): what a mapper
    reads. CSV rows come as columns of cells (None past a short row's end; `trimmed` marks
    the columns whose every cell is there and trimmed already), JSON records stay records; a
    column is taken out when asked, and its text kept for the next ask."""

    __slots__ = ("_columns", "_index", "_records", "_texts", "_trimmed", "lines", "n")

    def __init__(
        self,
        lines: list[int],
        columns: Sequence[list[str | None]] = (),
        index: dict[str, int] | None = None,
        records: list[dict[str, object]] | None = None,
        *,
        trimmed: Sequence[bool] = (),
    ) -> None:
        self.lines = lines
        self.n = len(lines)
        self._columns = columns
        self._index = index or {}
        self._records = records
        self._trimmed = trimmed
        self._texts: dict[str, list[str]] = {}

    def has(self, key: str) -> bool:
        """Whether any row has the column or field `key`."""
        if self._records is not None:
            return any(key in r for r in self._records)
        return key in self._index

    def raw(self, key: str) -> Sequence[object]:
        """The column `key` as read: text in CSV, any JSON value; None where a row lacks it."""
        if self._records is not None:
            return [r.get(key) for r in self._records]
        column = self._index.get(key)
        return [None] * self.n if column is None else self._columns[column]

    def texts(self, key: str) -> list[str]:
        """The column `key` as text (`_text`: trimmed, '' where a row lacks it)."""
        found = self._texts.get(key)
        if found is not None:
            return found
        column = self._index.get(key)
        if self._records is not None:
            found = [_text(v) for v in self.raw(key)]
        elif column is None:
            found = [""] * self.n
        elif self._trimmed[column]:
            found = cast("list[str]", self._columns[column])
        else:
            try:
                found = list(map(str.strip, cast("list[str]", self._columns[column])))
            except TypeError:  # a short row's missing cell
                found = [c.strip() if c is not None else "" for c in self._columns[column]]
        self._texts[key] = found
        return found


@dataclass(slots=True)
class _Columns:
    """What a mapper makes of a table, row by row: the event, the time as read and the scope
    (None: every row global); the evidence besides `line` and `kind` (`texts`: left out when
    empty, cut to `EVIDENCE_TEXT_CHARS`; `numbers`: left out when None); rows that give no
    event (row: problem); rows that give one event per scope (Mailgun's tagged unsubscribes)."""

    events: Sequence[EventType]
    at: Sequence[object]
    scopes: Sequence[str | None] | None = None
    texts: tuple[tuple[str, Sequence[str]], ...] = ()
    numbers: tuple[tuple[str, Sequence[int | None]], ...] = ()
    errors: dict[int, str] = field(default_factory=dict)
    split: dict[int, list[str]] = field(default_factory=dict)


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


def _by_value(values: Sequence[str], event: Callable[[str], EventType]) -> list[EventType]:
    """`event` of each value, asked once per distinct value (a status or code column holds a
    few)."""
    of = {v: event(v) for v in set(values)}
    return list(map(of.__getitem__, values))


def _map_sendgrid(export: _Export, t: _Table) -> _Columns:
    """SendGrid: bounces (a 4.x.x status is a soft bounce), blocks (soft bounces), invalid
    emails (hard bounces), spam reports (complaints), unsubscribes (global or a group)."""
    at = t.raw("created")
    match export.kind:
        case "bounces":
            status = t.texts("status")
            events = _by_value(status, lambda s: _SOFT if s.startswith("4") else _HARD)
            return _Columns(events, at, texts=(("reason", t.texts("reason")), ("status", status)))
        case "blocks":
            reason, status = t.texts("reason"), t.texts("status")
            return _Columns([_SOFT] * t.n, at, texts=(("reason", reason), ("status", status)))
        case "invalid_emails":
            return _Columns([_HARD] * t.n, at, texts=(("reason", t.texts("reason")),))
        case "spam_reports":
            return _Columns([_COMPLAINT] * t.n, at, texts=(("ip", t.texts("ip")),))
        case _:
            if t.has("createdat"):
                at = [
                    a if a is not None else b for a, b in zip(at, t.raw("createdat"), strict=True)
                ]
            scopes: list[str | None] | None = None
            if t.has("groupname") or t.has("groupid"):
                names = zip(t.texts("groupname"), t.texts("groupid"), strict=True)
                scopes = [f"group:{g}" if (g := name or number) else None for name, number in names]
            return _Columns([_UNSUBSCRIBE] * t.n, at, scopes)


@functools.lru_cache(maxsize=4096)
def _tags_in(text: str) -> tuple[str, ...]:
    """The tags in a CSV cell: the text of a JSON list (`["*"]`) or a comma-separated list."""
    items = re.split(r"[,\s]+", re.sub(r"[\[\]\"']", " ", text))
    return tuple(t for t in items if t)


def _mailgun_tags(value: object) -> tuple[str, ...]:
    """Mailgun's unsubscribe `tags`: a JSON list, or its text in a CSV cell (`["*"]`, `a,b`)."""
    if isinstance(value, list):
        return tuple(t for t in (_text(v) for v in value) if t)
    return _tags_in(_text(value))


def _map_mailgun(export: _Export, t: _Table) -> _Columns:
    """Mailgun: bounces (a 4xx code is a soft bounce), complaints, unsubscribes (tag `*` or
    no tag: global; otherwise one event per tag, scoped `tag:<tag>`)."""
    at = t.raw("createdat")
    match export.kind:
        case "bounces":
            codes = t.texts("code")
            events = _by_value(codes, lambda c: _SOFT if c.startswith("4") else _HARD)
            return _Columns(events, at, texts=(("reason", t.texts("error")), ("code", codes)))
        case "complaints":
            return _Columns([_COMPLAINT] * t.n, at)
        case _:
            split: dict[int, list[str]] = {}
            for row, value in enumerate(t.raw("tags")):
                tags = _mailgun_tags(value)
                if tags and "*" not in tags:
                    split[row] = [f"tag:{tag}" for tag in dict.fromkeys(tags)]
            return _Columns([_UNSUBSCRIBE] * t.n, at, split=split)


_SES_EVENTS: Final[dict[str, EventType]] = {"BOUNCE": _HARD, "COMPLAINT": _COMPLAINT}


def _map_ses(export: _Export, t: _Table) -> _Columns:
    """Amazon SES: Reason BOUNCE (SES lists hard bounces only) or COMPLAINT."""
    reasons = [r.upper() for r in t.texts("reason")]
    events = [_SES_EVENTS.get(r, _HARD) for r in reasons]
    errors = {
        row: f"unknown SES Reason {reason!r} (expected BOUNCE or COMPLAINT)"
        for row, reason in enumerate(reasons)
        if reason not in _SES_EVENTS
    }
    return _Columns(events, t.raw("lastupdatetime"), texts=(("reason", reasons),), errors=errors)


_POSTMARK_EVENTS: Final[dict[str, EventType]] = {"hardbounce": _HARD, "spamcomplaint": _COMPLAINT}


def _map_postmark(export: _Export, t: _Table) -> _Columns:
    """Postmark: HardBounce, SpamComplaint, ManualSuppression (an unsubscribe when its Origin
    is Recipient, an operator's suppression when Customer or Admin)."""
    reasons, origins = t.texts("suppressionreason"), t.texts("origin")
    events: list[EventType] = []
    errors: dict[int, str] = {}
    for row, (reason, origin) in enumerate(zip(reasons, origins, strict=True)):
        name = reason.lower()
        if name == "manualsuppression":
            events.append(_UNSUBSCRIBE if origin.lower() == "recipient" else _MANUAL)
            continue
        event = _POSTMARK_EVENTS.get(name)
        if event is None:
            errors[row] = (
                f"unknown Postmark SuppressionReason {reason!r}"
                " (expected HardBounce, SpamComplaint or ManualSuppression)"
            )
        events.append(event or _MANUAL)
    texts = (("reason", reasons), ("origin", origins))
    return _Columns(events, t.raw("createdat"), texts=texts, errors=errors)


_SPARKPOST_SOURCES: Final[dict[str, EventType]] = {
    "spam complaint": _COMPLAINT,
    "list unsubscribe": _UNSUBSCRIBE,
    "unsubscribe link": _UNSUBSCRIBE,
    "bounce rule": _HARD,
    "manually added": _MANUAL,
    "compliance": _MANUAL,
}


def _flag(value: object) -> bool:
    """A SparkPost boolean column (`true`, `1`, `yes`, or a JSON true)."""
    return value is True or _text(value).lower() in {"true", "1", "yes", "y"}


def _sparkpost_scope(kind: str, transactional: object, non_transactional: object) -> str | None:
    """The stream of a SparkPost suppression: its `type`, else the one flag of the older
    lists that is set (both or neither: global)."""
    kind = kind.lower()
    if kind in {"transactional", "non_transactional"}:
        return f"stream:{kind}"
    flags = (_flag(transactional), _flag(non_transactional))
    if flags == (True, False):
        return "stream:transactional"
    return "stream:non_transactional" if flags == (False, True) else None


def _map_sparkpost(export: _Export, t: _Table) -> _Columns:
    """SparkPost: the event from `source` (unknown or missing: manual), the scope from `type`
    (or the older `transactional` / `non_transactional` flags): one stream, or global."""
    sources = t.texts("source")
    events = [_SPARKPOST_SOURCES.get(s.lower(), _MANUAL) for s in sources]
    flags = zip(t.texts("type"), t.raw("transactional"), t.raw("nontransactional"), strict=True)
    scopes = [_sparkpost_scope(*f) for f in flags]
    at = [c or u for c, u in zip(t.raw("created"), t.raw("updated"), strict=True)]
    texts = (("reason", t.texts("description")), ("sparkpost_source", sources))
    return _Columns(events, at, scopes, texts=texts)


def _map_csv(export: _Export, t: _Table) -> _Columns:
    """kiln's own CSV: `address,event[,at][,expires_at][,scope][,reason]`."""
    names = [e.lower() for e in t.texts("event")]
    errors = {
        row: f"unknown event {name!r} (expected one of {', '.join(EVENT_TYPES)})"
        for row, name in enumerate(names)
        if name not in EVENT_TYPES
    }
    expires: list[int | None] = [None] * t.n
    if t.has("expiresat"):
        expires = _times_ms(t.raw("expiresat"), errors)
    scopes = [s or None for s in t.texts("scope")] if t.has("scope") else None
    return _Columns(
        cast("list[EventType]", names),
        t.raw("at"),
        scopes,
        texts=(("reason", t.texts("reason")),),
        numbers=(("expires_ms", expires),),
        errors=errors,
    )


_MAPPERS: Final[dict[str, Callable[[_Export, _Table], _Columns]]] = {
    "sendgrid": _map_sendgrid,
    "mailgun": _map_mailgun,
    "ses": _map_ses,
    "postmark": _map_postmark,
    "sparkpost": _map_sparkpost,
    "csv": _map_csv,
}

#: JSON text of a string, as `json.dumps` writes it (ASCII, escapes).
_json_text: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


_T = TypeVar("_T")


def _listed(values: Sequence[_T]) -> list[_T]:
    """`values` as a list (itself when it is one)."""
    return values if type(values) is list else list(values)


def _evidence_json(
    kind: str,
    lines: Sequence[int],
    texts: Sequence[tuple[str, Sequence[str]]],
    numbers: Sequence[tuple[str, Sequence[int | None]]],
) -> list[str]:
    """Each row's evidence, `{"line": ..., "kind": kind, ...}`, as the JSON text
    `json.dumps(evidence, sort_keys=True)` gives: texts left out when empty and cut to
    `EVIDENCE_TEXT_CHARS`, numbers left out when None. Built by the core
    (`_core.evidence_json`), or here (`_evidence_json_here`) for what it leaves to Python."""
    built = _core.evidence_json(
        kind,
        _listed(lines),
        [(name, _listed(values)) for name, values in texts],
        [(name, _listed(values)) for name, values in numbers],
        EVIDENCE_TEXT_CHARS,
    )
    return _evidence_json_here(kind, lines, texts, numbers) if built is None else built


def _evidence_json_here(
    kind: str,
    lines: Sequence[int],
    texts: Sequence[tuple[str, Sequence[str]]],
    numbers: Sequence[tuple[str, Sequence[int | None]]],
) -> list[str]:
    """`_evidence_json` in Python: a lone surrogate, an int past 64 bits.

    Built a column at a time into one %-template (`_slot`): a field every row has is a slot
    for its JSON value; a field some rows leave out is a slot for a fragment carrying its key
    and separator ('' where left out)."""
    slots: list[tuple[str, str, Sequence[object] | None]] = [
        ("kind", f'"kind": {_json_text(kind)}'.replace("%", "%%"), None)
    ]
    slots.append(("line", ', "line": %s', lines))
    for name, values in texts:
        if values and max(map(len, values)) > EVIDENCE_TEXT_CHARS:
            values = [_cut(v) for v in values]
        slots.append((name, *_slot(name, values, "", _json_text)))
    for name, numbers_of in numbers:
        slots.append((name, *_slot(name, numbers_of, None, str)))
    slots.sort(key=lambda s: s[0])
    template = "{" + "".join(piece for _, piece, _ in slots) + "}"
    columns = [column for _, _, column in slots if column is not None]
    return list(map(template.__mod__, zip(*columns, strict=True)))


_V = TypeVar("_V", str, int | None)


def _slot(
    name: str, values: Sequence[_V], empty: _V, encode: Callable[[Any], str]
) -> tuple[str, list[str]]:
    """A field's piece of the evidence template and the column filling its slot: "kind" is
    in every row, so a field sorted before it ends with ", " and any other starts with one."""
    lead, trail = ("", ", ") if name < "kind" else (", ", "")
    key = _json_text(name) + ": "
    if empty not in values:
        piece = f"{lead}{key}".replace("%", "%%") + "%s" + trail
        return piece, list(map(encode, values))
    return "%s", [f"{lead}{key}{encode(v)}{trail}" if v != empty else "" for v in values]


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL: Final = _EPOCH.toordinal()
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
        if text[4:5] == "-" and (iso_ms := _iso_ms(text)) is not None:  # before float(): no
            return iso_ms  # exception raised and caught
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


#: ISO 8601 as kiln and most APIs write it: a date, `T` or a space, the time to the second, a
#: fraction or not, and `Z`, an offset `+hh:mm` or nothing (UTC).
_ISO: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?",
    re.ASCII,
)


@functools.lru_cache(maxsize=4096)
def _epoch_day(year: str, month: str, day: str) -> int | None:
    """Days from 1970-01-01 to a date, None when there is no such date."""
    try:
        return date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None


def _iso_ms(text: str) -> int | None:
    """The common ISO 8601 form (`_ISO`) as Unix milliseconds, as `datetime.fromisoformat`
    reads it, without its cost; None for any other text, and for a field out of range (the
    general parser then tries it and says what is wrong)."""
    found = _ISO.fullmatch(text)
    if found is None:
        return None
    days = _epoch_day(found[1], found[2], found[3])
    hour, minute, second = int(found[4]), int(found[5]), int(found[6])
    if days is None or hour > 23 or minute > 59 or second > 59:
        return None
    ms = (((days * 24 + hour) * 60 + minute) * 60 + second) * 1000
    if found[7]:
        ms += int((found[7] + "00")[:3])
    zone = found[8]
    if zone and zone != "Z":
        zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
        if zone_hours > 23 or zone_minutes > 59:
            return None
        ms -= (1 if zone[0] == "+" else -1) * (zone_hours * 60 + zone_minutes) * 60_000
    return ms


def _text_time_ms(text: str) -> int:
    """An ISO 8601 or RFC 2822 time as Unix milliseconds, or `_RowError`."""
    when: datetime | None = None
    if not text[:1].isdigit() and (fast_ms := _rfc2822_ms(text)) is not None:
        return fast_ms
    if (iso_ms := _iso_ms(text)) is not None:
        return iso_ms
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


#: Digits at most this many are read exactly both as a float and as an integer.
_EXACT_DIGITS: Final = 15


def _times_ms(values: Sequence[object], errors: dict[int, str]) -> list[int | None]:
    """`_time_ms` of a column; an unreadable time is a problem of its row (in `errors`, unless
    the row has one already) and None. A column of Unix times written as digits (SendGrid's
    `created`) or as JSON integers is converted without a call per value."""
    fast = _unix_times_ms(values)
    if fast is not None:
        return fast
    out: list[int | None] = []
    for row, value in enumerate(values):
        try:
            out.append(_time_ms(value))
        except _RowError as exc:
            errors.setdefault(row, str(exc))
            out.append(None)
    return out


def _unix_times_ms(values: Sequence[object]) -> list[int | None] | None:
    """The column as `_time_ms` reads it when every value is empty or a Unix time in seconds
    or milliseconds, as digits (up to 15, read exactly either way) or as a JSON integer of as
    many; None for any other column."""
    if not values:
        return []
    if type(values) is list and (read := _core.unix_times_ms(values)) is not None:
        return read
    try:
        texts = list(map(str.strip, cast("Sequence[str]", values)))
    except TypeError:  # not all text: JSON numbers?
        if not all(type(v) is int for v in values):
            return None
        numbers = cast("Sequence[int]", values)
        if max(numbers) >= 10**_EXACT_DIGITS or min(numbers) <= -(10**_EXACT_DIGITS):
            return None
        return [v if abs(v) >= _MS_THRESHOLD else v * 1000 for v in numbers]
    filled = [t for t in texts if t] if "" in texts else texts
    if not filled:
        return [None] * len(texts)
    if max(map(len, filled)) > _EXACT_DIGITS or not "".join(filled).isdecimal():
        return None
    if filled is not texts:
        return [(v if (v := int(t)) >= _MS_THRESHOLD else v * 1000) if t else None for t in texts]
    return [v if v >= _MS_THRESHOLD else v * 1000 for v in map(int, texts)]


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


class _CsvText:
    """The lines of a CSV file, read a block at a time (`CSV_BLOCK_BYTES`) and split at `\\n`
    only, as the file's lines are numbered: handed out one at a time as text for
    `csv.reader` (`line`), or many at once as columns split by the core (`split`) where they
    are easy. A line that is not UTF-8 is given with replacement characters, and one over
    `MAX_LINE_BYTES` as an empty line (never held); either is remembered by number (`bad`)
    until its row claims it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        #: Lines handed out so far.
        self.number = 0
        self.bad: dict[int, str] = {}
        self._blocks = self._read()
        #: The current block (whole lines; None: an over-long line) and where in it the next
        #: line starts; whether anything of it is left to hand out.
        self._block: bytes | None = b""
        self._at = 0
        self._left = False

    def line(self) -> str | None:
        """The next line as text, with its `\\n` (the last one may have none); None at the
        end of the file."""
        if not self._fill():
            return None
        self.number += 1
        block = self._block
        if block is None:
            self._left = False
            self.bad[self.number] = f"line longer than {MAX_LINE_BYTES} bytes, skipped"
            return "\n"
        end = block.find(b"\n", self._at) + 1 or len(block)
        data = block[self._at : end]
        self._at = end
        self._left = end < len(block)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._replaced(data, exc.start)

    def split(
        self, delimiter: str, width: int, max_rows: int
    ) -> tuple[int, int, list[list[str | None]], list[bool]] | None:
        """The next lines, up to `max_rows`, split into `width` columns by the core
        (`_core.split_csv_lines`): (first line, rows, columns, trimmed). None when the next line
        is one the core leaves to `csv` (or there is none)."""
        if not self._fill() or not self._block:
            return None
        rows, end, columns, trimmed = _core.split_csv_lines(
            self._block, self._at, delimiter, width, max_rows, csv.field_size_limit()
        )
        if not rows:
            return None
        first = self.number + 1
        self.number += rows
        self._at = end
        self._left = end < len(self._block)
        return first, rows, columns, trimmed

    def claim(self, first: int, last: int) -> str | None:
        """The problem of the first bad line among lines first..last, forgetting them all."""
        found = None
        for n in range(first, last + 1):
            message = self.bad.pop(n, None)
            if found is None and message is not None:
                found = message
        return found

    def _fill(self) -> bool:
        """Whether a line is left to hand out, reading the next block when this one is used
        up."""
        if not self._left:
            block = next(self._blocks, _END)
            if block is _END:
                return False
            self._block, self._at, self._left = cast("bytes | None", block), 0, True
        return True

    def _read(self) -> Iterator[bytes | None]:
        """The file's blocks of whole lines (the last may lack its line break), None for an
        over-long line, `b""` for the one empty line of a file that is only a byte order
        mark. Only the first line of the buffer can be over-long (`MAX_LINE_BYTES` is at least
        twice `CSV_BLOCK_BYTES`): the others start inside the last two blocks read."""
        head = self._raw.read(CSV_BLOCK_BYTES)
        while 0 < len(head) < len(codecs.BOM_UTF8) and (more := self._raw.read(CSV_BLOCK_BYTES)):
            head += more
        data = head.removeprefix(codecs.BOM_UTF8) or self._raw.read(CSV_BLOCK_BYTES)
        if head and not data:  # a byte order mark and nothing else: one empty line
            yield b""
        rest = b""
        while data or rest:
            buffer = rest + data if rest else data
            end = buffer.find(b"\n")
            if end > MAX_LINE_BYTES or (end < 0 and len(buffer) > MAX_LINE_BYTES):
                yield None
                rest = buffer[end + 1 :] if end >= 0 else self._after_line() if data else b""
            elif end >= 0:
                cut = buffer.rfind(b"\n") + 1
                rest = buffer[cut:]
                yield buffer[:cut]
            elif data:
                rest = buffer
            else:  # the last line, without a line break
                yield buffer
                return
            data = self._raw.read(CSV_BLOCK_BYTES)

    def _after_line(self) -> bytes:
        """Read past the rest of the current line; what comes after its line break."""
        while data := self._raw.read(CSV_BLOCK_BYTES):
            end = data.find(b"\n")
            if end >= 0:
                return data[end + 1 :]
        return b""

    def _replaced(self, data: bytes, start: int) -> str:
        """A line that is not UTF-8 (first at byte `start`), with replacement characters
        (and no carriage return before its line break), noted as bad."""
        newline = data.endswith(b"\n")
        body = data[:-1] if newline else data
        shown = body.decode("utf-8", errors="replace").rstrip("\r\n")
        self.bad[self.number] = (
            f"invalid UTF-8 at byte {start + 1} of the line (shown with"
            f" replacement characters): {_cut(shown, 200)!r}"
        )
        return shown + "\n" if newline else shown


#: What `next` gives at the end of `_CsvText._read`.
_END: Final = object()


def _delimiter(line: str) -> str:
    """The header line's delimiter: a comma, or a semicolon or tab when it has no comma."""
    if "," in line:
        return ","
    for candidate in (";", "\t"):
        if candidate in line:
            return candidate
    return ","


class _Reader(Protocol):
    """What `csv.reader` returns, as this module uses it."""

    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...

    def __next__(self) -> list[str]: ...


@dataclass(slots=True)
class _Records:
    """Consecutive records of a CSV file: the rows as `width` columns (None past a short
    row's end), with the line each starts on, and the problems of records that gave no row,
    as (rows before it, line, message). `trimmed` marks the columns whose every cell is there
    and trimmed."""

    width: int
    columns: list[list[str | None]] = field(default_factory=list)
    trimmed: list[bool] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[tuple[int, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.columns = [[] for _ in range(self.width)]
        self.trimmed = [True] * self.width

    def add_split(
        self, first: int, rows: int, columns: list[list[str | None]], trimmed: list[bool]
    ) -> None:
        """`rows` rows the core split, the first on line `first`."""
        if not self.lines:
            self.columns = columns
            self.trimmed = trimmed
        else:
            for column, cells in zip(self.columns, columns, strict=True):
                column.extend(cells)
            self.trimmed = [a and b for a, b in zip(self.trimmed, trimmed, strict=True)]
        self.lines.extend(range(first, first + rows))

    def add_row(self, cells: list[str], line: int) -> None:
        """A row `csv` read, starting on `line`."""
        for i, column in enumerate(self.columns):
            column.append(cells[i] if i < len(cells) else None)
        self.trimmed = [False] * self.width
        self.lines.append(line)


#: Most records left to `csv` after the core declines a line (a file of hard lines is then
#: offered to the core once in this many).
_MAX_PAUSE: Final = 64


def _csv_records(
    reader: _Reader, text: _CsvText, size: int, delimiter: str, width: int
) -> Iterator[_Records]:
    """The records after the header, `size` at a time: rows not blank, and a problem for a
    row holding a bad line (`_CsvText.bad`) or that `csv` cannot read.

    Easy lines (one record a line, UTF-8, not blank: `_CsvText.split`) are split by the core
    into columns, with no Python code per row; `reader` reads each other record, from the
    line the core stopped at, and its rows join the same columns."""
    finished = False
    pause = wait = 0  # records left to `csv` after the core declined a line, and how many
    while not finished:
        records = _Records(width)
        items = 0
        while items < size:
            split = None if wait else text.split(delimiter, width, size - items)
            if split is not None:
                records.add_split(*split)
                items += split[1]
                pause = 0
                continue
            if wait:
                wait -= 1
            else:  # declined: leave the next records to `csv`, more after each decline
                pause = min(2 * pause + 1, _MAX_PAUSE)
                wait = pause
            start = text.number + 1
            try:
                cells = next(reader)
            except StopIteration:
                finished = True
                break
            except csv.Error as exc:
                text.claim(start, text.number)
                records.problems.append((len(records.lines), text.number, f"unreadable CSV: {exc}"))
            else:
                bad = text.claim(start, text.number) if text.bad else None
                if bad is not None:
                    records.problems.append((len(records.lines), start, bad))
                elif any(c.strip() for c in cells):
                    records.add_row(cells, start)
            items += 1
        if items:
            yield records


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


def _addresses(texts: list[str], key: str, fold_case: bool, errors: dict[int, str]) -> list[str]:
    """A column of addresses normalised (one check for a column already in normal form,
    `address.all_normal` by the core); an empty or malformed one is a problem of its row, and
    ''."""
    if texts and _core.all_normal_addresses(texts):
        return [a.lower() for a in texts] if fold_case else texts
    out: list[str] = []
    for row, text in enumerate(texts):
        if not text:
            errors.setdefault(row, f"no address (the {key!r} field is empty)")
            out.append("")
            continue
        try:
            out.append(normalise(text, fold_case=fold_case))
        except AddressError as exc:
            errors.setdefault(row, str(exc))
            out.append("")
    return out


def _batch(
    export: _Export,
    mapper: Callable[[_Export, _Table], _Columns],
    table: _Table,
    found: Sequence[tuple[int, int, str]],
    where: tuple[str, str, bool, str | None],
) -> EventBatch:
    """The events of a table's rows, and the problems among them in file order: `found`
    (rows before it, line, message) from reading, and each row's first problem (no address, a
    malformed one, what the mapper refused, an unreadable time). `where`: the file as shown,
    the source label, fold_case and the default scope."""
    shown, label, fold_case, scope = where
    errors: dict[int, str] = {}
    addresses = _addresses(table.texts(export.address_key), export.address_key, fold_case, errors)
    mapped = mapper(export, table)
    for row, message in mapped.errors.items():
        errors.setdefault(row, message)
    at_ms = _times_ms(mapped.at, errors)
    evidence = _evidence_json(export.kind, table.lines, mapped.texts, mapped.numbers)
    scopes: list[str | None]
    if mapped.scopes is None:
        scopes = [scope] * table.n
    else:
        scopes = [s or scope for s in mapped.scopes]
    batch = EventBatch(label)
    if not errors and not mapped.split and not found:
        batch.addresses, batch.events, batch.at_ms = addresses, list(mapped.events), at_ms
        batch.scopes, batch.lines, batch.evidence = scopes, table.lines, evidence
        return batch
    rows: list[int] = []  # the row of each event
    starts = [0] * (table.n + 1)  # events before each row
    for row in range(table.n):
        if row not in errors:
            for event_scope in mapped.split.get(row) or (scopes[row],):
                rows.append(row)
                batch.scopes.append(event_scope)
        starts[row + 1] = len(rows)
    batch.addresses = [addresses[r] for r in rows]
    batch.events = [mapped.events[r] for r in rows]
    batch.at_ms = [at_ms[r] for r in rows]
    batch.lines = [table.lines[r] for r in rows]
    batch.evidence = [evidence[r] for r in rows]
    problems = sorted(
        [(before, 0, n, line, message) for n, (before, line, message) in enumerate(found)]
        + [(row, 1, 0, table.lines[row], message) for row, message in errors.items()]
    )
    for before, _, _, line, message in problems:
        batch.problems.append(ImportProblem(shown, line, message))
        batch.problem_after.append(starts[before])
    return batch


def _problems_only(label: str, problems: Sequence[ImportProblem]) -> EventBatch:
    """A batch of problems and no events."""
    return EventBatch(label, problems=list(problems), problem_after=[0] * len(problems))


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
    batches = scan_batches(
        source, path, fold_case=fold_case, kind=kind, scope=scope, rows=_SCAN_ROWS
    )
    for batch in batches:
        yield from batch.items()


def scan_batches(
    source: str,
    path: Path,
    *,
    fold_case: bool = False,
    kind: str | None = None,
    scope: str | None = None,
    rows: int = BATCH_ROWS,
) -> Iterator[EventBatch]:
    """`scan` as batches of up to `rows` rows (records): the same events and problems in the
    same order, as columns (`EventBatch`), with no object made per event. What an import of
    a large file uses; memory holds one batch at a time."""
    if source not in _EXPORTS:
        raise ValueError(f"unknown import source {source!r}; expected one of {', '.join(SOURCES)}")
    if kind is not None and kind not in EXPORT_KINDS[source]:
        raise ValueError(f"{source} has no export kind {kind!r}: {', '.join(EXPORT_KINDS[source])}")
    shown, label = str(path), f"import:{source}"
    try:
        raw = _open(path)
    except OSError as exc:
        yield _problems_only(
            label, [ImportProblem(shown, 0, f"cannot read the file: {exc.strerror or exc}")]
        )
        return
    with raw:
        try:
            yield from _scan_open(source, path, raw, (shown, label, fold_case, scope), kind, rows)
        except _FileError as exc:
            yield _problems_only(label, [ImportProblem(shown, exc.line, exc.message)])
        except OSError as exc:  # a truncated gzip stream, a read error
            yield _problems_only(label, [ImportProblem(shown, 0, f"cannot read the file: {exc}")])


def _scan_open(
    source: str,
    path: Path,
    raw: IO[bytes],
    where: tuple[str, str, bool, str | None],
    kind: str | None,
    size: int,
) -> Iterator[EventBatch]:
    """`scan_batches` on an open file."""
    hint, mapper = path.name.lower(), _MAPPERS[source]
    if _first_char(raw) in {"[", "{"}:
        if source == "csv":
            raise _FileError(1, "this is JSON; kiln's csv import reads CSV (address,event,...)")
        yield from _json_batches(raw, source, hint, kind, size, mapper, where)
        return
    yield from _csv_batches(raw, source, hint, kind, size, mapper, where)


def _json_batches(
    raw: IO[bytes],
    source: str,
    hint: str,
    kind: str | None,
    size: int,
    mapper: Callable[[_Export, _Table], _Columns],
    where: tuple[str, str, bool, str | None],
) -> Iterator[EventBatch]:
    """The batches of a JSON file, `size` records at a time."""
    shown, label = where[0], where[1]
    export: _Export | None = None
    records: list[dict[str, object]] = []
    lines: list[int] = []
    found: list[tuple[int, int, str]] = []

    def pending() -> EventBatch:
        if export is None or not records:
            return _problems_only(label, [ImportProblem(shown, n, m) for _, n, m in found])
        return _batch(export, mapper, _Table(lines, records=records), found, where)

    try:
        for line, row, container in _json_rows(raw, source):
            if isinstance(row, str):
                found.append((len(records), line, row))
            else:
                if export is None:
                    keys = frozenset(row)
                    export = _detect(source, keys, hint, kind)
                    if export is None or _CONTAINERS.get(_key(container or ""), source) != source:
                        shown_keys = "keys " + ", ".join(sorted(row)) if row else "no keys"
                        raise _FileError(line, _misfit(source, keys, shown_keys, container))
                records.append(row)
                lines.append(line)
            if len(records) + len(found) >= size:
                yield pending()
                records, lines, found = [], [], []
    except (_FileError, OSError):
        if records or found:
            yield pending()
        raise
    if records or found:
        yield pending()


def _csv_batches(
    raw: IO[bytes],
    source: str,
    hint: str,
    kind: str | None,
    size: int,
    mapper: Callable[[_Export, _Table], _Columns],
    where: tuple[str, str, bool, str | None],
) -> Iterator[EventBatch]:
    """The batches of a CSV file, `size` rows at a time after its header."""
    shown, label = where[0], where[1]
    text = _CsvText(raw)
    first = text.line()
    if first is None:
        raise _FileError(1, "the file is empty")
    delimiter = _delimiter(first)
    lines = iter(text.line, None)
    reader = cast(_Reader, csv.reader(itertools.chain([first], lines), delimiter=delimiter))
    header: list[str] | None = None
    line = 0
    while header is None:  # the first row that is not blank
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            text.claim(start, reader.line_num)
            yield _problems_only(
                label, [ImportProblem(shown, reader.line_num, f"unreadable CSV: {exc}")]
            )
            continue
        bad = text.claim(start, reader.line_num)
        if bad is not None:
            raise _FileError(start, f"header: {bad}")
        if any(c.strip() for c in cells):
            header, line = cells, start
    keys = [_key(c) for c in header]
    export = _detect(source, frozenset(keys), hint, kind)
    if export is None:
        columns = [c.strip() for c in header]
        listed = "columns " + ", ".join(c for c in columns if c) if columns else "no columns"
        raise _FileError(line, _misfit(source, frozenset(keys), listed, None))
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        index.setdefault(key, i)
    for records in _csv_records(reader, text, size, delimiter, len(keys)):
        table = _Table(records.lines, records.columns, index, trimmed=records.trimmed)
        yield _batch(export, mapper, table, records.problems, where)


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
