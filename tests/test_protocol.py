"""The native protocol: docs/protocol.md's examples against a live daemon, `Engine.serve`
in-process for every kind of bad input, a hypothesis fuzz of `serve`, and socket tests
against a real `kiln run` (bad lines, long lines, half-open clients, many connections,
deep pipelines).
"""

from __future__ import annotations

import json
import re
import resource
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonproc import EXAMPLE, REPO, DaemonProc, running_daemon
from kiln import _core
from kiln.daemon import UPCALL_OPS
from kiln.daemon.listener import split_id
from kiln.daemon.ops import OPS

DOC = REPO / "docs" / "protocol.md"
#: Stands for a value that varies between runs, in a documented reply.
ANY = "<any>"
NOW_MS = 1_800_000_000_000
MAX_LINE = _core.MAX_LINE_BYTES
#: What the daemon writes before closing a connection whose line is too long.
TOO_LONG_REPLY = b'{"ok":false,"error":"request line longer than 65536 bytes; closing"}\n'
#: ASCII whitespace as the core counts it (Rust's `is_ascii_whitespace`: no vertical tab).
BLANK = frozenset(b" \t\n\x0c\r")
WARMING_IPS = ("192.0.2.10", "192.0.2.11")
WARM_IP = "198.51.100.10"
OVERFLOW_IP = "198.51.100.20"
DOMAINS = {"gmail.com": "google", "example.org": "default", "nomail.example": None}


# ----- helpers -----


