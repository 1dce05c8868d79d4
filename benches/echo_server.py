"""The daemon's serving path without kiln: the baseline for benches/daemon_bench.py.

    python benches/echo_server.py SOCKET

An asyncio Unix-socket server shaped like `kiln.daemon.NativeProtocol` (same buffering of a
partial line, same write buffer limit, same event loop) that answers every request line with
one fixed reply the size of a granted `acquire` reply, and decides nothing. What the daemon
costs above this server is what kiln's core, its clock read and its jobs cost per request.
Stops on SIGTERM or SIGINT and removes its socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

__all__ = ["REPLY", "EchoProtocol", "main"]

REPLY = (
    b'{"ok":true,"granted":1,"reason":"granted","retry_after_ms":0,'
    b'"ip":"192.0.2.10","provider":"default"}\n'
)
"""What kiln answers a granted `acquire` on benches/bench-plan.yaml, byte for byte."""

_HIGH_WATER_BYTES = 1 << 20
"""As the daemon: no more than this many bytes ahead of a slow reader."""


class EchoProtocol(asyncio.Protocol):
    """One client: a fixed reply per complete line; a partial line waits for the next read."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; bound its write buffer."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        """Answer every complete line in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buf = self.buffer + data if self.buffer else data
        end = buf.rfind(b"\n") + 1
        if end:
            transport.write(REPLY * buf.count(b"\n", 0, end))
        self.buffer = buf[end:] if end < len(buf) else b""

    def eof_received(self) -> bool:
        """A client that closed its side gets the rest of its replies, then we close."""
        return False

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading until it catches up."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again."""
        if self.transport is not None:
            self.transport.resume_reading()


async def serve(path: Path) -> None:
    """Listen on `path` until SIGTERM or SIGINT (`main` removes the socket file)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    server = await loop.create_unix_server(EchoProtocol, str(path))
    try:
        await stopping.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Serve on the socket path given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: echo_server.py SOCKET", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        asyncio.run(serve(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
