"""A small blocking client of the native socket, for `kiln status`, `kiln query` and tests."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

__all__ = ["Client", "ClientError"]


class ClientError(KilnError):
    """The daemon could not be reached, or closed the connection early."""


class Client:
    """One connection to a running daemon; requests are pipelined, replies read in order."""

    def __init__(self, path: Path | str, timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise ClientError(
                f"cannot reach the kiln daemon at {self.path}: {e.strerror or e} "
                "(is `kiln run` running with this --state-dir or --socket?)"
            ) from None
        self._pending = b""

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send_lines(self, lines: Iterable[bytes]) -> int:
        """Send raw request lines (newlines added); returns how many were sent."""
        data = [line.rstrip(b"\n") + b"\n" for line in lines]
        self._sock.sendall(b"".join(data))
        return len(data)

    def read_line(self) -> bytes:
        """The next reply line, without its newline."""
        while b"\n" not in self._pending:
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise ClientError("the kiln daemon did not answer in time") from None
            if not chunk:
                raise ClientError("the kiln daemon closed the connection")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its decoded reply."""
        self.send_lines([json.dumps({"op": op, **fields}).encode()])
        reply: dict[str, Any] = json.loads(self.read_line())
        return reply

    def many(self, requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pipeline `requests` and return their replies in order."""
        n = self.send_lines(json.dumps(r).encode() for r in requests)
        return [json.loads(self.read_line()) for _ in range(n)]
