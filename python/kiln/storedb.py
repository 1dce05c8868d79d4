"""How kiln's store opens its database: URLs, SQLite connections, the state marker, file modes.

`kiln.store.Store` uses these; nothing here knows kiln's tables.

SQLite without shared memory
----------------------------
In WAL mode SQLite normally keeps the WAL index in a memory-mapped `-shm` file. A fault on that
mapping (the file system went read-only or away under the process, the file was truncated)
is a SIGBUS: the process dies inside SQLite, without a Python exception or a log line. kiln
therefore never maps a database file:

* `PRAGMA locking_mode=EXCLUSIVE` is set on each connection *before* WAL is first used, so
  SQLite keeps the WAL index in heap memory and never creates a `-shm` file; `mmap_size=0`
  keeps SQLite from mapping the database itself. I/O failures are then plain return codes,
  which come out as `StoreError`s.
* An exclusive connection keeps its file lock until it closes, so a SQLite store has exactly
  one connection (a pool of one), used by one thread at a time under a lock (the daemon calls
  the store from its worker threads and from the event loop's thread). Waits for the lock are
  bounded (`LOCK_TIMEOUT_S`); a call stuck longer becomes a StoreError, not a hang.
* The file is locked for the life of the `Store`: a second process (another daemon, the
  `sqlite3` shell, a backup tool) gets "database is locked" after the busy timeout. That
  also guarantees that two daemons never write one SQLite file. Copy the file while kiln is
  stopped, or use PostgreSQL for live access.

The alternatives weighed: WAL with shared memory (the SIGBUS above; a handler cannot make the
interrupted SQLite call safe), and a rollback journal (`journal_mode=TRUNCATE`: no mapping
either, and other processes could read, but a reader blocks the commit of the once-a-second
flush, and it is only corruption-safe with `synchronous=FULL`). WAL in exclusive mode keeps
kiln's `synchronous=NORMAL` crash-safety and costs nothing kiln uses.

Every SQLite connection also has a 5 s busy timeout and foreign keys on, and writing
transactions start with `BEGIN IMMEDIATE`. The decision log is append-only in the database
itself: triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL).

Files the store creates (the SQLite database, and so its `-wal` and `-journal`, which SQLite
creates with the database's mode; the state marker) are mode 0600 whatever the umask.

The state marker
----------------
Each database carries a random identity (`store_id` in kiln_meta), made when it is created.
`Store.open_state` (what the daemon uses) also keeps `STATE_DIR/kiln.state`, a small JSON file
(mode 0600, replaced atomically) recording that id and the masked database URL. A state
folder whose marker names a database that is missing, empty (0 bytes), without kiln's tables,
or a different kiln database (another id) is refused with a `StateLostError` naming the
database and the marker: starting on a fresh database would put every ramp back to step 1
and grant the day's budget again. `reinitialise=True` (`kiln run --reinitialise`) accepts what
is at the database URL now (creating kiln's tables if they are missing; it never deletes
anything) and rewrites the marker. A folder without a marker just starts, and writes one;
a database found there without a marker (an older kiln, or a second node sharing a
PostgreSQL database) is adopted. See docs/state.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from kiln.errors import KilnError

__all__ = [
    "BEGIN_IMMEDIATE",
    "BUSY_TIMEOUT_MS",
    "FILE_MODE",
    "ID_PATTERN",
    "MARKER_FORMAT",
    "Marker",
    "StateLostError",
    "StoreError",
    "create_private",
    "describe",
    "file_system_hint",
    "mask_url",
    "on_sqlite_begin",
    "on_sqlite_connect",
    "parse_url",
    "read_marker",
    "sqlite_file",
    "tighten",
    "write_marker",
]

BUSY_TIMEOUT_MS: Final = 5_000
FILE_MODE: Final = 0o600
"""Mode of the files the store creates: the SQLite database (so its WAL) and the marker."""
MARKER_FORMAT: Final = 1
BEGIN_IMMEDIATE: Final = "kiln_begin_immediate"  # execution option read by the SQLite begin hook

#: A store id as the marker and kiln_meta write it.
ID_PATTERN: Final = re.compile(r"[0-9a-f]{32}")


class StoreError(KilnError):
    """The store could not do something: `action` names it, `target` is the masked database URL."""

    def __init__(self, action: str, target: str, problem: str) -> None:
        self.action = action
        self.target = target
        self.problem = problem
        super().__init__(f"cannot {action} ({target}): {problem}")


class StateLostError(StoreError):
    """The state folder had a database and it is gone, empty or replaced: kiln refuses to
    start on it (`kiln run --reinitialise` starts afresh). `found_id` is the store id the
    database holds, if any."""

    def __init__(
        self, action: str, target: str, problem: str, *, found_id: str | None = None
    ) -> None:
        self.found_id = found_id
        super().__init__(action, target, problem)


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, for URLs SQLAlchemy cannot even parse."""
    return re.sub(r"(^|//)([^:/@]*):[^@]*@", r"\1\2:***@", url)


