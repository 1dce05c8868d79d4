"""Signal sources: what mailbox providers, blocklists and the MTAs say about our IPs.

Each source module parses one wire format (see docs/signals.md) and fetches it with retries,
within a size limit and a deadline per request (`kiln.signals.http`). A fetch either returns
readings or raises `SourceError`; the daemon's poller records the last good reading of every
source, so staleness is always known, and the policy (`kiln.policy`) turns readings into ramp
actions. Sources never decide anything themselves.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ErrorKind", "SourceError"]

#: Why a source gave no good reading.
#: - `auth`: credentials refused or expired (401/403, SNDS key expired, HTML login page);
#: - `client`: kiln sent a bad request (400), or refused to send a credential over plain
#:   http:// to a non-loopback host -- a bug or a config error, not retried;
#: - `not_found`: the domain or day is unknown to the provider (404);
#: - `rate_limited`: 429 after every retry;
#: - `unavailable`: 5xx and connection errors after every retry;
#: - `bad_data`: the body did not parse as the documented format;
#: - `oversize`: the answer was larger than the source's `max_body_bytes` -- not retried;
#: - `timeout`: no complete answer (connect, headers and the whole body) within the source's
#:   deadline, or a connect/read timeout, after every retry (a source that trickles bytes ends
#:   here too).
ErrorKind = Literal[
    "auth",
    "client",
    "not_found",
    "rate_limited",
    "unavailable",
    "bad_data",
    "oversize",
    "timeout",
]


class SourceError(Exception):
    """A source could not produce a good reading. The message never holds a secret."""

    def __init__(self, source: str, kind: ErrorKind, message: str) -> None:
        super().__init__(f"{source}: {kind}: {message}")
        self.source = source
        self.kind: ErrorKind = kind
        self.detail = message
