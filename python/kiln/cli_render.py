"""`kiln render {pmta,kumomta}`: write PowerMTA's or KumoMTA's warm-up configuration from a
plan (nominal caps at an instant) or from the running daemon (live caps), once or whenever
it changes (`--watch`). docs/integrations/powermta.md, docs/integrations/kumomta.md.

Files are replaced atomically: each is written to FILE.tmp in its own folder, read back and
checked (kiln.mtarender), flushed to disk, then renamed over FILE; a render that fails its
check leaves the old files in place and names every problem.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from kiln.client import Client, ClientError
from kiln.clock import SystemClock
from kiln.errors import KilnError, ScheduleError
from kiln.mtarender import (
    KUMO_FILES,
    RenderOptions,
    check_kumomta,
    check_pmta,
    render_kumomta,
    render_pmta,
    same_content,
)
from kiln.mtashape import Shape, nominal_engine, shape_of
from kiln.planfile import load_plan
from kiln.schedule import Plan

__all__ = [
    "DaemonSource",
    "PlanSource",
    "RenderError",
    "ShapeSource",
    "Watcher",
    "add_render_verb",
    "render_files",
    "render_main",
    "write_checked",
]

MTAS = ("pmta", "kumomta")


class RenderError(KilnError):
    """A render that cannot be written: its check found problems, or the files cannot be."""

    def __init__(self, what: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__("\n  ".join([what, *self.problems]))


def add_render_verb(verbs: Any, state_dir_help: str, instant: Callable[[str], int]) -> None:
    """`render` on the `kiln` parser's verbs; `instant` parses `--at` (ISO 8601 with offset)."""
    p = verbs.add_parser(
        "render",
        help="write PowerMTA's or KumoMTA's warm-up rates from the plan or the running daemon",
    )
    p.add_argument("mta", choices=MTAS, help="pmta: one include file; kumomta: two TOML files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, metavar="PLAN", help="render the plan's nominal caps")
    src.add_argument(
        "--daemon",
        action="store_true",
        help="render the running daemon's live caps (pauses, suspensions, slow-downs, use)",
    )
    p.add_argument(
        "--at",
        type=instant,
        metavar="ISO8601",
        help="with --config: the instant whose caps are rendered (default now), e.g. "
        "2026-12-02T10:00:00+01:00",
    )
    p.add_argument("--state-dir", type=Path, help=state_dir_help)
    p.add_argument("--socket", type=Path, help="with --daemon: default STATE_DIR/operator.sock")
    p.add_argument(
        "--pool", action="append", default=[], help="only this pool and its IPs (repeatable)"
    )
    p.add_argument(
        "--hostname",
        metavar="TEMPLATE",
        help="each IP's EHLO name; {ip} and {ip_dashed} are replaced, e.g. "
        "'mta-{ip_dashed}.example.com' (required for pmta; kumomta: ehlo_domain if given)",
    )
    p.add_argument(
        "--max-smtp-out",
        type=int,
        default=2,
        metavar="N",
        help="pmta: connections per domain queue of a warming IP (default 2)",
    )
    p.add_argument(
        "--connection-limit",
        type=int,
        default=2,
        metavar="N",
        help="kumomta: connections per warming source and provider (default 2)",
    )
    p.add_argument(
        "--max-burst",
        type=int,
        metavar="N",
        help="kumomta: add ,max_burst=N to each rate (KumoMTA 2025.01.29 or later)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="pmta: the file; kumomta: the folder of its two files (default: standard output)",
    )
    p.add_argument("--watch", action="store_true", help="keep rendering as the caps change")
    p.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="--watch: how often to look (default 5)",
    )
    p.add_argument(
        "--reload-command",
        metavar="CMD",
        help="--watch: run through the shell after each write, e.g. 'pmta reload'",
    )
    p.add_argument(
        "--reload-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="--watch: the reload command is stopped after this long (default 30)",
    )


# ---------------------------------------------------------------- where the caps come from


class ShapeSource(Protocol):
    """Where a watch reads the caps: `fetch` raises KilnError when it cannot."""

    #: "live" or "nominal", for the files' header.
    kind: str

    def fetch(self, now_ms: int) -> tuple[Shape, str]:
        """The shape at `now_ms` and a digest of the plan's text ("" if not read here)."""
        ...