def doc_exchanges(text: str) -> list[tuple[str, Any]]:
    """Every (request line, expected reply) of the `text` blocks of a protocol page, in order.

    `> ` starts a request; `< ` starts a reply or continues a wrapped one: reply lines are
    joined until they parse as JSON. The n-th reply belongs to the n-th request.
    """
    requests: list[str] = []
    replies: list[Any] = []
    for block in re.findall(r"^```text\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        pending = ""
        for line in block.splitlines():
            if line.startswith("> "):
                assert not pending, f"unfinished reply before {line!r}"
                requests.append(line[2:])
            elif line.startswith("< "):
                pending += line[2:]
                try:
                    replies.append(json.loads(pending))
                except ValueError:
                    continue
                pending = ""
        assert not pending, f"reply does not parse: {pending!r}"
    assert len(requests) == len(replies), "every request needs exactly one reply"
    return list(zip(requests, replies, strict=True))


def matches(expected: Any, actual: Any) -> bool:
    """`actual` equals `expected`, where `"<any>"` in `expected` matches any value."""
    if expected == ANY:
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return type(expected) is type(actual) and bool(expected == actual)


def make_engine(daily_cap: int | None = None) -> _core.Engine:
    """An engine set up as the daemon sets one up: default provider, upcall ops, keys with
    limits, pools (warming, warm, overflow) and domain routes."""
    engine = _core.Engine()
    engine.set_default_provider("default")
    engine.set_upcall_ops(list(UPCALL_OPS))
    for ip in (*WARMING_IPS, WARM_IP, OVERFLOW_IP):
        for provider in ("google", "default"):
            engine.set_limits(engine.key(ip, provider), daily_cap=daily_cap)
    engine.define_pool("shared", [(OVERFLOW_IP, 1, False)])
    engine.define_pool(
        "transactional", [(WARMING_IPS[0], 1, True), (WARM_IP, 1, False)], overflow="shared"
    )
    for domain, route in DOMAINS.items():
        if domain != "example.org":  # unknown: counts as default
            engine.set_route(domain, route, _core.MAX_NOW_MS)
    return engine


def upcall_reply(line: bytes) -> bytes:
    """What the tests' stand-in for Python answers to an upcall."""
    return json.dumps({"ok": True, "upcall": line.decode("utf-8", "replace")}).encode() + b"\n"


def feed(engine: _core.Engine, chunks: Sequence[bytes]) -> tuple[bytes, int]:
    """Deliver `chunks` as one connection would (as `NativeProtocol.data_received` does):
    returns every reply byte and how many upcalls were answered. Checks `consumed`."""
    out: list[bytes] = []
    upcalls = 0
    buf = b""
    for chunk in chunks:
        buf += chunk
        while True:
            served = engine.serve(buf, NOW_MS)
            assert 0 <= served.consumed <= len(buf)
            out.append(served.reply)
            if served.too_long:
                return b"".join(out), upcalls
            buf = buf[served.consumed :]
            if served.upcall is None:
                break
            upcalls += 1
            out.append(upcall_reply(served.upcall))
    return b"".join(out), upcalls


def serve_lines(engine: _core.Engine, *lines: bytes) -> list[dict[str, Any]]:
    """Each line (newline added) in one buffer; the decoded replies."""
    out, _ = feed(engine, [b"".join(line + b"\n" for line in lines)])
    return [json.loads(r) for r in out.splitlines()]


def one(line: bytes, engine: _core.Engine | None = None) -> dict[str, Any]:
    """The decoded reply to one line."""
    (reply,) = serve_lines(engine or make_engine(), line)
    return reply


def request(op: str, **fields: Any) -> bytes:
    """A request line (without newline)."""
    return json.dumps({"op": op, **fields}).encode()


def complete_lines(data: bytes) -> list[bytes]:
    """The lines of `data` the core answers: complete and not blank."""
    return [line for line in data.split(b"\n")[:-1] if not set(line) <= BLANK]


def recv_line(sock: socket.socket, pending: bytearray) -> bytes:
    """The next reply line from `sock` (b"" at end of stream), `pending` keeps the rest."""
    while b"\n" not in pending:
        chunk = sock.recv(1 << 16)
        if not chunk:
            rest = bytes(pending)
            pending.clear()
            return rest
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line


def connect(path: Path, timeout_s: float = 10.0) -> socket.socket:
    """A blocking connection (the connect itself waits if the listen backlog is full)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    sock.settimeout(timeout_s)
    return sock


def exchange(path: Path, data: bytes, replies: int) -> list[bytes]:
    """Send `data` on a new connection and read `replies` lines."""
    with connect(path) as sock:
        sock.sendall(data)
        pending = bytearray()
        return [recv_line(sock, pending) for _ in range(replies)]


def anytime_plan(directory: Path) -> Path:
    """schedules/example.yaml with active hours all day, so no reply depends on the hour."""
    text = EXAMPLE.read_text()
    assert "active_hours: 07-22" in text
    path = directory / "example.yaml"
    path.write_text(text.replace("active_hours: 07-22", "active_hours: 00-24"))
    return path


# ----- a. the documented examples -----


def test_doc_examples_are_what_the_daemon_answers(tmp_path: Path) -> None:
    """Every `> ` request in docs/protocol.md, sent in order on one connection to a fresh
    daemon, gets a reply matching its `< ` line."""
    exchanges = doc_exchanges(DOC.read_text())
    assert len(exchanges) >= 36
    ops = set()
    for req, _ in exchanges:
        try:
            ops.add(json.loads(req).get("op"))
        except (ValueError, AttributeError):
            continue  # the examples of malformed requests
    assert ops >= {"acquire", "pick", "report", "route", "ping", *UPCALL_OPS}
    with running_daemon(anytime_plan(tmp_path)) as daemon:
        data = b"".join(req.encode() + b"\n" for req, _ in exchanges)
        replies = exchange(daemon.operator_socket, data, len(exchanges))
        for (req, expected), raw in zip(exchanges, replies, strict=True):
            actual = json.loads(raw)
            assert matches(expected, actual), f"{req}\n  documented: {expected}\n  got: {actual}"


def test_explaining_a_foreign_ip_does_not_make_it_a_sending_ip() -> None:
    """`explain` of an IP outside the plan is an error and changes nothing: `acquire` still
    refuses that IP afterwards."""
    from kiln.client import Client

    ip = "203.0.113.7"
    refused = {"ok": False, "error": f"ip: {ip} is not a sending IP of this daemon's plan"}
    with running_daemon() as proc:
        with Client(proc.operator_socket) as c:
            assert c.request("explain", ip=ip, provider="google") == refused
        with Client(proc.socket) as c:
            assert c.request("acquire", ip=ip, provider="google") == refused


def test_doc_lists_every_reason() -> None:
    """The reasons table names every reason a Decision can have (`_core.pyi`), plus null_mx
    and suppressed (answered before the engine decides)."""
    text = DOC.read_text()
    table = text.split("## Reasons", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE))
    assert documented == {
        "granted",
        "paused",
        "suspended",
        "daily_cap",
        "hourly_cap",
        "ip_daily_cap",
        "ip_hourly_cap",
        "rate",
        "reservation",
        "retired",
        "outside_active_hours",
        "null_mx",
        "suppressed",
    }


# ----- b. Engine.serve in-process: bad input of every kind -----


@pytest.mark.parametrize(
    "line",
    [b"not json", b'{"op":"ping"', b'{"op":"ping"} {"op":"ping"}', b"{'op':'ping'}", b"{,}"],
)
def test_invalid_json_gets_an_error(line: bytes) -> None:
    """Text that is not one JSON value gets "invalid JSON" with the parser's message."""
    reply = one(line)
    assert reply["ok"] is False
    assert reply["error"].startswith("invalid JSON: ")
    assert "id" not in reply


@pytest.mark.parametrize("line", [b"[1,2]", b'"ping"', b"5", b"null", b"true", b'[{"op":"ping"}]'])
def test_json_that_is_not_an_object_gets_an_error(line: bytes) -> None:
    """Valid JSON that is not an object is refused as such."""
    assert one(line) == {"ok": False, "error": "request must be a JSON object"}


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{}", "op: missing (one of acquire, pick, report, ...)"),
        (b'{"id":1}', "op: missing (one of acquire, pick, report, ...)"),
        (b'{"op":5,"id":1}', "op: must be a string, got 5"),
        (b'{"op":null}', "op: must be a string, got null"),
    ],
)
def test_missing_or_wrong_typed_op(line: bytes, error: str) -> None:
    """A request without a string `op` is refused, naming `op`."""
    reply = one(line)
    assert reply["error"] == error
    assert reply["ok"] is False


