"""Postfix syslog lines -> `FeedbackEvent`s (format: docs/signals.md, "Wire formats").

Postfix does not log the source IP. Each warm-up IP gets its own `smtp` transport with a
distinct `syslog_name` (`postfix-ip10/smtp[...]`), and `syslog_names` maps that name to the IP;
lines from an unmapped name give `ip=None`. `cleanup` lines (`message-id=<...>`) are
remembered by queue id so later deliveries carry their Message-ID.

Both timestamp styles are read: classic (`Mar  9 14:02:11`, no year and no zone: the year is
the one that puts the line closest to the caller's `now_ms`, which handles the Dec -> Jan
rollover; the zone is `tz`) and RFC 3339 (rsyslog's file format).
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo

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

__all__ = ["PostfixParser"]

_MONTHS = {
    name: n
    for n, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_CLASSIC = re.compile(
    r"^(?P<mon>[A-Za-z]{3}) +(?P<day>\d{1,2}) (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:\.\d+)? "
    r"(?P<host>\S+) (?P<prog>[^\s\[\]:]+)(?:\[\d+\])?: (?P<msg>.*)$"
)
_RFC3339 = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|z|[+-]\d\d:?\d\d)?) "
    r"(?P<host>\S+) (?P<prog>[^\s\[\]:]+)(?:\[\d+\])?: (?P<msg>.*)$"
)
_QUEUED = re.compile(r"^(?P<qid>[0-9A-Za-z]{5,}): (?P<rest>.*)$")
_STATUS = re.compile(r"(?:^|, )status=(?P<status>[a-z]+)(?:, | \(|$)")
_TO = re.compile(r"(?:^|, )to=<(?P<v>[^>]*)>")
_ORIG_TO = re.compile(r"(?:^|, )orig_to=<(?P<v>[^>]*)>")
_RELAY = re.compile(r"(?:^|, )relay=(?P<v>[^,\s]+)")
_DSN = re.compile(r"(?:^|, )dsn=(?P<v>\d\.\d{1,3}\.\d{1,3})")
_MESSAGE_ID = re.compile(r"^message-id=(?P<v>.*)$")
_SAID = re.compile(r"^host \S+ said: (?P<reply>.*)$", re.S)
_IN_REPLY = re.compile(r"\s*\(in reply to (?P<cmd>.+?) command\)\s*$")
_REPLY_HEAD = re.compile(
    r"^(?P<code>[2-5]\d\d)(?P<sep>[ -])(?:(?P<enh>[2-5]\.\d{1,3}\.\d{1,3})\b)?"
)
_RESULTS: Mapping[str, Result] = {
    "sent": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
    "expired": "expired",
}
_MAX_QUEUE_IDS = 200_000


def strip_continuations(reply: str) -> tuple[int | None, str | None, str]:
    """(code, enhanced, text) of a flattened multi-line SMTP reply.

    The code and enhanced code come from the first segment. Every `NNN-x.y.z ` continuation
    prefix (and the final line's `NNN x.y.z `) carrying the same code is removed, so the text
    reads as one sentence.
    """
    text = reply.strip()
    head = _REPLY_HEAD.match(text)
    if head is None:
        return None, None, text
    code = head["code"]
    enhanced = head["enh"]
    text = text[head.end() :].lstrip()
    enh = rf"(?:{re.escape(enhanced)}\b)?" if enhanced else ""
    dash = re.compile(rf"(?:^|\s+){code}-{enh}\s*")
    pieces = dash.split(text)
    if head["sep"] == "-" or len(pieces) > 1:
        # The last piece holds the final line: "... 421 4.7.28 rest".
        last = re.compile(rf"(?:^|\s+){code} {enh}\s*")
        tail = last.split(pieces[-1], maxsplit=1)
        pieces[-1:] = tail
    return int(code), enhanced, " ".join(p.strip() for p in pieces if p.strip())


class PostfixParser:
    """Parses Postfix log lines one at a time; stateful only for queue id -> Message-ID.

    `counters` counts `lines`, `events`, `skipped` (no `status=`: qmgr bookkeeping, connects,
    ...), `bad` (not a syslog line, or a status line without the parts needed) and
    `unmapped` (events from a syslog name with no IP).
    """

    def __init__(self, syslog_names: Mapping[str, str], *, tz: tzinfo = UTC) -> None:
        """`syslog_names` maps a syslog name (`postfix-ip10`) to its sending IP."""
        mapped: dict[str, str] = {}
        for name, ip in syslog_names.items():
            canonical = normal_ip(ip)
            if canonical is None:
                raise ValueError(f"syslog name {name!r}: not an IP address: {ip!r}")
            mapped[name] = canonical
        self._names = mapped
        self._tz = tz
        self._message_ids: OrderedDict[str, str] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def parse(self, line: str, now_ms: int) -> FeedbackEvent | None:
        """The event on `line`, or None (skipped or bad, and counted). Never raises."""
        self.counters["lines"] += 1
        line = line.rstrip("\r\n")
        match = _CLASSIC.match(line) or _RFC3339.match(line)
        if match is None:
            self.counters["bad"] += 1
            return None
        queued = _QUEUED.match(match["msg"])
        if queued is None:
            self.counters["skipped"] += 1
            return None
        qid, rest = queued["qid"], queued["rest"]
        message_id = _MESSAGE_ID.match(rest)
        if message_id is not None:
            self._remember(qid, message_id["v"])
            self.counters["skipped"] += 1
            return None
        status = _STATUS.search(rest)
        if status is None:
            if rest == "removed":
                self._message_ids.pop(qid, None)  # the queue id may be reused from now on
            self.counters["skipped"] += 1
            return None
        at_ms = self._at_ms(match, now_ms)
        result = _RESULTS.get(status["status"])
        if at_ms is None or result is None:
            self.counters["bad"] += 1
            return None
        event = self._event(match["prog"], qid, rest, status, result, at_ms)
        self.counters["events"] += 1
        if event.ip is None:
            self.counters["unmapped"] += 1
        return event

    def _event(
        self, prog: str, qid: str, rest: str, status: re.Match[str], result: Result, at_ms: int
    ) -> FeedbackEvent:
        """Build the event of one status line."""
        head, tail = rest[: status.start()], rest[status.end() :]
        syslog_name = prog.rsplit("/", 1)[0]
        to = _TO.search(head)
        recipient, domain = split_recipient(to["v"] if to else None)
        relay = _RELAY.search(head)
        dsn = _DSN.search(head)
        enhanced = normal_enhanced(dsn["v"]) if dsn else None
        detail = tail[:-1] if status.group().endswith("(") and tail.endswith(")") else tail
        detail = detail.strip()
        code: int | None = None
        command: str | None = None
        local = (relay is not None and relay["v"] == "none") or result == "expired"
        said = _SAID.match(detail)
        text: str | None = detail or None
        if said is not None:
            reply = said["reply"]
            in_reply = _IN_REPLY.search(reply)
            if in_reply is not None:
                command = normal_command(in_reply["cmd"])
                reply = reply[: in_reply.start()]
            code, reply_enhanced, text = strip_continuations(reply)
            enhanced = reply_enhanced or enhanced
            local = False
        elif result == "delivered":
            code, reply_enhanced, text = strip_continuations(detail)
            enhanced = reply_enhanced or enhanced
        return FeedbackEvent(
            at_ms=at_ms,
            ip=self._names.get(syslog_name),
            recipient=recipient,
            recipient_domain=domain,
            result=result,
            code=code,
            enhanced=enhanced,
            text=one_line(text),
            local=local,
            command=command,
            message_id=self._message_ids.get(qid),
            source="postfix",
            queue_id=qid,
        )

    def _remember(self, qid: str, message_id: str) -> None:
        """Keep the Message-ID of a queue id (bounded, oldest first out)."""
        value = normal_message_id(message_id)
        if value is None:
            return
        self._message_ids[qid] = value
        self._message_ids.move_to_end(qid)
        while len(self._message_ids) > _MAX_QUEUE_IDS:
            self._message_ids.popitem(last=False)

    def _at_ms(self, match: re.Match[str], now_ms: int) -> int | None:
        """The line's time in Unix ms, or None if it does not name a real instant."""
        groups = match.groupdict()
        if groups.get("ts") is not None:
            text = match["ts"].replace(" ", "T", 1).replace("z", "Z")
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                return None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=self._tz)
            return to_ms(moment)
        month = _MONTHS.get(match["mon"].lower())
        if month is None:
            return None
        now = datetime.fromtimestamp(now_ms / 1000, tz=self._tz)
        best: datetime | None = None
        for year in (now.year - 1, now.year, now.year + 1):
            try:
                moment = datetime(
                    year,
                    month,
                    int(match["day"]),
                    int(match["h"]),
                    int(match["m"]),
                    int(match["s"]),
                    tzinfo=self._tz,
                )
            except ValueError:
                continue  # Feb 29 outside leap years, hour 25, ...
            if best is None or abs(moment - now) < abs(best - now):
                best = moment
        if best is None or abs(best - now) > timedelta(days=366):
            return None
        return to_ms(best)
