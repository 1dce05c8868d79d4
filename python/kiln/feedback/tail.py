"""Follow log files, KumoMTA segment directories and maildirs without losing or repeating lines.

- `FileTail` follows one path like `tail -F`: whole lines only, rotation by rename (the old
  file is kept open and finished while its writer still appends, then closed after
  `drain_ms` of silence), truncation (copytruncate), a path that does not exist yet. Its
  `checkpoint()` is plain data the caller persists; a tail restored from it continues
  exactly where the last one stopped, even across a rotation that happened meanwhile (the
  old file is found again by its inode next to the path).
- `SegmentDir` reads a KumoMTA log directory: each finished segment once; the newest
  segment, still being written, only up to its last complete line (plain) or not at all
  until a newer one exists (zstd, which can only be read whole).
- `Maildir` lists `new/` and moves each message to `cur/` (flag `S`) or aside to a
  `.kiln-bad` folder, so no message is read twice.

Nothing here reads the clock: `now_ms` is an argument where time matters.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import zstandard

__all__ = [
    "FilePosition",
    "FileTail",
    "Maildir",
    "SegmentCheckpoint",
    "SegmentDir",
    "Start",
    "TailBatch",
    "TailCheckpoint",
]

#: Where to begin when there is no checkpoint: the whole existing content, or only what is
#: written from now on. A file that appears later is always read from its beginning.
Start = Literal["beginning", "end"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HEAD_BYTES = 64 * 1024


def _decode(raw: bytes) -> str:
    """One line as text (invalid UTF-8 replaced), without its line feed."""
    return raw.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class FilePosition:
    """A file by identity (device, inode) and the byte offset read up to (whole lines)."""

    dev: int
    inode: int
    offset: int


@dataclass(frozen=True, slots=True)
class TailCheckpoint:
    """Where a `FileTail` stands: the file at `path`, plus rotated files still being drained."""

    path: str
    current: FilePosition | None
    draining: tuple[FilePosition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "path": self.path,
            "current": None if self.current is None else _position_dict(self.current),
            "draining": [_position_dict(p) for p in self.draining],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TailCheckpoint:
        """The checkpoint `to_dict()` wrote. Raises KeyError/TypeError/ValueError if mangled."""
        current = data.get("current")
        return cls(
            path=str(data["path"]),
            current=None if current is None else _position(current),
            draining=tuple(_position(p) for p in data.get("draining", ())),
        )


def _position_dict(position: FilePosition) -> dict[str, int]:
    """A position as plain data."""
    return {"dev": position.dev, "inode": position.inode, "offset": position.offset}


def _position(data: Mapping[str, Any]) -> FilePosition:
    """A position from plain data."""
    return FilePosition(int(data["dev"]), int(data["inode"]), int(data["offset"]))


@dataclass(frozen=True, slots=True)
class TailBatch:
    """Whole lines read from one file, in order, without their line feeds.

    `dev`/`inode` name the file (a rotation changes them); `start_offset` is where the first
    line began; `head` is the file's first line when `start_offset` is not 0 (a header-led
    format such as PowerMTA's CSV needs it when it starts mid-file), else None.
    """

    dev: int
    inode: int
    start_offset: int
    lines: tuple[str, ...]
    head: str | None = None


@dataclass
class _Open:
    """An open file being read: fd, identity, offset of the next unread byte."""

    fd: int
    dev: int
    inode: int
    offset: int
    idle_since_ms: int | None = None
    skipping: bool = False

    def position(self) -> FilePosition:
        """Identity and offset as plain data."""
        return FilePosition(self.dev, self.inode, self.offset)


class FileTail:
    """Follows one path like `tail -F`; call `read(now_ms)` once a poll, `close()` at the end.

    `counters`: `rotations`, `truncations`, `oversized_lines` (longer than `max_line_bytes`,
    skipped), `lost_files` (a checkpointed file that could not be found again).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        checkpoint: TailCheckpoint | None = None,
        start: Start = "end",
        drain_ms: int = 60_000,
        max_line_bytes: int = 1 << 20,
        max_read_bytes: int = 8 << 20,
    ) -> None:
        """Follow `path`; continue from `checkpoint` if given (its path must be `path`)."""
        self._path = os.fspath(path)
        if checkpoint is not None and checkpoint.path != self._path:
            raise ValueError(f"checkpoint is for {checkpoint.path!r}, not {self._path!r}")
        self._checkpoint = checkpoint
        self._start = start
        self._drain_ms = drain_ms
        self._max_line_bytes = max_line_bytes
        self._max_read_bytes = max(max_read_bytes, max_line_bytes + 1)
        self._current: _Open | None = None
        self._draining: list[_Open] = []
        self._started = False
        self.counters: Counter[str] = Counter()
        if checkpoint is None and start == "end":
            # "From now on" means from when the tail was made, not from its first read: lines
            # written in between (an MTA logging as the daemon starts) are not skipped.
            self._begin()
            self._started = True

    @property
    def path(self) -> str:
        """The path followed."""
        return self._path

    def checkpoint(self) -> TailCheckpoint:
        """Where the tail stands now; persist it and pass it back to continue without loss."""
        if not self._started:
            if self._checkpoint is not None:
                return self._checkpoint
            return TailCheckpoint(self._path, None)
        return TailCheckpoint(
            self._path,
            None if self._current is None else self._current.position(),
            tuple(f.position() for f in self._draining),
        )

    def close(self) -> None:
        """Close every open file. Safe to call twice."""
        for f in [*self._draining, *([self._current] if self._current else [])]:
            os.close(f.fd)
        self._draining = []
        self._current = None

    def __enter__(self) -> FileTail:
        """The tail itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close every open file."""
        self.close()

    def read(self, now_ms: int) -> list[TailBatch]:
        """New whole lines: rotated files still draining first (oldest first), then the path."""
        if not self._started:
            self._begin()
            self._started = True
        self._follow()
        batches: list[TailBatch] = []
        for old in list(self._draining):
            batch = self._read(old)
            if batch is not None:
                old.idle_since_ms = None
                batches.append(batch)
                continue
            if old.idle_since_ms is None:
                old.idle_since_ms = now_ms
            if now_ms - old.idle_since_ms >= self._drain_ms:
                last = self._read(old, final=True)
                if last is not None:
                    batches.append(last)
                os.close(old.fd)
                self._draining.remove(old)
        if self._current is not None:
            batch = self._read(self._current)
            if batch is not None:
                batches.append(batch)
        return batches

    # ----- opening and following -----

    def _open(self, path: str, offset: int | None) -> _Open | None:
        """Open `path` at `offset` (None: at its end), or None if it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        if offset is None:
            offset = self._last_line_end(fd, info.st_size)
        elif offset > info.st_size:
            self.counters["truncations"] += 1
            offset = 0
        return _Open(fd, info.st_dev, info.st_ino, offset)

    def _last_line_end(self, fd: int, size: int) -> int:
        """Offset just after the last line feed before `size` (0 if none is near the end)."""
        start = max(0, size - _HEAD_BYTES)
        tail = os.pread(fd, size - start, start)
        cut = tail.rfind(b"\n")
        return start + cut + 1 if cut >= 0 else (size if start > 0 else 0)

    def _find(self, position: FilePosition) -> _Open | None:
        """The file with `position`'s identity: the path itself or a sibling (rotated name)."""
        directory = os.path.dirname(self._path) or "."
        candidates = [self._path]
        with contextlib.suppress(OSError):
            candidates += sorted(
                e.path for e in os.scandir(directory) if e.path != self._path and e.is_file()
            )
        for candidate in candidates:
            try:
                info = os.stat(candidate)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) == (position.dev, position.inode):
                opened = self._open(candidate, position.offset)
                if opened is not None and (opened.dev, opened.inode) == (info.st_dev, info.st_ino):
                    return opened
                if opened is not None:
                    os.close(opened.fd)
        self.counters["lost_files"] += 1
        return None

    def _begin(self) -> None:
        """First read: restore the checkpoint, or open the path per `start`."""
        checkpoint = self._checkpoint
        if checkpoint is None:
            self._current = self._open(self._path, None if self._start == "end" else 0)
            return
        for position in checkpoint.draining:
            opened = self._find(position)
            if opened is not None:
                self._draining.append(opened)
        if checkpoint.current is not None:
            opened = self._find(checkpoint.current)
            if opened is not None:
                self._current = opened
        # _follow() notices when the path now holds a newer file than `current`.

    def _follow(self) -> None:
        """Notice a rotation (new inode at the path), a truncation, or a path that appeared."""
        try:
            info = os.stat(self._path)
        except FileNotFoundError:
            return  # renamed away, not replaced yet: keep reading what is open
        except OSError as error:
            if error.errno in {errno.EACCES, errno.ENOTDIR}:
                return
            raise
        current = self._current
        if current is None:
            self._current = self._open(self._path, 0)
            return
        if (info.st_dev, info.st_ino) != (current.dev, current.inode):
            fresh = self._open(self._path, 0)
            if fresh is None:
                return
            self.counters["rotations"] += 1
            current.idle_since_ms = None
            self._draining.append(current)
            self._current = fresh
        elif info.st_size < current.offset:
            self.counters["truncations"] += 1
            current.offset = 0
            current.skipping = False

    # ----- reading -----

    def _read(self, f: _Open, *, final: bool = False) -> TailBatch | None:
        """Whole lines from `f`'s offset on (with `final`, also an unterminated last line)."""
        start = f.offset
        data = os.pread(f.fd, self._max_read_bytes, f.offset)
        if not data:
            return None
        cut = data.rfind(b"\n")
        if cut < 0:
            if final:
                f.offset += len(data)
                return self._batch(f, start, [] if f.skipping else [data])
            if len(data) > self._max_line_bytes:
                f.offset += len(data)
                if not f.skipping:
                    self.counters["oversized_lines"] += 1
                f.skipping = True
            return None
        chunk = data[: cut + 1]
        f.offset += len(chunk)
        raw = chunk.split(b"\n")[:-1]
        if f.skipping:
            raw = raw[1:]
            f.skipping = False
        for i, line in enumerate(raw):
            if len(line) > self._max_line_bytes:
                self.counters["oversized_lines"] += 1
                raw[i] = b""
        if final and cut + 1 < len(data):
            f.offset += len(data) - cut - 1
            raw.append(data[cut + 1 :])
        return self._batch(f, start, raw)

    def _batch(self, f: _Open, start: int, raw: list[bytes]) -> TailBatch | None:
        """A batch of decoded lines (None if empty), with the file's head when mid-file."""
        if not raw:
            return None
        head: str | None = None
        if start > 0:
            first = os.pread(f.fd, _HEAD_BYTES, 0)
            end = first.find(b"\n")
            head = _decode(first[:end] if end >= 0 else first)
        return TailBatch(f.dev, f.inode, start, tuple(_decode(r) for r in raw), head)


