"""Complaint feedback reports (RFC 5965 ARF, as Yahoo sends them) -> `FeedbackEvent`s.

Format: docs/signals.md ("ARF complaint reports"). `parse_arf()` reads one message with Python's
`email` package: the top part must be `multipart/report` with `report-type=feedback-report`;
the `message/feedback-report` part's fields are read case-insensitively (unknown fields kept
as extensions); part 3 (`message/rfc822` or `text/rfc822-headers`, possibly base64 or
quoted-printable) gives the original Message-ID, DKIM `d=` and From domain.

Attribution: `Source-IP` when the report has one, else the Message-ID joined through a
`MessageIndex` that the log readers fill (`FeedbackReader` does the join). The signature of
the report itself (DKIM by `arf.mail.yahoo.com`) is not checked here: read reports only from
a mailbox that accepts them from Yahoo alone.
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.parser
import email.policy
import email.utils
import itertools
import quopri
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message

from kiln.feedback.events import (
    FeedbackEvent,
    normal_ip,
    normal_message_id,
    split_recipient,
    to_ms,
)

__all__ = ["ArfError", "ArfReport", "parse_arf"]

#: What Yahoo writes instead of a real Authentication-Results value.
PLACEHOLDER_AUTH = "authentication result string is not available"

_KNOWN = frozenset(
    {
        "feedback-type",
        "user-agent",
        "version",
        "arrival-date",
        "received-date",
        "original-mail-from",
        "original-rcpt-to",
        "original-envelope-id",
        "reporting-mta",
        "source-ip",
        "authentication-results",
        "reported-domain",
        "reported-uri",
        "incidents",
    }
)
_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.I)
_FOLD = re.compile(r"\r?\n[ \t]+")
_MAX_MESSAGE_BYTES = 10 * 1024 * 1024


class ArfError(ValueError):
    """A message that is not a readable feedback report; the text says what is missing."""


@dataclass(frozen=True, slots=True)
class ArfReport:
    """The fields of one feedback report that kiln uses; absent ones are None or empty."""

    feedback_type: str | None
    user_agent: str | None
    version: str | None
    arrival_ms: int | None
    report_ms: int | None
    original_mail_from: str | None
    original_rcpt_to: tuple[str, ...]
    source_ip: str | None
    authentication_results: tuple[str, ...]
    reported_domains: tuple[str, ...]
    message_id: str | None
    dkim_domain: str | None
    from_domain: str | None
    extensions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def event(self, now_ms: int) -> FeedbackEvent:
        """The complaint as an event: at the report's Date (else its arrival date, else now)."""
        recipient, domain = split_recipient(
            self.original_rcpt_to[0] if self.original_rcpt_to else None
        )
        at_ms = self.report_ms if self.report_ms is not None else self.arrival_ms
        return FeedbackEvent(
            at_ms=at_ms if at_ms is not None else now_ms,
            ip=self.source_ip,
            recipient=recipient,
            recipient_domain=domain,
            result="complaint",
            code=None,
            enhanced=None,
            text=self.feedback_type,
            local=False,
            command=None,
            message_id=self.message_id,
            source="arf",
        )


def _value(raw: object) -> str | None:
    """A header value unfolded and trimmed, or None if empty."""
    if raw is None:
        return None
    text = _FOLD.sub(" ", str(raw)).strip()
    return text or None


def _date_ms(raw: object) -> int | None:
    """An RFC 5322 date in Unix ms, or None."""
    text = _value(raw)
    if text is None:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return to_ms(moment) if moment.tzinfo is not None else None


def _domain(address: object) -> str | None:
    """The lower-cased domain of the (first) address in a From-like header."""
    text = _value(address)
    if text is None:
        return None
    _, addr = email.utils.parseaddr(text)
    _, at, domain = addr.rpartition("@")
    return domain.strip().lower().rstrip(".") or None if at else None


def _raw_bodies(data: bytes, boundary: str) -> list[bytes]:
    """The undecoded body of each part of a multipart message, in order.

    The `email` parser has already parsed an encoded `message/rfc822` part as a message, so
    its encoded bytes are taken from the original data instead.
    """
    delimiter = re.compile(
        rb"(?:^|\r?\n)--"
        + re.escape(boundary.encode("ascii", "replace"))
        + rb"(--)?[ \t]*(?=\r?\n|$)"
    )
    bodies: list[bytes] = []
    matches = list(delimiter.finditer(data))
    for current, following in itertools.pairwise(matches):
        if current.group(1):
            break  # the close delimiter
        segment = data[current.end() : following.start()]
        split = re.search(rb"\r?\n\r?\n", segment)
        bodies.append(segment[split.end() :] if split else b"")
    return bodies


def _decode(raw: bytes, encoding: str) -> bytes:
    """Undo a base64 or quoted-printable transfer encoding (others are left as they are)."""
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(raw.split()), validate=False)
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        return quopri.decodestring(raw)
    return raw


