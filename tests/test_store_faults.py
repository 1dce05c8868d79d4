"""The store when things go wrong: a lost, emptied or replaced database is refused, not silently
replaced; state files are private; a read-only or full file system gives StoreErrors, never a
crash.

Real SQLite files under tmp_path. The file-system faults need file systems of their own (a
1 MiB tmpfs, a small ext4 image on a loop device): each runs in a child process with a private
mount namespace (`unshare --mount`), so its mounts vanish with the child whatever happens; the
child unmounts them itself too. Those tests skip, saying why, only where mounting is not
permitted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

import kiln.storedb
from kiln.cli import build_parser
from kiln.records import RampState
from kiln.store import STATE_MARKER, StateLostError, Store, StoreError
from pgserver import create_database

NOW_MS = 1_790_000_000_000
TESTS = Path(__file__).resolve().parent
SKIP_EXIT = 77  # a child's "this machine cannot do that"
#: What mount(8) and friends say when this machine does not let us mount (a skip, not a failure).
NOT_PERMITTED = (
    "permission denied",
    "not permitted",
    "must be superuser",
    "failed to setup loop device",
    "unknown filesystem type",
)


def sqlite_url(folder: Path) -> str:
    """The URL the daemon uses for a state folder: SQLite in STATE_DIR/kiln.db."""
    return f"sqlite:///{(folder / 'kiln.db').resolve()}"


def open_state(folder: Path, **options: Any) -> Store:
    """`Store.open_state` on the SQLite database of `folder`."""
    return Store.open_state(sqlite_url(folder), folder, **options)


def marker(folder: Path) -> dict[str, Any]:
    """The state marker of `folder`, parsed."""
    data: dict[str, Any] = json.loads((folder / STATE_MARKER).read_text())
    return data


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def started_store(folder: Path) -> str:
    """A state folder whose daemon got to step 3 and stopped; the store id."""
    with open_state(folder) as store:
        store.save_positions("plan", {("b1", "google"): RampState(step=3)}, NOW_MS)
        return store.store_id


@contextmanager
def umask(value: int) -> Iterator[None]:
    """The process umask set to `value` inside the block."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# -- the marker: a fresh folder, a lost database, a replaced one --------------------------------


def test_a_fresh_state_folder_starts_and_writes_the_marker(tmp_path: Path) -> None:
    """No marker, no database: a new store, and a marker naming its id and database."""
    folder = tmp_path / "state"
    with capture_logs() as logs, open_state(folder) as store:
        assert store.created
        assert len(store.store_id) == 32
        assert store.load_positions("plan") == {}
    written = marker(folder)
    assert written["kiln_state"] == 1
    assert written["store_id"] == store.store_id
    assert written["database"] == sqlite_url(folder)
    assert [e["event"] for e in logs] == ["state_marker_written"]
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_reopening_a_folder_with_its_database_just_works(tmp_path: Path) -> None:
    """Marker and database agree: the saved state is there; the marker is left alone."""
    store_id = started_store(tmp_path)
    before = (tmp_path / STATE_MARKER).stat().st_mtime_ns
    with capture_logs() as logs, open_state(tmp_path) as store:
        assert store.store_id == store_id
        assert not store.created
        assert store.load_positions("plan") == {("b1", "google"): RampState(step=3)}
    assert (tmp_path / STATE_MARKER).stat().st_mtime_ns == before
    assert logs == []


def test_a_deleted_database_is_refused_naming_the_file_and_the_marker(tmp_path: Path) -> None:
    """The database file is gone: refused, the message names it, the marker and the way out;
    no new database is made."""
    store_id = started_store(tmp_path)
    database = tmp_path / "kiln.db"
    database.unlink()
    with pytest.raises(StateLostError) as info:
        open_state(tmp_path)
    message = str(info.value)
    assert f"{database} is missing" in message
    assert str(tmp_path / STATE_MARKER) in message
    assert f"store id {store_id}" in message
    assert "--reinitialise" in message
    assert "step 1" in message
    assert isinstance(info.value, StoreError)
    assert not database.exists()
    assert marker(tmp_path)["store_id"] == store_id


def test_an_empty_database_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """A 0-byte file (SQLite would take it for a new database): refused, still 0 bytes."""
    started_store(tmp_path)
    database = tmp_path / "kiln.db"
    database.write_bytes(b"")
    with pytest.raises(StateLostError, match=r"kiln\.db is empty \(0 bytes\)"):
        open_state(tmp_path)
    assert database.stat().st_size == 0


