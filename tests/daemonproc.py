"""Run `kiln run` as a real subprocess for tests: start, wait until it answers, stop or kill."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kiln.client import Client

__all__ = ["REPO", "DaemonProc", "running_daemon", "stored_counts"]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "schedules" / "example.yaml"


class DaemonProc:
    """A `kiln run` process with its own state folder (short path: Unix sockets max 107 B)."""

    def __init__(
        self,
        plan: Path = EXAMPLE,
        state_dir: Path | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.plan = plan
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="kiln-", dir="/tmp"))
        self.socket = self.state_dir / "kiln.sock"  # the MTA socket: decisions only
        self.operator_socket = self.state_dir / "operator.sock"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "daemon.log"
        #: CPUs the daemon's threads may run on (None: wherever the harness may).
        self.cpus = cpus

    def start(self, timeout_s: float = 20.0, poll_s: float = 0.05) -> DaemonProc:
        """Start the daemon and wait until it answers `ping` on the MTA socket (asked every
        `poll_s`; 0: as fast as it can, to catch the first moment it answers)."""
        cmd = [
            sys.executable,
            "-m",
            "kiln",
            "run",
            "--config",
            str(self.plan),
            "--state-dir",
            str(self.state_dir),
            "--log-format",
            "json",
            *self.args,
        ]
        if "--nameserver" not in self.args:
            cmd += ["--nameserver", "127.0.0.1:9"]  # nothing answers: every domain is default
        if "--http" not in self.args:
            cmd += ["--http", "127.0.0.1:0"]  # a free port: daemons of one test never collide
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                cmd, stdout=log, stderr=log, env=self.env, cwd=REPO
            )
        if self.cpus is not None:
            # Before the interpreter has started a thread; `_place_threads` checks them all.
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln run exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.socket))
                    probe.sendall(b'{"op":"ping"}\n')
                    if probe.recv(100).startswith(b'{"ok":true'):
                        self._place_threads()
                        return self
                finally:
                    probe.close()
            time.sleep(poll_s)
        self.kill()
        raise RuntimeError(f"kiln run did not answer within {timeout_s} s:\n{self.log()}")

    def _place_threads(self) -> None:
        """Every thread of the daemon on `cpus` (threads inherit the main thread's CPUs; this
        makes sure no thread started before `start` set them escapes)."""
        if self.cpus is None or self.proc is None:
            return
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that has ended meanwhile
                if os.sched_getaffinity(int(task.name)) != self.cpus:
                    os.sched_setaffinity(int(task.name), self.cpus)

    @property
    def pid(self) -> int | None:
        """The running process's id (None before start or after it ended)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) and VmSize of the running process, in KiB, from
        /proc/PID/status; empty when it is not running."""
        pid = self.pid
        if pid is None:
            return {}
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "VmSize") and value.strip().endswith("kB"):
                out[name] = int(value.split()[0])
        return out

    def client(self) -> Client:
        """A new connection to the operator socket (answers every operation)."""
        return Client(self.operator_socket)

    def mta_client(self) -> Client:
        """A new connection to the MTA socket (decision operations only)."""
        return Client(self.socket)

    def http_url(self, timeout_s: float = 10.0) -> str:
        """The HTTP API's base URL, from the daemon's `http_listening` log line."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log().splitlines():
                if '"http_listening"' in line:
                    return str(json.loads(line)["url"])
            if time.monotonic() > deadline:
                raise AssertionError("the daemon logged no http_listening line:\n" + self.log())
            time.sleep(0.05)

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        """Kill if running and remove the state folder."""
        self.kill()
        shutil.rmtree(self.state_dir, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(
    plan: Path = EXAMPLE, args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[DaemonProc]:
    """A started daemon, killed and cleaned up afterwards."""
    d = DaemonProc(plan, args=args, env=env)
    try:
        yield d.start()
    finally:
        d.cleanup()


def stored_counts(state: Path, day: str, column: str) -> dict[tuple[str, str], int]:
    """One of kiln's stored day counts (`granted`, `delivered`, `deferred`, `bounced`) per
    (IP, provider), non-zero ones only; read once the daemon has stopped (it holds its SQLite
    database while it runs)."""
    assert column in ("granted", "delivered", "deferred", "bounced")
    db = sqlite3.connect(f"file:{state / 'kiln.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            f"SELECT ip, provider, {column} FROM kiln_feedback_counts WHERE day = ?",  # noqa: S608
            (day,),
        ).fetchall()
    finally:
        db.close()
    return {(ip, provider): n for ip, provider, n in rows if n}
