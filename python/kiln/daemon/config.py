"""What `kiln run` is told: paths, socket modes, limits (validated by the CLI)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from kiln.daemon.postfix import PostfixSettings

__all__ = ["DaemonConfig"]


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `kiln run` needs; paths are resolved by `from_args`."""

    plan_path: Path
    state_dir: Path
    database_url: str | None = None
    socket_path: Path | None = None
    socket_mode: int = 0o660
    socket_group: str | None = None
    snapshot_interval_ms: int = 1_000
    node: str = field(default_factory=socket.gethostname)
    #: DNS servers for MX lookups as "host" or "host:port"; empty: /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    #: The operator socket (reload, cancel, explain, status, ...): owner only by default.
    operator_socket_path: Path | None = None
    operator_socket_mode: int = 0o600
    #: Open client connections at most, over both sockets; 0: the open-files limit less
    #: what the daemon needs for itself.
    max_connections: int = 0
    #: Who serves the MTA socket: "rust" (a thread of the core's own; decisions never wait
    #: for Python) or "asyncio" (the event loop, as the operator socket).
    mta_listener: str = "rust"
    #: Start afresh when the state folder lost its database (see docs/state.md).
    reinitialise: bool = False
    #: Serve Postfix's transport table and release the recipients it holds (`--postfix`).
    postfix: PostfixSettings | None = None
    #: The Redis-protocol socket (`--resp-socket`; default STATE_DIR/resp.sock); off with
    #: `--no-resp`.
    resp_socket_path: Path | None = None
    resp: bool = True
    #: Also serve the Redis protocol on this loopback TCP address (`--resp-tcp`, e.g.
    #: `127.0.0.1:6380`); None: not at all (the default). Only loopback: RESP has no
    #: authentication.
    resp_tcp: str | None = None
    #: The HTTP API, metrics and dashboard (`--http HOST:PORT`; None: off, `--http off`).
    http: str | None = "127.0.0.1:8470"
    #: Serve HTTP beyond loopback (`--http-public`); reads then need the token too.
    http_public: bool = False

    @property
    def socket(self) -> Path:
        """Where the native (MTA) socket listens."""
        return self.socket_path or self.state_dir / "kiln.sock"

    @property
    def resp_socket(self) -> Path | None:
        """Where the Redis-protocol socket listens, or None when it is off."""
        if not self.resp:
            return None
        return self.resp_socket_path or self.state_dir / "resp.sock"

    @property
    def operator_socket(self) -> Path:
        """Where the operator socket listens."""
        return self.operator_socket_path or self.state_dir / "operator.sock"

    @property
    def store_url(self) -> str:
        """The database: `--database-url`, else SQLite in the state folder."""
        return self.database_url or f"sqlite:///{(self.state_dir / 'kiln.db').resolve()}"
