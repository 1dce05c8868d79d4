"""Readers that turn MTA logs and complaint mailboxes into `FeedbackEvent`s, one poll at a time.

Each reader has the same small surface: `poll(now_ms) -> list[FeedbackEvent]` (new events
since the last poll), `checkpoint()` (plain data to persist; pass it back to the constructor
to continue without loss or repetition), `counters` (skipped and bad lines, for metrics) and
`close()`. `FeedbackReader` polls several of them, fills the `MessageIndex` from the log
events and attributes complaints that came without a source IP.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, tzinfo
from types import TracebackType
from typing import Protocol, Self

from kiln.feedback.arf import ArfError, parse_arf
from kiln.feedback.events import FeedbackEvent, MessageIndex
from kiln.feedback.kumomta import KumoParser
from kiln.feedback.postfix import PostfixParser
from kiln.feedback.powermta import PowerMtaParser
from kiln.feedback.tail import (
    FileTail,
    Maildir,
    SegmentCheckpoint,
    SegmentDir,
    Start,
    TailCheckpoint,
)

__all__ = [
    "ArfMaildirReader",
    "FeedbackReader",
    "FeedbackSource",
    "KumoLogReader",
    "PostfixLogReader",
    "PowerMtaLogReader",
]

_MAX_PMTA_FILES = 8


class FeedbackSource(Protocol):
    """What `FeedbackReader` needs of a reader."""

    @property
    def name(self) -> str:
        """A short name for counters and checkpoints (`postfix`, `powermta`, ...)."""
        ...

    @property
    def counters(self) -> Mapping[str, int]:
        """Lines read, events, skipped and bad lines, ... (monotonic)."""
        ...

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """Events that arrived since the last poll."""
        ...

    def checkpoint(self) -> TailCheckpoint | SegmentCheckpoint | None:
        """Where the reader stands (None: it keeps its state elsewhere, like a maildir)."""
        ...

    def close(self) -> None:
        """Release open files."""
        ...


class _Closing:
    """`with reader:` closes the reader at the end of the block."""

    def close(self) -> None:
        """Release open files (nothing by default)."""

    def __enter__(self) -> Self:
        """The reader itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the reader."""
        self.close()


class _Tailing(_Closing):
    """A reader of one followed file (`self._tail`)."""

    _tail: FileTail

    def checkpoint(self) -> TailCheckpoint:
        """The tail's position."""
        return self._tail.checkpoint()

    def close(self) -> None:
        """Close the followed files."""
        self._tail.close()


class PostfixLogReader(_Tailing):
    """Follows a Postfix mail log (`/var/log/mail.log`).

    `syslog_names` maps each warm-up transport's `syslog_name` to its IP; `tz` is the zone
    of classic syslog timestamps. See `FileTail` for `checkpoint`, `start` and `drain_ms`.
    """

    name = "postfix"

    def __init__(
        self,
        path: str | os.PathLike[str],
        syslog_names: Mapping[str, str],
        *,
        tz: tzinfo = UTC,
        checkpoint: TailCheckpoint | None = None,
        start: Start = "end",
        drain_ms: int = 60_000,
    ) -> None:
        """Follow `path`."""
        self._parser = PostfixParser(syslog_names, tz=tz)
        self._tail = FileTail(path, checkpoint=checkpoint, start=start, drain_ms=drain_ms)

    @property
    def counters(self) -> Mapping[str, int]:
        """Parser counters (`lines`, `events`, `skipped`, `bad`, `unmapped`) and tail ones."""
        return dict(self._parser.counters + self._tail.counters)

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """Events of the lines written since the last poll."""
        events: list[FeedbackEvent] = []
        for batch in self._tail.read(now_ms):
            for line in batch.lines:
                event = self._parser.parse(line, now_ms)
                if event is not None:
                    events.append(event)
        return events


class PowerMtaLogReader(_Tailing):
    """Follows a PowerMTA accounting file (`/var/log/pmta/acct.csv`).

    Every file gets its own parser, so a header is always read from the file it belongs to
    (rotation, or a restart mid-file: the tail hands over the file's first line). `tz` is
    used only for times without an offset.
    """

    name = "powermta"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        tz: tzinfo = UTC,
        checkpoint: TailCheckpoint | None = None,
        start: Start = "end",
        drain_ms: int = 60_000,
    ) -> None:
        """Follow `path`."""
        self._tz = tz
        self._tail = FileTail(path, checkpoint=checkpoint, start=start, drain_ms=drain_ms)
        self._parsers: OrderedDict[tuple[int, int], PowerMtaParser] = OrderedDict()
        self._counters: Counter[str] = Counter()

    @property
    def counters(self) -> Mapping[str, int]:
        """Parser counters (`lines`, `events`, `headers`, `ignored`, `no_header`, `bad`)."""
        return dict(self._counters + self._tail.counters)

    def _parser(self, key: tuple[int, int], head: str | None) -> PowerMtaParser:
        """The parser of one file, created (and fed the file's header) on first use."""
        parser = self._parsers.get(key)
        if parser is None:
            parser = PowerMtaParser(tz=self._tz, counters=self._counters)
            if head is not None and head.lstrip("\ufeff").strip().lower().startswith("type,"):
                parser.feed(head)
            self._parsers[key] = parser
            while len(self._parsers) > _MAX_PMTA_FILES:
                self._parsers.popitem(last=False)
        self._parsers.move_to_end(key)
        return parser

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """Events of the records written since the last poll."""
        events: list[FeedbackEvent] = []
        for batch in self._tail.read(now_ms):
            parser = self._parser((batch.dev, batch.inode), batch.head)
            for line in batch.lines:
                event = parser.feed(line)
                if event is not None:
                    events.append(event)
        return events


