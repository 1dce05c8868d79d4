"""Read a YAML file into plain data plus the line and column of every key and item.

Values YAML cannot construct (an impossible date) are kept as `Unreadable` text and reported in
`SourceMap.problems`, so the caller can report them together with every other mistake.

Plan errors must name file, line and key, so loading keeps a map from each path (a tuple of
keys and indexes, as pydantic reports them) to where that path starts in the file. Duplicate
keys, syntax errors, impossible dates, empty and oversized files become `Problem`s, never
tracebacks.

Every YAML file kiln reads (plans, rule files, operator rule overrides) goes through `load_yaml`,
which is bounded so that a broken or hostile file costs milliseconds and little memory, and which
keeps no shared state, so it can run in a worker thread:

- the file is opened without blocking and must be a regular file (a FIFO, device or directory is
  refused, never waited on), and is read with a bound of `MAX_FILE_BYTES`;
- at most `MAX_NODES` values, an alias counting each time it is used: the expanded size is
  measured on the composed graph, so an alias bomb is refused before anything is expanded;
- values at most `MAX_DEPTH` lists and mappings deep: deeper nesting is a located problem, never
  a `RecursionError`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.errors import Problem, ScheduleError

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_NUMBER_CHARS",
    "Loc",
    "SourceMap",
    "Unreadable",
    "load_yaml",
    "path_text",
    "read_bounded",
    "short_repr",
]

#: Files larger than this are refused: a real plan or rule file is a few kilobytes.
MAX_FILE_BYTES = 1024 * 1024

#: Values (scalars, lists, mappings) in one file, an alias counting each time it is used. The
#: shipped rule file, the largest real file, has about 1,400.
MAX_NODES = 100_000

#: Lists and mappings inside each other around any value. Real plans use at most 6.
MAX_DEPTH = 64

#: Characters of a number YAML is asked to read: a cap has at most 10 digits, and YAML 1.1's
#: base-60 integers (`1:30:00`) cost time quadratic in their length.
MAX_NUMBER_CHARS = 100

#: Characters of a value quoted back in a problem.
_QUOTED_CHARS = 80

Loc = tuple[str | int, ...]

_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})

_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"
_STR_TAG = "tag:yaml.org,2002:str"

#: Path parts shown in a problem about nesting (the full path of a 64-deep value is unreadable).
_SHOWN_PARTS = 4


def short_repr(value: object) -> str:
    """`repr(value)`, cut to a readable length for a problem message."""
    text = repr(value)
    if len(text) <= _QUOTED_CHARS:
        return text
    return f"{text[: _QUOTED_CHARS - 20]}... ({len(text):,} characters)"


def path_text(loc: Loc) -> str:
    """`("schedules", "slow", "table", 3, "daily_cap")` as `schedules.slow.table[3].daily_cap`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class SourceMap:
    """Where each path of a loaded file starts (1-based line and column)."""

    file: str
    marks: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    #: Values that could not be read (an impossible date, say): reported with the rest.
    problems: list[Problem] = field(default_factory=list)

    def where(self, loc: Loc) -> tuple[int, int]:
        """The position of `loc`, or of its nearest ancestor that has one."""
        for end in range(len(loc), -1, -1):
            mark = self.marks.get(tuple(loc[:end]))
            if mark is not None:
                return mark
        return (1, 1)

    def problem(
        self, loc: Loc, message: str, severity: Literal["error", "warning"] = "error"
    ) -> Problem:
        """A located problem at `loc`."""
        line, column = self.where(loc)
        return Problem(self.file, line, column, path_text(loc), message, severity)


class Unreadable(str):
    """A scalar YAML could not construct; already reported, so later checks skip it."""

    __slots__ = ()


# ----- reading the bytes -----