@dataclass
class PlanSource:
    """A plan file's nominal caps; it is re-read when its content changes, and a version with
    mistakes is reported (`log`) while the last good one stays in use."""

    path: Path
    log: Callable[[str], None]
    kind: str = "nominal"
    _digest: str = ""
    _plan: Plan | None = None

    def fetch(self, now_ms: int) -> tuple[Shape, str]:
        """The plan's shape at `now_ms` (KilnError if no good version was ever read)."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            if self._plan is None:
                raise KilnError(f"cannot read the plan {self.path}: {e.strerror or e}") from None
            self.log(f"cannot read the plan {self.path} ({e.strerror or e}); the last one stays")
            data = b""
        digest = hashlib.sha256(data).hexdigest()[:16] if data else self._digest
        if digest != self._digest:
            try:
                plan = load_plan(self.path)
            except ScheduleError as e:
                lines = [str(p) for p in e.problems]
                if self._plan is None:
                    raise RenderError(f"the plan {self.path} has mistakes", lines) from None
                self.log(f"the plan {self.path} has mistakes; the last good one stays")
                for line in lines:
                    self.log(f"  {line}")
            else:
                self._plan = plan
            self._digest = digest
        assert self._plan is not None
        return shape_of(nominal_engine(self._plan, now_ms), self._plan, now_ms), self._digest


@dataclass
class DaemonSource:
    """The running daemon's live caps, asked over its operator socket (`caps`)."""

    socket: Path
    why: str = "--socket"
    kind: str = "live"

    def fetch(self, now_ms: int) -> tuple[Shape, str]:
        """The daemon's shape now (`now_ms` is the daemon's own; KilnError if unreachable)."""
        del now_ms
        try:
            with Client(self.socket) as c:
                reply = c.request("caps")
        except ClientError as e:
            raise KilnError(
                f"{e}\n  looked for the operator socket at {self.socket.absolute()}, from "
                f"{self.why}"
            ) from None
        if not reply.pop("ok", False):
            raise KilnError(f"the daemon refused caps: {reply.get('error', reply)}")
        try:
            return Shape.from_json(reply), ""
        except ValueError as e:
            raise KilnError(str(e)) from None


# ---------------------------------------------------------------- rendering and writing


def render_files(mta: str, shape: Shape, options: RenderOptions, out: Path) -> dict[Path, str]:
    """Path -> text of what `mta` needs, under `out` (pmta: the file; kumomta: the folder)."""
    if mta == "pmta":
        return {out: render_pmta(shape, options)}
    return {out / name: text for name, text in render_kumomta(shape, options).items()}


def check_files(mta: str, files: dict[Path, str]) -> list[str]:
    """Problems of rendered files, each prefixed with its file."""
    if mta == "pmta":
        return [f"{path}: {p}" for path, text in files.items() for p in check_pmta(text)]
    named = {path.name: text for path, text in files.items()}
    folder = next(iter(files)).parent if files else Path()
    return [f"{folder}/{p}" for p in check_kumomta(named)]


def write_checked(files: dict[Path, str], check: Callable[[dict[Path, str]], list[str]]) -> None:
    """Replace each file atomically: FILE.tmp beside it, read back, `check`ed as a whole,
    flushed, renamed over FILE. On a problem nothing is replaced: RenderError lists them."""
    tmps: dict[Path, Path] = {path: path.with_name(path.name + ".tmp") for path in files}
    try:
        for path, text in files.items():
            with tmps[path].open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        written = {path: tmps[path].read_text(encoding="utf-8") for path in files}
        problems = check(written)
        if problems:
            raise RenderError("the render failed its check; the old files stay", problems)
        for path in files:
            os.replace(tmps[path], path)
        for folder in {path.parent for path in files}:
            _fsync_dir(folder)
    except OSError as e:
        raise RenderError(f"cannot write {e.filename or ''}: {e.strerror or e}") from None
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def changed_files(files: dict[Path, str]) -> dict[Path, str]:
    """The files whose text differs from what is on disk (the time stamp aside)."""
    out: dict[Path, str] = {}
    for path, text in files.items():
        try:
            old = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            out[path] = text
            continue
        if not same_content(old, text):
            out[path] = text
    return out


def _local_time(ms: int, timezone: str) -> str:
    """Epoch ms as local ISO 8601 with offset in `timezone`."""
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .astimezone(ZoneInfo(timezone))
        .isoformat(timespec="seconds")
    )


# ---------------------------------------------------------------- the watch