class KumoLogReader(_Closing):
    """Reads a KumoMTA log directory (one `log_dir` of segment files, zstd or plain).

    `egress_sources` maps `egress_source` names to IPs, for records without a
    `source_address`.
    """

    name = "kumomta"

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        egress_sources: Mapping[str, str] | None = None,
        checkpoint: SegmentCheckpoint | None = None,
        start: Start = "end",
    ) -> None:
        """Read `log_dir`."""
        self._parser = KumoParser(egress_sources)
        self._segments = SegmentDir(log_dir, checkpoint=checkpoint, start=start)

    @property
    def counters(self) -> Mapping[str, int]:
        """Parser counters (`lines`, `events`, `ignored`, `bad`, `unattributed`), segments."""
        return dict(self._parser.counters + self._segments.counters)

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """Events of the records written since the last poll (`now_ms` is not needed)."""
        del now_ms
        events: list[FeedbackEvent] = []
        for _name, lines in self._segments.read():
            for line in lines:
                if not line.strip():
                    continue
                event = self._parser.parse(line)
                if event is not None:
                    events.append(event)
        return events

    def checkpoint(self) -> SegmentCheckpoint:
        """Segments done and the open one's offset."""
        return self._segments.checkpoint()

    def close(self) -> None:
        """Nothing stays open between polls."""


class ArfMaildirReader(_Closing):
    """Reads complaint reports (ARF) delivered to a maildir.

    Each message in `new/` is parsed once and moved to `cur/` (flag `S`); one that is not a
    readable report is moved to the `.kiln-bad` folder and counted (`bad`). At most
    `max_per_poll` messages are read per poll.
    """

    name = "arf"

    def __init__(
        self,
        maildir: str | os.PathLike[str],
        *,
        bad_folder: str = ".kiln-bad",
        max_per_poll: int = 1000,
        max_message_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        """Read the maildir at `maildir`."""
        self._maildir = Maildir(maildir, bad_folder=bad_folder)
        self._max_per_poll = max_per_poll
        self._max_message_bytes = max_message_bytes
        self._counters: Counter[str] = Counter()

    @property
    def counters(self) -> Mapping[str, int]:
        """`messages`, `events`, `bad` (moved aside)."""
        return dict(self._counters)

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """Complaints in the messages delivered since the last poll."""
        events: list[FeedbackEvent] = []
        for name, path in self._maildir.new(self._max_per_poll):
            try:
                with path.open("rb") as fh:
                    data = fh.read(self._max_message_bytes + 1)
            except FileNotFoundError:
                continue  # another reader took it
            self._counters["messages"] += 1
            try:
                if len(data) > self._max_message_bytes:
                    raise ArfError("message too large")
                report = parse_arf(data)
            except ArfError:
                self._counters["bad"] += 1
                self._maildir.reject(name)
                continue
            events.append(report.event(now_ms))
            self._counters["events"] += 1
            self._maildir.accept(name)
        return events

    def checkpoint(self) -> None:
        """A maildir keeps its own state (processed messages live in `cur/`)."""
        return None

    def close(self) -> None:
        """Nothing stays open between polls."""


class FeedbackReader:
    """Polls every configured reader once a second and returns their events.

    Events that carry a Message-ID and an IP go into `index`; complaints without an IP are
    then attributed through it (their `ip`, and `recipient_domain` if missing). Complaints
    still without an IP are counted under `unattributed_complaints`.
    """

    def __init__(self, sources: Sequence[FeedbackSource], *, index: MessageIndex | None = None):
        """Poll `sources` in order; names must be distinct."""
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"feedback sources named twice: {names}")
        self._sources = tuple(sources)
        self.index = index if index is not None else MessageIndex()
        self._counters: Counter[str] = Counter()

    @property
    def sources(self) -> tuple[FeedbackSource, ...]:
        """The readers polled, in order."""
        return self._sources

    def poll(self, now_ms: int) -> list[FeedbackEvent]:
        """New events from every reader, logs before complaints, complaints attributed."""
        batches = [source.poll(now_ms) for source in self._sources]
        for events in batches:
            for event in events:
                self.index.record_event(event)
        out: list[FeedbackEvent] = []
        for events in batches:
            out.extend(self._attribute(event) for event in events)
        return out

    def _attribute(self, event: FeedbackEvent) -> FeedbackEvent:
        """A complaint with its IP filled from the index when the report did not say it."""
        if event.result != "complaint" or event.ip is not None:
            return event
        found = self.index.lookup(event.message_id)
        if found is None:
            self._counters["unattributed_complaints"] += 1
            return event
        ip, domain = found
        self._counters["attributed_complaints"] += 1
        return dataclasses.replace(event, ip=ip, recipient_domain=event.recipient_domain or domain)

    def counters(self) -> dict[str, dict[str, int]]:
        """Counters per reader name, plus `reader` for attribution counts."""
        out = {source.name: dict(source.counters) for source in self._sources}
        out["reader"] = dict(self._counters)
        return out

    def checkpoints(self) -> dict[str, TailCheckpoint | SegmentCheckpoint | None]:
        """Each reader's checkpoint by name, to persist and pass back at the next start."""
        return {source.name: source.checkpoint() for source in self._sources}

    def close(self) -> None:
        """Close every reader."""
        for source in self._sources:
            source.close()

    def __enter__(self) -> FeedbackReader:
        """The reader itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close every reader."""
        self.close()
