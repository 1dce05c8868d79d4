"""Postfix's transport table as kiln serves it (`_core.MtaServer(protocol="socketmap")`),
over a real Unix socket: answers, bad input in the protocol's own error form, bounds, a
peer that disconnects mid-request, and other clients unaffected. Fuzzed with hypothesis."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln import _core
from test_protocol import WARM_IP, WARMING_IPS, make_engine

TRANSPORTS = [(ip, f"kiln-{ip}") for ip in (*WARMING_IPS, WARM_IP)]
MAX_REQUEST = 65536


def net(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


class Reader:
    """Netstring replies from one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self) -> bytes | None:
        """The next reply's payload, or None when the server closed the connection."""
        while True:
            head, colon, rest = self.buf.partition(b":")
            if colon:
                n = int(head)
                if len(rest) > n:
                    assert rest[n : n + 1] == b",", self.buf
                    self.buf = rest[n + 1 :]
                    return rest[:n]
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk


@pytest.fixture
def table(tmp_path: Path) -> Iterator[tuple[_core.Engine, Path]]:
    """The protocol tests' engine (pools `transactional` and `shared`) behind a socketmap
    server."""
    engine = make_engine(daily_cap=3)
    engine.postfix_configure(TRANSPORTS, "[127.0.0.1]:2525")
    path = tmp_path / "postfix.sock"
    server = _core.MtaServer(engine, str(path), backlog=16, max_connections=4, protocol="socketmap")
    try:
        yield engine, path
    finally:
        server.stop()


def connect(path: Path) -> tuple[socket.socket, Reader]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s, Reader(s)


def ask(path: Path, *payloads: bytes) -> list[bytes | None]:
    s, r = connect(path)
    with s:
        s.sendall(b"".join(net(p) for p in payloads))
        return [r.reply() for _ in payloads]


def test_addresses_get_a_transport_then_wait_and_domains_are_not_found(
    table: tuple[_core.Engine, Path],
) -> None:
    """Warming IP first (cap 3), then the warm one, then the overflow pool's (which has no
    transport here: a TEMP that names the fix); a queued provider makes new mail wait."""
    engine, path = table
    replies = ask(path, *[b"transactional user%d@gmail.com" % i for i in range(6)])
    assert replies[:3] == [b"OK kiln-%s:[127.0.0.1]:2525" % WARMING_IPS[0].encode()] * 3
    assert replies[3:6] == [b"OK kiln-%s:[127.0.0.1]:2525" % WARM_IP.encode()] * 3
    overflow = ask(path, b"transactional next@gmail.com")[0]
    assert overflow is not None and overflow.startswith(b"TEMP no Postfix transport"), overflow
    assert ask(path, b"transactional gmail.com", b"transactional .gmail.com") == [
        b"NOTFOUND ",
        b"NOTFOUND ",
    ]
    engine.enqueue(1, engine.pool("shared"), engine.provider("google"))
    assert ask(path, b"shared x@gmail.com") == [
        b"OK retry:4.7.0 kiln: waiting for room at google in pool shared"
    ]
    stats = engine.postfix_stats()
    assert (stats["granted"], stats["waited"], stats["not_found"], stats["errors"]) == (7, 1, 2, 1)


def test_bad_requests_get_errors_and_the_connection_stays(
    table: tuple[_core.Engine, Path],
) -> None:
    _, path = table
    replies = ask(
        path,
        b"nopool a@gmail.com",
        b"no-space-here",
        b"transactional \xff\xfe@x",
        b"transactional a@bad domain",
        b"",
        b"transactional xn--bcher-kva.example@\xc3\xa9xample.com",
        b"transactional a@b\x00c.com",
        b"transactional ok@gmail.com",
    )
    assert replies[0] == b"PERM unknown pool nopool"
    assert replies[1] is not None and replies[1].startswith(b"PERM expected")
    assert replies[2] == b"PERM request is not UTF-8"
    assert replies[3] is not None and replies[3].startswith(b"TEMP domain")
    assert replies[4] is not None and replies[4].startswith(b"PERM expected")
    assert replies[5] is not None and replies[5].startswith(b"OK kiln-"), replies[5]
    assert replies[6] is not None and replies[6].split(b" ")[0] in (b"OK", b"TEMP")
    assert replies[7] is not None and replies[7].startswith(b"OK kiln-")


@pytest.mark.parametrize(
    "frame",
    [b"x5:hello,", b"5:hello;", b"99999999:", f"{MAX_REQUEST + 1}:".encode(), b":,"],
)
def test_a_broken_frame_gets_perm_and_a_close_others_unaffected(
    table: tuple[_core.Engine, Path], frame: bytes
) -> None:
    _, path = table
    other, other_reader = connect(path)
    with other:
        s, r = connect(path)
        with s:
            s.sendall(net(b"transactional a@gmail.com") + frame)
            first = r.reply()
            assert first is not None and first.startswith(b"OK kiln-")
            assert r.reply() == b"PERM not a netstring, or longer than 65536 bytes; closing"
            assert r.reply() is None  # closed
        other.sendall(net(b"transactional b@gmail.com"))
        reply = other_reader.reply()
        assert reply is not None and reply.startswith(b"OK kiln-")


def test_a_peer_that_leaves_mid_request_and_a_long_key(table: tuple[_core.Engine, Path]) -> None:
    engine, path = table
    s, _ = connect(path)
    s.sendall(b"40:transactional half")
    s.close()
    long_local = b"transactional " + b"a" * 60_000 + b"@gmail.com"  # within the bound
    long_domain = b"transactional a@" + b"b" * 300 + b".com"  # no such domain name
    local, domain = ask(path, long_local, long_domain)
    assert local is not None and local.startswith(b"OK kiln-"), local
    assert domain is not None and domain.startswith(b"TEMP domain"), domain
    assert engine.postfix_stats()["requests"] == 2


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.text(max_size=60).map(lambda t: ("transactional " + t).encode()),
            st.from_regex(r"\Atransactional [a-z0-9.+]{1,20}@[a-z0-9.\-]{1,30}\Z").map(str.encode),
        ),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=6),
)
def test_fuzzed_requests_in_any_pieces_get_one_wellformed_reply_each(
    table: tuple[_core.Engine, Path], payloads: list[bytes], cuts: list[int]
) -> None:
    """Any well-framed payloads, sent in arbitrary pieces: exactly one reply each, every one
    in the protocol's form (OK, NOTFOUND, TEMP or PERM), and the connection stays up."""
    _, path = table
    stream = b"".join(net(p) for p in payloads)
    s, r = connect(path)
    with s:
        at = 0
        for c in cuts:
            s.sendall(stream[at : at + c])
            at += c
        s.sendall(stream[at:])
        for _ in payloads:
            reply = r.reply()
            assert reply is not None
            assert reply.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"TEMP", b"PERM"), reply
        s.sendall(net(b"transactional still@gmail.com"))
        assert r.reply() is not None


def test_only_known_protocols_and_sane_transports(tmp_path: Path) -> None:
    engine = _core.Engine()
    with pytest.raises(_core.CoreError, match="protocol"):
        _core.MtaServer(
            engine, str(tmp_path / "x.sock"), backlog=1, max_connections=1, protocol="smtp"
        )
    with pytest.raises(_core.CoreError, match="IP address"):
        engine.postfix_configure([("nope", "kiln-x")], "")
    with pytest.raises(_core.CoreError, match="service name"):
        engine.postfix_configure([("192.0.2.1", "a:b")], "")
    with pytest.raises(_core.CoreError, match="spaces"):
        engine.postfix_configure([], "a b")