def read_bounded(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit` (default `MAX_FILE_BYTES`).

    Opens without blocking (a FIFO with no writer would otherwise wait forever), refuses
    anything but a regular file, and never reads more than `limit` + 1 bytes, even from a file
    that grows while it is read. Raises `ScheduleError` naming the path.
    """
    bound = MAX_FILE_BYTES if limit is None else limit
    name = str(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ScheduleError([_at_top(name, _cannot_read(e))]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _file_kind(info.st_mode)
            raise ScheduleError(
                [_at_top(name, f"{kind}, not a regular file; kiln reads YAML from regular files")]
            )
        if info.st_size > bound:
            raise ScheduleError([_at_top(name, _too_big(info.st_size, bound))])
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        while got <= bound:
            chunk = os.read(fd, min(bound + 1 - got, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > bound:  # it grew after fstat
            raise ScheduleError([_at_top(name, _too_big(None, bound))])
        return b"".join(chunks)
    except OSError as e:
        raise ScheduleError([_at_top(name, _cannot_read(e))]) from None
    finally:
        os.close(fd)


def _cannot_read(e: OSError) -> str:
    """The message for a file the system would not open or read."""
    return f"cannot read the file: {e.strerror or type(e).__name__}"


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = (
        (stat.S_ISDIR, "this is a directory"),
        (stat.S_ISFIFO, "this is a FIFO (named pipe)"),
        (stat.S_ISCHR, "this is a character device"),
        (stat.S_ISBLK, "this is a block device"),
        (stat.S_ISSOCK, "this is a socket"),
    )
    for test, words in kinds:
        if test(mode):
            return words
    return "this is a special file"


def _decode(name: str, raw: bytes) -> str:
    """`raw` as UTF-8; a bad byte is a problem at its line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[line_start : e.start].decode("utf-8", errors="replace")) + 1
        bad = raw[e.start : e.end].hex(" ")
        message = f"not UTF-8 text: byte(s) {bad} ({e.reason}); save the file as UTF-8"
        raise ScheduleError([Problem(name, line, column, "", message)]) from None


# ----- composing within limits -----


class _Refused(Exception):
    """A limit was hit; becomes one located `Problem`."""

    def __init__(self, mark: yaml.Mark | None, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.loc = loc
        self.message = message


class _Loader(yaml.SafeLoader):
    """A `SafeLoader` that bounds what it composes and what merge keys (`<<`) copy."""

    def __init__(self, text: str, max_nodes: int, max_depth: int) -> None:
        super().__init__(text)
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.composed = 0
        #: Where the composer is (keys and indexes), for messages; its length is the depth.
        self.where: list[str | int] = []
        #: ids of the mappings whose merge keys are merged (each is merged once).
        self.flattened: set[int] = set()

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        """`[` or `{`, refused past the depth limit: the scanner looks ahead over every open
        bracket (a quadratic cost), so `[[[[...` must stop here, before the composer sees it."""
        if self.flow_level >= self.max_depth:
            raise _Refused(self.get_mark(), (), _too_deep(self.max_depth))
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(
        self, parent: yaml.Node | None, index: int | yaml.Node | None
    ) -> yaml.Node | None:
        """One node, refused past the depth limit or the node budget (aliases are free here)."""
        if parent is not None:
            self.where.append(_part(index))
        try:
            if len(self.where) > self.max_depth:
                mark = self._next_mark()
                raise _Refused(mark, tuple(self.where), _too_deep(self.max_depth))
            if not self.check_event(yaml.AliasEvent):
                self.composed += 1
                if self.composed > self.max_nodes:
                    mark = self._next_mark()
                    raise _Refused(mark, tuple(self.where), _too_many(self.max_nodes))
            # The stub says `index: int`; PyYAML passes the key node for a mapping's value.
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            if parent is not None:
                self.where.pop()

    def _next_mark(self) -> yaml.Mark | None:
        """Where the next event starts."""
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stub
        mark: yaml.Mark | None = event.start_mark
        return mark

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge of `<<` keys, with the copied pairs counted against the budget."""
        self._flatten(node, 0)

    def _flatten(self, node: yaml.MappingNode, depth: int) -> None:
        """Merge `node`'s `<<` keys in place, once; the copies are counted before they are made."""
        if id(node) in self.flattened:  # done: no `<<` left (a list may name it many times)
            return
        if depth > self.max_depth:
            message = f"merge keys (<<) chained more than {self.max_depth} deep"
            raise _Refused(node.start_mark, (), message)
        merge: list[tuple[yaml.Node, yaml.Node]] = []
        index = 0
        while index < len(node.value):
            key_node, value_node = node.value[index]
            if key_node.tag == _VALUE_TAG:
                key_node.tag = _STR_TAG
            if key_node.tag != _MERGE_TAG:
                index += 1
                continue
            del node.value[index]
            if isinstance(value_node, yaml.MappingNode):
                sources = [value_node]
            elif isinstance(value_node, yaml.SequenceNode):
                sources = list(value_node.value)
            else:
                raise _merge_error(node, value_node)
            pairs = len(merge) + len(node.value)
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise _merge_error(node, source)
                self._flatten(source, depth + 1)
                pairs += len(source.value)
                if 2 * pairs > self.max_nodes:  # a pair is two values
                    raise _Refused(node.start_mark, (), _too_many(self.max_nodes))
            for source in reversed(sources):  # later mappings lose to earlier ones, as in PyYAML
                merge.extend(source.value)
        if merge:
            node.value = merge + node.value
        self.flattened.add(id(node))


def _part(index: int | yaml.Node | None) -> str | int:
    """The path part of the child `compose_node` is composing."""
    if isinstance(index, int):
        return index
    if isinstance(index, yaml.ScalarNode):
        return str(index.value)
    return "<key>"


def _node_kind(node: yaml.Node) -> str:
    """`scalar`, `sequence` or `mapping`, as PyYAML words it."""
    return str(getattr(node, "id", type(node).__name__))


def _merge_error(node: yaml.MappingNode, found: yaml.Node) -> yaml.constructor.ConstructorError:
    """PyYAML's error for a `<<` that is not a mapping or a list of mappings."""
    return yaml.constructor.ConstructorError(
        "while constructing a mapping",
        node.start_mark,
        f"expected a mapping or list of mappings for merging, but found {_node_kind(found)}",
        found.start_mark,
    )


class _Meter:
    """The expanded size and depth of a composed graph, measured without expanding it.

    Each node is measured once (aliases share the node they name), so the 416-byte alias bomb
    that expands to a million values costs a hundred steps here, and is refused.
    """

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        #: id(node) -> (values in its expansion, levels of lists and mappings below it)
        self.done: dict[int, tuple[int, int]] = {}
        self.open: set[int] = set()

    def measure(self, node: yaml.Node, loc: Loc, via: yaml.Mark | None) -> tuple[int, int]:
        """`node`'s expanded size and height; `via` is the mark of the list or mapping holding it
        (where an alias is reported: the node's own mark is where its anchor was defined)."""
        max_depth = self.loader.max_depth
        known = self.done.get(id(node))
        if known is not None:
            if len(loc) + known[1] > max_depth:
                raise _Refused(via or node.start_mark, loc, _too_deep(max_depth))
            return known
        if id(node) in self.open:
            message = "an alias refers to the list or mapping that contains it"
            raise _Refused(via or node.start_mark, loc, message)
        if len(loc) > max_depth:
            raise _Refused(node.start_mark, loc, _too_deep(max_depth))
        if isinstance(node, yaml.ScalarNode):
            return (1, 0)
        children: list[tuple[yaml.Node, Loc]]
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            children = []
            for key_node, value_node in node.value:
                children.append((key_node, (*loc, "<key>")))
                children.append((value_node, (*loc, _part(key_node))))
        else:
            children = [(item, (*loc, i)) for i, item in enumerate(node.value)]
        self.open.add(id(node))
        size, height = 1, 0
        for child, child_loc in children:
            child_size, child_height = self.measure(child, child_loc, node.start_mark)
            size += child_size
            height = max(height, child_height + 1)
            if size > self.loader.max_nodes:
                raise _Refused(node.start_mark, loc, _too_many(self.loader.max_nodes))
        self.open.discard(id(node))
        self.done[id(node)] = (size, height)
        return (size, height)


def _too_deep(limit: int) -> str:
    """The message for nesting past the limit."""
    return f"nested more than {limit} lists and mappings deep; the limit is {limit}"


def _too_many(limit: int) -> str:
    """The message for a file past the node budget."""
    return (
        f"more than {limit:,} values once aliases are expanded (each use of an alias counts); "
        f"the limit is {limit:,}"
    )


class _Builder:
    """Turns a composed node tree into plain data, recording marks and collecting problems."""

    def __init__(self, loader: yaml.SafeLoader, source: SourceMap) -> None:
        self.loader = loader
        self.source = source
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        """Plain data for `node` at `loc`."""
        self.source.marks.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            message = f"cannot read {short_repr(node.value)}: a number over {MAX_NUMBER_CHARS} "
            self.source.problems.append(self.source.problem(loc, message + "characters"))
            return Unreadable(node.value)
        try:
            return self.loader.construct_object(node, deep=True)
        except (
            ValueError,
            TypeError,
            AttributeError,
            OverflowError,
            yaml.constructor.ConstructorError,
        ) as e:
            # e.g. a date that does not exist (2026-02-30), or `!!timestamp nonsense`
            self.source.problems.append(
                self.source.problem(loc, f"cannot read {short_repr(node.value)}: {_reason(e)}")
            )
            return Unreadable(node.value)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        """A mapping; a key given twice is a problem at its second place."""
        self.loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.build(key_node, (*loc, "<key>"))
            if not isinstance(key, str | int | float | bool) and key is not None:
                self.problems.append(self.source.problem(loc, f"keys must be text, got {key!r}"))
                continue
            key_text = str(key) if not isinstance(key, str) else key
            where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            child: Loc = (*loc, key_text)
            if key_text in out:
                first = self.source.marks[child]
                self.problems.append(
                    Problem(
                        self.source.file,
                        where[0],
                        where[1],
                        path_text(child),
                        f"duplicate key (first given at line {first[0]})",
                    )
                )
                continue
            self.source.marks[child] = where
            out[key_text] = self.build(value_node, child)
        return out


def _reason(e: Exception) -> str:
    """The useful part of a YAML or date error."""
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def load_yaml(path: Path, text: str | None = None) -> tuple[Any, SourceMap]:
    """Read `path` (or `text` as if read from it). Raises `ScheduleError` with every problem.

    Bounded (`MAX_FILE_BYTES`, `MAX_NODES`, `MAX_DEPTH`; see the module's docstring) and free
    of shared state, so it may run in a worker thread. Every failure is a `ScheduleError`.
    """
    name = str(path)
    if text is None:
        text = _decode(name, read_bounded(path))
    else:
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > MAX_FILE_BYTES:
            raise ScheduleError([_at_top(name, _too_big(size, MAX_FILE_BYTES))])
    try:
        return _parse(name, text)
    except RecursionError:  # the limits should make this impossible; never a traceback
        raise ScheduleError([_at_top(name, _too_deep(MAX_DEPTH))]) from None
    except MemoryError:
        message = "not enough memory to read the file; it is far larger than a plan needs"
        raise ScheduleError([_at_top(name, message)]) from None


def _parse(name: str, text: str) -> tuple[Any, SourceMap]:
    """Compose, measure and build `text`; `name` is the file's name in problems."""
    source = SourceMap(name)
    try:
        loader = _Loader(text, MAX_NODES, MAX_DEPTH)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, say)
        raise ScheduleError([_reader_problem(name, text, e)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ScheduleError([_at_top(name, "the file is empty; a plan is a YAML mapping")])
        _Meter(loader).measure(node, (), None)
        builder = _Builder(loader, source)
        data = builder.build(node, ())
    except _Refused as e:
        line, column = (e.mark.line + 1, e.mark.column + 1) if e.mark else (1, 1)
        shown = path_text(e.loc[:_SHOWN_PARTS]) + ("..." if len(e.loc) > _SHOWN_PARTS else "")
        raise ScheduleError([Problem(name, line, column, shown, e.message)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"YAML syntax error: {e.problem or e.context}"
        raise ScheduleError([Problem(name, line, column, "", message)]) from None
    except yaml.reader.ReaderError as e:
        raise ScheduleError([_reader_problem(name, text, e)]) from None
    except yaml.YAMLError as e:
        raise ScheduleError([_at_top(name, f"YAML error: {_reason(e)}")]) from None
    finally:
        loader.dispose()
    if builder.problems:
        raise ScheduleError(builder.problems + source.problems)
    return data, source


def _reader_problem(name: str, text: str, e: yaml.reader.ReaderError) -> Problem:
    """A character YAML refuses, at its line and column."""
    position = e.position if isinstance(e.position, int) else 0
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    character = e.character if isinstance(e.character, int) else 0
    message = f"the character U+{character:04X} is not allowed in YAML ({e.reason})"
    return Problem(name, line, column, "", message)


def _at_top(file: str, message: str) -> Problem:
    """A problem with the file as a whole."""
    return Problem(file, 1, 1, "", message)


def _too_big(size: int | None, limit: int) -> str:
    """The message for an oversized file (`size` None: it grew past the limit while read)."""
    limit_text = f"{_mib(limit)} ({limit:,} bytes)"
    if size is None:
        return f"the file grew past {limit_text} while it was read; files over that are refused"
    return (
        f"the file is {size / (1 << 20):.1f} MiB ({size:,} bytes); files over {limit_text} are "
        "refused (a plan or rule file is a few kilobytes)"
    )


def _mib(size: int) -> str:
    """`1 MiB`, `2.5 MiB`."""
    return f"{size / (1 << 20):.2f}".rstrip("0").rstrip(".") + " MiB"