@dataclass(frozen=True, slots=True)
class SegmentCheckpoint:
    """Where a `SegmentDir` stands: segments finished, and the open one's offset."""

    done: frozenset[str]
    current: str | None = None
    offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"done": sorted(self.done), "current": self.current, "offset": self.offset}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentCheckpoint:
        """The checkpoint `to_dict()` wrote."""
        current = data.get("current")
        return cls(
            frozenset(str(n) for n in data.get("done", ())),
            None if current is None else str(current),
            int(data.get("offset", 0)),
        )


class SegmentDir:
    """Reads each KumoMTA log segment in `directory` once, in name (= time) order.

    `counters`: `segments` (finished and read), `bad_segments` (zstd data that would not
    decompress; the lines before the damage are kept).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        checkpoint: SegmentCheckpoint | None = None,
        start: Start = "end",
        max_read_bytes: int = 8 << 20,
    ) -> None:
        """Follow `directory`; continue from `checkpoint` if given."""
        self._dir = Path(directory)
        self._done: set[str] = set(checkpoint.done) if checkpoint else set()
        self._current = checkpoint.current if checkpoint else None
        self._offset = checkpoint.offset if checkpoint else 0
        self._fresh = checkpoint is None and start == "end"
        self._max_read_bytes = max_read_bytes
        self.counters: Counter[str] = Counter()

    def checkpoint(self) -> SegmentCheckpoint:
        """Where the reader stands; persist it and pass it back to continue."""
        return SegmentCheckpoint(frozenset(self._done), self._current, self._offset)

    def _names(self) -> list[str]:
        """Segment file names, oldest first (KumoMTA names them by creation time)."""
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())

    def read(self) -> list[tuple[str, list[str]]]:
        """(segment name, new lines) for each segment with something new."""
        names = self._names()
        present = set(names)
        self._done &= present
        if self._current is not None and self._current not in present:
            self._current, self._offset = None, 0
        if self._fresh:
            self._fresh = False
            self._skip_existing(names)
        out: list[tuple[str, list[str]]] = []
        for name in names:
            if name in self._done:
                continue
            finished = name != names[-1]
            lines = self._segment(name, finished=finished)
            if lines:
                out.append((name, lines))
        return out

    def _skip_existing(self, names: list[str]) -> None:
        """`start="end"`: everything already written counts as read."""
        if not names:
            return
        self._done.update(names[:-1])
        newest = self._dir / names[-1]
        with newest.open("rb") as fh:
            if fh.read(4) == _ZSTD_MAGIC:
                self._done.add(names[-1])
                return
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - _HEAD_BYTES)
            fh.seek(start)
            cut = fh.read().rfind(b"\n")
        self._current = names[-1]
        self._offset = start + cut + 1 if cut >= 0 else 0

    def _segment(self, name: str, *, finished: bool) -> list[str]:
        """New lines of one segment; marks it done when it is finished and fully read."""
        path = self._dir / name
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            return []
        with fh:
            magic = fh.read(4)
            if magic == _ZSTD_MAGIC or (not finished and _ZSTD_MAGIC.startswith(magic)):
                if not finished:
                    return []  # compressed: readable only once closed
                lines = self._zstd(fh)
                self._finish(name)
                return lines
            offset = self._offset if self._current == name else 0
            fh.seek(offset)
            data = fh.read() if finished else fh.read(self._max_read_bytes)
        if finished:
            self._finish(name)
            raw = data.split(b"\n")
            if raw and raw[-1] == b"":
                raw.pop()
            return [_decode(r) for r in raw]
        cut = data.rfind(b"\n")
        self._current = name
        self._offset = offset + cut + 1
        return [_decode(r) for r in data[: cut + 1].split(b"\n")[:-1]] if cut >= 0 else []

    def _finish(self, name: str) -> None:
        """Mark a segment read."""
        self._done.add(name)
        self.counters["segments"] += 1
        if self._current == name:
            self._current, self._offset = None, 0

    def _zstd(self, fh: Any) -> list[str]:
        """Every line of a finished zstd segment (those before any damage)."""
        fh.seek(0)
        lines: list[str] = []
        pending = b""
        try:
            with zstandard.ZstdDecompressor().stream_reader(
                fh, read_across_frames=True, closefd=False
            ) as reader:
                while chunk := reader.read(1 << 20):
                    pieces = (pending + chunk).split(b"\n")
                    pending = pieces.pop()
                    lines.extend(_decode(p) for p in pieces)
        except zstandard.ZstdError:
            self.counters["bad_segments"] += 1
            return lines
        if pending:
            lines.append(_decode(pending))
        return lines


class Maildir:
    """A maildir whose `new/` messages are handed out once, then filed.

    `accept(name)` moves a message to `cur/` with the `S` (seen) flag; `reject(name)` moves
    it to the `bad_folder` sub-maildir (`.kiln-bad` by default), created when needed.
    """

    def __init__(self, path: str | os.PathLike[str], *, bad_folder: str = ".kiln-bad") -> None:
        """Use the maildir at `path` (its `new/` and `cur/` are created if missing)."""
        self._path = Path(path)
        self._bad = self._path / bad_folder

    @property
    def path(self) -> Path:
        """The maildir."""
        return self._path

    def new(self, limit: int = 1000) -> Iterator[tuple[str, Path]]:
        """(name, path) of up to `limit` messages in `new/`, oldest name first."""
        try:
            names = sorted(
                e.name for e in os.scandir(self._path / "new") if not e.name.startswith(".")
            )
        except FileNotFoundError:
            return
        for name in names[:limit]:
            yield name, self._path / "new" / name

    def accept(self, name: str) -> Path:
        """File a processed message in `cur/` with the seen flag; returns its new path."""
        return self._file(name, self._path)

    def reject(self, name: str) -> Path:
        """Move a message that could not be read to the bad folder; returns its new path."""
        return self._file(name, self._bad)

    def _file(self, name: str, maildir: Path) -> Path:
        """Rename `new/name` into `maildir/cur/` with info `:2,S` (flags kept, S added)."""
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        base, sep, info = name.partition(":2,")
        flags = "".join(sorted(set(info) | {"S"})) if sep else "S"
        target = maildir / "cur" / f"{base}:2,{flags}"
        os.rename(self._path / "new" / name, target)
        return target