def test_unknown_op_lists_the_known_ones() -> None:
    """An unknown op names itself and every op the daemon answers, core and upcall."""
    reply = one(b'{"op":"send","id":"x"}')
    assert reply == {
        "id": "x",
        "ok": False,
        "error": 'op: unknown operation "send", expected one of acquire, pick, report, route, '
        "ping, classify, " + ", ".join(n for n, o in OPS.items() if not o.addressed),
    }


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"op": "acquire", "domain": "gmail.com"}, "ip: missing"),
        ({"op": "acquire", "ip": WARM_IP}, "domain: missing (or give provider)"),
        ({"op": "pick", "domain": "gmail.com"}, "pool: missing"),
        ({"op": "pick", "pool": "transactional"}, "domain: missing (or give provider)"),
        (
            {"op": "report", "ip": WARM_IP, "domain": "gmail.com"},
            "result: missing (delivered, deferred, bounced or complaint)",
        ),
        ({"op": "report", "ip": WARM_IP, "result": "delivered"}, "domain: missing"),
        ({"op": "route"}, "domain: missing"),
    ],
)
def test_missing_fields_are_named(fields: dict[str, Any], error: str) -> None:
    """A missing required field is named in the error."""
    reply = one(json.dumps(fields).encode())
    assert reply["ok"] is False
    assert reply["error"].startswith(error)


ACQUIRE: dict[str, Any] = {"op": "acquire", "ip": WARM_IP, "domain": "gmail.com"}
REPORT: dict[str, Any] = {
    "op": "report",
    "ip": WARM_IP,
    "domain": "gmail.com",
    "result": "deferred",
}


@pytest.mark.parametrize(
    ("base", "field", "value", "expected"),
    [
        (ACQUIRE, "ip", 5, "a string"),
        (ACQUIRE, "domain", ["gmail.com"], "a string"),
        ({**ACQUIRE, "domain": None}, "domain", None, "a string"),
        ({"op": "acquire", "ip": WARM_IP}, "provider", {"a": 1}, "a string"),
        ({"op": "pick", "domain": "gmail.com"}, "pool", 1, "a string"),
        (REPORT, "result", True, "a string"),
        (REPORT, "enhanced", 4.7, "a string"),
        (REPORT, "text", 5, "a string"),
        (ACQUIRE, "n", "2", "a whole number"),
        (ACQUIRE, "n", 1.5, "a whole number"),
        (ACQUIRE, "n", 1.0, "a whole number"),
        (ACQUIRE, "n", -1, "a whole number"),
        (ACQUIRE, "n", True, "a whole number"),
        (ACQUIRE, "n", 2**64, "a whole number"),
        (REPORT, "code", "421", "a whole number"),
    ],
)
def test_wrong_typed_fields_are_named(
    base: dict[str, Any], field: str, value: Any, expected: str
) -> None:
    """A field of the wrong type is refused, naming the field, the type and the value."""
    reply = one(json.dumps({**base, field: value, "id": 9}).encode())
    assert reply["id"] == 9
    assert reply["ok"] is False
    assert reply["error"].startswith(f"{field}: must be {expected}, got ")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {**ACQUIRE, "count": 2},
            "count: not a field of acquire (fields: ip, domain, provider, n)",
        ),
        ({**ACQUIRE, "pool": "shared"}, "pool: not a field of acquire"),
        (
            {"op": "route", "domain": "gmail.com", "n": 1},
            "n: not a field of route (fields: domain)",
        ),
        ({"op": "ping", "x": None}, "x: not a field of ping (it takes none)"),
        ({"op": "pick", "pool": "shared", "domain": "gmail.com", "ip": WARM_IP}, "ip: not a field"),
        ({**REPORT, "reason": "x"}, "reason: not a field of report"),
    ],
)
def test_unknown_fields_are_named(fields: dict[str, Any], error: str) -> None:
    """A field an op does not take is refused, naming it and the fields the op takes."""
    reply = one(json.dumps(fields).encode())
    assert reply["ok"] is False
    assert reply["error"].startswith(error)


@pytest.mark.parametrize(
    ("n", "error"),
    [
        (0, "n: must be at least 1, got 0"),
        (2**32, "n: must be at most 4294967295, got 4294967296"),
    ],
)
@pytest.mark.parametrize("op", ["acquire", "pick", "report"])
def test_n_out_of_range(op: str, n: int, error: str) -> None:
    """`n` is 1 to 2**32 - 1 for every op that counts."""
    fields = {"acquire": ACQUIRE, "report": REPORT}.get(
        op, {"op": "pick", "pool": "transactional", "domain": "gmail.com"}
    )
    assert one(json.dumps({**fields, "op": op, "n": n}).encode()) == {"ok": False, "error": error}


def test_the_largest_n_is_decided() -> None:
    """n = 2**32 - 1 is a valid request: with a cap it is denied, never an error."""
    reply = one(json.dumps({**ACQUIRE, "n": 2**32 - 1}).encode(), make_engine(daily_cap=10))
    assert reply["ok"] is True
    assert (reply["granted"], reply["reason"], reply["retry_after_ms"]) == (0, "daily_cap", None)