def test_a_database_without_kiln_tables_is_refused_and_not_touched(tmp_path: Path) -> None:
    """Another SQLite database in kiln.db's place: refused; kiln creates none of its tables."""
    started_store(tmp_path)
    database = tmp_path / "kiln.db"
    database.unlink()
    with sqlite3.connect(database) as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    other.close()
    with pytest.raises(StateLostError, match="holds no kiln tables"):
        open_state(tmp_path)
    with sqlite3.connect(database) as other:
        tables = other.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    other.close()
    assert tables == [("notes",)]


def test_another_kiln_database_is_refused(tmp_path: Path) -> None:
    """kiln.db replaced by another folder's kiln database (another store id): refused."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    my_id = started_store(mine)
    their_id = started_store(theirs)
    shutil.copyfile(theirs / "kiln.db", mine / "kiln.db")
    with pytest.raises(
        StateLostError, match=f"another kiln database \\(store id {their_id}\\)"
    ) as info:
        open_state(mine)
    assert info.value.found_id == their_id
    assert f"store id {my_id}" in str(info.value)


def test_reinitialise_starts_afresh_and_rewrites_the_marker(tmp_path: Path) -> None:
    """`reinitialise` on a folder that lost its database: a new empty store, a new id in the
    marker, and a warning that says what happened."""
    old_id = started_store(tmp_path)
    (tmp_path / "kiln.db").unlink()
    with capture_logs() as logs, open_state(tmp_path, reinitialise=True) as store:
        assert store.created
        assert store.store_id != old_id
        assert store.load_positions("plan") == {}
    assert marker(tmp_path)["store_id"] == store.store_id
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state_reinitialised"
    assert warning["previous_store_id"] == old_id
    assert warning["new_database"] is True
    with open_state(tmp_path) as again:  # and from now on the new store is the folder's
        assert again.store_id == store.store_id


def test_reinitialise_adopts_the_database_it_finds_and_deletes_nothing(tmp_path: Path) -> None:
    """`reinitialise` with another kiln database in place keeps that database and its data:
    the marker now names its id."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    started_store(mine)
    their_id = started_store(theirs)
    shutil.copyfile(theirs / "kiln.db", mine / "kiln.db")
    with open_state(mine, reinitialise=True) as store:
        assert store.store_id == their_id
        assert store.load_positions("plan") == {("b1", "google"): RampState(step=3)}
    assert marker(mine)["store_id"] == their_id


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"kiln_state": 1}', b'{"kiln_state": 9}'])
def test_a_damaged_marker_is_refused_unless_reinitialise(tmp_path: Path, damage: bytes) -> None:
    """A marker that cannot be read is not taken for "no marker": refused, naming it;
    `reinitialise` rewrites it and keeps the database."""
    store_id = started_store(tmp_path)
    (tmp_path / STATE_MARKER).write_bytes(damage)
    with pytest.raises(StateLostError, match=f"{STATE_MARKER} is damaged") as info:
        open_state(tmp_path)
    assert "--reinitialise" in str(info.value)
    with open_state(tmp_path, reinitialise=True) as store:
        assert store.store_id == store_id
    assert marker(tmp_path)["store_id"] == store_id


def test_a_database_without_a_marker_is_adopted(tmp_path: Path) -> None:
    """A folder from a kiln without markers (or a database put there first): its database is
    used as it is and the marker written with its id."""
    with Store.sqlite(tmp_path / "kiln.db") as old:
        old.save_positions("plan", {("b1", "google"): RampState(step=5)}, NOW_MS)
        store_id = old.store_id
    with open_state(tmp_path) as store:
        assert (store.store_id, store.created) == (store_id, False)
        assert store.load_positions("plan") == {("b1", "google"): RampState(step=5)}
    assert marker(tmp_path)["store_id"] == store_id


