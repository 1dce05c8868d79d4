"""The store: the same tests against SQLite in a temp dir and a real PostgreSQL server."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from kiln.errors import KilnError
from kiln.records import DayCounts, LogEntry, RampState, SuppressionEvent
from kiln.store import SCHEMA_VERSION, Store, StoreError
from pgserver import create_database

NOW_MS = 1_790_000_000_000  # late 2026: well past 2**31
DAY = date(2026, 12, 1)
IP, IP2 = "192.0.2.10", "192.0.2.11"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database of each backend, new for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kiln.db'}"
    postgres_url: str = request.getfixturevalue("postgres_url")
    return create_database(postgres_url, f"kiln_{uuid4().hex[:16]}")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A store open on `db_url`, closed after the test."""
    with Store(db_url) as opened:
        yield opened


@contextmanager
def raw(url: str, store: Store | None = None) -> Iterator[Connection]:
    """A plain SQLAlchemy connection to `url` in one transaction, bypassing the store's API.

    An open SQLite store holds its file's lock, so with `store` given and SQLite, the
    connection is the store's own one (taken under its lock).
    """
    if store is not None and url.startswith("sqlite"):
        with store._one_at_a_time("test"), store._engine.begin() as connection:
            yield connection
        return
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def entry(at_ms: int, kind: str = "ramp", subject: str = "tx/google", **evidence: Any) -> LogEntry:
    """A decision log entry with only the interesting fields given."""
    return LogEntry(at_ms, kind, subject, "advance", "all gates passed", dict(evidence))


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- ramp positions ----------------------------------------------------------------------------


def test_positions_round_trip_per_plan(store: Store, db_url: str) -> None:
    """Saved positions load back equal, per plan; *_ms values beyond 32 bits survive."""
    positions = {
        ("tx", "google"): RampState(step=4, idle_days=2, last_sending_day=DAY),
        ("tx", "yahoo"): RampState(step=1, paused=True, days_without_advance=3),
    }
    assert store.load_positions("main") == {}
    store.save_positions("main", positions, NOW_MS)
    store.save_positions("other", {("tx", "google"): RampState(step=9)}, NOW_MS)
    assert store.load_positions("main") == positions
    assert store.load_positions("other") == {("tx", "google"): RampState(step=9)}
    with raw(db_url, store) as connection:
        saved = connection.execute(text("SELECT DISTINCT updated_at_ms FROM kiln_ramp_positions"))
        assert saved.scalars().all() == [NOW_MS]


def test_save_positions_overwrites_given_keys_and_keeps_the_rest(store: Store) -> None:
    """Saving is an upsert: given keys are overwritten, absent ones stay."""
    store.save_positions(
        "main",
        {("tx", "google"): RampState(step=2), ("tx", "yahoo"): RampState(step=5)},
        NOW_MS,
    )
    store.save_positions("main", {("tx", "google"): RampState(step=3, paused=True)}, NOW_MS)
    store.save_positions("main", {}, NOW_MS)
    assert store.load_positions("main") == {
        ("tx", "google"): RampState(step=3, paused=True),
        ("tx", "yahoo"): RampState(step=5),
    }


# -- counter snapshots -------------------------------------------------------------------------


def test_snapshot_latest_wins(store: Store) -> None:
    """No snapshot at first; then the last one saved, with its time."""
    assert store.load_snapshot() is None
    store.save_snapshot(b"\x00first", NOW_MS)
    store.save_snapshot(b"\x00second\xff", NOW_MS + 1000)
    assert store.load_snapshot() == (b"\x00second\xff", NOW_MS + 1000)


def test_snapshots_are_per_node(db_url: str) -> None:
    """Two daemons sharing a database each get back their own snapshot (one after the other:
    an open SQLite store holds its file's lock)."""
    with Store(db_url, node="mx1") as mx1:
        mx1.save_snapshot(b"one", NOW_MS)
    with Store(db_url, node="mx2") as mx2:
        assert mx2.load_snapshot() is None
        mx2.save_snapshot(b"two", NOW_MS + 5)
    with Store(db_url, node="mx1") as mx1:
        assert mx1.load_snapshot() == (b"one", NOW_MS)
    with Store(db_url, node="mx2") as mx2:
        assert mx2.load_snapshot() == (b"two", NOW_MS + 5)


# -- feedback counts ---------------------------------------------------------------------------


