"""The daemon's persistent store: ramp positions, counter snapshots, feedback counts, decision log.

One `Store` wraps one database, SQLite (the default, one file) or PostgreSQL (several daemons
sharing one server, each under its own `node` name). Every method is one transaction, and every
database failure comes out as a `StoreError` naming what was being done, never the password:
a read-only file system ("attempt to write a readonly database", "disk I/O error"), a full disk
("database or disk is full"), a file that is not a database. Time is always an argument
(`now_ms`, `day`); the store never reads a clock.

How the database is opened (SQLite without shared memory, the state marker, file modes):
`kiln.storedb`; see docs/state.md.
"""

from __future__ import annotations

import json
import secrets
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, cast, runtime_checkable

from sqlalchemy import (
    Engine,
    event,
    inspect,
)
from sqlalchemy import func as sqlfunc
from sqlalchemy import select as sa_select
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool
from sqlmodel import Session, SQLModel, col, create_engine, delete, or_, select

from kiln.log import get_logger
from kiln.records import DayCounts, Held, LogEntry, PushbackKey, RampState, SuppressionEvent
from kiln.storebatch import IMPORT_EVENT, LogBatch, batches_of, packed_rows
from kiln.storedb import (
    BEGIN_IMMEDIATE,
    FILE_MODE,
    Marker,
    StateLostError,
    StoreError,
    create_private,
    describe,
    file_system_hint,
    on_sqlite_begin,
    on_sqlite_connect,
    parse_url,
    read_marker,
    sqlite_file,
    tighten,
    write_marker,
)
from kiln.storeschema import (
    APPEND_ONLY,
    SUPPRESSION_APPEND_ONLY,
    TABLES,
    AutomationRow,
    CountsRow,
    DecisionRow,
    HeldRow,
    MetaRow,
    PositionRow,
    PushbackRow,
    SnapshotRow,
    SuppressionBatchRow,
    SuppressionRow,
    table_of,
)

__all__ = [
    "FILE_MODE",
    "SCHEMA_VERSION",
    "STATE_MARKER",
    "FoldChunk",
    "LogBatches",
    "StateLostError",
    "Store",
    "StoreError",
]

SCHEMA_VERSION: Final = 2
"""The layout this module writes; a database with a higher number is refused. 2 added
`kiln_suppression_batch` (an older kiln would not read imports); a database at 1 is raised to
2 when opened."""

LOCK_TIMEOUT_S: Final = 30.0
"""How long a call waits for a SQLite store's one connection before it is a StoreError."""
STATE_MARKER: Final = "kiln.state"
"""The marker's name in the state folder (see `Store.open_state`)."""
_VERSION_KEY: Final = "schema_version"  # in kiln_meta
#: Rows per statement when saving held recipients (SQLite's bound on parameters).
_HELD_CHUNK: Final = 500
_ID_KEY: Final = "store_id"  # in kiln_meta: the database's identity, recorded in the marker
#: In kiln_meta once any suppression event was written with its address (not hashed-only):
#: the log then holds addresses for good (`Store.suppress_kept_addresses`).
_ADDRESSES_KEY: Final = "suppression_addresses_kept"
_STORE_KEYS: Final = (_VERSION_KEY, _ID_KEY, _ADDRESSES_KEY)  # set_meta may not write these
IO_ERRORS: Final = ("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")  # worth a write probe
_SCHEMA_LOCK: Final = 0x6B696C6E  # PostgreSQL advisory lock key ("kiln") held while installing


_COUNTERS: Final = tuple(f.name for f in fields(DayCounts))
#: The columns of an import batch that the live set's fold does not read.
_BATCH_TEXT: Final = frozenset({"at_ms", "scopes", "address", "evidence"})


@runtime_checkable
class LogBatches(Protocol):
    """Events that come as log batches already (an import's,
    `kiln.suppress.files.ImportRows`): `Store.suppress_bulk` writes them with no object made
    per event."""

    def log_batches(self) -> Iterator[LogBatch]:
        """The events, a batch at a time."""
        ...


@dataclass(frozen=True, slots=True)
class FoldChunk:
    """Consecutive events of the suppression log as the live set folds them
    (`Engine.suppress_apply_column`'s arguments), and the id of the last event read."""

    last_id: int
    #: int64s in the machine's byte order.
    fingerprints: bytes
    #: One per event: its event's place in `names`.
    codes: bytes
    names: tuple[str, ...]
    #: Each event's expiry; None when no event has one.
    expires_ms: list[int | None] | None

    def __len__(self) -> int:
        """How many events."""
        return len(self.codes)


