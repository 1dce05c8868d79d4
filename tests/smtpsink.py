"""An SMTP sink for the MTA end-to-end tests: accepts every message on a loopback port and
records, per message, the address it came from (the sending IP an MTA bound), the
recipients and the Message-ID. Runs its own event loop on a thread; bounded line lengths."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Delivery", "SmtpSink"]

_MESSAGE_ID = re.compile(rb"(?im)^message-id:\s*(\S+)")
_MAX_LINE = 8192


@dataclass(frozen=True)
class Delivery:
    """One message the sink accepted."""

    source_ip: str
    recipients: tuple[str, ...]
    message_id: str | None
    #: `time.monotonic()` when the message was accepted.
    at: float = 0.0


@dataclass
class SmtpSink:
    """`with SmtpSink() as sink:` listens on 127.0.0.1:`sink.port` until the block ends."""

    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    #: Recipients starting with this get a 451 reply with quotes and a backslash in it.
    defer_prefix: str | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> SmtpSink:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._session, "127.0.0.1", 0, limit=_MAX_LINE)

        def main() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(start())
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=main, name="smtp-sink", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the SMTP sink did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def taken(self) -> list[Delivery]:
        """The messages accepted so far."""
        with self._lock:
            return list(self.deliveries)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One SMTP session: every command accepted, every message recorded."""
        peer = writer.get_extra_info("peername")[0]
        recipients: list[str] = []
        try:
            writer.write(b"220 sink ESMTP\r\n")
            while line := await asyncio.wait_for(reader.readline(), 30):
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 sink\r\n")
                elif verb == b"MAIL":
                    recipients = []
                    writer.write(b"250 ok\r\n")
                elif verb == b"RCPT":
                    rcpt = line.split(b":", 1)[1].strip().strip(b"<>").decode()
                    if self.defer_prefix and rcpt.startswith(self.defer_prefix):
                        writer.write(b'451 4.7.1 "Slow down" \\ try again later\r\n')
                    else:
                        recipients.append(rcpt)
                        writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    body = b""
                    while (part := await reader.readline()) not in (b".\r\n", b""):
                        body += part
                    m = _MESSAGE_ID.search(body)
                    with self._lock:
                        self.deliveries.append(
                            Delivery(
                                peer,
                                tuple(recipients),
                                m[1].decode() if m else None,
                                time.monotonic(),
                            )
                        )
                    writer.write(b"250 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