@pytest.mark.parametrize(
    "line", [b"\xff\xfe", b'{"op":"ping","id":"\xff"}', b'{"op":"ping","id":"\xc3"}', b"\x80"]
)
def test_invalid_utf8_gets_an_error(line: bytes) -> None:
    """A line that is not UTF-8 gets an error (without id: it cannot be read)."""
    assert one(line) == {"ok": False, "error": "request is not valid UTF-8"}


@pytest.mark.parametrize(
    "line",
    [b"\x00", b"\x00\x01\x02\x03", b'{"op":"ping"}\x00', b'\x00{"op":"ping"}', b"\x1b[A\x7f"],
)
def test_nul_bytes_and_control_junk_get_an_error(line: bytes) -> None:
    """Binary junk is invalid JSON, answered with one error line."""
    reply = one(line)
    assert reply["ok"] is False
    assert reply["error"].startswith("invalid JSON: ")


def test_a_byte_order_mark_is_invalid_json() -> None:
    """The protocol has no byte-order mark: one makes the line invalid JSON."""
    assert one(b'\xef\xbb\xbf{"op":"ping"}')["error"].startswith("invalid JSON: ")


def test_crlf_and_blank_lines() -> None:
    """`\\r\\n` ends a line like `\\n`; blank lines (any ASCII whitespace) get no reply."""
    engine = make_engine()
    data = b'\n \n\t\r\n{"op":"ping","id":1}\r\n\r\n  {"op":"ping","id":2}  \n\x0c\n'
    served = engine.serve(data, NOW_MS)
    assert served.reply == b'{"id":1,"ok":true}\n{"id":2,"ok":true}\n'
    assert served.consumed == len(data)


def test_partial_lines_wait_for_the_rest() -> None:
    """A line without its newline is left unconsumed until the rest arrives."""
    engine = make_engine()
    first = engine.serve(b'{"op":"ping","id":1}\n{"op":"pi', NOW_MS)
    assert (first.reply, first.consumed) == (b'{"id":1,"ok":true}\n', 21)
    waiting = engine.serve(b'{"op":"pi', NOW_MS)
    assert (waiting.reply, waiting.consumed, waiting.too_long) == (b"", 0, False)
    done = engine.serve(b'{"op":"ping"}\r', NOW_MS)
    assert (done.reply, done.consumed) == (b"", 0)
    done = engine.serve(b'{"op":"ping"}\r\n', NOW_MS)
    assert (done.reply, done.consumed) == (b'{"ok":true}\n', 15)


def padded_ping(length: int) -> bytes:
    """A valid ping line of exactly `length` bytes (its id string is the padding)."""
    head, tail = b'{"op":"ping","id":"', b'"}'
    return head + b"x" * (length - len(head) - len(tail)) + tail


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_a_line_of_exactly_64_kib_is_answered(end: bytes) -> None:
    """64 KiB is the longest line, not counting its terminator (either kind)."""
    line = padded_ping(MAX_LINE)
    served = make_engine().serve(line + end, NOW_MS)
    assert not served.too_long
    assert served.consumed == len(line) + len(end)
    assert json.loads(served.reply) == {"id": json.loads(line)["id"], "ok": True}


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"", b"\r"])
def test_a_line_over_64_kib_is_too_long(end: bytes) -> None:
    """One byte more, complete or not, ends the connection after the earlier replies."""
    before = b'{"op":"ping","id":0}\n'
    served = make_engine().serve(before + padded_ping(MAX_LINE + 1) + end, NOW_MS)
    assert served.too_long
    assert (served.reply, served.consumed) == (b'{"id":0,"ok":true}\n', len(before))


def test_a_partial_line_of_64_kib_still_waits() -> None:
    """A buffered partial line of 64 KiB (plus a `\\r`) may still end in time."""
    for data in (padded_ping(MAX_LINE), padded_ping(MAX_LINE) + b"\r"):
        served = make_engine().serve(data, NOW_MS)
        assert (served.consumed, served.too_long) == (0, False)


ID_VALUES = [
    b'"a-1"',
    b'""',
    b'"caf\xc3\xa9 \\u00e9 \\"q\\""',
    b"0",
    b"-1",
    b"1.5",
    b"1E2",
    b"1e999",
    b"-0",
    b"123456789012345678901234567890",
    b"null",
    b"true",
    b"[]",
    b'{"a":[1,{"b":null}],"c":"}"}',
    b"[" * 200 + b"]" * 200,
]


@pytest.mark.parametrize("raw_id", ID_VALUES)
def test_ids_are_echoed_as_written(raw_id: bytes) -> None:
    """Any JSON value as `id` comes back byte for byte, first, in replies and errors alike."""
    engine = make_engine()
    for line, tail in [
        (b'{"op":"ping","id":' + raw_id + b"}", b'"ok":true}\n'),
        (b'{"id":' + raw_id + b',"op":"nope"}', b'"ok":false,"error":'),
        (b'{"op":"acquire","id":' + raw_id + b',"ip":"' + WARM_IP.encode() + b'"}', b'"ok":f'),
    ]:
        reply = engine.serve(line + b"\n", NOW_MS).reply
        assert reply.startswith(b'{"id":' + raw_id + b"," + tail), reply[:300]


