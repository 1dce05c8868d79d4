"""A small authoritative DNS server on loopback, for tests that resolve for real.

`DnsServer` answers UDP and TCP on 127.0.0.1 (one ephemeral port for both) from a record
store keyed by `(name, rdtype)`, in a background thread, with dnspython doing the wire
format. Names it knows with other types get NOERROR and no answer; names it does not know
get NXDOMAIN. Both negative answers carry an SOA (owner `.`, minimum `soa_minimum_s`) so
resolvers can cache them. Knobs let a test count queries, delay or drop answers, or
answer SERVFAIL. Use it as a context manager; leaving the block closes every socket and
joins the thread.

    with DnsServer() as server:
        server.mx("example.com", ["mx1.example.net", "mx2.example.net"])
        server.set("example.com", "TXT", ['"v=spf1 -all"'])
        ...  # resolve against ("127.0.0.1", server.port)
        assert server.count("example.com", "MX") == 1
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsServer"]

_HOST = "127.0.0.1"
_UDP_MAX_BYTES = 512
_EDNS_MAX_BYTES = 1232


def _key(name: str | dns.name.Name) -> str:
    """A name as the store keys it: lower-case, no trailing dot."""
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.lower().rstrip(".") or "."


def _absolute(host: str) -> str:
    """A host name with the trailing dot that makes it absolute in record text."""
    return host if host.endswith(".") else host + "."


@dataclass
class _Conn:
    """A TCP client connection and the bytes read from it so far."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


@dataclass(order=True)
class _Pending:
    """A reply held back until `due_s` (monotonic), sent by UDP to `addr` or on `conn`."""

    due_s: float
    seq: int
    wire: bytes = field(compare=False)
    addr: tuple[str, int] | None = field(compare=False, default=None)
    conn: _Conn | None = field(compare=False, default=None)


