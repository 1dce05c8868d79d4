"""The sockets: one asyncio protocol for both, moving bytes between clients and the engine.

Python moves bytes; `Engine.serve` parses, decides and writes the replies of a whole read
buffer. Operator requests the core hands back (upcalls) go to `kiln.daemon.ops`. Also here:
what a socket file needs (stale files, modes, group), the listen backlog and the connection
limit.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import json
import os
import resource
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import _core
from kiln.daemon.ops import MTA_UPCALL_OPS
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = [
    "RESOURCE_ERRNOS",
    "NativeProtocol",
    "answer_upcall",
    "connection_limit",
    "listen_backlog",
    "op_of",
    "prepare_socket_path",
    "raise_open_files_limit",
    "refusal",
    "refuse_if_answered",
    "set_socket_access",
    "split_id",
    "with_id",
]

#: Write no more than this many bytes ahead of a slow reader before pausing its reads.
_HIGH_WATER_BYTES = 1 << 20
#: Open files kept free for the store, logs, signal sources and MTA-log readers when the
#: connection limit is derived from the open-files limit.
_RESERVED_FDS = 256


class NativeProtocol(asyncio.Protocol):
    """One client of a native socket. Python moves bytes; `Engine.serve` answers them.

    Input is scanned once: a read without a newline is only appended, so a client dripping
    a long line costs O(n), not a rescan per read. An operator request (an upcall) is answered
    as a task: this connection's later requests wait for it (replies stay in order), every
    other connection goes on being served. On the MTA socket (`operator=False`) operator
    requests are refused with an error reply.
    """

    def __init__(self, daemon: Daemon, *, operator: bool = True) -> None:
        self.daemon = daemon
        self.operator = operator
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # an upcall is being answered; input waits in `buffer`
        self.write_paused = False
        self.eof = False
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and bound its write buffer; refuse past the connection limit."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        d = self.daemon
        if d.open_connections >= d.max_connections:
            d.warn_repeated(
                "connection_refused",
                limit=d.max_connections,
                hint="at the connection limit (--max-connections); open ones are still served",
            )
            transport.write(b'{"ok":false,"error":"too many connections; try again"}\n')
            transport.close()
            return
        d.connections += 1
        self.counted = True
        transport.set_write_buffer_limits(high=_HIGH_WATER_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        """Count the connection out."""
        if self.counted:
            self.daemon.connections -= 1
            self.counted = False

    def data_received(self, data: bytes) -> None:
        """Answer every complete line; keep a partial one for the next read."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.busy or b"\n" not in data:
            self.buffer += data
            if not self.busy and len(self.buffer) > _core.MAX_LINE_BYTES:
                self._too_long(transport)
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
            self.buffer = bytearray()
        self._serve(data)

    def _serve(self, buf: bytes) -> None:
        """Answer what `buf` holds, up to the first upcall (answered as a task)."""
        transport = self.transport
        assert transport is not None
        engine = self.daemon.engine
        clock = self.daemon.clock
        while True:
            served = engine.serve(buf, clock.now_ms())
            if served.reply:
                transport.write(served.reply)
            if served.too_long:
                self._too_long(transport)
                return
            buf = buf[served.consumed :]
            if served.upcall is None:
                break
            if not self.operator and op_of(served.upcall) not in MTA_UPCALL_OPS:
                transport.write(refusal(served.upcall))
                continue
            self.busy = True
            self.buffer = bytearray(buf)
            transport.pause_reading()
            _ = self.daemon.spawn(self._answer(served.upcall))
            return
        if len(buf) > _core.MAX_LINE_BYTES:
            self._too_long(transport)
            return
        self.buffer = bytearray(buf)

    def _too_long(self, transport: asyncio.Transport) -> None:
        """A line past the limit: say so and close."""
        transport.write(b'{"ok":false,"error":"request line longer than 65536 bytes; closing"}\n')
        transport.close()
        self.buffer = bytearray()

    async def _answer(self, line: bytes) -> None:
        """Answer one upcall, then go on with what this client sent meanwhile."""
        out = await answer_upcall(self.daemon, line)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out)
        self.busy = False
        rest = bytes(self.buffer)
        self.buffer = bytearray()
        if rest:
            self._serve(rest)
        if self.busy or transport.is_closing():
            return
        if self.eof:
            transport.close()
        elif not self.write_paused:
            transport.resume_reading()

    async def upcall_async(self, line: bytes) -> bytes:
        """The reply line to an upcall as the serving daemon answers it, `id` echoed."""
        return await answer_upcall(self.daemon, line)

    def eof_received(self) -> bool:
        """A client that closed its side gets the rest of its replies, then we close."""
        if self.busy:
            self.eof = True
            return True  # `_answer` closes once the pending reply is written
        return False

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading until it catches up."""
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again (unless an upcall is still pending)."""
        self.write_paused = False
        if self.transport is not None and not self.busy:
            self.transport.resume_reading()


