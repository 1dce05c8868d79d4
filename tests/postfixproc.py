"""A private Postfix instance for the end-to-end tests and benchmarks: Debian's postfix
package (installed by `make system-deps`), run with its own configuration, queue, data folder
and log file in a temporary folder, listening on one loopback port. It never reads or changes
the machine's own /etc/postfix/main.cf, and is stopped (and its folder removed) on exit.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["POSTFIX", "SMTP_SOURCE", "Postfix", "free_port"]

POSTFIX = Path("/usr/sbin/postfix")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")

#: Every service the instance runs besides the ones a test adds (kiln's or a plain `smtp`).
_MASTER = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN = """\
compatibility_level = 3.6
queue_directory = {folder}/spool
data_directory = {folder}/data
maillog_file = {folder}/maillog
maillog_file_prefixes = {folder}
mail_owner = postfix
setgid_group = postdrop
myhostname = kiln-e2e.test
mydomain = kiln-e2e.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
local_recipient_maps =
alias_maps =
alias_database =
smtputf8_enable = no
biff = no
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_process_limit = 50
default_destination_concurrency_limit = 10
"""


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postfix:
    """`Postfix().configure(...)`, then `with pf:` a running instance on `pf.port`;
    `cleanup` removes its folder."""

    def __init__(self, *, port: int | None = None) -> None:
        """The instance's folder; `configure` writes its files, `with` runs it."""
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="kiln-postfix-", dir="/tmp"))
        self.folder.chmod(0o755)
        self.conf = self.folder / "etc"
        self.conf.mkdir()
        (self.folder / "spool").mkdir()
        (self.folder / "data").mkdir()
        shutil.chown(self.folder / "data", "postfix", "postfix")
        self.maillog = self.folder / "maillog"
        self.maillog.touch()

    def configure(self, *, master_cf: str, main_cf: str = "") -> Postfix:
        """Write main.cf and master.cf: the instance's own lines, then the given ones."""
        (self.conf / "main.cf").write_text(_MAIN.format(folder=self.folder) + main_cf)
        listen = f"127.0.0.1:{self.port}"
        (self.conf / "master.cf").write_text(_MASTER.format(listen=listen) + master_cf)
        return self

    def __enter__(self) -> Postfix:
        self.run("postfix", "start")
        deadline = time.monotonic() + 30
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run("postfix", "stop", check=False)
        deadline = time.monotonic() + 15
        while self._master_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._master_running():
            self.run("postfix", "abort", check=False)

    def cleanup(self) -> None:
        """Remove the instance's folder (after it stopped)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, command: str, *args: str, check: bool = True) -> str:
        """`command -c CONFIG args...` (postfix, postqueue, postsuper), its output."""
        done = subprocess.run(  # noqa: S603 (Debian's Postfix commands, our arguments)
            [command, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{command} {' '.join(args)}: {done.stderr}{done.stdout}")
        return done.stdout

    def release_command(self) -> str:
        """What `kiln run --postfix-release` is given for this instance."""
        return f"postqueue -c {self.conf} -i"

    def queued(self) -> int:
        """Messages in the instance's queue (incoming, active, deferred, hold)."""
        spool = self.folder / "spool"
        return sum(
            1
            for sub in ("incoming", "active", "deferred", "hold", "maildrop")
            for p in (spool / sub).rglob("*")
            if p.is_file()
        )

    def log(self) -> str:
        """The instance's log so far."""
        return self.maillog.read_text(errors="replace")

    def submit(
        self,
        count: int,
        recipient: str,
        *,
        sessions: int = 5,
        sender: str = "sender@example.com",
        extra: Iterable[str] = (),
    ) -> None:
        """`count` messages through SMTP with smtp-source, each to its own recipient
        (`-N`: a number is prepended to `recipient`)."""
        done = subprocess.run(  # noqa: S603 (Debian's smtp-source, our arguments)
            [
                str(SMTP_SOURCE),
                "-N",
                "-m",
                str(count),
                "-s",
                str(sessions),
                "-f",
                sender,
                "-t",
                recipient,
                *extra,
                f"127.0.0.1:{self.port}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"smtp-source: {done.stderr}{done.stdout}")

    def _listening(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _master_running(self) -> bool:
        pid = self.folder / "spool" / "pid" / "master.pid"
        try:
            n = int(pid.read_text().strip())
        except (OSError, ValueError):
            return False
        return Path(f"/proc/{n}").exists()
