"""Read a YAML file into plain data plus the line and column of every key and item.

Values YAML cannot construct (an impossible date) are kept as `Unreadable` text and reported in
`SourceMap.problems`, so the caller can report them together with every other mistake.

Plan errors must name file, line and key, so loading keeps a map from each path (a tuple of
keys and indexes, as pydantic reports them) to where that path starts in the file. Duplicate
keys, syntax errors, impossible dates, empty and oversized files become `Problem`s, never
tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.errors import Problem, ScheduleError

__all__ = ["MAX_FILE_BYTES", "Loc", "SourceMap", "Unreadable", "load_yaml", "path_text"]

#: Plans larger than this are refused: a real plan is a few kilobytes.
MAX_FILE_BYTES = 2 * 1024 * 1024

Loc = tuple[str | int, ...]


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
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, yaml.constructor.ConstructorError) as e:
            # e.g. a date that does not exist: 2026-02-30
            self.source.problems.append(
                self.source.problem(loc, f"cannot read {node.value!r}: {_reason(e)}")
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
    """Read `path` (or `text` as if read from it). Raises `ScheduleError` with every problem."""
    name = str(path)
    source = SourceMap(name)
    if text is None:
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ScheduleError([_at_top(name, _too_big(size))])
            raw = path.read_bytes()
        except OSError as e:
            raise ScheduleError([_at_top(name, f"cannot read the file: {e.strerror}")]) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ScheduleError([_at_top(name, f"not UTF-8 text ({e.reason})")]) from None
    elif len(text.encode()) > MAX_FILE_BYTES:
        raise ScheduleError([_at_top(name, _too_big(len(text.encode())))])
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ScheduleError([_at_top(name, "the file is empty; a plan is a YAML mapping")])
        builder = _Builder(loader, source)
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"YAML syntax error: {e.problem or e.context}"
        raise ScheduleError([Problem(name, line, column, "", message)]) from None
    except yaml.YAMLError as e:
        raise ScheduleError([_at_top(name, f"YAML error: {_reason(e)}")]) from None
    finally:
        loader.dispose()
    if builder.problems:
        raise ScheduleError(builder.problems + source.problems)
    return data, source


def _at_top(file: str, message: str) -> Problem:
    """A problem with the file as a whole."""
    return Problem(file, 1, 1, "", message)


def _too_big(size: int) -> str:
    """The message for an oversized file."""
    return (
        f"the file is {size / 1_048_576:.1f} MiB; plans over "
        f"{MAX_FILE_BYTES // 1_048_576} MiB are refused"
    )