def test_pipelined_replies_come_in_order() -> None:
    """Many requests of every kind in one buffer get their replies in request order."""
    engine = make_engine(daily_cap=50)
    kinds = [
        {"op": "ping"},
        ACQUIRE,
        {**ACQUIRE, "ip": WARMING_IPS[1], "domain": "example.org"},
        {"op": "pick", "pool": "transactional", "domain": "gmail.com"},
        {**REPORT, "code": 421},
        {"op": "route", "domain": "Example.ORG."},
        {"op": "nope"},
        {"op": "acquire"},
    ]
    lines = [json.dumps({**kinds[i % len(kinds)], "id": i}).encode() for i in range(400)]
    replies = serve_lines(engine, *lines)
    assert [r["id"] for r in replies] == list(range(400))
    assert [r["ok"] for r in replies[:8]] == [True] * 6 + [False] * 2


def test_upcalls_stop_the_buffer_in_order() -> None:
    """An operator op hands its line back and stops there; the rest waits for the next call."""
    engine = make_engine()
    data = b'{"op":"ping","id":1}\n{"op":"status","id":2}\r\n{"op":"ping","id":3}\n'
    served = engine.serve(data, NOW_MS)
    assert served.reply == b'{"id":1,"ok":true}\n'
    assert served.upcall == b'{"op":"status","id":2}'
    rest = engine.serve(data[served.consumed :], NOW_MS)
    assert (rest.reply, rest.upcall) == (b'{"id":3,"ok":true}\n', None)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"op":"status","op":"nope","id":1}', "op: given twice"),
        (b'{"op":"limits","ip":5}', "ip: must be a string, got 5"),
        (b'{"op":"stats","id":1,"id":2}', "id: given twice"),
    ],
)
def test_upcall_lines_with_bad_known_fields_are_refused_in_the_core(
    line: bytes, error: str
) -> None:
    """Python never sees an operator line with a repeated or wrong-typed field (a second
    `op` used to reach `Daemon.upcall` as an unknown op and raise)."""
    served = make_engine().serve(line + b"\n", NOW_MS)
    assert served.upcall is None
    assert json.loads(served.reply)["error"] == error


def test_domains_are_normalised() -> None:
    """Case, one trailing dot, surrounding space and `user@` do not matter."""
    engine = make_engine()
    for domain in ["gmail.com", "GMAIL.com.", " Jane.Doe@Gmail.COM ", "a@b@gmail.com"]:
        reply = one(request("route", domain=domain), engine)
        assert reply == {"ok": True, "domain": "gmail.com", "provider": "google", "resolved": True}
        assert one(request("acquire", ip=WARM_IP, domain=domain), engine)["provider"] == "google"


@pytest.mark.parametrize(
    ("domain", "error"),
    [
        ("", "domain: must not be empty"),
        ("user@", "domain: must not be empty"),
        (".", "domain: must not be empty"),
        ("a b.example", "domain: not a domain name"),
        ("a/b.example", "domain: not a domain name"),
        ("x" * 254, "domain: longer than 253 characters"),
    ],
)
def test_bad_domains_are_refused(domain: str, error: str) -> None:
    """Domains that cannot be domain names are errors, for every op that takes one."""
    for line in [request("route", domain=domain), request("acquire", ip=WARM_IP, domain=domain)]:
        assert one(line)["error"].startswith(error)


def test_unknown_domains_count_as_default_and_wait_for_a_lookup() -> None:
    """An unknown domain counts as `default` at once and is queued for an MX lookup; once
    routed it counts as its provider."""
    engine = make_engine()
    assert one(request("acquire", ip=WARM_IP, domain="Corp.Example"), engine)["provider"] == (
        "default"
    )
    assert engine.take_unresolved() == ["corp.example"]
    engine.set_route("corp.example", "google", NOW_MS + 1)
    assert one(request("route", domain="corp.example"), engine)["resolved"] is True
    assert one(request("acquire", ip=WARM_IP, domain="corp.example"), engine)["provider"] == (
        "google"
    )


def test_null_mx_replies() -> None:
    """A null-MX domain: acquire and pick say `null_mx` with no time; report is an error."""
    engine = make_engine()
    null_mx = {
        "ok": True,
        "granted": 0,
        "reason": "null_mx",
        "retry_after_ms": None,
        "provider": None,
    }
    assert one(request("acquire", ip=WARM_IP, domain="nomail.example"), engine) == null_mx
    assert one(request("pick", pool="transactional", domain="nomail.example"), engine) == null_mx
    assert one(request("route", domain="nomail.example"), engine)["provider"] is None
    reply = one(request("report", ip=WARM_IP, domain="nomail.example", result="bounced"), engine)
    assert reply["error"].startswith("domain: publishes a null MX")


def test_pick_tiers_then_the_documented_denial() -> None:
    """pick takes the warming IP, then the warm one, then the overflow pool; then it is
    denied with the shortest wait, without `ip` or `tier`."""
    engine = make_engine(daily_cap=1)
    engine.set_calendar([], [NOW_MS + 60_000])
    line = request("pick", pool="transactional", domain="gmail.com")
    replies = serve_lines(engine, line, line, line, line)
    assert [(r.get("ip"), r.get("tier")) for r in replies] == [
        (WARMING_IPS[0], "warming"),
        (WARM_IP, "warm"),
        (OVERFLOW_IP, "overflow"),
        (None, None),
    ]
    assert all(r["pool"] == "transactional" for r in replies)
    assert replies[3] == {
        "ok": True,
        "granted": 0,
        "reason": "daily_cap",
        "retry_after_ms": 60_000,
        "pool": "transactional",
        "provider": "google",
    }


def test_reports_feed_tallies_and_keep_pushback() -> None:
    """Reports are counted per key; everything but `delivered` is kept with its SMTP text."""
    engine = make_engine()
    replies = serve_lines(
        engine,
        request("report", ip=WARM_IP, domain="gmail.com", result="delivered", n=3),
        request(
            "report",
            ip=WARM_IP,
            provider="google",
            result="deferred",
            code=421,
            enhanced="4.7.28",
            text="é" * 600,
        ),
        request("report", ip=WARM_IP, domain="x.example", result="bounced", code=550),
        request("report", ip=WARM_IP, domain="gmail.com", result="complaint"),
    )
    assert [r["provider"] for r in replies] == ["google", "google", "default", "google"]
    tallies = {(t[0], t[1]): t[2:] for t in engine.take_tallies()}
    assert tallies[(WARM_IP, "google")] == (0, 3, 1, 0, 1)
    assert tallies[(WARM_IP, "default")] == (0, 0, 0, 1, 0)
    reports = engine.take_reports()
    assert [(r[3], r[5], r[6]) for r in reports] == [
        ("deferred", 421, "4.7.28"),
        ("bounced", 550, None),
        ("complaint", None, None),
    ]
    text = reports[0][7]
    assert text is not None
    assert text == "é" * 500  # cut to 1,000 bytes at a character boundary


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"result": "sent"},
            "result: must be delivered, deferred, bounced or complaint (or unsubscribe, with "
            'the recipient\'s address), got "sent"',
        ),
        ({"code": 199}, "code: must be an SMTP reply code 200-599, got 199"),
        ({"code": 600}, "code: must be an SMTP reply code 200-599, got 600"),
        ({"enhanced": "4.7"}, "enhanced: must be an enhanced status code"),
        ({"enhanced": "6.0.0"}, "enhanced: must be an enhanced status code"),
        ({"enhanced": "4.1234.1"}, "enhanced: must be an enhanced status code"),
        ({"enhanced": "4.x.1"}, "enhanced: must be an enhanced status code"),
    ],
)
def test_report_values_are_checked(fields: dict[str, Any], error: str) -> None:
    """Result, code and enhanced code are validated; nothing is recorded on error."""
    engine = make_engine()
    reply = one(json.dumps({**REPORT, **fields}).encode(), engine)
    assert reply["error"].startswith(error)
    assert engine.take_tallies() == []
    assert engine.take_reports() == []


# ----- c. hypothesis: serve never breaks, and splitting changes nothing -----


def _json_values() -> st.SearchStrategy[Any]:
    """Any JSON value (small)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )


_FIELD_NAMES = ["op", "id", "ip", "domain", "provider", "pool", "n", "result", "code", "x"]
_OPS = ["acquire", "pick", "report", "route", "ping", "status", "nope"]


@st.composite
def _object_lines(draw: st.DrawFn) -> bytes:
    """A JSON object made of protocol-ish fields with any values (mostly wrong ones)."""
    fields: dict[str, Any] = {"op": draw(st.sampled_from(_OPS))}
    for name in draw(st.lists(st.sampled_from(_FIELD_NAMES), max_size=5)):
        fields[name] = draw(
            st.sampled_from([*WARMING_IPS, WARM_IP, *DOMAINS, "google", "transactional"])
            | st.integers(-2, 2**33)
            | _json_values()
        )
    return json.dumps(fields, ensure_ascii=draw(st.booleans())).encode()


def _valid_acquires() -> st.SearchStrategy[bytes]:
    """Acquire lines that are valid requests."""
    return st.builds(
        lambda ip, domain, n: request("acquire", ip=ip, domain=domain, n=n),
        st.sampled_from([*WARMING_IPS, WARM_IP]),
        st.sampled_from(["gmail.com", "example.org", "Mail.Example.ORG."]),
        st.integers(1, 4),
    )


_lines = st.one_of(
    _valid_acquires(),
    _object_lines(),
    st.sampled_from([b"", b" ", b"\t", b'{"op":"ping"}', b'{"op":"status"}', b"[1]", b"{"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=30).map(lambda t: t.replace("\n", "").encode()),
)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A byte stream of lines (with `\\n` or `\\r\\n`, maybe an unfinished last line) and the
    same stream cut at random points."""
    lines = draw(st.lists(_lines, max_size=25))
    ends = draw(
        st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(lines), max_size=len(lines))
    )
    data = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    data += draw(st.sampled_from([b"", b'{"op":"pi', b"\r", b"junk"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, chunks


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_streams())
def test_serve_never_breaks_and_splitting_changes_nothing(
    stream: tuple[bytes, list[bytes]],
) -> None:
    """For any bytes, in any pieces: no exception; one JSON object reply with a boolean `ok`
    per complete non-blank line (upcalls included); the same replies as in one piece."""
    data, chunks = stream
    whole, whole_upcalls = feed(make_engine(daily_cap=3), [data])
    split, split_upcalls = feed(make_engine(daily_cap=3), chunks)
    assert (split, split_upcalls) == (whole, whole_upcalls)
    replies = whole.splitlines()
    assert len(replies) == len(complete_lines(data))
    for raw in replies:
        reply = json.loads(raw)
        assert isinstance(reply, dict)
        assert isinstance(reply["ok"], bool)


@given(st.binary(max_size=300))
def test_serve_survives_any_bytes(data: bytes) -> None:
    """Raw random bytes: replies are one JSON object per complete non-blank line."""
    out, _ = feed(make_engine(), [data])
    assert len(out.splitlines()) == len(complete_lines(data))
    assert all(isinstance(json.loads(r)["ok"], bool) for r in out.splitlines())


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from(WARMING_IPS), st.sampled_from(list(DOMAINS)))
        | st.tuples(st.booleans(), st.just("bad"), st.text(max_size=5)),
        max_size=40,
    ),
    st.integers(1, 5),
    st.lists(st.integers(1, 4), min_size=40, max_size=40),
)
def test_acquire_grants_exactly_what_a_daily_cap_allows(
    requests: list[tuple[bool, str, str]], daily_cap: int, counts: list[int]
) -> None:
    """With only a daily cap, a valid acquire is granted iff the key's use plus `n` stays
    within the cap; invalid lines in between charge nothing."""
    engine = make_engine(daily_cap=daily_cap)
    used: dict[tuple[str, str], int] = {}
    lines: list[bytes] = []
    expected: list[tuple[bool, int, str | None]] = []
    for (with_id, ip, domain), n in zip(requests, counts, strict=False):
        fields: dict[str, Any] = {"id": len(lines)} if with_id else {}
        if ip == "bad":
            lines.append(
                json.dumps({"op": "acquire", "ip": ip, "domain": domain, **fields}).encode()
            )
            expected.append((False, 0, None))
            continue
        lines.append(request("acquire", ip=ip, domain=domain, n=n, **fields))
        provider = DOMAINS[domain]
        if provider is None:
            expected.append((True, 0, "null_mx"))
            continue
        fits = used.get((ip, provider), 0) + n <= daily_cap
        if fits:
            used[(ip, provider)] = used.get((ip, provider), 0) + n
        expected.append((True, n if fits else 0, "granted" if fits else "daily_cap"))
    replies = serve_lines(engine, *lines) if lines else []
    assert [(r["ok"], r.get("granted", 0), r.get("reason")) for r in replies] == expected


@given(
    st.dictionaries(st.text(max_size=4).filter(lambda k: k != "id"), _json_values(), max_size=4),
    st.none() | _json_values(),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,\t", " :\r\n ")]),
    st.booleans(),
    st.integers(0, 4),
)
def test_upcall_id_is_split_off_as_written(
    fields: dict[str, Any],
    id_value: Any,
    separators: tuple[str, str],
    ascii_only: bool,
    at: int,
) -> None:
    """`NativeProtocol` takes an upcall's `id` text out of the line exactly as written, and
    the rest of the line is the same object without it."""
    items = list(fields.items())
    if id_value is not None:
        items.insert(min(at, len(items)), ("id", id_value))
    dump = json.JSONEncoder(separators=separators, ensure_ascii=ascii_only).encode
    members = [dump(k) + separators[1] + dump(v) for k, v in items]
    line = (" { " + separators[0].join(members) + " } ").encode()
    raw_id, rest = split_id(line)
    if id_value is None:
        assert raw_id is None
    else:
        assert raw_id == dump(id_value).encode()
    assert json.loads(rest) == fields


# ----- d. a real daemon on a real socket -----


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon for this module's socket tests (the example plan, active all day)."""
    with running_daemon(anytime_plan(tmp_path_factory.mktemp("plan"))) as proc:
        yield proc
        log = proc.log()
        assert "Traceback" not in log, log  # no request ever broke a connection's handler


def test_bad_lines_get_errors_and_the_connection_keeps_working(daemon: DaemonProc) -> None:
    """Every kind of bad line gets one error reply on the same connection, which then
    answers normally; an operator line with a repeated op no longer kills it."""
    bad = [
        b"not json",
        b"[1]",
        b'{"op":"nope","id":1}',
        b'{"op":"acquire","ip":"192.0.2.10","domain":"gmail.com","n":0}',
        b'{"op":"status","op":"nope"}',
        b'{"op":"stats","deep":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe\x00",
    ]
    with connect(daemon.socket) as sock:
        pending = bytearray()
        for line in bad:
            sock.sendall(line + b"\n")
            reply = json.loads(recv_line(sock, pending))
            assert reply["ok"] is False, line[:60]
        sock.sendall(b'{"op":"stats","id":1e999}\n{"op":"ping","id":"still-here"}\n')
        assert recv_line(sock, pending).startswith(b'{"id":1e999,"ok":true,')
        assert recv_line(sock, pending) == b'{"id":"still-here","ok":true}'
    assert "Traceback" not in daemon.log()


