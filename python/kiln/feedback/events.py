"""The one event type every feedback reader produces, and the small helpers they share.

A `FeedbackEvent` is one delivery attempt's outcome (or one complaint) as the MTA or the
mailbox provider reported it. Fields that the source did not say are None: absent is not
zero, and no reader fills in a favourable default.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

__all__ = [
    "FeedbackEvent",
    "MessageIndex",
    "Result",
    "SourceName",
    "normal_command",
    "normal_ip",
    "normal_message_id",
    "split_recipient",
    "to_ms",
]

#: What happened to the message (or, for "complaint", what the recipient said about it).
Result = Literal["delivered", "deferred", "bounced", "complaint", "expired"]

#: Which reader produced an event.
SourceName = Literal["postfix", "powermta", "kumomta", "arf"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """One delivery outcome or complaint, normalised across MTAs.

    - `at_ms`: when it happened (Unix ms), from the log line or report;
    - `ip`: the sending (warm-up) IP as canonical text, or None when the source did not say;
    - `recipient`, `recipient_domain`: lower-cased, or None when unknown;
    - `code`, `enhanced`: the remote SMTP reply code (`421`) and enhanced code (`4.7.28`);
    - `text`: the reply text on one line, codes and continuation prefixes removed (for local
      failures: the MTA's own description);
    - `local`: True when the MTA itself failed (no connection, internal expiry): not remote
      push-back, so never read as throttling;
    - `command`: the SMTP step answered (`MAIL FROM`, `RCPT TO`, `DATA`, `.` for end of
      data), or None;
    - `message_id`: the Message-ID without angle brackets, or None;
    - `source`: which reader produced the event;
    - `queue_id`: the MTA's queue id of the message, where its log names one.
    """

    at_ms: int
    ip: str | None
    recipient: str | None
    recipient_domain: str | None
    result: Result
    code: int | None
    enhanced: str | None
    text: str | None
    local: bool
    command: str | None
    message_id: str | None
    source: SourceName
    queue_id: str | None = None


def to_ms(moment: datetime) -> int:
    """A timezone-aware datetime as integer Unix milliseconds (no float rounding)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def normal_ip(text: str | None) -> str | None:
    """`text` as a canonical IP address (brackets and an IPv6 zone removed), or None."""
    if not text:
        return None
    value = text.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def normal_message_id(text: str | None) -> str | None:
    """A Message-ID without white space and angle brackets, or None if empty."""
    if not text:
        return None
    value = "".join(text.split())
    if value.startswith("<") and ">" in value:
        value = value[1 : value.index(">")]
    value = value.strip("<>")
    return value or None


def split_recipient(text: str | None) -> tuple[str | None, str | None]:
    """(address, domain), both lower-cased, from an address with or without `<>`."""
    if not text:
        return None, None
    value = text.strip().strip("<>").strip().lower()
    if not value:
        return None, None
    _, at, domain = value.rpartition("@")
    return value, (domain.rstrip(".") or None) if at else None


def normal_enhanced(text: str | None) -> str | None:
    """An enhanced status code (`4.7.28`), or None for anything else."""
    if text is None:
        return None
    value = text.strip()
    return value if _ENHANCED.match(value) else None


_VERBS = ("MAIL FROM", "RCPT TO", "END OF DATA", "DATA", "BDAT")


def normal_command(text: str | None) -> str | None:
    """The SMTP step a reply answered, in one spelling for every MTA.

    `MAIL FROM`, `RCPT TO`, `DATA`, `BDAT`, `.` (end of data: Postfix's "end of DATA",
    KumoMTA's "."), else the first word upper-cased (`EHLO`, `STARTTLS`, ...). None if empty.
    """
    if text is None:
        return None
    value = " ".join(text.split()).upper()
    if not value:
        return None
    if value in {".", "END OF DATA", "<CR><LF>.<CR><LF>"}:
        return "."
    for verb in _VERBS:
        if value.startswith(verb):
            return "." if verb == "END OF DATA" else verb
    return value.split(" ", 1)[0]


def one_line(text: str | None) -> str | None:
    """Text with line breaks folded to spaces and the ends trimmed; None if empty."""
    if text is None:
        return None
    value = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip()
    return value or None


class MessageIndex:
    """Message-ID -> (sending IP, recipient domain) for the last `max_entries` messages.

    The log readers record every event that carries both a Message-ID and an IP; complaint
    reports without a `Source-IP` are attributed through it. Least recently used first out.
    """

    __slots__ = ("_entries", "_max_entries")

    def __init__(self, max_entries: int = 1_000_000) -> None:
        """An empty index holding at most `max_entries` messages."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def __len__(self) -> int:
        """Messages held."""
        return len(self._entries)

    def record(self, message_id: str, ip: str, recipient_domain: str | None) -> None:
        """Remember where `message_id` was sent from (a later record wins)."""
        key = normal_message_id(message_id)
        if key is None:
            return
        self._entries[key] = (ip, recipient_domain)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def record_event(self, event: FeedbackEvent) -> None:
        """Remember a log event's Message-ID and IP, if it has both (complaints excluded)."""
        if event.message_id and event.ip and event.result != "complaint":
            self.record(event.message_id, event.ip, event.recipient_domain)

    def lookup(self, message_id: str | None) -> tuple[str, str | None] | None:
        """(ip, recipient_domain) of `message_id` (with or without `<>`), or None."""
        key = normal_message_id(message_id)
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry
