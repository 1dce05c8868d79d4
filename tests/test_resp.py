"""The Redis-protocol socket (rust/src/resp) with real clients nobody here wrote: redis-py
(sync and asyncio) and Debian's redis-cli (one-shot, interactive on a terminal, and
`--pipe`), against a running daemon; and its bounds with hand-made and fuzzed input against
the core's server in-process."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonproc import DaemonProc, running_daemon
from kiln import _core
from test_protocol import anytime_plan, make_engine

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
IP = "192.0.2.10"  # a warming IP of the example plan


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon on the example plan (active all day), its Redis socket in its state folder."""
    with running_daemon(anytime_plan(tmp_path_factory.mktemp("plan"))) as d:
        yield d


def sock(d: DaemonProc) -> str:
    return str(d.state_dir / "resp.sock")


def cmd(r: redis.Redis | redis.client.Pipeline, *args: object) -> Any:
    """`execute_command`, which redis-py leaves untyped."""
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def test_redis_py_speaks_to_kiln(daemon: DaemonProc) -> None:
    r = redis.Redis(unix_socket_path=sock(daemon), socket_timeout=5)
    assert r.ping() is True
    assert r.echo("héllo") == "héllo".encode()
    first = cmd(r, "CL.THROTTLE", "user:1", 2, 1, 60)
    assert first == [0, 3, 2, -1, 60]
    for _ in range(2):
        cmd(r, "CL.THROTTLE", "user:1", 2, 1, 60)
    assert cmd(r, "CL.THROTTLE", "user:1", 2, 1, 60)[0] == 1
    granted, reason, retry_ms, ip, provider = cmd(r, "KILN.ACQUIRE", IP, "gmail.com")
    assert (granted, reason, ip, provider) == (1, b"granted", IP.encode(), b"google")
    assert isinstance(retry_ms, int)
    picked = cmd(r, "KILN.PICK", "transactional", "yahoo.com", 2)
    assert picked[0] == 2 and picked[5] in (b"warming", b"warm", b"overflow")
    daily_cap, day_used, *_ = cmd(r, "KILN.LIMITS", IP, "gmail.com")
    assert day_used >= 1 and (daily_cap == -1 or daily_cap >= day_used)
    assert cmd(r, "KILN.REPORT", IP, "gmail.com", "delivered") == b"google"
    klass, scope, rule = cmd(
        r, "KILN.CLASSIFY", "550 5.1.1 The email account that you tried to reach does not exist"
    )
    assert klass == b"hard_bounce" and rule is not None, (klass, scope, rule)
    with pytest.raises(redis.ResponseError, match="unknown command 'GET'"):
        r.get("x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        cmd(r, "CL.THROTTLE", "k")
    assert r.ping() is True  # the connection survived the errors
    pipe = r.pipeline(transaction=False)
    for i in range(50):
        cmd(pipe, "CL.THROTTLE", f"pipe:{i % 5}", 10, 100, 1)
    assert [x[0] for x in pipe.execute()] == [0] * 50
    r.close()
    # The throttle keys count in the engine's memory figures (the stats op).
    with daemon.client() as c:
        figures = c.request("stats")["resp"]
    assert figures["throttle_keys"] >= 6  # user:1 and pipe:0..4 (other tests add more)
    assert figures["throttle_bytes"] >= 6 * (len("pipe:0") + 32)
    assert figures["commands"] >= 60 and figures["throttled"] >= 1


def test_loopback_tcp_is_off_by_default_and_serves_the_same_commands(
    tmp_path: Path, daemon: DaemonProc
) -> None:
    assert '"resp_tcp": null' in daemon.log()  # the module's daemon, started without it
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # the daemon binds it next (SO_REUSEADDR)
    plan = anytime_plan(tmp_path)
    with running_daemon(plan, args=["--resp-tcp", f"localhost:{port}"]) as d:
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        assert r.ping() is True
        assert cmd(r, "CL.THROTTLE", "tcp:1", 0, 1, 60)[:2] == [0, 1]
        granted, reason, *_ = cmd(r, "KILN.ACQUIRE", IP, "gmail.com")
        assert (granted, reason) == (1, b"granted")
        r.close()
        assert f'"resp_tcp": "127.0.0.1:{port}"' in d.log()
    with pytest.raises(redis.ConnectionError):  # closed with the daemon
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
    # Only loopback: RESP has no authentication.
    from kiln.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["run", "--resp-tcp", "192.0.2.1:6380"])
    assert refused.value.code == 2


def test_redis_py_asyncio_concurrent_clients(daemon: DaemonProc) -> None:
    async def main() -> list[int]:
        clients = [redis.asyncio.Redis(unix_socket_path=sock(daemon)) for _ in range(8)]
        try:
            results = await asyncio.gather(
                *(
                    c.execute_command("CL.THROTTLE", "shared", 9, 1, 3600)  # type: ignore[no-untyped-call]
                    for c in clients
                    for _ in range(3)
                )
            )
            return [int(x[0]) for x in results]
        finally:
            for c in clients:
                await c.aclose()

    limited = asyncio.run(main())
    assert sorted(limited) == [0] * 10 + [1] * 14  # burst 9: ten fit, whatever the order


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (Debian's redis-cli, our arguments)
        [REDIS_CLI, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def test_redis_cli_one_shot_pipe_and_interactive(daemon: DaemonProc) -> None:
    assert Path(REDIS_CLI).exists(), "redis-cli is missing: run `make system-deps` (as root)"
    s = sock(daemon)
    assert _cli("-s", s, "PING").stdout == "PONG\n"
    out = _cli("-s", s, "CL.THROTTLE", "cli-key", "0", "1", "10").stdout.split()
    assert out == ["0", "1", "0", "-1", "10"]
    # --pipe: raw RESP on stdin, every reply counted.
    n = 1000
    frames = "".join(
        f"*5\r\n$11\r\nCL.THROTTLE\r\n${len(k)}\r\n{k}\r\n$2\r\n10\r\n$3\r\n100\r\n$1\r\n1\r\n"
        for k in (f"piped:{i % 7}" for i in range(n))
    )
    piped = _cli("-s", s, "--pipe", stdin=frames)
    assert piped.returncode == 0, piped.stderr
    assert f"errors: 0, replies: {n}" in piped.stdout, piped.stdout
    # Interactive, on a terminal (`script` gives it one; TERM=dumb keeps its line editor
    # from asking the terminal where the cursor is): the handshake and a few commands.
    session = subprocess.run(  # noqa: S603 (util-linux's script, our arguments)
        ["/usr/bin/script", "-qec", f"{REDIS_CLI} -s {s}", "/dev/null"],
        input="PING\nECHO hi\nSELECT 3\nQUIT\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "TERM": "dumb"},
    )
    text = session.stdout.replace("\r", "")
    assert "PONG" in text and '"hi"' in text, text
    assert "DB index is out of range" in text, text


# ----- bounds and bad input, in-process -----


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    engine = make_engine()
    path = tmp_path / "resp.sock"
    server = _core.MtaServer(engine, str(path), backlog=16, max_connections=8, protocol="resp")
    try:
        yield path
    finally:
        server.stop()


def _talk(path: Path, data: bytes, *, pieces: list[int] | None = None) -> bytes:
    """Send `data` (in pieces), half-close, and read until the server is done."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        at = 0
        for p in pieces or []:
            s.sendall(data[at : at + p])
            at += p
        s.sendall(data[at:])
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"*1\r\n$2147483647\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\n$-1\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\n*1\r\n$4\r\nPING\r\n", b"-ERR Protocol error: expected '$'"),
        (b"*2\r\n$4\r\nPING\r\n$1\r\nab\r\n", b"-ERR Protocol error: bulk string not followed"),
        (b"*100000\r\n", b"-ERR Protocol error: too many arguments"),
        (b"x" * 70_000, b"-ERR Protocol error: too big inline request"),
    ],
)
def test_broken_frames_get_a_protocol_error_and_a_close(
    served: Path, frame: bytes, error: bytes
) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.settimeout(10)
    other.connect(str(served))
    with other:
        out = _talk(served, b"PING\r\n" + frame + b"PING\r\n")
        assert out.startswith(b"+PONG\r\n" + error), out[:120]
        assert out.count(b"+PONG") == 1  # closed after the error
        other.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert other.recv(100) == b"+PONG\r\n"


def test_a_client_that_stops_mid_frame_costs_nothing(served: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(served))
        s.sendall(b"*2\r\n$4\r\nECHO\r\n$100\r\nabc")  # and goes away
    assert _talk(served, b"PING\r\n") == b"+PONG\r\n"


def _replies(data: bytes) -> list[bytes]:
    """Split a stream of RESP2 replies into whole replies (asserting they are well-formed)."""
    out: list[bytes] = []
    at = 0

    def one(i: int) -> int:
        kind, nl = data[i : i + 1], data.index(b"\r\n", i)
        if kind in (b"+", b"-", b":"):
            return nl + 2
        n = int(data[i + 1 : nl])
        if kind == b"$":
            return nl + 2 if n < 0 else nl + 2 + n + 2
        assert kind == b"*", data[i : i + 20]
        j = nl + 2
        for _ in range(max(n, 0)):
            j = one(j)
        return j

    while at < len(data):
        end = one(at)
        out.append(data[at:end])
        at = end
    return out


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    commands=st.lists(
        st.lists(st.binary(max_size=30), min_size=1, max_size=6),
        min_size=1,
        max_size=10,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=5),
)
def test_fuzzed_commands_in_any_pieces_get_one_wellformed_reply_each(
    served: Path, commands: list[list[bytes]], cuts: list[int]
) -> None:
    """Any well-framed commands (binary words, unknown names, wrong arities), sent in any
    pieces: one well-formed reply each, and the connection stays up."""
    stream = b"".join(
        b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in c) for c in commands
    )
    quits = [i for i, c in enumerate(commands) if c[0].lower() == b"quit"]
    out = _talk(served, stream + b"*1\r\n$4\r\nPING\r\n", pieces=cuts)
    replies = _replies(out)
    if quits:
        assert len(replies) == quits[0] + 1 and replies[-1] == b"+OK\r\n"
    else:
        assert len(replies) == len(commands) + 1 and replies[-1] == b"+PONG\r\n", replies


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=300))
def test_any_bytes_get_wellformed_replies_or_a_close(served: Path, garbage: bytes) -> None:
    out = _talk(served, garbage)
    _replies(out)  # whatever came back parses as RESP2
    assert _talk(served, b"PING\r\n") == b"+PONG\r\n"  # and the server is fine