def test_add_counts_adds_up_per_day_and_key(store: Store) -> None:
    """Each call adds to what the day holds; days and keys are separate; 64-bit totals."""
    big = 3_000_000_000
    store.add_counts(DAY, {(IP, "google"): DayCounts(granted=big, delivered=5, complaints=1)})
    store.add_counts(DAY, {(IP, "google"): DayCounts(granted=big, bounced=2)})
    store.add_counts(DAY, {(IP2, "google"): DayCounts(deferred=7)})
    store.add_counts(date(2026, 12, 2), {(IP, "google"): DayCounts(granted=1)})
    store.add_counts(DAY, {})
    assert store.counts(DAY) == {
        (IP, "google"): DayCounts(granted=2 * big, delivered=5, bounced=2, complaints=1),
        (IP2, "google"): DayCounts(deferred=7),
    }
    assert store.counts(date(2026, 12, 2)) == {(IP, "google"): DayCounts(granted=1)}
    assert store.counts(date(2026, 11, 30)) == {}


def test_add_counts_is_exact_under_concurrent_writers(db_url: str) -> None:
    """Four threads adding 1 at a time, through two stores on one PostgreSQL database or one
    SQLite store (its one connection is locked by the store): no increment is lost."""
    adds_per_thread = 25
    with ExitStack() as stores:
        first = stores.enter_context(Store(db_url, node="a"))
        second = (
            first if db_url.startswith("sqlite") else stores.enter_context(Store(db_url, node="b"))
        )

        def add_ones(writer: Store, thread_ip: str) -> None:
            for _ in range(adds_per_thread):
                writer.add_counts(
                    DAY,
                    {
                        (IP, "google"): DayCounts(granted=1),
                        (thread_ip, "google"): DayCounts(delivered=1),
                    },
                )

        writers = [(first, "198.51.100.1"), (second, "198.51.100.2")] * 2
        with ThreadPoolExecutor(max_workers=len(writers)) as pool:
            for future in [pool.submit(add_ones, w, ip) for w, ip in writers]:
                future.result()
        assert first.counts(DAY) == {
            (IP, "google"): DayCounts(granted=4 * adds_per_thread),
            ("198.51.100.1", "google"): DayCounts(delivered=2 * adds_per_thread),
            ("198.51.100.2", "google"): DayCounts(delivered=2 * adds_per_thread),
        }


day_counts = st.builds(DayCounts, *[st.integers(0, 1_000)] * 5)
keys = st.tuples(st.sampled_from([IP, IP2]), st.sampled_from(["google", "yahoo"]))


# Each example starts from what earlier examples left and checks the difference, so sharing
# the function-scoped store between examples is safe.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.dictionaries(keys, day_counts, max_size=3), max_size=4))
def test_any_sequence_of_add_counts_is_the_python_sum(
    store: Store, calls: list[dict[tuple[str, str], DayCounts]]
) -> None:
    """Whatever the calls, the stored counts are what Python's sums say."""
    expected = store.counts(DAY)
    for call in calls:
        store.add_counts(DAY, call)
        for key, add in call.items():
            old = expected.get(key, DayCounts())
            expected[key] = DayCounts(
                old.granted + add.granted,
                old.delivered + add.delivered,
                old.deferred + add.deferred,
                old.bounced + add.bounced,
                old.complaints + add.complaints,
            )
    assert store.counts(DAY) == expected


# -- decision log ------------------------------------------------------------------------------


def test_append_returns_ids_and_entries_read_back(store: Store) -> None:
    """append() gives rising ids in entry order; decisions() returns the entries with them."""
    written = [
        entry(NOW_MS, gate="bounce", rate=0.01),
        entry(NOW_MS + 1),
        entry(NOW_MS + 2, nested={"list": [1, 2], "none": None, "text": "é"}),
    ]
    first = store.append(written[:2])
    second = store.append(iter(written[2:]))
    assert store.append([]) == []
    ids = first + second
    assert ids == sorted(set(ids))
    assert len(ids) == len(written)
    assert store.decisions() == [replace(e, id=i) for e, i in zip(written, ids, strict=True)]