async def answer_upcall(d: Daemon, line: bytes) -> bytes:
    """The reply line to an upcall (a line the core handed up) as the serving daemon answers
    it, `id` echoed; both MTA listeners and the operator socket answer through here. A
    failure is logged and answered with an error reply: the client always gets a line."""
    raw_id, rest = split_id(line)
    try:
        reply = await d.upcall_async(rest)
    except RecursionError:
        reply = {"ok": False, "error": "request nested too deeply"}
    except Exception:
        d.log.exception("upcall_failed")
        return b'{"ok":false,"error":"internal error; see the daemon log"}\n'
    return with_id(raw_id, reply)


def with_id(raw_id: bytes | None, reply: dict[str, Any]) -> bytes:
    """A reply line with the request's `id` as the client wrote it, first."""
    body = json.dumps(reply, separators=(",", ":")).encode()
    if raw_id is None:
        return body + b"\n"
    return b'{"id":' + raw_id + b"," + body[1:] + b"\n"


def op_of(line: bytes) -> str | None:
    """The `op` of a request line the core checked and handed back."""
    try:
        op = json.loads(split_id(line)[1]).get("op")
    except (ValueError, RecursionError):
        return None
    return op if isinstance(op, str) else None


def refusal(line: bytes) -> bytes:
    """The MTA socket's reply to an operator request."""
    raw_id, _ = split_id(line)
    op = op_of(line)
    return with_id(
        raw_id,
        {
            "ok": False,
            "error": f"op {op}: an operator operation, answered on the operator socket only "
            "(STATE_DIR/operator.sock)",
        },
    )


def _string_end(line: bytes, start: int) -> int:
    """Just past the JSON string whose opening quote is at `start`."""
    i = start + 1
    while True:
        quote = line.index(b'"', i)
        backslashes = quote
        while line[backslashes - 1] == 0x5C:  # a quote after an odd run of \\ is escaped
            backslashes -= 1
        if (quote - backslashes) % 2 == 0:
            return quote + 1
        i = quote + 1


def _value_end(line: bytes, start: int) -> int:
    """Just past the JSON value at `start` (iterative: any depth)."""
    i, depth = start, 0
    while True:
        c = line[i]
        if c == 0x22:  # "
            i = _string_end(line, i)
        elif c in b"[{":
            depth += 1
            i += 1
            continue
        elif c in b"]}":
            depth -= 1
            i += 1
        elif c in b" \t\r\n,:":  # only met inside a container
            i += 1
            continue
        else:  # a number, true, false or null
            while i < len(line) and line[i] not in b" \t\r\n,]}":
                i += 1
        if depth == 0:
            return i


def _space_end(line: bytes, i: int) -> int:
    """The first index at or after `i` that is not JSON whitespace."""
    while i < len(line) and line[i] in b" \t\r\n":
        i += 1
    return i


def split_id(line: bytes) -> tuple[bytes | None, bytes]:
    """(the `id` value as written or None, the line without it) of a request line the core
    has checked: one JSON object with no repeated field."""
    members: list[bytes] = []
    raw_id = None
    i = _space_end(line, line.index(b"{") + 1)
    while line[i] != 0x7D:  # }
        key_end = _string_end(line, i)
        value_start = _space_end(line, _space_end(line, key_end) + 1)  # past the colon
        value_end = _value_end(line, value_start)
        if json.loads(line[i:key_end]) == "id":
            raw_id = line[value_start:value_end]
        else:
            members.append(line[i:value_end])
        i = _space_end(line, value_end)
        if line[i] == 0x2C:  # ,
            i = _space_end(line, i + 1)
    return raw_id, b"{" + b",".join(members) + b"}"


def raise_open_files_limit(log: Any) -> None:
    """Raise the soft limit on open files to the hard one (at most 65,536): each client
    connection holds one, and the usual soft default of 1,024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open_files_limit_raised", soft_before=soft, soft=target, hard=hard)


#: accept() failures that mean "out of descriptors or memory", not a bad client.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listen_backlog(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int:
    """The kernel's listen backlog limit (asyncio's default of 100 makes a burst of clients
    see EAGAIN); 4,096 where it cannot be read."""
    try:
        return max(128, int(path.read_text().strip()))
    except (OSError, ValueError):
        return 4_096


def connection_limit() -> int:
    """Connections at most: the open-files limit less what the daemon needs itself."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65_536
    return max(16, soft - _RESERVED_FDS)


def refuse_if_answered(path: Path) -> bool:
    """KilnError if a daemon answers on the socket at `path`; True if a stale socket file is
    there (left by a daemon that was killed)."""
    if len(str(path).encode()) > 107:
        raise KilnError(f"socket path is too long for a Unix socket (max 107 bytes): {path}")
    if not (path.exists() or path.is_symlink()):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return True
    else:
        raise KilnError(f"another kiln daemon is listening on {path}")
    finally:
        probe.close()


def prepare_socket_path(path: Path) -> None:
    """Make the folder; remove a stale socket, refuse if another daemon answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if refuse_if_answered(path):
        path.unlink()


def set_socket_access(path: Path, mode: int, group: str | None) -> None:
    """Apply the configured mode and group to the socket file."""
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KilnError(f"socket group {group!r} does not exist") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)