@dataclass
class Watcher:
    """Re-renders when the local hour, the limits' fingerprint or the plan's text changes,
    writes only what differs, and runs the reload command after a write (again at the next
    poll if it failed). Time and sleeping are injected; `stop` ends `run`."""

    mta: str
    source: ShapeSource
    options: RenderOptions
    out: Path
    log: Callable[[str], None]
    reload_command: str | None = None
    reload_timeout_s: float = 30.0
    stop: threading.Event = field(default_factory=threading.Event)
    #: (local hour, limits fingerprint, plan digest) of the last render written or found same.
    last: tuple[str, str, str] | None = None
    reload_pending: bool = False
    writes: int = 0
    reloads: int = 0
    _failing: str | None = None

    def poll(self, now_ms: int) -> None:
        """One look: fetch, re-render if something changed, write, reload. Never raises for a
        source, a render, a write or a reload that fails: it logs and tries again later."""
        try:
            shape, digest = self.source.fetch(now_ms)
        except KilnError as e:
            text = str(e).splitlines()[0]
            if text != self._failing:
                self.log(f"cannot read the caps: {e}; trying again every poll")
            self._failing = text
            return
        if self._failing is not None:
            self.log("the caps can be read again")
            self._failing = None
        key = (shape.local_hour, shape.limits_fingerprint(), digest)
        if key != self.last:
            self._render(shape, key)
        elif self.reload_pending:
            self._reload("the last reload failed")

    def _render(self, shape: Shape, key: tuple[str, str, str]) -> None:
        """Render `shape`, write what changed and reload."""
        why = self._why(key)
        options = _with_time(self.options, shape)
        try:
            files = render_files(self.mta, shape, options, self.out)
            changed = changed_files(files)
            if changed:
                write_checked(changed, lambda w: check_files(self.mta, {**files, **w}))
        except RenderError as e:
            self.log(f"not written ({why}): {e}")
            if e.problems:
                self.last = key  # the same caps would fail the same way: wait for a change
            return
        except KilnError as e:
            self.log(f"cannot render ({why}): {e}")
            self.last = key
            return
        self.last = key
        if not changed:
            self.log(f"rendered, unchanged ({why})")
            return
        self.writes += 1
        self.log(f"wrote {', '.join(str(p) for p in sorted(changed))} ({why})")
        self._reload("after the write")

    def _why(self, key: tuple[str, str, str]) -> str:
        """What changed since the last render."""
        if self.last is None:
            return "first render"
        parts = []
        if key[0] != self.last[0]:
            parts.append(f"hour {self.last[0]} -> {key[0]}")
        if key[1] != self.last[1]:
            parts.append("limits changed (reload, pause, suspension or slow-down)")
        if key[2] != self.last[2]:
            parts.append("plan file changed")
        return ", ".join(parts)

    def _reload(self, why: str) -> None:
        """Run the reload command (if any) through the shell; log how it ended."""
        if not self.reload_command:
            self.reload_pending = False
            return
        self.reloads += 1
        try:
            done = subprocess.run(  # noqa: S602 (the operator's own command, through the shell)
                self.reload_command,
                shell=True,
                capture_output=True,
                text=True,
                timeout=self.reload_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.log(
                f"reload command {self.reload_command!r} ({why}) did not end in "
                f"{self.reload_timeout_s:g} s; trying again at the next poll"
            )
            self.reload_pending = True
            return
        except OSError as e:
            self.log(f"reload command {self.reload_command!r} ({why}) failed to start: {e}")
            self.reload_pending = True
            return
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            self.log(
                f"reload command {self.reload_command!r} ({why}) exited {done.returncode}"
                + (f": {said[-1]}" if said else "")
                + "; trying again at the next poll"
            )
            self.reload_pending = True
            return
        self.reload_pending = False
        self.log(f"ran reload command {self.reload_command!r} ({why})")

    def run(
        self,
        now_ms: Callable[[], int],
        sleep: Callable[[float], None],
        interval_s: float,
        max_polls: int | None = None,
    ) -> None:
        """Poll every `interval_s` until `stop` is set (or `max_polls` polls)."""
        polls = 0
        while not self.stop.is_set():
            self.poll(now_ms())
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            if self.stop.is_set():
                break
            sleep(interval_s)


def _with_time(options: RenderOptions, shape: Shape) -> RenderOptions:
    """`options` with the header's local time set to the shape's instant."""
    return RenderOptions(
        hostname=options.hostname,
        max_smtp_out=options.max_smtp_out,
        connection_limit=options.connection_limit,
        max_burst=options.max_burst,
        pools=options.pools,
        source=options.source,
        plan_path=options.plan_path,
        local_time=_local_time(shape.at_ms, shape.timezone),
    )


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` while inside (the previous handlers come back after)."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        """Ask the watch to end after the current poll."""
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the verb


def _err(text: str) -> None:
    """A line on standard error."""
    sys.stderr.write(text + "\n")


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of options, or None."""
    if args.at is not None and args.daemon:
        return "--at renders a plan's caps at an instant; it goes with --config, not --daemon"
    if args.watch and args.out is None:
        return "--watch needs --out (the file or folder it keeps up to date)"
    if args.watch and args.at is not None:
        return "--watch follows the clock; leave out --at"
    if not 0.05 <= args.interval <= 3600:
        return f"--interval must be 0.05 to 3600 seconds, got {args.interval:g}"
    if not 0.1 <= args.reload_timeout <= 3600:
        return f"--reload-timeout must be 0.1 to 3600 seconds, got {args.reload_timeout:g}"
    if args.socket is not None and not args.daemon:
        return "--socket names the daemon's operator socket; it goes with --daemon"
    return None


def render_main(args: argparse.Namespace, state_dir: Path, state_dir_from: str) -> int:
    """`kiln render MTA`: 0 when written (or printed, or a watch ended by a signal); 1 with
    the reason on bad input, a plan with mistakes, or a daemon that does not answer."""
    verb = f"kiln render {args.mta}"
    problem = _usage_problem(args)
    if problem:
        _err(f"{verb}: {problem}")
        return 1

    def log(text: str) -> None:
        """One line per event on standard error."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _err(f"{stamp} {verb}: {text}")

    source: ShapeSource
    if args.daemon:
        if args.socket is not None:
            source = DaemonSource(args.socket, "--socket")
        else:
            source = DaemonSource(
                state_dir / "operator.sock", f"the state folder {state_dir} ({state_dir_from})"
            )
    else:
        source = PlanSource(args.config, log)
    options = RenderOptions(
        hostname=args.hostname,
        max_smtp_out=args.max_smtp_out,
        connection_limit=args.connection_limit,
        max_burst=args.max_burst,
        pools=tuple(args.pool),
        source=source.kind,
        plan_path=None if args.daemon else str(args.config),
    )
    try:
        options.check()
    except KilnError as e:
        _err(f"{verb}: {e}")
        return 1
    clock = SystemClock()
    if args.watch:
        return _watch(args, source, options, log, clock.now_ms)
    try:
        shape, _ = source.fetch(args.at if args.at is not None else clock.now_ms())
        options = _with_time(options, shape)
        if args.out is None:
            _print(args.mta, shape, options)
            return 0
        if args.mta == "kumomta":
            args.out.mkdir(parents=True, exist_ok=True)
        files = render_files(args.mta, shape, options, args.out)
        changed = changed_files(files)
        if changed:
            write_checked(changed, lambda w: check_files(args.mta, {**files, **w}))
    except KilnError as e:
        _err(f"{verb}: {e}")
        return 1
    except OSError as e:
        _err(f"{verb}: cannot create {args.out}: {e.strerror or e}")
        return 1
    _err(
        f"{verb}: "
        + (f"wrote {', '.join(str(p) for p in sorted(changed))}" if changed else "unchanged")
    )
    return 0


def _print(mta: str, shape: Shape, options: RenderOptions) -> None:
    """The render on standard output (KumoMTA's two files, each under a comment line)."""
    if mta == "pmta":
        sys.stdout.write(render_pmta(shape, options))
        return
    files = render_kumomta(shape, options)
    for name in KUMO_FILES:
        sys.stdout.write(f"# ---- {name} ----\n{files[name]}")


def _watch(
    args: argparse.Namespace,
    source: ShapeSource,
    options: RenderOptions,
    log: Callable[[str], None],
    now_ms: Callable[[], int],
) -> int:
    """Run the watch until SIGTERM or SIGINT (exit 0), or 1 if the first render cannot be
    made: a plan with mistakes, an unknown pool, a bad hostname template (a daemon that does
    not answer yet is waited for)."""
    out: Path = args.out
    verb = f"kiln render {args.mta}"
    try:
        shape, _ = source.fetch(now_ms())
    except KilnError as e:
        if not args.daemon:
            _err(f"{verb}: {e}")
            return 1
        log(f"cannot read the caps yet: {e}")
    else:
        try:
            render_files(args.mta, shape, options, out)
        except KilnError as e:
            _err(f"{verb}: {e}")
            return 1
    if args.mta == "kumomta":
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _err(f"{verb}: cannot create {out}: {e.strerror or e}")
            return 1
    watcher = Watcher(
        mta=args.mta,
        source=source,
        options=options,
        out=out,
        log=log,
        reload_command=args.reload_command,
        reload_timeout_s=args.reload_timeout,
    )
    log(f"watching every {args.interval:g} s; writing {out}")

    def sleep(seconds: float) -> None:
        """Wait, waking early when a signal sets the stop event."""
        watcher.stop.wait(seconds)

    with _stop_on_signals(watcher.stop):
        watcher.run(now_ms, sleep, args.interval)
    log("stopped")
    return 0