def parse_url(url: str) -> URL:
    """The URL to hand to SQLAlchemy: SQLite as given, PostgreSQL always through psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError("open the store", mask_url(url), f"not a database URL ({exc})") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() == "pysqlite":
        return parsed
    if backend in ("postgresql", "postgres") and parsed.drivername in (
        "postgres",
        "postgresql",
        "postgresql+psycopg",
    ):
        return parsed.set(drivername="postgresql+psycopg")
    raise StoreError(
        "open the store",
        parsed.render_as_string(hide_password=True),
        "unsupported database; use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE",
    )


def sqlite_file(parsed: URL) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or a `file:` URI."""
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def create_private(path: Path) -> None:
    """Create `path` empty with FILE_MODE if it does not exist; SQLite reports any failure."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except OSError:
        pass  # exists already, or cannot be made: SQLite says why when it opens the file


def on_sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    """Per-connection SQLite settings; SQLAlchemy, not the driver, emits BEGIN."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # first: the WAL switch may wait
        # Before WAL is first used: the WAL index lives in heap memory, no -shm mapping
        # (see the module docstring). Nothing maps the database file either.
        cursor.execute("PRAGMA locking_mode=EXCLUSIVE")
        cursor.execute("PRAGMA mmap_size=0")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def on_sqlite_begin(connection: Connection) -> None:
    """Writers take the write lock up front; readers start a plain (deferred) transaction."""
    immediate = connection.get_execution_options().get(BEGIN_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def describe(exc: SQLAlchemyError, password: str | None) -> str:
    """The driver's own words, on one line, without the password."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    message = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    if password:
        message = message.replace(password, "***")
    name = getattr(cause, "sqlite_errorname", None)  # SQLite's extended code, e.g. SQLITE_FULL
    if isinstance(name, str) and name not in message:
        message = f"{message} ({name})"
    return message or type(cause).__name__


def file_system_hint(path: Path, *, probe: bool) -> str:
    """What the file system holding `path` says after a failure: read-only, full, or (with
    `probe`) why a small file cannot be written beside it; "" when it looks fine."""
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return ""
    if info.f_flag & os.ST_RDONLY:
        return f"; the file system holding {path.parent} is read-only"
    if info.f_bavail == 0:
        return f"; the file system holding {path.parent} is full"
    if not probe:
        return ""
    # A file system made read-only by an error (ext4 errors=remount-ro) may not say so in its
    # flags: try a write, as SQLite did.
    probe_path = path.parent / f".kiln-write-probe.{os.getpid()}"
    try:
        os.close(os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        probe_path.unlink()
    except OSError as exc:
        return f"; writing a file in {path.parent} fails: {exc.strerror}"
    return ""


@dataclass(frozen=True, slots=True)
class Marker:
    """What `STATE_DIR/kiln.state` says: the database's id and its masked URL."""

    store_id: str
    database: str


def read_marker(path: Path, target: str) -> Marker | None:
    """The marker at `path`, None if there is none; a StoreError if it cannot be used."""
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError("read the state marker", target, f"{path}: {exc.strerror}") from exc
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("kiln_state") != MARKER_FORMAT:
            raise ValueError(f"unknown format {data.get('kiln_state')!r}")
        store_id, database = data.get("store_id"), data.get("database")
        if not isinstance(store_id, str) or not ID_PATTERN.fullmatch(store_id):
            raise ValueError("no store_id")
        if not isinstance(database, str):
            raise ValueError("no database")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        raise StateLostError(
            "read the state marker",
            target,
            f"{path} is damaged ({exc}); it should say which database this state folder "
            "belongs to. Put it back from a backup, or start afresh with "
            "`kiln run --reinitialise`",
        ) from exc
    return Marker(store_id, database)


def write_marker(path: Path, marker: Marker) -> None:
    """Replace the marker at `path` atomically (temporary file, fsync, rename, fsync folder)."""
    body = json.dumps(
        {
            "kiln_state": MARKER_FORMAT,
            "store_id": marker.store_id,
            "database": marker.database,
            "about": "kiln notes here which database this state folder belongs to, and "
            "refuses to start if that database is lost or replaced (docs/state.md)",
        },
        indent=2,
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(body + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def tighten(path: Path, log: Any) -> None:
    """Take group and other permissions off an existing state file (kiln before 0600)."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & ~FILE_MODE:
            os.chmod(path, FILE_MODE)
            log.warning("state_file_mode_tightened", file=str(path), was=f"{mode:04o}", now="0600")
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("state_file_mode_unchanged", file=str(path), error=exc.strerror)