def test_a_too_long_line_closes_only_its_connection(daemon: DaemonProc) -> None:
    """A line over 64 KiB gets the earlier replies, the error line and a clean close; another
    open connection is not affected, and a line of exactly 64 KiB is fine."""
    with connect(daemon.socket) as victim, connect(daemon.socket) as bystander:
        victim.sendall(b'{"op":"ping","id":1}\n' + padded_ping(MAX_LINE + 1) + b"\n")
        received = bytearray()
        while chunk := victim.recv(1 << 16):
            received += chunk
        assert bytes(received) == b'{"id":1,"ok":true}\n' + TOO_LONG_REPLY
        long_line = padded_ping(MAX_LINE)
        bystander.sendall(long_line + b"\r\n" + b'{"op":"ping","id":2}\n')
        pending = bytearray()
        assert json.loads(recv_line(bystander, pending))["id"] == json.loads(long_line)["id"]
        assert recv_line(bystander, pending) == b'{"id":2,"ok":true}'


def test_invalid_utf8_and_binary_junk(daemon: DaemonProc) -> None:
    """Kilobytes of binary junk get one error per line, then a ping is answered."""
    junk = bytes(range(256)) * 40 + b"\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc"
    data = junk + b"\n" + b'{"op":"ping","id":"after"}\n'
    lines = complete_lines(data)
    replies = exchange(daemon.socket, data, len(lines))
    assert all(json.loads(r)["ok"] is False for r in replies[:-1])
    assert replies[-1] == b'{"id":"after","ok":true}'


def test_a_half_open_client_gets_its_replies_then_a_close(daemon: DaemonProc) -> None:
    """A client that writes a line and half of another, then shuts down its writing side,
    gets the reply to the whole line and then end of stream; the daemon carries on."""
    with connect(daemon.socket) as sock:
        sock.sendall(b'{"op":"ping","id":1}\n{"op":"acquire","ip":"192.0.2.')
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    assert bytes(received) == b'{"id":1,"ok":true}\n'
    assert exchange(daemon.socket, b'{"op":"ping"}\n', 1) == [b'{"ok":true}']


def _raise_open_files_limit(wanted: int) -> None:
    """Raise this process's soft limit on open files to `wanted` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def test_a_thousand_concurrent_connections(daemon: DaemonProc) -> None:
    """1,000 connections open at once, each with a request in flight, all get answered."""
    _raise_open_files_limit(4096)
    socks: list[socket.socket] = []
    try:
        socks.extend(connect(daemon.socket) for _ in range(1000))
        for i, sock in enumerate(socks):
            sock.sendall(request("acquire", ip=WARM_IP, domain="gmail.com", id=i) + b"\n")
        for i, sock in enumerate(socks):
            reply = json.loads(recv_line(sock, bytearray()))
            assert (reply["id"], reply["granted"]) == (i, 1)
    finally:
        for sock in socks:
            sock.close()
    assert exchange(daemon.socket, b'{"op":"ping"}\n', 1) == [b'{"ok":true}']


def test_thousands_of_pipelined_requests_read_afterwards(daemon: DaemonProc) -> None:
    """A client that writes 5,000 requests before reading gets every reply, in order."""
    kinds = [
        {"op": "ping"},
        {"op": "acquire", "ip": WARM_IP, "domain": "gmail.com"},
        {"op": "route", "domain": "Outlook.com"},
        {"op": "pick", "pool": "shared", "provider": "default"},
        {"op": "nope"},
    ]
    lines = [json.dumps({**kinds[i % len(kinds)], "id": i}).encode() for i in range(5000)]
    replies = exchange(daemon.socket, b"\n".join(lines) + b"\n", len(lines))
    decoded = [json.loads(r) for r in replies]
    assert [r["id"] for r in decoded] == list(range(5000))
    assert [r["ok"] for r in decoded[:5]] == [True, True, True, True, False]


@settings(max_examples=25, deadline=None)
@given(junk=st.binary(max_size=3000), cut=st.booleans())
def test_socket_fuzz_junk_then_ping(daemon: DaemonProc, junk: bytes, cut: bool) -> None:
    """Random bytes, then a ping: one JSON reply per complete line and the ping is answered."""
    data = junk + b"\n" + b'{"op":"ping","id":"fuzz"}\n'
    lines = complete_lines(data)
    with connect(daemon.socket) as sock:
        if cut:  # in two writes, split inside the junk
            sock.sendall(data[: len(junk) // 2])
        sock.sendall(data[len(junk) // 2 :] if cut else data)
        pending = bytearray()
        replies = [recv_line(sock, pending) for _ in lines]
    assert all(isinstance(json.loads(r)["ok"], bool) for r in replies)
    assert replies[-1] == b'{"id":"fuzz","ok":true}'