def test_decisions_filter_and_come_oldest_first(store: Store) -> None:
    """since_ms, kind and subject filter; order is by time then id; limit keeps the oldest."""
    store.append(
        [
            entry(NOW_MS + 30, subject="tx/yahoo"),
            entry(NOW_MS + 10),
            entry(NOW_MS + 20, kind="suspend", subject="192.0.2.10/google"),
            entry(NOW_MS + 10, subject="tx/yahoo"),
            entry(NOW_MS + 40, kind="reload", subject="plan"),
        ]
    )

    def times(entries: list[LogEntry]) -> list[tuple[int, str]]:
        return [(e.at_ms - NOW_MS, e.subject) for e in entries]

    assert times(store.decisions()) == [
        (10, "tx/google"),
        (10, "tx/yahoo"),
        (20, "192.0.2.10/google"),
        (30, "tx/yahoo"),
        (40, "plan"),
    ]
    assert times(store.decisions(since_ms=NOW_MS + 20)) == [
        (20, "192.0.2.10/google"),
        (30, "tx/yahoo"),
        (40, "plan"),
    ]
    assert times(store.decisions(kind="ramp")) == [
        (10, "tx/google"),
        (10, "tx/yahoo"),
        (30, "tx/yahoo"),
    ]
    assert times(store.decisions(kind="ramp", subject="tx/yahoo", since_ms=NOW_MS + 11)) == [
        (30, "tx/yahoo")
    ]
    assert times(store.decisions(limit=2)) == [(10, "tx/google"), (10, "tx/yahoo")]
    assert store.decisions(subject="nobody") == []


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE kiln_decisions SET reason = 'rewritten'",
        "DELETE FROM kiln_decisions",
    ],
)
def test_decision_log_is_append_only_in_the_database(
    store: Store, db_url: str, statement: str
) -> None:
    """Raw SQL that would change or remove a logged decision is refused by the database."""
    store.append([entry(NOW_MS)])
    with pytest.raises(DBAPIError, match="append-only"), raw(db_url, store) as connection:
        connection.execute(text(statement))
    assert [e.reason for e in store.decisions()] == ["all gates passed"]


def test_bad_evidence_is_a_store_error(store: Store) -> None:
    """Evidence that JSON cannot hold is refused with a message naming the entry."""
    with pytest.raises(StoreError, match="evidence of ramp tx/google advance is not JSON"):
        store.append([entry(NOW_MS), entry(NOW_MS, ips={"192.0.2.1"})])
    assert store.decisions() == []


def test_meta_values_round_trip_and_survive_reopen(db_url: str) -> None:
    """get_meta/set_meta keep small named strings; the schema version is not theirs to set."""
    with Store(db_url) as store:
        assert store.get_meta("last_rolled_day") is None
        store.set_meta("last_rolled_day", "2026-11-30")
        store.set_meta("last_rolled_day", "2026-12-01")
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        with pytest.raises(ValueError, match="'schema_version' belongs to the store"):
            store.set_meta("schema_version", "7")
    with Store(db_url) as store:
        assert store.get_meta("last_rolled_day") == "2026-12-01"


# -- flush -------------------------------------------------------------------------------------


def test_flush_writes_snapshot_counts_and_entries(store: Store) -> None:
    """One flush saves the snapshot, adds the counts and appends the entries."""
    store.flush(
        snapshot=b"state",
        now_ms=NOW_MS,
        day=DAY,
        counts={(IP, "google"): DayCounts(granted=3)},
        entries=[entry(NOW_MS)],
    )
    store.flush(snapshot=None, now_ms=NOW_MS + 1000)  # nothing to do: fine
    assert store.load_snapshot() == (b"state", NOW_MS)
    assert store.counts(DAY) == {(IP, "google"): DayCounts(granted=3)}
    assert [e.at_ms for e in store.decisions()] == [NOW_MS]


def test_flush_that_fails_midway_leaves_nothing(store: Store) -> None:
    """A flush failing after some writes (bad evidence, a raising iterable) is rolled back."""
    store.flush(snapshot=b"before", now_ms=NOW_MS, entries=[entry(NOW_MS)])

    def entries_then_crash() -> Iterator[LogEntry]:
        yield entry(NOW_MS + 1)
        raise RuntimeError("caller bug")

    with pytest.raises(StoreError, match="not JSON"):
        store.flush(
            snapshot=b"after",
            now_ms=NOW_MS + 1,
            day=DAY,
            counts={(IP, "google"): DayCounts(granted=3)},
            entries=[entry(NOW_MS + 1), entry(NOW_MS + 1, bad=object())],
        )
    with pytest.raises(RuntimeError, match="caller bug"):
        store.flush(
            snapshot=b"after",
            now_ms=NOW_MS + 1,
            day=DAY,
            counts={(IP, "google"): DayCounts(granted=3)},
            entries=entries_then_crash(),
        )
    assert store.load_snapshot() == (b"before", NOW_MS)
    assert store.counts(DAY) == {}
    assert [e.at_ms for e in store.decisions()] == [NOW_MS]


def test_flush_refuses_counts_without_a_day(store: Store) -> None:
    """Counts belong to a day; flushing them without one is a caller bug."""
    with pytest.raises(ValueError, match="without the day"):
        store.flush(snapshot=None, now_ms=NOW_MS, counts={(IP, "google"): DayCounts(granted=1)})


# -- opening, reopening, refusing --------------------------------------------------------------