def _headers_of(part: Message, raw: bytes | None) -> Message | None:
    """The original message's headers from part 3, decoding base64/QP when needed."""
    encoding = (_value(part.get("Content-Transfer-Encoding")) or "").lower()
    if part.is_multipart() and encoding not in {"base64", "quoted-printable"}:
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        return None
    if part.is_multipart():
        body = _decode(raw or b"", encoding)
    else:
        decoded = part.get_payload(decode=True)
        body = decoded if isinstance(decoded, bytes) else b""
    if not body.strip():
        return None
    parser = email.parser.BytesParser(policy=email.policy.compat32)
    return parser.parsebytes(body.lstrip(b"\r\n"), headersonly=True)


def parse_arf(data: bytes) -> ArfReport:
    """Read one feedback report. Raises `ArfError` for anything that is not one."""
    if len(data) > _MAX_MESSAGE_BYTES:
        raise ArfError(f"message larger than {_MAX_MESSAGE_BYTES} bytes")
    try:
        return _parse(data)
    except ArfError:
        raise
    except (email.errors.MessageError, ValueError, TypeError, LookupError, AttributeError) as e:
        raise ArfError(f"unreadable message: {type(e).__name__}") from e


def _parse(data: bytes) -> ArfReport:
    """`parse_arf` without the size check and the error translation."""
    top = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    if top.get_content_type() != "multipart/report":
        raise ArfError(f"not multipart/report but {top.get_content_type()}")
    report_type = top.get_param("report-type")
    if not isinstance(report_type, str) or report_type.strip().lower() != "feedback-report":
        raise ArfError("multipart/report without report-type=feedback-report")
    parts = top.get_payload()
    if not isinstance(parts, list):
        raise ArfError("multipart/report without parts")
    boundary = top.get_boundary()
    raw_bodies = _raw_bodies(data, boundary) if boundary else []
    fields: Message | None = None
    original: Message | None = None
    for index, part in enumerate(parts):
        if not isinstance(part, Message):
            continue
        kind = part.get_content_type()
        if kind == "message/feedback-report" and fields is None:
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                fields = inner[0]
            elif isinstance(inner, str):
                fields = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
                    inner.lstrip("\r\n")
                )
        elif kind in {"message/rfc822", "text/rfc822-headers"} and original is None:
            original = _headers_of(part, raw_bodies[index] if index < len(raw_bodies) else None)
    if fields is None:
        raise ArfError("no message/feedback-report part")
    return _report(top, fields, original)


def _all(fields: Message, name: str) -> tuple[str, ...]:
    """Every non-empty value of a repeatable field."""
    values = (_value(v) for v in fields.get_all(name) or [])
    return tuple(v for v in values if v)


def _report(top: Message, fields: Message, original: Message | None) -> ArfReport:
    """Assemble the report from its parts."""
    arrival = _date_ms(fields.get("Arrival-Date"))
    if arrival is None:
        arrival = _date_ms(fields.get("Received-Date"))
    auth = tuple(a for a in _all(fields, "Authentication-Results") if a.lower() != PLACEHOLDER_AUTH)
    rcpts = tuple(r.strip("<>").strip() for r in _all(fields, "Original-Rcpt-To"))
    mail_from = _value(fields.get("Original-Mail-From"))
    extensions: dict[str, list[str]] = {}
    for name, raw in fields.items():
        key = name.strip().lower()
        value = _value(raw)
        if key not in _KNOWN and value:
            extensions.setdefault(key, []).append(value)
    message_id = dkim_domain = from_domain = None
    if original is not None:
        message_id = normal_message_id(_value(original.get("Message-ID")))
        signature = _value(original.get("DKIM-Signature"))
        found = _DKIM_D.search(signature) if signature else None
        dkim_domain = found.group(1).lower().rstrip(".") if found else None
        from_domain = _domain(original.get("From"))
    if not rcpts and original is not None:
        to = _value(original.get("To"))
        rcpts = (email.utils.parseaddr(to)[1],) if to and email.utils.parseaddr(to)[1] else ()
    feedback_type = _value(fields.get("Feedback-Type"))
    return ArfReport(
        feedback_type=feedback_type.lower() if feedback_type else None,
        user_agent=_value(fields.get("User-Agent")),
        version=_value(fields.get("Version")),
        arrival_ms=arrival,
        report_ms=_date_ms(top.get("Date")),
        original_mail_from=mail_from.strip("<>").strip() or None if mail_from else None,
        original_rcpt_to=tuple(r for r in rcpts if r),
        source_ip=normal_ip(_value(fields.get("Source-IP"))),
        authentication_results=auth,
        reported_domains=tuple(d.lower() for d in _all(fields, "Reported-Domain")),
        message_id=message_id,
        dkim_domain=dkim_domain,
        from_domain=from_domain,
        extensions={k: tuple(v) for k, v in extensions.items()},
    )