class Store:
    """The daemon's database. Open once, share between threads, `close()` at shutdown."""

    def __init__(self, url: str, *, node: str = "default", expect_id: str | None = None) -> None:
        """Open (and if needed create) the store at `url`; `node` names this daemon.

        With `expect_id`, the database must already be kiln's, with that store id: a missing
        or empty SQLite file, a database without kiln's tables or with another id is a
        `StateLostError`, and nothing is created.
        """
        parsed = parse_url(url)
        self.node = node
        self.target = parsed.render_as_string(hide_password=True)
        self._password = parsed.password if isinstance(parsed.password, str) else None
        self._dialect = parsed.get_backend_name()
        #: The database's identity (kiln_meta `store_id`), made when it was created.
        self.store_id = ""
        #: Whether this open created kiln's tables (a new, empty store).
        self.created = False
        #: SQLite: the one connection's lock (see the module docstring); PostgreSQL: None.
        self._lock: threading.Lock | None = None
        #: This object wrote _ADDRESSES_KEY already (or saw it written): no upsert per write.
        self._addresses_noted = False
        self._file: Path | None = None  # SQLite: the database file, for failure hints
        if self._dialect == "sqlite":
            path = self._file = sqlite_file(parsed)
            if path is not None and expect_id is not None:
                self._check_file(path)
            elif path is not None:
                create_private(path)
            self._engine: Engine = create_engine(
                parsed,
                poolclass=QueuePool,
                pool_size=1,
                max_overflow=0,
                pool_timeout=LOCK_TIMEOUT_S,
                connect_args={"check_same_thread": False},  # one thread at a time: self._lock
            )
            self._lock = threading.Lock()
            event.listen(self._engine, "connect", on_sqlite_connect)
            event.listen(self._engine, "begin", on_sqlite_begin)
        else:
            self._engine = create_engine(
                parsed,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 5, "application_name": f"kiln {node}"[:63]},
            )
        self._writer = self._engine.execution_options(**{BEGIN_IMMEDIATE: True})
        try:
            with self._failing_as("open the store"), self._one_at_a_time("open the store"):
                self._install(expect_id)
        except StoreError as exc:
            self._engine.dispose()
            if self._dialect == "sqlite" and "database is locked" in exc.problem:
                raise StoreError(
                    "open the store",
                    self.target,
                    f"{exc.problem}: another process has the file open (a running kiln keeps "
                    "its SQLite database locked; is another daemon using this state folder?)",
                ) from exc
            raise
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def sqlite(cls, path: Path, *, node: str = "default") -> Store:
        """A store in the SQLite file at `path` (created if missing; its directory must exist)."""
        return cls(URL.create("sqlite", database=str(path.resolve())).render_as_string(), node=node)

    @classmethod
    def open_state(
        cls,
        url: str,
        state_dir: Path,
        *,
        node: str = "default",
        reinitialise: bool = False,
    ) -> Store:
        """The store at `url` for the state folder `state_dir`, checked against its marker.

        A folder with a marker (`STATE_DIR/kiln.state`) only opens the database the marker
        names by id: a missing or empty SQLite file, a database without kiln's tables or
        with another store id is a `StateLostError` naming the database and the marker.
        Without a marker, the database is opened (created if needed) and the marker written.
        `reinitialise` skips the check: what is at `url` now becomes the folder's store (a
        new one if there is none; nothing is deleted) and the marker is rewritten.
        """
        log = get_logger(component="store")
        target = parse_url(url).render_as_string(hide_password=True)
        marker_path = state_dir / STATE_MARKER
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                "open the state folder", target, f"{state_dir}: {exc.strerror}"
            ) from exc
        try:
            marker = read_marker(marker_path, target)
        except StoreError:
            if not reinitialise:
                raise
            marker = None
        if marker is not None and not reinitialise:
            try:
                store = cls(url, node=node, expect_id=marker.store_id)
            except StateLostError as exc:
                raise StateLostError(
                    "open the store",
                    target,
                    f"the state marker {marker_path} says this folder's database is "
                    f"{marker.database} (store id {marker.store_id}), but {exc.problem}. "
                    "Starting on a fresh database would put every ramp back to step 1 and "
                    "grant the day's budget again. Put the database back (from a backup), or "
                    "start afresh on purpose with `kiln run --reinitialise`",
                    found_id=exc.found_id,
                ) from exc
        else:
            store = cls(url, node=node)
        try:
            path = sqlite_file(parse_url(url))
            if path is not None:
                for name in ("", "-wal", "-journal"):
                    tighten(path.with_name(path.name + name), log)
            if marker != Marker(store.store_id, store.target):
                write_marker(marker_path, Marker(store.store_id, store.target))
        except OSError as exc:
            store.close()
            raise StoreError(
                "write the state marker", target, f"{marker_path}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            store.close()
            raise
        facts = {"database": store.target, "store_id": store.store_id, "marker": str(marker_path)}
        if reinitialise:
            log.warning(
                "state_reinitialised",
                **facts,
                previous_store_id=marker.store_id if marker is not None else None,
                new_database=store.created,
            )
        elif marker is None:
            log.info("state_marker_written", **facts, new_database=store.created)
        elif marker.database != store.target:
            log.warning("state_database_moved", **facts, was=marker.database)
        return store

    def close(self) -> None:
        """Close every pooled connection; call it once, at shutdown."""
        locked = self._lock is not None and self._lock.acquire(timeout=LOCK_TIMEOUT_S)
        try:
            self._engine.dispose()
        finally:
            if locked and self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        """The store itself; `close()` on leaving the block."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the store."""
        self.close()

    def __repr__(self) -> str:
        """The masked URL and node name."""
        return f"Store({self.target!r}, node={self.node!r})"

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _failing_as(self, action: str) -> Iterator[None]:
        """Turn database errors raised in the block into a StoreError naming `action`."""
        try:
            yield
        except SQLAlchemyError as exc:
            problem = describe(exc, self._password)
            if self._file is not None:
                name = getattr(getattr(exc, "orig", None), "sqlite_errorname", "")
                io_error = isinstance(name, str) and name.startswith(IO_ERRORS)
                problem += file_system_hint(self._file, probe=io_error)
            raise StoreError(action, self.target, problem) from exc

    @contextmanager
    def _one_at_a_time(self, action: str) -> Iterator[None]:
        """SQLite: hold the lock of the store's one connection for the block."""
        if self._lock is None:
            yield
            return
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise StoreError(
                action,
                self.target,
                f"the store stayed busy for {LOCK_TIMEOUT_S:g} s (another call is stuck in it)",
            )
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _transaction(self, action: str, *, write: bool) -> Iterator[Session]:
        """One Session in one transaction: committed at the end of the block, else rolled back."""
        with (
            self._failing_as(action),
            self._one_at_a_time(action),
            Session(self._writer if write else self._engine) as session,
            session.begin(),
        ):
            yield session

    def _check_file(self, path: Path) -> None:
        """The SQLite file a marker expects must exist and hold something."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StateLostError("open the store", self.target, f"{path} is missing") from None
        except OSError as exc:
            raise StoreError("open the store", self.target, f"{path}: {exc.strerror}") from exc
        if size == 0:
            raise StateLostError("open the store", self.target, f"{path} is empty (0 bytes)")

    def _install(self, expect_id: str | None = None) -> None:
        """Check the schema version and identity, then create what is missing (idempotent,
        race-free); with `expect_id`, refuse a database that is not that kiln store."""
        with self._writer.begin() as connection:
            if self._dialect == "postgresql":
                connection.execute(
                    sql_text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK}
                )
            found: dict[str, str] = {}
            if inspect(connection).has_table(MetaRow.__tablename__):
                rows = connection.execute(
                    select(MetaRow.key, MetaRow.value).where(col(MetaRow.key).in_(_STORE_KEYS))
                )
                found = {str(key): str(value) for key, value in rows}
            version = int(found[_VERSION_KEY]) if _VERSION_KEY in found else None
            store_id = found.get(_ID_KEY)
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    "open the store",
                    self.target,
                    f"database was written by a newer kiln (schema {version}); "
                    f"this kiln reads schema {SCHEMA_VERSION}",
                )
            if expect_id is not None and (version is None or store_id != expect_id):
                problem = (
                    f"{self.target} holds no kiln tables"
                    if version is None
                    else f"{self.target} is another kiln database (store id {store_id})"
                    if store_id
                    else f"{self.target} is another kiln database (one without a store id)"
                )
                raise StateLostError("open the store", self.target, problem, found_id=store_id)
            SQLModel.metadata.create_all(connection, tables=TABLES)
            for statement in SUPPRESSION_APPEND_ONLY[self._dialect]:
                connection.execute(sql_text(statement))
            if version is None:
                for statement in APPEND_ONLY[self._dialect]:
                    connection.execute(sql_text(statement))
                connection.execute(
                    table_of(MetaRow).insert().values(key=_VERSION_KEY, value=str(SCHEMA_VERSION))
                )
                self.created = True
            elif version < SCHEMA_VERSION:  # the tables it lacked were made just above
                meta = table_of(MetaRow)
                connection.execute(
                    meta.update()
                    .where(meta.c.key == _VERSION_KEY)
                    .values(value=str(SCHEMA_VERSION))
                )
            if store_id is None:  # a new database, or one written before kiln had store ids
                store_id = secrets.token_hex(16)
                connection.execute(table_of(MetaRow).insert().values(key=_ID_KEY, value=store_id))
            self.store_id = store_id

    def _insert(self) -> Any:
        """The dialect's INSERT construct, the one that knows ON CONFLICT."""
        return postgresql.insert if self._dialect == "postgresql" else sqlite.insert

    # -- small named values (kiln_meta) --------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under `key` in kiln_meta, or None. Shared by every node."""
        with self._transaction(f"read meta value {key!r}", write=False) as session:
            row = session.get(MetaRow, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: str) -> None:
        """Store `value` under `key` in kiln_meta, replacing any previous value."""
        if key in _STORE_KEYS:
            raise ValueError(f"set_meta: {key!r} belongs to the store")
        with self._transaction(f"write meta value {key!r}", write=True) as session:
            self._set_meta(session, key, value)

    def _set_meta(self, session: Session, key: str, value: str) -> None:
        """The upsert of `set_meta`, inside the caller's transaction."""
        if key in _STORE_KEYS:
            raise ValueError(f"set_meta: {key!r} belongs to the store")
        self._upsert_meta(session, key, value)

    def _upsert_meta(self, session: Session, key: str, value: str) -> None:
        """Write `key` in kiln_meta inside the caller's transaction, the store's own keys too."""
        statement = self._insert()(MetaRow).values(key=key, value=value)
        statement = statement.on_conflict_do_update(
            index_elements=["key"], set_={"value": statement.excluded.value}
        )
        session.exec(statement)

    # -- ramp positions ------------------------------------------------------------------------

    def load_positions(self, plan: str) -> dict[tuple[str, str], RampState]:
        """Every saved position of `plan`, keyed by (batch, provider)."""
        with self._transaction(f"load ramp positions of plan {plan!r}", write=False) as session:
            rows = session.exec(select(PositionRow).where(PositionRow.plan == plan)).all()
            return {
                (row.batch, row.provider): RampState(
                    step=row.step,
                    paused=row.paused,
                    idle_days=row.idle_days,
                    last_sending_day=row.last_sending_day,
                    days_without_advance=row.days_without_advance,
                )
                for row in rows
            }

    def save_positions(
        self,
        plan: str,
        positions: Mapping[tuple[str, str], RampState],
        now_ms: int,
        *,
        meta: Mapping[str, str] | None = None,
        entries: Iterable[LogEntry] = (),
        automations: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Insert or overwrite each given position of `plan`, all in one transaction, with
        `meta` values, decision-log `entries` and changed `automations` (a day roll lands
        whole or not at all).

        Positions saved earlier and absent from `positions` are left as they are.
        """
        with self._transaction(f"save ramp positions of plan {plan!r}", write=True) as session:
            if positions:
                self._save_positions(session, plan, positions, now_ms)
            for key, value in (meta or {}).items():
                self._set_meta(session, key, value)
            self._save_automations(session, plan, automations, now_ms)
            self._append(session, entries)

    def _save_positions(
        self,
        session: Session,
        plan: str,
        positions: Mapping[tuple[str, str], RampState],
        now_ms: int,
    ) -> None:
        """The upsert of `save_positions`, inside the caller's transaction."""
        rows = [
            {
                "plan": plan,
                "batch": batch,
                "provider": provider,
                "step": position.step,
                "paused": position.paused,
                "idle_days": position.idle_days,
                "last_sending_day": position.last_sending_day,
                "days_without_advance": position.days_without_advance,
                "updated_at_ms": now_ms,
            }
            for (batch, provider), position in sorted(positions.items())
        ]
        statement = self._insert()(PositionRow)
        statement = statement.on_conflict_do_update(
            index_elements=["plan", "batch", "provider"],
            set_={
                name: statement.excluded[name]
                for name in rows[0]
                if name not in ("plan", "batch", "provider")
            },
        )
        session.exec(statement, params=rows)

    # -- counter snapshots ---------------------------------------------------------------------

    def save_snapshot(self, data: bytes, now_ms: int) -> None:
        """Keep `data` as this node's snapshot, replacing the previous one."""
        with self._transaction("save the counter snapshot", write=True) as session:
            self._save_snapshot(session, data, now_ms)

    def _save_snapshot(self, session: Session, data: bytes, now_ms: int) -> None:
        """Upsert this node's snapshot row inside `session`'s transaction."""
        statement = self._insert()(SnapshotRow).values(
            node=self.node, saved_at_ms=now_ms, data=data
        )
        statement = statement.on_conflict_do_update(
            index_elements=["node"],
            set_={"saved_at_ms": statement.excluded.saved_at_ms, "data": statement.excluded.data},
        )
        session.exec(statement)

    def load_snapshot(self) -> tuple[bytes, int] | None:
        """This node's latest snapshot as (data, saved_at_ms), or None if it never saved one."""
        with self._transaction("load the counter snapshot", write=False) as session:
            row = session.get(SnapshotRow, self.node)
            return None if row is None else (bytes(row.data), row.saved_at_ms)

    # -- feedback counts -----------------------------------------------------------------------

    def add_counts(self, day: date, counts: Mapping[tuple[str, str], DayCounts]) -> None:
        """Add `counts`, keyed by (ip, provider), to what `day` already holds (atomic)."""
        with self._transaction(f"add feedback counts for {day}", write=True) as session:
            self._add_counts(session, day, counts)

    def _add_counts(
        self, session: Session, day: date, counts: Mapping[tuple[str, str], DayCounts]
    ) -> None:
        """Upsert-add `counts` inside `session`'s transaction, in key order (no deadlocks)."""
        if not counts:
            return
        rows = [
            {"day": day, "ip": ip, "provider": provider}
            | {name: getattr(add, name) for name in _COUNTERS}
            for (ip, provider), add in sorted(counts.items())
        ]
        statement = self._insert()(CountsRow)
        statement = statement.on_conflict_do_update(
            index_elements=["day", "ip", "provider"],
            set_={
                name: table_of(CountsRow).c[name] + statement.excluded[name] for name in _COUNTERS
            },
        )
        session.exec(statement, params=rows)

    def counts(self, day: date) -> dict[tuple[str, str], DayCounts]:
        """Everything counted on `day`, keyed by (ip, provider)."""
        with self._transaction(f"read feedback counts for {day}", write=False) as session:
            rows = session.exec(select(CountsRow).where(CountsRow.day == day)).all()
            return {
                (row.ip, row.provider): DayCounts(
                    **{name: getattr(row, name) for name in _COUNTERS}
                )
                for row in rows
            }

    # -- automations ---------------------------------------------------------------------------

    def save_automations(
        self, plan: str, automations: Iterable[Mapping[str, Any]], now_ms: int
    ) -> None:
        """Insert or replace automations (plain data with `id` and `state`)."""
        with self._transaction("save automations", write=True) as session:
            self._save_automations(session, plan, automations, now_ms)

    def _save_automations(
        self,
        session: Session,
        plan: str,
        automations: Iterable[Mapping[str, Any]],
        now_ms: int,
    ) -> None:
        rows = [
            {
                "plan": plan,
                "id": a["id"],
                "state": a["state"],
                "data": json.dumps(a, sort_keys=True),
                "updated_at_ms": now_ms,
            }
            for a in sorted(automations, key=lambda a: str(a["id"]))
        ]
        if not rows:
            return
        statement = self._insert()(AutomationRow)
        statement = statement.on_conflict_do_update(
            index_elements=["plan", "id"],
            set_={k: statement.excluded[k] for k in ("state", "data", "updated_at_ms")},
        )
        session.exec(statement, params=rows)

    def load_automations(self, plan: str, *, since_ms: int | None = None) -> list[dict[str, Any]]:
        """A plan's automations: every active one, and the others updated since `since_ms`."""
        query = select(AutomationRow).where(AutomationRow.plan == plan)
        if since_ms is not None:
            query = query.where(
                or_(AutomationRow.state == "active", col(AutomationRow.updated_at_ms) >= since_ms)
            )
        with self._transaction("read automations", write=False) as session:
            return [json.loads(r.data) for r in session.exec(query).all()]

    # -- push-back replies per day ---------------------------------------------------------------

    def _add_pushback(self, session: Session, day: date, rows: Mapping[PushbackKey, int]) -> None:
        if not rows:
            return
        params = [
            {"day": day, "ip": ip, "provider": p, "cls": c, "hour": h, "rule": r, "count": n}
            for (ip, p, c, h, r), n in sorted(rows.items())
        ]
        statement = self._insert()(PushbackRow)
        statement = statement.on_conflict_do_update(
            index_elements=["day", "ip", "provider", "cls", "hour", "rule"],
            set_={"count": table_of(PushbackRow).c["count"] + statement.excluded["count"]},
        )
        session.exec(statement, params=params)

    def pushback(self, day: date) -> dict[PushbackKey, int]:
        """Classified push-back replies counted on `day`."""
        with self._transaction(f"read push-back for {day}", write=False) as session:
            rows = session.exec(select(PushbackRow).where(PushbackRow.day == day)).all()
            return {(r.ip, r.provider, r.cls, r.hour, r.rule): r.count for r in rows}

    # -- suppression log -----------------------------------------------------------------------

    def suppress_append(self, events: Sequence[SuppressionEvent]) -> list[int]:
        """Append `events` to the suppression log in one transaction (durable when this
        returns); their ids, in order."""
        rows = [
            SuppressionRow(
                at_ms=e.at_ms,
                fingerprint=e.fingerprint,
                address=e.address,
                scope=e.scope,
                event=e.event,
                expires_ms=e.expires_ms,
                source=e.source,
                evidence=json.dumps(e.evidence, sort_keys=True, default=str),
            )
            for e in events
        ]
        with self._transaction("append to the suppression log", write=True) as session:
            session.add_all(rows)
            session.flush()
            noted = self._note_addresses(session, any(e.address for e in events))
            ids = [row.id for row in rows if row.id is not None]
        self._addresses_noted |= noted
        return ids

    def suppress_bulk(self, events: Iterable[SuppressionEvent] | LogBatches) -> int:
        """Append many events in one transaction (imports): all of them or, on a failure,
        none. How many were written.

        They take the next range of log ids and are written as rows of
        `kiln_suppression_batch` (`kiln.storebatch`), then one `import` event after the range
        in `kiln_suppression`, which the next event's id follows."""
        items = events.log_batches() if isinstance(events, LogBatches) else events
        log = table_of(SuppressionRow)
        with self._transaction("import into the suppression log", write=True) as session:
            if self._dialect == "postgresql":  # no other writer takes an id meanwhile
                session.execute(sql_text("LOCK TABLE kiln_suppression IN EXCLUSIVE MODE"))
            first = (session.execute(sa_select(sqlfunc.max(log.c.id))).scalar() or 0) + 1
            seen = _BatchesSeen(batches_of(items))
            next_id, rows = first, 0
            for size, values in packed_rows(seen, first):
                session.execute(table_of(SuppressionBatchRow).insert(), [values])
                next_id += size
                rows += 1
            if next_id == first:
                return 0
            evidence = {"first_id": first, "events": next_id - first, "batches": rows}
            session.execute(
                log.insert().values(
                    id=next_id,
                    at_ms=0,
                    fingerprint=0,
                    address="",
                    scope="",
                    event=IMPORT_EVENT,
                    expires_ms=None,
                    source=seen.source,
                    evidence=json.dumps(evidence, sort_keys=True),
                )
            )
            if self._dialect == "postgresql":  # the id column's sequence goes on after it
                session.execute(
                    sql_text("SELECT setval(pg_get_serial_sequence('kiln_suppression', 'id'), :n)"),
                    {"n": next_id},
                )
            noted = self._note_addresses(session, seen.addresses)
        self._addresses_noted |= noted
        return next_id - first

    def _note_addresses(self, session: Session, written: bool) -> bool:
        """Record in the writing transaction that events with addresses are in the log, when
        `written` says so and this object has not recorded it yet; whether it did (the
        caller marks it done once the transaction committed)."""
        if not written or self._addresses_noted:
            return False
        self._upsert_meta(session, _ADDRESSES_KEY, "1")
        return True

    def suppress_kept_addresses(self) -> bool:
        """Whether an event was ever written to the log with its address (recorded in
        kiln_meta in the transaction that wrote it; a log that held an address holds it for
        good). Stores written before the record was kept need a look at the log itself."""
        return self.get_meta(_ADDRESSES_KEY) is not None

    def suppress_last_id(self) -> int:
        """The id of the newest log event (0: none)."""
        table = table_of(SuppressionRow)
        with self._transaction("read the suppression log", write=False) as session:
            found = session.execute(sa_select(sqlfunc.max(table.c.id))).scalar()
        return int(found or 0)

    def suppress_fold_chunks(self, after_id: int = 0, chunk: int = 200_000) -> Iterator[FoldChunk]:
        """The log after `after_id` in order, as the live set folds it: `chunk` events of
        `kiln_suppression` at a time, an import batch at a time (`import` events left out,
        their ids counted in `last_id`)."""
        cursor = after_id
        while True:
            with self._transaction("read the suppression log", write=False) as session:
                batch = self._next_batch(session, cursor, text=False)
                upto = batch[0] if batch is not None else 2**63 - 1
                rows = self._fold_rows(session, cursor, upto, chunk)
            if rows:
                cursor = int(rows[-1][0])
                yield _fold_chunk(cursor, rows)
                if len(rows) == chunk:
                    continue
            if batch is None:
                return
            first_id, found = batch
            start = max(cursor - first_id + 1, 0)  # a cursor inside the batch: after it
            cursor = first_id + len(found) - 1
            expires = found.fold_expires()
            yield FoldChunk(
                cursor,
                found.fingerprints[start:].tobytes(),
                found.codes[start:],
                found.names,
                None if expires is None else expires[start:],
            )

    def _fold_rows(
        self, session: Session, after_id: int, before_id: int, limit: int
    ) -> list[tuple[int, int, str, int | None]]:
        """(id, fingerprint, event, expires_ms) of up to `limit` rows of `kiln_suppression`
        with ids between, in order: read on the driver's own cursor, as a restart without a
        snapshot reads millions (SQLAlchemy's rows cost as much again)."""
        sql = (
            "SELECT id, fingerprint, event, expires_ms FROM kiln_suppression"
            " WHERE id > ? AND id < ? ORDER BY id LIMIT ?"
        )
        if self._dialect != "sqlite":
            sql = sql.replace("?", "%s")
        driver: Any = session.connection().connection.driver_connection
        cursor = driver.cursor()
        try:
            cursor.execute(sql, (after_id, before_id, limit))
            return cast("list[tuple[int, int, str, int | None]]", cursor.fetchall())
        finally:
            cursor.close()

    def _next_batch(
        self, session: Session, after_id: int, *, text: bool = True
    ) -> tuple[int, LogBatch] | None:
        """The first import batch holding an event after `after_id`: its first id and
        events (without `text`, their numbers only: `LogBatch.unpacked`)."""
        table = table_of(SuppressionBatchRow)
        columns = table.c if text else [c for c in table.c if c.name not in _BATCH_TEXT]
        query = sa_select(*columns).where(table.c.last_id > after_id).order_by(table.c.last_id)
        row = session.execute(query.limit(1)).mappings().first()
        return (
            None if row is None else (int(row["first_id"]), LogBatch.unpacked(dict(row), text=text))
        )

    def suppress_events(
        self,
        *,
        fingerprints: Sequence[int] | None = None,
        after_id: int = 0,
        event: str | None = None,
        limit: int = 100,
    ) -> list[SuppressionEvent]:
        """Log events in order from after `after_id`: of these fingerprints, of this type
        (`import` events are bookkeeping, never among them)."""
        found: list[SuppressionEvent] = []
        cursor = after_id
        while len(found) < limit:
            with self._transaction("read the suppression log", write=False) as session:
                batch = self._next_batch(session, cursor)
                query = select(SuppressionRow).where(
                    col(SuppressionRow.id) > cursor, SuppressionRow.event != IMPORT_EVENT
                )
                if batch is not None:
                    query = query.where(col(SuppressionRow.id) < batch[0])
                if fingerprints is not None:
                    query = query.where(col(SuppressionRow.fingerprint).in_(list(fingerprints)))
                if event is not None:
                    query = query.where(SuppressionRow.event == event)
                query = query.order_by(col(SuppressionRow.id)).limit(limit - len(found))
                found += [_event_of(r) for r in session.exec(query).all()]
            if batch is None or len(found) >= limit:
                break
            first_id, events = batch
            places = events.positions(fingerprints, event, after=cursor - first_id)
            places = places[: limit - len(found)]
            found += events.events(first_id, places)
            cursor = first_id + len(events) - 1
        return found

    # -- decision log --------------------------------------------------------------------------

    def append(self, entries: Iterable[LogEntry]) -> list[int]:
        """Add `entries` to the decision log, in order; their new ids, in the same order."""
        with self._transaction("append to the decision log", write=True) as session:
            return self._append(session, entries)

    def _append(self, session: Session, entries: Iterable[LogEntry]) -> list[int]:
        """Insert `entries` inside `session`'s transaction; the ids the database gave them."""
        rows = [
            DecisionRow(
                at_ms=entry.at_ms,
                kind=entry.kind,
                subject=entry.subject,
                action=entry.action,
                reason=entry.reason,
                evidence=self._evidence_json(entry),
            )
            for entry in entries
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows if row.id is not None]

    def _evidence_json(self, entry: LogEntry) -> str:
        """The entry's evidence as JSON text, or a StoreError saying why it cannot be."""
        try:
            return json.dumps(entry.evidence, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            what = f"{entry.kind} {entry.subject} {entry.action}"
            raise StoreError(
                "append to the decision log", self.target, f"evidence of {what} is not JSON: {exc}"
            ) from exc

    def decisions(
        self,
        *,
        since_ms: int | None = None,
        kind: str | None = None,
        subject: str | None = None,
        limit: int = 1000,
    ) -> list[LogEntry]:
        """Log entries at or after `since_ms`, of `kind`, about `subject`, oldest first.

        At most `limit` entries: the oldest that match, so `since_ms` pages forward.
        """
        query = select(DecisionRow)
        if since_ms is not None:
            query = query.where(DecisionRow.at_ms >= since_ms)
        if kind is not None:
            query = query.where(DecisionRow.kind == kind)
        if subject is not None:
            query = query.where(DecisionRow.subject == subject)
        query = query.order_by(col(DecisionRow.at_ms), col(DecisionRow.id)).limit(limit)
        with self._transaction("read the decision log", write=False) as session:
            return [
                LogEntry(
                    at_ms=row.at_ms,
                    kind=row.kind,
                    subject=row.subject,
                    action=row.action,
                    reason=row.reason,
                    evidence=json.loads(row.evidence),
                    id=row.id,
                )
                for row in session.exec(query)
            ]

    # -- Postfix recipients held in the release queue ------------------------------------------

    def load_held(self) -> dict[int, Held]:
        """This node's held recipients by release-queue id."""
        with self._transaction("load the held Postfix recipients", write=False) as session:
            rows = session.exec(select(HeldRow).where(HeldRow.node == self.node))
            return {
                r.id: Held(r.queue_id, r.recipient, r.pool, r.provider, r.since_ms) for r in rows
            }

    def _save_held(self, session: Session, held: Mapping[int, Held | None]) -> None:
        """Add (or replace) the held recipients and drop the released ones (`None`)."""
        gone = sorted(i for i, h in held.items() if h is None)
        for at in range(0, len(gone), _HELD_CHUNK):
            session.exec(
                delete(HeldRow).where(
                    col(HeldRow.node) == self.node,
                    col(HeldRow.id).in_(gone[at : at + _HELD_CHUNK]),
                )
            )
        rows = [
            {
                "node": self.node,
                "id": i,
                "queue_id": h.queue_id,
                "recipient": h.recipient,
                "pool": h.pool,
                "provider": h.provider,
                "since_ms": h.since_ms,
            }
            for i, h in sorted(held.items())
            if h is not None
        ]
        for at in range(0, len(rows), _HELD_CHUNK):
            statement = self._insert()(HeldRow).values(rows[at : at + _HELD_CHUNK])
            statement = statement.on_conflict_do_nothing(index_elements=["node", "id"])
            session.exec(statement)

    # -- the daemon's periodic flush -----------------------------------------------------------

    def flush(
        self,
        *,
        snapshot: bytes | None,
        now_ms: int,
        day: date | None = None,
        counts: Mapping[tuple[str, str], DayCounts] | None = None,
        entries: Iterable[LogEntry] = (),
        pushback: Mapping[date, Mapping[PushbackKey, int]] | None = None,
        plan: str | None = None,
        automations: Iterable[Mapping[str, Any]] = (),
        meta: Mapping[str, str] | None = None,
        held: Mapping[int, Held | None] | None = None,
    ) -> None:
        """Save the snapshot, add `counts` to `day` and append `entries`: all or nothing.

        Also adds `pushback` replies per day, saves the `plan`'s changed `automations`, sets
        `meta` values and adds or drops `held` recipients, in the same transaction (the
        snapshot's release queue and the held recipients always agree).

        `counts` needs `day`. A failure anywhere (a database error, evidence that is not
        JSON-able, an exception from the `entries` iterable) leaves the database untouched.
        """
        if counts and day is None:
            raise ValueError("flush: counts given without the day they belong to")
        with self._transaction("flush state", write=True) as session:
            if snapshot is not None:
                self._save_snapshot(session, snapshot, now_ms)
            if counts and day is not None:
                self._add_counts(session, day, counts)
            for pday, rows in sorted((pushback or {}).items()):
                self._add_pushback(session, pday, rows)
            if plan is not None:
                self._save_automations(session, plan, automations, now_ms)
            for key, value in (meta or {}).items():
                self._set_meta(session, key, value)
            if held:
                self._save_held(session, held)
            self._append(session, entries)


def _fold_chunk(last_id: int, rows: Sequence[tuple[int, int, str, int | None]]) -> FoldChunk:
    """Rows of `kiln_suppression` (id, fingerprint, event, expires_ms) as the live set folds
    them, `import` events left out."""
    if any(r[2] == IMPORT_EVENT for r in rows):
        rows = [r for r in rows if r[2] != IMPORT_EVENT]
    events = [r[2] for r in rows]
    names = tuple(set(events))
    code = {name: n for n, name in enumerate(names)}
    expires = [r[3] for r in rows]
    return FoldChunk(
        last_id,
        array("q", [r[1] for r in rows]).tobytes(),
        bytes(map(code.__getitem__, events)),
        names,
        expires if expires.count(None) != len(expires) else None,
    )


def _event_of(row: SuppressionRow) -> SuppressionEvent:
    """A row of `kiln_suppression` as an event."""
    return SuppressionEvent(
        at_ms=row.at_ms,
        fingerprint=row.fingerprint,
        address=row.address,
        event=row.event,
        source=row.source,
        scope=row.scope,
        expires_ms=row.expires_ms,
        evidence=json.loads(row.evidence),
        id=row.id,
    )


class _BatchesSeen:
    """Batches passed on as they are, noting their source and whether any event keeps its
    address."""

    def __init__(self, batches: Iterable[LogBatch]) -> None:
        self._batches = batches
        self.source = ""
        self.addresses = False

    def __iter__(self) -> Iterator[LogBatch]:
        for batch in self._batches:
            self.source = self.source or batch.source
            self.addresses = self.addresses or batch.keeps_addresses()
            yield batch
