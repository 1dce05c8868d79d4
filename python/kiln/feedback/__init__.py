"""Delivery feedback: what the MTAs' logs and the providers' complaint reports say, as events.

Readers follow PowerMTA accounting files, KumoMTA log directories, Postfix mail logs and a
maildir of ARF complaint reports (formats: docs/signals.md, "Wire formats"). Each produces
`FeedbackEvent`s; `FeedbackReader` polls them together once a second and attributes
complaints without a source IP through a `MessageIndex` of recent Message-IDs. Parsers never
raise on bad input: they skip the line and count it.
"""

from __future__ import annotations

from kiln.feedback.arf import ArfError, ArfReport, parse_arf
from kiln.feedback.events import FeedbackEvent, MessageIndex, Result, SourceName
from kiln.feedback.kumomta import KumoParser
from kiln.feedback.postfix import PostfixParser
from kiln.feedback.powermta import PowerMtaParser
from kiln.feedback.reader import (
    ArfMaildirReader,
    FeedbackReader,
    FeedbackSource,
    KumoLogReader,
    PostfixLogReader,
    PowerMtaLogReader,
)
from kiln.feedback.tail import (
    FilePosition,
    FileTail,
    Maildir,
    SegmentCheckpoint,
    SegmentDir,
    Start,
    TailBatch,
    TailCheckpoint,
)

__all__ = [
    "ArfError",
    "ArfMaildirReader",
    "ArfReport",
    "FeedbackEvent",
    "FeedbackReader",
    "FeedbackSource",
    "FilePosition",
    "FileTail",
    "KumoLogReader",
    "KumoParser",
    "Maildir",
    "MessageIndex",
    "PostfixLogReader",
    "PostfixParser",
    "PowerMtaLogReader",
    "PowerMtaParser",
    "Result",
    "SegmentCheckpoint",
    "SegmentDir",
    "SourceName",
    "Start",
    "TailBatch",
    "TailCheckpoint",
    "parse_arf",
]
