"""From the plan's `signals.feedback` section to readers, and from their events to `report`s.

`READERS` is the table: one entry per key of the section (`kiln.policyspec.FeedbackSpec`),
saying how that key's reader is built. A new MTA log reader is its module in this package,
its key in `FeedbackSpec` and one entry here (a test checks the table and the spec agree).
The daemon polls the readers off the event loop (`read_reports`) and serves the lines to
the engine on its thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from kiln.feedback.events import FeedbackEvent
from kiln.feedback.reader import (
    ArfMaildirReader,
    FeedbackReader,
    FeedbackSource,
    KumoLogReader,
    PostfixLogReader,
    PowerMtaLogReader,
)
from kiln.feedback.tail import SegmentCheckpoint, TailCheckpoint
from kiln.postfix import wait_of
from kiln.records import Held
from kiln.schedule import Plan

__all__ = [
    "READERS",
    "ReaderSite",
    "checkpoints_json",
    "feedback_reader",
    "held_of",
    "read_reports",
    "report_line",
]

#: Longest reply text a `report` carries (the engine's bound).
_MAX_TEXT = 1000


@dataclass(frozen=True, slots=True)
class ReaderSite:
    """What a reader is built with besides its own settings: the folder relative paths are
    read from, the plan's zone (for log timestamps without one) and the saved checkpoints."""

    base: Path
    zone: ZoneInfo
    saved: Mapping[str, dict[str, Any]]

    def path(self, text: str) -> Path:
        """A configured path: `~` expanded, relative ones from the plan's folder."""
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base / p

    def tail(self, name: str) -> TailCheckpoint | None:
        """Where the file reader `name` got to, if saved."""
        data = self.saved.get(name)
        return TailCheckpoint.from_dict(data) if data else None

    def segments(self, name: str) -> SegmentCheckpoint | None:
        """Where the segment-directory reader `name` got to, if saved."""
        data = self.saved.get(name)
        return SegmentCheckpoint.from_dict(data) if data else None


#: Key of the plan's feedback section -> how its reader is built from its settings.
READERS: dict[str, Callable[[Any, ReaderSite], FeedbackSource]] = {
    "postfix": lambda spec, site: PostfixLogReader(
        site.path(spec.path), spec.syslog_names, tz=site.zone, checkpoint=site.tail("postfix")
    ),
    "powermta": lambda spec, site: PowerMtaLogReader(
        site.path(spec.path), tz=site.zone, checkpoint=site.tail("powermta")
    ),
    "kumomta": lambda spec, site: KumoLogReader(
        site.path(spec.log_dir),
        egress_sources=spec.egress_sources,
        checkpoint=site.segments("kumomta"),
    ),
    "arf_maildir": lambda spec, site: ArfMaildirReader(site.path(spec)),
}


def feedback_reader(
    plan: Plan, checkpoints: Mapping[str, dict[str, Any]] | None = None
) -> FeedbackReader | None:
    """Readers for the plan's `signals.feedback`, resumed from saved checkpoints; None when
    the plan reads no feedback."""
    spec = plan.signals.feedback
    if spec is None:
        return None
    site = ReaderSite(
        Path(plan.source).parent if plan.source else Path(), plan.zone, checkpoints or {}
    )
    return FeedbackReader(
        [
            build(settings, site)
            for name, build in READERS.items()
            if (settings := getattr(spec, name)) is not None
        ]
    )


def report_line(e: FeedbackEvent) -> bytes | None:
    """The native `report` request for one event (None: nothing to report).

    Events without an IP or a recipient domain cannot be charged to a key; `expired` says
    nothing about the receiver. An MTA-internal failure counts as a deferral without its
    reply, so it can never fire a reply rule.
    """
    if e.ip is None or e.recipient_domain is None or e.result == "expired":
        return None
    req: dict[str, Any] = {
        "op": "report",
        "ip": e.ip,
        "domain": e.recipient_domain,
        "result": e.result,
    }
    if not e.local and e.code is not None:
        req["code"] = e.code
        if e.enhanced:
            req["enhanced"] = e.enhanced
        if e.text:
            req["text"] = e.text[:_MAX_TEXT]
    return json.dumps(req, separators=(",", ":")).encode() + b"\n"


def checkpoints_json(reader: FeedbackReader) -> str:
    """The readers' checkpoints as the store keeps them."""
    return json.dumps(
        {k: v.to_dict() for k, v in reader.checkpoints().items() if v is not None},
        sort_keys=True,
    )


def held_of(e: FeedbackEvent) -> Held | None:
    """The recipient of a deferral kiln's Postfix transport table asked for (a `retry:`
    answer, kiln.postfix.WAIT_TEXT), or None."""
    if e.source != "postfix" or e.result != "deferred" or not e.queue_id or not e.recipient:
        return None
    wait = wait_of(e.text)
    if wait is None:
        return None
    return Held(e.queue_id, e.recipient, wait[0], wait[1], e.at_ms)


def read_reports(
    reader: FeedbackReader, now_ms: int
) -> tuple[list[bytes], list[Held], str, list[FeedbackEvent]]:
    """New events as `report` lines, the recipients kiln asked Postfix to hold, the
    checkpoints after them, and the events that may put a recipient on the suppression list
    (remote bounces, complaints, and deferrals with an enhanced status, naming a recipient).
    Any thread: touches only the readers."""
    lines: list[bytes] = []
    held: list[Held] = []
    said_no: list[FeedbackEvent] = []
    for e in reader.poll(now_ms):
        if (h := held_of(e)) is not None:
            held.append(h)  # kiln's own wait says nothing about the receiver
            continue
        if line := report_line(e):
            lines.append(line)
        if (
            e.recipient
            and not e.local
            and (e.result in ("bounced", "complaint") or (e.result == "deferred" and e.enhanced))
        ):
            said_no.append(e)  # the suppression list's rules judge (SuppressionList.verdict)
    return lines, held, checkpoints_json(reader), said_no
