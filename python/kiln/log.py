"""Logging for the daemon: structlog, JSON lines under a service manager, console on a tty.

Every state-changing decision is logged with an `event` name and its reason. Values of keys
that look like secrets (keys, tokens, passwords) are replaced before anything is written, so
an SNDS key or an OAuth token never reaches a log even if a caller passes one by mistake.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = ["LogFormat", "configure", "get_logger", "redact"]

LogFormat = Literal["auto", "json", "console"]

_SECRET_KEY = re.compile(r"(secret|token|password|passwd|api_?key|snds_?key|credential)", re.I)
_SECRET_IN_TEXT = re.compile(r"((?:key|token|password|secret)=)[^&\s\"']+", re.I)
REDACTED = "***"


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hide secret-looking values and `key=...` parts of URLs."""
    for name, value in list(event.items()):
        if _SECRET_KEY.search(name):
            event[name] = REDACTED
        elif isinstance(value, str) and "=" in value:
            event[name] = _SECRET_IN_TEXT.sub(rf"\1{REDACTED}", value)
    return event


def configure(
    fmt: LogFormat = "auto", stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """Set up structlog once per process. `auto` is console on a terminal, else JSON lines."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(level)


class _ToStructlog(logging.Handler):
    """Records of libraries that use the standard `logging` (apscheduler, asyncio, httpx) as
    kiln's own lines: JSON under a service manager, redacted, tracebacks as a field."""

    #: Libraries whose INFO lines are per-request or per-job noise (every second, every call).
    QUIET = ("apscheduler", "httpx", "httpcore")

    def emit(self, record: logging.LogRecord) -> None:
        """Re-log the record through structlog at its level."""
        if record.levelno < logging.WARNING and record.name.startswith(self.QUIET):
            return
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        fields: dict[str, Any] = {"component": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        structlog.get_logger().log(record.levelno, message, **fields)


def _route_stdlib_logging(level: int) -> None:
    """Send the standard library's log records through structlog (once)."""
    root = logging.getLogger()
    if not any(isinstance(h, _ToStructlog) for h in root.handlers):
        root.addHandler(_ToStructlog())
    root.setLevel(max(level, logging.INFO))


def get_logger(**context: Any) -> Any:
    """A bound logger; `context` is added to every line it writes."""
    return structlog.get_logger().bind(**context)