def test_reopening_keeps_everything(db_url: str) -> None:
    """What one process saved, the next one (same URL, same node) reads back."""
    with Store(db_url, node="mx1") as before:
        before.save_positions("main", {("tx", "google"): RampState(step=7)}, NOW_MS)
        before.flush(
            snapshot=b"counters",
            now_ms=NOW_MS,
            day=DAY,
            counts={(IP, "google"): DayCounts(delivered=2)},
            entries=[entry(NOW_MS, kind="stop", subject="daemon")],
        )
    with Store(db_url, node="mx1") as after:
        assert after.load_positions("main") == {("tx", "google"): RampState(step=7)}
        assert after.load_snapshot() == (b"counters", NOW_MS)
        assert after.counts(DAY) == {(IP, "google"): DayCounts(delivered=2)}
        assert [(e.kind, e.subject) for e in after.decisions()] == [("stop", "daemon")]
        assert after.append([entry(NOW_MS + 1)]) == [2]
        with pytest.raises(DBAPIError, match="append-only"), raw(db_url, after) as connection:
            connection.execute(text("DELETE FROM kiln_decisions"))


def test_a_schema_1_database_is_raised_to_2(db_url: str) -> None:
    """A database of schema 1 (before the suppression log's import batches) gets the
    batches' table and its guard, and schema 2, keeping what it held."""
    with Store(db_url) as store:
        store.set_meta("kept", "yes")
    with raw(db_url) as connection:
        connection.execute(text("DROP TABLE kiln_suppression_batch"))
        connection.execute(text("UPDATE kiln_meta SET value = '1' WHERE key = 'schema_version'"))
    with Store(db_url) as store:
        assert store.get_meta("schema_version") == "2" and store.get_meta("kept") == "yes"
        event = SuppressionEvent(NOW_MS, 5, "a@example.org", "manual", "import:csv")
        assert store.suppress_bulk([event, replace(event, fingerprint=6)]) == 2
        assert [e.fingerprint for e in store.suppress_events()] == [5, 6]
        with pytest.raises(DBAPIError, match="append-only"), raw(db_url, store) as connection:
            connection.execute(text("DELETE FROM kiln_suppression_batch"))


def test_a_newer_schema_is_refused(db_url: str) -> None:
    """A database written by a later kiln is not touched."""
    Store(db_url).close()
    with raw(db_url) as connection:
        connection.execute(text("UPDATE kiln_meta SET value = '3' WHERE key = 'schema_version'"))
    with pytest.raises(StoreError, match=r"written by a newer kiln \(schema 3\)") as info:
        Store(db_url)
    assert isinstance(info.value, KilnError)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    """The SQLite file is in WAL mode without shared memory (exclusive locking, no -shm file,
    no mmap); each connection waits on locks and checks foreign keys."""
    path = tmp_path / "kiln.db"
    with Store.sqlite(path) as store:
        store.add_counts(DAY, {(IP, "google"): DayCounts(granted=1)})
        with store._engine.connect() as connection:  # the store's own pooled connection
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA busy_timeout").scalar() == 5_000
            assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA locking_mode").scalar() == "exclusive"
            assert pragma("PRAGMA mmap_size").scalar() == 0
        assert path.with_name("kiln.db-wal").exists()
        assert not path.with_name("kiln.db-shm").exists()  # the WAL index is in heap memory
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    plain.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (lambda: f"postgresql://kiln:s3cret@127.0.0.1:{closed_port()}/kiln", "refused"),
        (lambda: f"postgresql+psycopg://kiln:s3cret@127.0.0.1:{closed_port()}/kiln", "refused"),
        (lambda: "mysql://kiln:s3cret@db.example/kiln", "unsupported database"),
        (lambda: "postgresql+asyncpg://kiln:s3cret@db.example/kiln", "unsupported database"),
        (lambda: "kiln:s3cret@nowhere", "not a database URL"),
        (lambda: "sqlite:////nonexistent-dir/kiln.db", "unable to open database file"),
    ],
)
def test_unusable_urls_are_store_errors_without_the_password(url: Any, problem: str) -> None:
    """Bad or unreachable databases raise StoreError; the password never appears."""
    with pytest.raises(StoreError, match=problem) as info:
        Store(url())
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(info.value)
    assert str(info.value).startswith("cannot open the store (")


def test_wrong_password_on_a_real_server_is_masked(postgres_url: str) -> None:
    """The server's refusal comes through; the password that was tried does not."""
    wrong = make_url(postgres_url).set(password="s3cret")  # noqa: S106  # the wrong one, on purpose
    url = wrong.render_as_string(hide_password=False)
    with pytest.raises(StoreError, match="password authentication failed") as info:
        Store(url)
    assert "s3cret" not in str(info.value)
    assert ":***@" in str(info.value)


def test_repr_hides_the_password(postgres_url: str) -> None:
    """A store's repr and target name the database without its password."""
    with Store(postgres_url, node="mx1") as store:
        assert make_url(postgres_url).password
        assert str(make_url(postgres_url).password) not in repr(store)
        assert "mx1" in repr(store)
