"""KumoMTA JSON log records -> `FeedbackEvent`s (format: docs/signals.md, "Wire formats").

One JSON object per line, the record type under `"type"`: `Delivery` (delivered),
`TransientFailure` (deferred), `Bounce` and `OOB` (bounced), `Expiration` (expired),
`Feedback` (complaint). `Reception`, `AdminBounce`, `Rejection`, `Delay`, `AdminRebind` and
types newer releases add are ignored (counted). The sending IP is `source_address.address`
without its port (IPv6 is written `[addr]:port`), else the configured `egress_sources` table
(`egress_source` name -> IP). Responses whose content starts `KumoMTA internal` are local.

A `Feedback` record is a parsed ARF report: its recipient is the complaining
`original_rcpto_to` (sic), its Message-ID comes from `original_message`, its IP from
`source_ip` when present (else the daemon joins the Message-ID with the delivery logs); its
time is the record's (when the report arrived), not the original message's `arrival_date`.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kiln.feedback.events import (
    FeedbackEvent,
    Result,
    normal_command,
    normal_enhanced,
    normal_ip,
    normal_message_id,
    one_line,
    split_recipient,
    to_ms,
)

__all__ = ["KumoParser", "source_ip"]

_RESULTS: Mapping[str, Result] = {
    "Delivery": "delivered",
    "TransientFailure": "deferred",
    "Bounce": "bounced",
    "OOB": "bounced",
    "Expiration": "expired",
    "Feedback": "complaint",
}
_INTERNAL = "kumomta internal"


def source_ip(address: object) -> str | None:
    """The IP of a `source_address.address` (`192.0.2.10:53210`, `[2001:db8::1]:25`)."""
    if not isinstance(address, str) or not address:
        return None
    value = address.strip()
    if value.startswith("["):
        return normal_ip(value[1 : value.find("]")] if "]" in value else value[1:])
    direct = normal_ip(value)
    if direct is not None:
        return direct  # no port, or a bare IPv6 address
    host, _, port = value.rpartition(":")
    return normal_ip(host) if port.isdigit() else None


def _time_ms(value: object) -> int | None:
    """A record time (Unix seconds, or RFC 3339 text) in ms, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return round(value * 1000)
    if isinstance(value, str):
        try:
            return round(float(value) * 1000)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return to_ms(moment) if moment.tzinfo is not None else None
    return None


def _text(value: object) -> str | None:
    """`value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value.strip() else None


def _header(headers: object, name: str) -> str | None:
    """A captured header's value by case-insensitive name (string or list of strings)."""
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            if isinstance(value, list):
                value = value[0] if value else None
            return _text(value)
    return None


def _captured_message_id(record: Mapping[str, Any]) -> str | None:
    """The Message-ID among the record's captured `headers` (or `meta`), if configured."""
    return normal_message_id(
        _header(record.get("headers"), "message-id") or _header(record.get("meta"), "message-id")
    )


def _original_message_id(original: object) -> str | None:
    """The Message-ID of a report's `original_message` (full message or headers)."""
    text = _text(original)
    if text is None:
        return None
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    return normal_message_id(parser.parsestr(text).get("Message-ID"))


def _enhanced(value: object) -> str | None:
    """`{class, subject, detail}` as `4.7.28`, or None (null or incomplete)."""
    if not isinstance(value, dict):
        return None
    parts = [value.get("class"), value.get("subject"), value.get("detail")]
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return None
    return normal_enhanced(".".join(str(p) for p in parts))


class KumoParser:
    """Parses KumoMTA log lines one at a time.

    `counters`: `lines`, `events`, `ignored` (types that are not outcomes), `bad` (not JSON,
    not an object, no type, no usable time), `unattributed` (delivery events without an IP).
    """

    def __init__(self, egress_sources: Mapping[str, str] | None = None) -> None:
        """`egress_sources` maps an `egress_source` name to its IP (the fallback)."""
        table: dict[str, str] = {}
        for name, ip in (egress_sources or {}).items():
            canonical = normal_ip(ip)
            if canonical is None:
                raise ValueError(f"egress source {name!r}: not an IP address: {ip!r}")
            table[name] = canonical
        self._egress = table
        self.counters: Counter[str] = Counter()

    def parse(self, line: str | bytes) -> FeedbackEvent | None:
        """The event of one line, or None (ignored or bad, and counted). Never raises."""
        self.counters["lines"] += 1
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            self.counters["bad"] += 1
            return None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            self.counters["bad"] += 1
            return None
        result = _RESULTS.get(record["type"])
        if result is None:
            self.counters["ignored"] += 1
            return None
        at_ms = _time_ms(record.get("timestamp"))
        if at_ms is None:
            self.counters["bad"] += 1
            return None
        event = self._event(record, result, at_ms)
        self.counters["events"] += 1
        if event.ip is None and result != "complaint":
            self.counters["unattributed"] += 1
        return event

    def _event(self, record: dict[str, Any], result: Result, at_ms: int) -> FeedbackEvent:
        """Build the event of one outcome record."""
        if result == "complaint":
            return self._complaint(record, at_ms)
        response = record.get("response")
        if not isinstance(response, dict):
            response = {}
        code = response.get("code")
        if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 999:
            code = None
        content = one_line(_text(response.get("content")))
        ip: str | None = None
        source = record.get("source_address")
        if isinstance(source, dict):
            ip = source_ip(source.get("address"))
        if ip is None:
            egress = record.get("egress_source")
            ip = self._egress.get(egress) if isinstance(egress, str) else None
        recipient, domain = split_recipient(_text(record.get("recipient")))
        return FeedbackEvent(
            at_ms=at_ms,
            ip=ip,
            recipient=recipient,
            recipient_domain=domain,
            result=result,
            code=code,
            enhanced=_enhanced(response.get("enhanced_code")),
            text=content,
            local=content is not None and content.lower().startswith(_INTERNAL),
            command=normal_command(_text(response.get("command"))),
            message_id=_captured_message_id(record),
            source="kumomta",
        )

    def _complaint(self, record: dict[str, Any], at_ms: int) -> FeedbackEvent:
        """A `Feedback` record: the complaining recipient, the original Message-ID."""
        report = record.get("feedback_report")
        if not isinstance(report, dict):
            report = {}
        rcpts = report.get("original_rcpto_to") or report.get("original_rcpt_to")
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        if not isinstance(rcpts, list):
            rcpts = []
        first = next((r for r in rcpts if isinstance(r, str) and r.strip()), None)
        recipient, domain = split_recipient(first)
        message_id = _original_message_id(report.get("original_message"))
        return FeedbackEvent(
            at_ms=at_ms,  # when the report came in (`arrival_date` is the original's arrival)
            ip=normal_ip(_text(report.get("source_ip"))),
            recipient=recipient,
            recipient_domain=domain,
            result="complaint",
            code=None,
            enhanced=None,
            text=_text(report.get("feedback_type")),
            local=False,
            command=None,
            message_id=message_id or _captured_message_id(record),
            source="kumomta",
        )