class DnsServer:
    """Authoritative DNS for any name, from a record store, on 127.0.0.1 UDP and TCP.

    `records` maps `(name, rdtype)` to rdata in zone-file text (`"10 mx.example.net."`,
    `"192.0.2.1"`, `'"some text"'`). Knobs, all safe to change while running:

    - `ttl_s`: TTL of answers; `ttls[(name, rdtype)]` overrides it per record set.
    - `soa_minimum_s`: SOA TTL and minimum in negative answers (their negative TTL).
    - `with_soa`: set False to send negative answers without an SOA.
    - `delay_s[name]`: hold answers for that name back this long.
    - `drop`: names whose queries are never answered; `drop_all` for every name.
    - `servfail`: names answered SERVFAIL; `servfail_all` for every name.
    - `refused`: names answered REFUSED.
    """

    def __init__(
        self,
        records: Mapping[tuple[str, str], Sequence[str]] | None = None,
        *,
        ttl_s: int = 300,
        soa_minimum_s: int = 300,
    ) -> None:
        """A stopped server holding `records`; `start()` or `with` runs it."""
        self._lock = threading.Lock()
        self._queried = threading.Condition(self._lock)
        self.records: dict[tuple[str, str], list[str]] = {}
        self.ttls: dict[tuple[str, str], int] = {}
        self.ttl_s = ttl_s
        self.soa_minimum_s = soa_minimum_s
        self.with_soa = True
        self.delay_s: dict[str, float] = {}
        self.drop: set[str] = set()
        self.drop_all = False
        self.servfail: set[str] = set()
        self.servfail_all = False
        self.refused: set[str] = set()
        self._queries: Counter[tuple[str, str]] = Counter()
        for (name, rdtype), values in (records or {}).items():
            self.set(name, rdtype, values)
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._port = 0

    # ----- the record store -----

    def set(self, name: str, rdtype: str, values: Iterable[str], ttl_s: int | None = None) -> None:
        """Serve `values` (rdata text) for `name` and `rdtype`, replacing what was there."""
        key = (_key(name), rdtype.upper())
        with self._lock:
            self.records[key] = list(values)
            if ttl_s is None:
                self.ttls.pop(key, None)
            else:
                self.ttls[key] = ttl_s

    def mx(self, domain: str, hosts: Iterable[str], ttl_s: int | None = None) -> None:
        """Serve `hosts` as the MX set of `domain`, preferences 10, 20, ...; `.` is a null MX."""
        values = [
            "0 ." if host in {".", ""} else f"{10 * (i + 1)} {_absolute(host)}"
            for i, host in enumerate(hosts)
        ]
        self.set(domain, "MX", values, ttl_s)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Stop serving `name` (one type, or every type)."""
        wanted = _key(name)
        with self._lock:
            for key in [k for k in self.records if k[0] == wanted]:
                if rdtype is None or key[1] == rdtype.upper():
                    del self.records[key]
                    self.ttls.pop(key, None)

    # ----- counters -----

    def count(self, name: str, rdtype: str | None = None) -> int:
        """Queries received for `name` (of one type, or of any type)."""
        wanted = _key(name)
        with self._lock:
            return sum(
                n
                for (qname, qtype), n in self._queries.items()
                if qname == wanted and (rdtype is None or qtype == rdtype.upper())
            )

    def wait_for_query(self, name: str, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Block until `count` queries for `name` have arrived; False if `timeout_s` passed."""
        wanted = _key(name)

        def arrived() -> bool:
            return sum(n for (qname, _), n in self._queries.items() if qname == wanted) >= count

        with self._queried:
            return self._queried.wait_for(arrived, timeout_s)

    @property
    def total_queries(self) -> int:
        """Queries received for any name."""
        with self._lock:
            return sum(self._queries.values())

    def reset_counts(self) -> None:
        """Forget the queries counted so far."""
        with self._lock:
            self._queries.clear()

    # ----- lifecycle -----

    @property
    def port(self) -> int:
        """The UDP and TCP port the server listens on (0 until started)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to query."""
        return _HOST, self._port

    def start(self) -> None:
        """Bind the sockets and start answering in a background thread."""
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="test-dns-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            assert self._wake_w is not None
            self._wake_w.send(b"x")
            thread.join(timeout=5)
            if thread.is_alive():
                raise RuntimeError("DNS server thread did not stop")
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def __enter__(self) -> DnsServer:
        """Start, and return the running server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and close everything."""
        self.stop()

    def _bind(self) -> None:
        """A UDP socket on an ephemeral port and a TCP listener on the same port."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((_HOST, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((_HOST, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, self._tcp, self._port = udp, tcp, port
            return
        raise RuntimeError("no free port for UDP and TCP together")

    # ----- the server thread -----

    def _serve(self) -> None:
        """Answer until stopped; all sockets are owned by this loop while it runs."""
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        pending: list[_Pending] = []
        seq = itertools.count()
        conns: list[_Conn] = []
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "listen")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                while not self._stopping.is_set():
                    now_s = time.monotonic()
                    while pending and pending[0].due_s <= now_s:
                        self._send(heapq.heappop(pending))
                    wait_s = max(0.0, pending[0].due_s - now_s) if pending else None
                    for sel_key, _ in sel.select(wait_s):
                        for reply in self._ready(sel, sel_key, conns):
                            reply.seq = next(seq)
                            heapq.heappush(pending, reply)
            finally:
                for conn in conns:
                    conn.sock.close()

    def _ready(
        self, sel: selectors.BaseSelector, sel_key: selectors.SelectorKey, conns: list[_Conn]
    ) -> list[_Pending]:
        """Handle one readable socket; return the replies to send (now or later)."""
        replies: list[_Pending] = []
        if sel_key.data == "wake":
            return replies
        if sel_key.data == "udp":
            assert self._udp is not None
            try:
                wire, addr = self._udp.recvfrom(65535)
            except (BlockingIOError, ConnectionError):
                return replies
            reply = self._answer(wire, tcp=False)
            if reply is not None:
                replies.append(_Pending(time.monotonic() + reply[1], 0, reply[0], addr=addr))
            return replies
        if sel_key.data == "listen":
            assert self._tcp is not None
            try:
                sock, _ = self._tcp.accept()
            except BlockingIOError:
                return replies
            sock.setblocking(False)
            conn = _Conn(sock)
            conns.append(conn)
            sel.register(sock, selectors.EVENT_READ, conn)
            return replies
        conn = sel_key.data
        assert isinstance(conn, _Conn)
        try:
            data = conn.sock.recv(65535)
        except BlockingIOError:
            return replies
        except ConnectionError:
            data = b""
        if not data:
            sel.unregister(conn.sock)
            conns.remove(conn)
            conn.sock.close()
            return replies
        conn.buffer += data
        while len(conn.buffer) >= 2:
            size = int.from_bytes(conn.buffer[:2], "big")
            if len(conn.buffer) < 2 + size:
                break
            wire = bytes(conn.buffer[2 : 2 + size])
            del conn.buffer[: 2 + size]
            reply = self._answer(wire, tcp=True)
            if reply is not None:
                framed = len(reply[0]).to_bytes(2, "big") + reply[0]
                replies.append(_Pending(time.monotonic() + reply[1], 0, framed, conn=conn))
        return replies

    def _send(self, reply: _Pending) -> None:
        """Send a reply that is due; a client that went away is not an error."""
        try:
            if reply.addr is not None and self._udp is not None:
                self._udp.sendto(reply.wire, reply.addr)
            elif reply.conn is not None and reply.conn.sock.fileno() != -1:
                reply.conn.sock.sendall(reply.wire)
        except OSError:
            return  # the client went away; nothing to tell it

    def _answer(self, wire: bytes, *, tcp: bool) -> tuple[bytes, float] | None:
        """(reply wire, delay in s) for one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries[(name, rdtype)] += 1
            self._queried.notify_all()
            if self.drop_all or name in self.drop:
                return None
            delay_s = self.delay_s.get(name, 0.0)
            servfail = self.servfail_all or name in self.servfail
            refused = name in self.refused
            values = list(self.records.get((name, rdtype), ()))
            ttl_s = self.ttls.get((name, rdtype), self.ttl_s)
            known = any(key[0] == name for key in self.records)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif refused:
            response.set_rcode(dns.rcode.REFUSED)
        elif values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl_s, dns.rdataclass.IN, rdtype, values)
            )
        else:
            if not known:
                response.set_rcode(dns.rcode.NXDOMAIN)
            if self.with_soa:
                response.authority.append(self._soa())
        max_bytes = 65535 if tcp else (_EDNS_MAX_BYTES if query.edns >= 0 else _UDP_MAX_BYTES)
        try:
            out = response.to_wire(max_size=max_bytes)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            out = truncated.to_wire()
        return out, delay_s

    def _soa(self) -> dns.rrset.RRset:
        """The SOA that makes negative answers cacheable for `soa_minimum_s`."""
        minimum = self.soa_minimum_s
        return dns.rrset.from_text(
            dns.name.root,
            minimum,
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.test. hostmaster.test. 1 3600 600 86400 {minimum}",
        )