def test_a_moved_state_folder_keeps_its_store(tmp_path: Path) -> None:
    """The folder was moved (the marker names the old path) but the database is the same
    (same id): accepted, and the marker now names the new place."""
    store_id = started_store(tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    with capture_logs() as logs, open_state(tmp_path / "after") as store:
        assert store.store_id == store_id
    assert marker(tmp_path / "after")["database"] == sqlite_url(tmp_path / "after")
    assert [e["event"] for e in logs] == ["state_database_moved"]


def test_the_store_id_is_the_stores_own(tmp_path: Path) -> None:
    """set_meta cannot change the store id (nor the schema version)."""
    with open_state(tmp_path) as store:
        with pytest.raises(ValueError, match="'store_id' belongs to the store"):
            store.set_meta("store_id", "0" * 32)
        assert store.get_meta("store_id") == store.store_id


def test_kiln_run_takes_reinitialise() -> None:
    """`kiln run --reinitialise` is a flag, off unless given."""
    parser = build_parser()
    assert parser.parse_args(["run"]).reinitialise is False
    assert parser.parse_args(["run", "--reinitialise"]).reinitialise is True


# -- PostgreSQL --------------------------------------------------------------------------------


def pg_tables(url: str) -> list[str]:
    """The tables of the PostgreSQL database at `url`."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            return sorted(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_postgresql_marker_names_the_masked_url_and_refuses_another_database(
    postgres_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL the marker records the masked URL; a second node's folder adopts the same
    store; pointing a folder at an empty database is refused and creates nothing there."""
    url = create_database(postgres_url, f"kiln_{uuid.uuid4().hex[:16]}")
    password = str(make_url(url).password)
    with Store.open_state(url, tmp_path / "mx1", node="mx1") as mx1:
        store_id = mx1.store_id
    written = (tmp_path / "mx1" / STATE_MARKER).read_text()
    assert password not in written
    assert json.loads(written)["database"] == make_url(url).render_as_string(hide_password=True)
    with Store.open_state(url, tmp_path / "mx2", node="mx2") as mx2:
        assert mx2.store_id == store_id
    empty = create_database(postgres_url, f"kiln_{uuid.uuid4().hex[:16]}")
    with pytest.raises(StateLostError, match="holds no kiln tables") as info:
        Store.open_state(empty, tmp_path / "mx1", node="mx1")
    assert password not in str(info.value)
    assert "--reinitialise" in str(info.value)
    assert pg_tables(empty) == []
    with Store.open_state(empty, tmp_path / "mx1", node="mx1", reinitialise=True) as fresh:
        assert fresh.created and fresh.store_id != store_id
    assert "kiln_meta" in pg_tables(empty)


# -- file modes and the SQLite locking mode ----------------------------------------------------


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Database, WAL and marker are created 0600 even under umask 022; there is no -shm."""
    with umask(0o022), open_state(tmp_path) as store:
        store.save_snapshot(b"counters", NOW_MS)
        files = {p.name: mode(p) for p in tmp_path.iterdir()}
    assert files == {"kiln.db": 0o600, "kiln.db-wal": 0o600, STATE_MARKER: 0o600}


def test_existing_state_files_are_tightened(tmp_path: Path) -> None:
    """A database left 0644 by an older kiln is made 0600 when the daemon opens it."""
    Store.sqlite(tmp_path / "kiln.db").close()
    os.chmod(tmp_path / "kiln.db", 0o644)
    with capture_logs() as logs, open_state(tmp_path):
        assert mode(tmp_path / "kiln.db") == 0o600
    assert {"event": "state_file_mode_tightened", "was": "0644"}.items() <= logs[0].items()


def test_sqlite_maps_no_file_of_the_store(tmp_path: Path) -> None:
    """No -shm file and no memory mapping of any database file, so a file-system fault cannot
    become a SIGBUS inside SQLite."""
    with open_state(tmp_path) as store:
        for n in range(50):
            store.save_snapshot(bytes(10_000), NOW_MS + n)
        assert store.load_snapshot() == (bytes(10_000), NOW_MS + 49)
        maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in maps
    assert not (tmp_path / "kiln.db-shm").exists()


def test_a_second_store_on_an_open_sqlite_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open store holds the file's lock: another one (another daemon) is refused, saying
    so, after the busy timeout (shortened here)."""
    monkeypatch.setattr(kiln.storedb, "BUSY_TIMEOUT_MS", 100)
    with open_state(tmp_path) as first:
        first.save_snapshot(b"mine", NOW_MS)
        with pytest.raises(StoreError, match=r"database is locked.*another process has the file"):
            Store.sqlite(tmp_path / "kiln.db")
        assert first.load_snapshot() == (b"mine", NOW_MS)


def test_a_refused_write_is_a_store_error_and_the_store_stays_usable(tmp_path: Path) -> None:
    """SQLite's "attempt to write a readonly database" (simulated: the store's one connection
    switched to query_only) is a StoreError; reads go on, and writes once it is writable."""
    with open_state(tmp_path) as store:
        store.save_snapshot(b"before", NOW_MS)
        with store._one_at_a_time("test"), store._engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA query_only=ON")
        with pytest.raises(
            StoreError, match=r"cannot save the counter snapshot .*readonly database"
        ):
            store.save_snapshot(b"refused", NOW_MS + 1)
        assert store.load_snapshot() == (b"before", NOW_MS)
        with store._one_at_a_time("test"), store._engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA query_only=OFF")
        store.save_snapshot(b"after", NOW_MS + 2)
        assert store.load_snapshot() == (b"after", NOW_MS + 2)


def test_a_fatal_signal_in_kiln_run_leaves_a_traceback(tmp_path: Path) -> None:
    """`kiln run` enables faulthandler: a SIGBUS prints the Python stack on stderr."""
    code = (
        "import os, signal\n"
        "from kiln.cli import _enable_faulthandler\n"
        "_enable_faulthandler()\n"
        "os.kill(os.getpid(), signal.SIGBUS)\n"
    )
    done = subprocess.run(  # noqa: S603  # our own interpreter and script
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == -7  # SIGBUS
    assert "Fatal Python error: Bus error" in done.stderr
    assert 'File "<string>", line 4' in done.stderr


# -- file systems that go read-only or fill up (child processes with private mounts) -----------


class Unavailable(Exception):
    """This machine cannot set up the fault (no mount permission, no mkfs.ext4, ...)."""


def run_privately(scenario: Callable[[Path], dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """Run `scenario(tmp_path)` in a child process with a private mount namespace; its report.

    Skips when the namespace or the mounts are not permitted here. A child killed by a signal
    (a SIGBUS inside SQLite) fails the test, with faulthandler's traceback in the message.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting file systems for this test needs root")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) and mount(8) are needed to mount a private file system")
    code = (
        "import faulthandler, sys\n"
        "faulthandler.enable()\n"
        "import test_store_faults\n"
        "test_store_faults.child_main(sys.argv[1], sys.argv[2])\n"
    )
    paths = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    unshare = shutil.which("unshare") or "unshare"
    argv = [unshare, "--mount", "--propagation", "private", sys.executable, "-c", code]
    done = subprocess.run(  # noqa: S603  # our own interpreter, script and temp dir
        [*argv, scenario.__name__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, f"the child exited with {done.returncode}:\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def child_main(scenario: str, folder: str) -> None:
    """In the child: run one scenario, print its report as the last line of JSON."""
    try:
        report = SCENARIOS[scenario](Path(folder))
    except Unavailable as exc:
        sys.stdout.write(f"{exc}\n")
        sys.exit(SKIP_EXIT)
    sys.stdout.write(json.dumps(report) + "\n")


def command(name: str, *args: str, check: bool = True) -> int:
    """Run a system command of the fault set-up; its exit status, or (with `check`)
    Unavailable if it fails."""
    program = shutil.which(name)
    if program is None:
        raise Unavailable(f"{name} is needed for this test and is not installed")
    done = subprocess.run(  # noqa: S603  # fixed commands on our own temp dir
        [program, *args], capture_output=True, text=True, check=False, timeout=60
    )
    if check and done.returncode != 0:
        failure = f"{name} {' '.join(args)}: {done.stderr.strip()}"
        if any(sign in done.stderr.lower() for sign in NOT_PERMITTED):
            raise Unavailable(failure)
        raise RuntimeError(failure)
    return done.returncode


@contextmanager
def mounted(where: Path, *mount_args: str) -> Iterator[Path]:
    """`mount MOUNT_ARGS WHERE` for the block; unmounted afterwards (lazily if still busy)."""
    where.mkdir(exist_ok=True)
    command("mount", *mount_args, str(where))
    try:
        yield where
    finally:
        if command("umount", str(where), check=False) != 0:
            command("umount", "--lazy", str(where), check=False)


def flush_error(store: Store, snapshot: bytes, now_ms: int) -> str | None:
    """Flush `snapshot`; the StoreError's message, or None if it was saved."""
    try:
        store.flush(snapshot=snapshot, now_ms=now_ms)
    except StoreError as exc:
        return str(exc)
    return None


def read_only_under_the_store(tmp_path: Path) -> dict[str, Any]:
    """An ext4 file system (errors=remount-ro) goes read-only under an open store, as a disk
    error makes it; the store writes, reads, closes and reopens."""
    image = tmp_path / "ext4.img"
    with image.open("wb") as out:
        out.truncate(8 << 20)
    command("mkfs.ext4", "-q", "-F", str(image))
    with mounted(tmp_path / "mnt", "-o", "loop,errors=remount-ro", str(image)) as folder:
        device = next(
            line.split()[0]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1] == str(folder)
        )
        trigger = Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error")
        if not trigger.exists():
            raise Unavailable(f"{trigger} is missing: this kernel cannot fail ext4 on purpose")
        store = open_state(folder)
        try:
            before = flush_error(store, b"before", NOW_MS)
            os.sync()  # the pages are clean: any later write must go to the file system
            try:
                trigger.write_text("kiln test: disk error")  # ext4 remounts itself read-only
            except OSError as exc:
                raise Unavailable(f"cannot fail ext4 on purpose here: {exc}") from exc
            report = {
                "before": before,
                "errors": [flush_error(store, b"after", NOW_MS + n) for n in (1, 2)],
                "read": list(map(str, store.load_snapshot() or ())),
            }
        finally:
            store.close()
        try:
            open_state(folder).close()
        except StoreError as exc:
            report["reopen"] = str(exc)
        return report


def read_only_at_start(tmp_path: Path) -> dict[str, Any]:
    """A state folder that is read-only when the daemon starts (a read-only bind mount)."""
    folder = tmp_path / "state"
    started_store(folder)
    with mounted(folder, "--bind", str(folder)):
        command("mount", "-o", "remount,ro,bind", str(folder))
        try:
            open_state(folder).close()
        except StoreError as exc:
            return {"error": str(exc), "type": type(exc).__name__}
        return {"error": None}


def full_disk(tmp_path: Path) -> dict[str, Any]:
    """A 1 MiB tmpfs fills up under an open store, then space is freed."""
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m,mode=0700", "kiln-test") as fs:
        store = open_state(fs)
        try:
            report: dict[str, Any] = {"before": flush_error(store, b"before", NOW_MS)}
            filler = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(filler, bytes(65_536))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
            finally:
                os.close(filler)
            report["full"] = flush_error(store, bytes(300_000), NOW_MS + 1)
            report["read_when_full"] = list(map(str, store.load_snapshot() or ()))
            (fs / "filler").unlink()
            report["freed"] = flush_error(store, bytes(300_000), NOW_MS + 2)
            saved = store.load_snapshot()
            report["read_when_freed"] = None if saved is None else [len(saved[0]), saved[1]]
        finally:
            store.close()
        with open_state(fs) as again:  # and it opens again, with the last good flush
            saved = again.load_snapshot()
            report["reopened"] = None if saved is None else [len(saved[0]), saved[1]]
        return report


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    f.__name__: f for f in (read_only_under_the_store, read_only_at_start, full_disk)
}


def test_a_file_system_gone_read_only_gives_store_errors_not_a_crash(tmp_path: Path) -> None:
    """The file system goes read-only under an open store: each write is a StoreError naming
    the cause, reads still answer, close works, a reopen is a StoreError; no SIGBUS."""
    report = run_privately(read_only_under_the_store, tmp_path)
    assert report["before"] is None
    for error in report["errors"]:
        assert error.startswith("cannot flush state (sqlite:///")
        assert "disk I/O error" in error
        assert "Read-only file system" in error
    assert report["read"] == ["b'before'", str(NOW_MS)]
    assert report["reopen"].startswith("cannot open the store")
    assert "Read-only file system" in report["reopen"]


def test_a_read_only_state_folder_refuses_to_start(tmp_path: Path) -> None:
    """A state folder on a read-only mount: opening is a StoreError saying it is read-only."""
    report = run_privately(read_only_at_start, tmp_path)
    assert report["type"] == "StoreError"
    assert "disk I/O error" in report["error"]
    assert "is read-only" in report["error"]


def test_a_full_disk_fails_the_flush_and_the_store_recovers(tmp_path: Path) -> None:
    """Disk full: the flush is a StoreError ("database or disk is full") that changes nothing;
    once space is freed the next flush lands, and the store reopens with it."""
    report = run_privately(full_disk, tmp_path)
    assert report["before"] is None
    assert "database or disk is full" in report["full"]
    assert "is full" in report["full"].split("database or disk is full", 1)[1]
    assert report["read_when_full"] == ["b'before'", str(NOW_MS)]
    assert report["freed"] is None
    assert report["read_when_freed"] == [300_000, NOW_MS + 2]
    assert report["reopened"] == [300_000, NOW_MS + 2]
