"""A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, `postgres` on a
free TCP port of 127.0.0.1, `fsync=off`, stopped and deleted at the end.

PostgreSQL refuses to run as root. When the tests run as root (containers, CI), the server runs
as the `postgres` system user that the Debian package creates, in a directory that user owns.
The superuser is `kiln`, with a password checked over TCP (scram-sha-256), so tests can also
see what a wrong password does.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

__all__ = [
    "PostgresServer",
    "PostgresUnavailableError",
    "create_database",
    "find_bindir",
    "running_postgres",
]

SUPERUSER = "kiln"
PASSWORD = "kiln-test-password"  # noqa: S105  # a throwaway server on 127.0.0.1
INSTALL_HINT = "`make system-deps` installs them (Debian/Ubuntu package postgresql)"


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and what to install."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A running server: where it listens and how to log in as its superuser."""

    host: str
    port: int

    def url(self, database: str, *, password: str = PASSWORD) -> str:
        """SQLAlchemy URL of `database` on this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"


def create_database(url: str, name: str) -> str:
    """Create an empty database `name` on the server of `url` (a superuser's); the new URL."""
    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
        autocommit=True,
    ) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return parsed.set(database=name).render_as_string(hide_password=False)


def find_bindir() -> Path | None:
    """The directory holding `initdb` and `postgres`: newest Debian install first, then PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (Path(directory) / "initdb").is_file() and (Path(directory) / "postgres").is_file():
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres") is not None:
        return Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None to run as ourselves, else `postgres` (if root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailableError(
            "tests run as root and PostgreSQL refuses to, but there is no `postgres` user to run "
            f"it as; {INSTALL_HINT} and create that user"
        ) from None


def _tail(log: Path, lines: int = 20) -> str:
    """The end of the server's log, for error messages."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_postgres(*, timeout_s: float = 30.0) -> Iterator[PostgresServer]:
    """Start a private server, yield it once it accepts connections, then stop and delete it."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailableError(
            f"PostgreSQL server binaries (initdb, postgres) not found; {INSTALL_HINT}"
        )
    account = _server_account()
    base = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    try:
        data, log, pwfile = base / "data", base / "server.log", base / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        as_user: dict[str, object] = {}
        if account is not None:
            os.chown(base, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        initdb = subprocess.run(  # noqa: S603  # fixed arguments, our own temp dir
            [
                str(bindir / "initdb"),
                f"--pgdata={data}",
                f"--username={SUPERUSER}",
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **as_user,  # type: ignore[call-overload]  # user/group/extra_groups, typed loosely
        )
        if initdb.returncode != 0:
            raise PostgresUnavailableError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
        server = PostgresServer("127.0.0.1", _free_port())
        with log.open("wb") as log_file:
            process = subprocess.Popen(  # noqa: S603  # fixed arguments, our own temp dir
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-h",
                    server.host,
                    "-p",
                    str(server.port),
                    "-k",
                    str(base),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
                cwd=base,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user,  # type: ignore[call-overload]  # user/group/extra_groups, typed loosely
            )
        try:
            _wait_until_ready(server, process, log, timeout_s)
            yield server
        finally:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: end sessions, checkpoint, exit
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_until_ready(
    server: PostgresServer, process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    """Return once `server` accepts a login; PostgresUnavailableError if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise PostgresUnavailableError(
                f"postgres exited with code {process.returncode}:\n{_tail(log)}"
            )
        try:
            with psycopg.connect(
                host=server.host,
                port=server.port,
                user=SUPERUSER,
                password=PASSWORD,
                dbname="postgres",
                connect_timeout=1,
            ):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise PostgresUnavailableError(
                    f"postgres did not accept connections within {timeout_s} s ({exc}):\n"
                    f"{_tail(log)}"
                ) from exc
        time.sleep(0.05)
