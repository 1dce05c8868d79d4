"""Fake Google Postmaster Tools and Microsoft SNDS servers: real HTTP on 127.0.0.1.

Each fake is a `ThreadingHTTPServer` on an ephemeral loopback port, run in a background
thread. Use it as a context manager; leaving the block stops the thread and closes every
socket (slow answers still pending are woken up and dropped).

    with FakeGoogle() as google, FakeSnds() as snds:
        creds = google.authorized_user()           # AuthorizedUser for the fake token endpoint
        source = PostmasterSource(client, creds, ["mail.example.com"], now_ms=clock.now_ms,
                                  base_url=google.base_url, token_url=google.token_url)
        snds_source = SndsSource.legacy(client, snds.key, base_url=snds.base_url)

Both serve the signal fixtures (`tests/fixtures/signals/`) until told otherwise:
`FakeGoogle` has v1 days 2026-03-10 (list fixture) and 2026-03-12 (degraded fixture) and the v2
spam_rate/dkim_pass values of 9-10 March for `mail.example.com`, and the compliance fixture for
`example.com` and `mail.example.com`; `FakeSnds` has `snds_data.csv` for 2026-03-10 and
`snds_ipstatus.csv`. Pass `fixtures=False` to start empty.

Data setters (safe while running; a day is a `datetime.date`):

- `google.set_traffic_stats(domain, day, obj)`: the v1 TrafficStats object for that day (a
  dict; `name` is filled in if missing); `None` removes the day.
- `google.set_domain_stats(domain, day, {metric_name: value})`: v2 values keyed by the
  metric *name* the client defines (`spam_rate`, `delivery_error_rate`, `reject_rate`,
  `temp_fail_rate` in the default set). A number becomes `{"doubleValue": x}`; a dict is
  sent as the StatisticValue itself (e.g. `{"intValue": "12"}`). Replaces that day's values.
- `google.set_compliance(domain, obj)`: the complianceStatus body (`None`: 404).
- `google.deny_domain(domain)` / `google.allow_domain(domain)`: 403 PERMISSION_DENIED for
  every endpoint of that domain (per-item gRPC code 7 in batchQuery).
- `google.expire_tokens()`: every access token issued so far is refused with 401.
- `google.revoke_refresh_token()`: the token endpoint answers 400 `invalid_grant`.
- Knobs: `token_expires_in_s` (3600), `page_size` (server default page size, 10),
  `reverse_order` (serve v1 pages newest first), `last_page_token` (None omits the key on
  the last page; `""` sends an empty token), `missing_day` (`"404"` or `"name_only"`: what
  `trafficStats.get` answers for a day without data).
- `snds.set_data(day, csv_text)` (`None` removes: 404), `snds.set_ip_status(csv_text)`,
  `snds.expire_key()` (every request 404, as an expired link), `snds.key`,
  `snds.wrong_key` (`"html"`: a 200 login page for a wrong key, the default; `"404"`).

Checks: FakeGoogle answers 401 UNAUTHENTICATED without a valid bearer token, and 400
INVALID_ARGUMENT for v1 dates that are not exactly the six dotted, unpadded integer params
(both or neither, end after start) or a v2 body without the nested
`timeQuery.dateRanges.dateRanges` of full Date objects (start <= end).

Failures (both fakes), each a `Failure`:

- `fake.fail_next(failure, n=1, path=None)`: the next `n` matching requests get `failure`.
- `fake.fail_path(path, failure)`: every matching request, until `clear_failures()`.
- `path` is a substring of the request path (`"trafficStats"`, `"complianceStatus"`,
  `"domainStats"`, `"data.aspx"`, `"/token"`...). `path=None` matches every request except
  the Google token endpoint (fail it with `path="/token"`).
- `Failure.status_code(code, retry_after=None)`, `Failure.bad_request()`, `.forbidden()`,
  `.not_found()`, `.rate_limited(retry_after="2")`, `.server_error()`, `.html()` (a login
  page with status 200), `.slow(delay_s)` (answers normally after the delay: use a delay
  beyond the client timeout), `.garbage()` (200 with a body that does not parse).
- Answers that misbehave on the wire, streamed by the handler thread and never held in
  memory: `Failure.flood(size, status=200, declare_length=False)` (`size` bytes of generated
  CSV-looking body, chunked, or with a `Content-Length` of `size`; it stops as soon as the
  client hangs up), `Failure.drip(every_s=0.1, in_headers=False)` (complete headers of a
  chunked answer, then a one-byte chunk every `every_s` forever; with `in_headers`, the
  header block itself never ends, one byte at a time). `fake.streamed_bytes` counts the
  body bytes a flood got onto the socket.

Assertions: `fake.requests` (a list of `RecordedRequest`: method, path, query as
`{name: [values]}`, headers, body; `.json()` for JSON bodies), `fake.count(path=None)`,
`fake.reset_log()`.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import parse_qs, urlsplit

from kiln.signals.http import Secret
from kiln.signals.oauth import AuthorizedUser

__all__ = ["FIXTURES", "Failure", "FakeGoogle", "FakeSnds", "RecordedRequest", "days"]

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "signals"
_HOST = "127.0.0.1"
_HTML = (
    b"<!DOCTYPE html>\r\n<html><head><title>Sign in to your account</title></head>"
    b"<body><form>Sign in</form></body></html>\r\n"
)

Response = tuple[int, dict[str, str], bytes]
#: One generated CSV row, repeated to make a flood's body.
_FLOOD_ROW = (
    b"192.0.2.10,3/9/2026 12:00 AM,3/10/2026 12:00 AM,1200,1180,1500,GREEN,< 0.1%,,,,"
    b"mail.example.com,bounce@example.com,\r\n"
)
_FLOOD_BLOCK = (_FLOOD_ROW * (65_536 // len(_FLOOD_ROW) + 1))[:65_536]


@dataclass(frozen=True)
class Failure:
    """A scripted bad answer: a status (with an error body), HTML, a delay, or garbage."""

    kind: Literal["status", "html", "slow", "garbage", "flood", "drip"]
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0
    size: int = 0
    declare_length: bool = False
    in_headers: bool = False

    @classmethod
    def status_code(cls, code: int, retry_after: str | None = None) -> Failure:
        """Answer `code` with the server's usual error body (and Retry-After if given)."""
        return cls("status", code, retry_after)

    @classmethod
    def bad_request(cls) -> Failure:
        """400 (INVALID_ARGUMENT for Google)."""
        return cls("status", 400)

    @classmethod
    def forbidden(cls) -> Failure:
        """403 (PERMISSION_DENIED for Google)."""
        return cls("status", 403)

    @classmethod
    def not_found(cls) -> Failure:
        """404."""
        return cls("status", 404)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "2") -> Failure:
        """429 RESOURCE_EXHAUSTED with `Retry-After` (seconds or an HTTP-date)."""
        return cls("status", 429, retry_after)

    @classmethod
    def server_error(cls, code: int = 500) -> Failure:
        """500 (or another 5xx)."""
        return cls("status", code)

    @classmethod
    def html(cls) -> Failure:
        """200 with a text/html login page."""
        return cls("html", 200)

    @classmethod
    def slow(cls, delay_s: float) -> Failure:
        """The normal answer, after `delay_s` seconds."""
        return cls("slow", 200, delay_s=delay_s)

    @classmethod
    def garbage(cls) -> Failure:
        """200 with a body that is neither valid JSON nor valid CSV rows."""
        return cls("garbage", 200)

    @classmethod
    def flood(cls, size: int, *, status: int = 200, declare_length: bool = False) -> Failure:
        """A generated body of `size` bytes (chunked, or with its Content-Length)."""
        return cls("flood", status, size=size, declare_length=declare_length)

    @classmethod
    def drip(cls, every_s: float = 0.1, *, in_headers: bool = False) -> Failure:
        """One byte every `every_s` seconds, forever (of the body, or of the headers)."""
        return cls("drip", 200, delay_s=every_s, in_headers=in_headers)


@dataclass(frozen=True)
class _Streamed:
    """An answer the handler streams itself (a flood or a drip)."""

    failure: Failure
    content_type: str


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def param(self, name: str) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class _Scripted:
    """A pending failure: for `remaining` requests (None: until cleared) matching `path`."""

    failure: Failure
    path: str | None
    remaining: int | None


class _Handler(BaseHTTPRequestHandler):
    """Hands each request to the fake that owns the server."""

    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def setup(self) -> None:
        """Track the connection so stop() can close it."""
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        """Untrack the connection."""
        try:
            super().finish()
        except OSError:
            pass
        self.server.fake._track(self.connection, add=False)

    def _serve(self) -> None:
        """Read the request, ask the fake, write the answer (the client may be gone)."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        answer = self.server.fake._dispatch(request)
        if self.server.fake._stopping.is_set():
            self.close_connection = True
            return
        if isinstance(answer, _Streamed):
            self.close_connection = True
            try:
                self._stream(answer)
            except OSError:
                pass  # the client hung up: what these answers wait for
            return
        status, headers, payload = answer
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def _stream(self, answer: _Streamed) -> None:
        """Write a flood or a drip until it is done, the client leaves or the fake stops."""
        fake = self.server.fake
        failure = answer.failure
        if failure.kind == "drip" and failure.in_headers:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not fake._stopping.wait(failure.delay_s):
                self.wfile.write(b"a")
            return
        self.send_response(failure.status)
        self.send_header("Content-Type", answer.content_type)
        if failure.kind == "drip":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while not fake._stopping.wait(failure.delay_s):
                self.wfile.write(b"1\r\n1\r\n")  # a chunk of one byte
            return
        chunked = not failure.declare_length
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(failure.size))
        self.end_headers()
        sent = 0
        while sent < failure.size and not fake._stopping.is_set():
            piece = _FLOOD_BLOCK[: min(len(_FLOOD_BLOCK), failure.size - sent)]
            if chunked:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
            sent += len(piece)
            fake._count_streamed(len(piece))
        if chunked and sent >= failure.size:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = _serve
    do_POST = _serve


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its fake."""

    daemon_threads = True

    def __init__(self, fake: _FakeServer) -> None:
        self.fake = fake
        super().__init__((_HOST, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connections dropped by the client are normal here."""


class _FakeServer:
    """Lifecycle, request log and failure scripting shared by the fakes."""

    #: Request paths that `path=None` failures do not touch.
    _exempt: ClassVar[tuple[str, ...]] = ()
    #: The Content-Type of a flood or a drip.
    _stream_type: ClassVar[str] = "text/plain; charset=utf-8"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._scripted: list[_Scripted] = []
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._streamed = 0

    # ----- lifecycle -----

    def start(self) -> None:
        """Bind an ephemeral port and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, wake slow answers, close every socket. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        """Start; return the running fake."""
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

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        if self._server is None:
            raise RuntimeError("not started")
        return f"http://{_HOST}:{self._server.server_address[1]}"

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        """Remember (or forget) a client connection."""
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ----- failures -----

    def fail_next(self, failure: Failure, n: int = 1, path: str | None = None) -> None:
        """The next `n` requests whose path contains `path` get `failure`."""
        with self._lock:
            self._scripted.append(_Scripted(failure, path, n))

    def fail_path(self, path: str, failure: Failure) -> None:
        """Every request whose path contains `path` gets `failure` until `clear_failures()`."""
        with self._lock:
            self._scripted.append(_Scripted(failure, path, None))

    def clear_failures(self) -> None:
        """Drop every scripted failure."""
        with self._lock:
            self._scripted.clear()

    def _take_failure(self, path: str) -> Failure | None:
        """The failure this request gets, if any (uses up one of a `fail_next`)."""
        with self._lock:
            for scripted in self._scripted:
                if scripted.path is None:
                    if any(p in path for p in self._exempt):
                        continue
                elif scripted.path not in path:
                    continue
                if scripted.remaining is not None:
                    scripted.remaining -= 1
                    if scripted.remaining <= 0:
                        self._scripted.remove(scripted)
                return scripted.failure
        return None

    # ----- the log -----

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def count(self, path: str | None = None) -> int:
        """Requests so far whose path contains `path` (all if None)."""
        with self._lock:
            return sum(1 for r in self._requests if path is None or path in r.path)

    @property
    def streamed_bytes(self) -> int:
        """Body bytes floods have written to sockets so far."""
        with self._lock:
            return self._streamed

    def _count_streamed(self, n: int) -> None:
        with self._lock:
            self._streamed += n

    def reset_log(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._requests.clear()

    # ----- dispatch -----

    def _dispatch(self, request: RecordedRequest) -> Response | _Streamed:
        """Log, apply a scripted failure, else route."""
        with self._lock:
            self._requests.append(request)
        failure = self._take_failure(request.path)
        if failure is None:
            return self._route(request)
        if failure.kind in ("flood", "drip"):
            return _Streamed(failure, self._stream_type)
        if failure.kind == "slow":
            self._stopping.wait(failure.delay_s)
            return self._route(request)
        if failure.kind == "html":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, _HTML
        if failure.kind == "garbage":
            return self._garbage()
        status, headers, body = self._error(failure.status)
        if failure.retry_after is not None:
            headers["Retry-After"] = failure.retry_after
        return status, headers, body

    def _route(self, request: RecordedRequest) -> Response:
        """The normal answer."""
        raise NotImplementedError

    def _error(self, status: int) -> Response:
        """This server's error answer for `status`."""
        raise NotImplementedError

    def _garbage(self) -> Response:
        """A 200 whose body does not parse."""
        raise NotImplementedError


# ----- Google ----------------------------------------------------------------------------

_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_UNPADDED = re.compile(r"^[1-9][0-9]*$")
_V1_DATE_KEYS = tuple(
    f"{p}.{k}" for p in ("startDate", "endDate") for k in ("year", "month", "day")
)
_V1_LIST = re.compile(r"^/v1/domains/(?P<domain>[^/]+)/trafficStats$")
_V1_GET = re.compile(r"^/v1/domains/(?P<domain>[^/]+)/trafficStats/(?P<day>[0-9]{8})$")
_V2_QUERY = re.compile(r"^/v2/domains/(?P<domain>[^/]+)/domainStats:query$")
_V2_COMPLIANCE = re.compile(r"^/v2/domains/(?P<domain>[^/]+)/complianceStatus$")


def _json(status: int, obj: Any) -> Response:
    """A JSON answer."""
    return status, {"Content-Type": "application/json; charset=UTF-8"}, json.dumps(obj).encode()


def _google_error(status: int, message: str = "") -> Response:
    """Google's error envelope."""
    code = _GOOGLE_STATUS.get(status, "UNKNOWN")
    return _json(
        status, {"error": {"code": status, "message": message or code.lower(), "status": code}}
    )


class _Invalid(Exception):
    """A request the real API would refuse with 400 INVALID_ARGUMENT."""


def _v1_date(query: Mapping[str, list[str]], prefix: str) -> date:
    """One dotted date; every part a single unpadded integer."""
    parts = []
    for key in ("year", "month", "day"):
        values = query.get(f"{prefix}.{key}", [])
        if len(values) != 1 or not _UNPADDED.match(values[0]):
            raise _Invalid(f"{prefix}.{key} must be one unpadded integer, got {values}")
        parts.append(int(values[0]))
    try:
        return date(*parts)
    except ValueError:
        raise _Invalid(f"{prefix} is not a date") from None


def _v2_date(obj: Any, where: str) -> date:
    """A google.type.Date JSON object with integer year, month, day."""
    if not isinstance(obj, dict) or set(obj) != {"year", "month", "day"}:
        raise _Invalid(f"{where} must be a Date object with year, month, day")
    if not all(type(obj[k]) is int for k in ("year", "month", "day")):
        raise _Invalid(f"{where}: year, month, day must be integers")
    try:
        return date(obj["year"], obj["month"], obj["day"])
    except ValueError:
        raise _Invalid(f"{where} is not a date") from None


def _v2_ranges(body: Any) -> tuple[list[tuple[str, str | None]], list[tuple[date, date]]]:
    """(metric names and filters, inclusive date ranges) from a QueryDomainStatsRequest."""
    if not isinstance(body, dict):
        raise _Invalid("the body must be a JSON object")
    metrics = body.get("metricDefinitions")
    if not isinstance(metrics, list) or not metrics:
        raise _Invalid("metricDefinitions is required")
    names = []
    for m in metrics:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise _Invalid("each metric definition needs a name")
        base = m.get("baseMetric")
        if not isinstance(base, dict) or not isinstance(base.get("standardMetric"), str):
            raise _Invalid("each metric definition needs baseMetric.standardMetric")
        names.append((m["name"], m.get("filter")))
    time_query = body.get("timeQuery")
    if not isinstance(time_query, dict) or set(time_query) != {"dateRanges"}:
        raise _Invalid("timeQuery must hold dateRanges")
    outer = time_query["dateRanges"]
    if not isinstance(outer, dict) or not isinstance(outer.get("dateRanges"), list):
        raise _Invalid("timeQuery.dateRanges.dateRanges must be a list")
    ranges = []
    for i, r in enumerate(outer["dateRanges"]):
        if not isinstance(r, dict):
            raise _Invalid("a date range must be an object")
        start = _v2_date(r.get("start"), f"dateRanges[{i}].start")
        end = _v2_date(r.get("end"), f"dateRanges[{i}].end")
        if end < start:
            raise _Invalid("a date range ends before it starts")
        ranges.append((start, end))
    if not ranges:
        raise _Invalid("no date range")
    granularity = body.get("aggregationGranularity", "DAILY")
    if granularity not in ("DAILY", "AGGREGATION_GRANULARITY_UNSPECIFIED"):
        raise _Invalid("this fake serves DAILY only")
    return names, ranges


def _stat_value(value: Any) -> dict[str, Any]:
    """A test's value as a StatisticValue."""
    if isinstance(value, dict):
        return value
    if isinstance(value, bool):
        raise TypeError("not a statistic value")
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    return {"stringList": {"values": list(value)}}


@dataclass
class _GoogleData:
    """What FakeGoogle serves."""

    traffic: dict[str, dict[date, dict[str, Any]]] = field(default_factory=dict)
    domain_stats: dict[str, dict[date, dict[str, Any]]] = field(default_factory=dict)
    compliance: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeGoogle(_FakeServer):
    """Google's token endpoint and Postmaster Tools v1/v2 on loopback (see the module doc)."""

    _exempt = ("/token",)
    _stream_type = "application/json; charset=UTF-8"
    CLIENT_ID = "123456789-kilntest.apps.googleusercontent.com"
    CLIENT_SECRET = "GOCSPX-fake-client-secret-c0ffee"  # noqa: S105  (a test value)
    REFRESH_TOKEN = "1//0fake-refresh-token-d00dfeed"  # noqa: S105  (a test value)

    def __init__(self, *, fixtures: bool = True, token_expires_in_s: int = 3600) -> None:
        super().__init__()
        self.token_expires_in_s = token_expires_in_s
        self.page_size = 10
        self.reverse_order = False
        self.last_page_token: str | None = None
        self.missing_day: Literal["404", "name_only"] = "404"
        self.issued_tokens: list[str] = []
        self._valid_tokens: set[str] = set()
        self._refresh_ok = True
        self._denied: set[str] = set()
        self._data = _GoogleData()
        if fixtures:
            self._load_fixtures()

    def _load_fixtures(self) -> None:
        """The Postmaster fixtures of `tests/fixtures/signals/`."""
        listing = json.loads((FIXTURES / "postmaster_v1_trafficstats_list.json").read_text())
        for obj in listing["trafficStats"]:
            self.set_traffic_stats("mail.example.com", date(2026, 3, 10), obj)
        degraded = json.loads((FIXTURES / "postmaster_v1_trafficstats_degraded.json").read_text())
        self.set_traffic_stats("mail.example.com", date(2026, 3, 12), degraded)
        response = json.loads(
            (FIXTURES / "postmaster_v2_domainstats_query_response.json").read_text()
        )
        for entry in response["domainStats"]:
            d = entry["date"]
            day = date(d["year"], d["month"], d["day"])
            stats = self._data.domain_stats.setdefault("mail.example.com", {})
            stats.setdefault(day, {})[entry["metric"]] = entry["value"]
        compliance = json.loads((FIXTURES / "postmaster_v2_compliance.json").read_text())
        self.set_compliance("example.com", compliance)
        self.set_compliance("mail.example.com", compliance)

    # ----- endpoints and credentials -----

    @property
    def base_url(self) -> str:
        """The API root to give the client."""
        return self.url

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return f"{self.url}/token"

    def authorized_user(self) -> AuthorizedUser:
        """Credentials the fake token endpoint accepts."""
        return AuthorizedUser(
            client_id=self.CLIENT_ID,
            client_secret=Secret(self.CLIENT_SECRET),
            refresh_token=Secret(self.REFRESH_TOKEN),
            token_uri=self.token_url,
        )

    def credentials_json(self) -> dict[str, str]:
        """The same as an `authorized_user` file's content."""
        return {
            "type": "authorized_user",
            "client_id": self.CLIENT_ID,
            "client_secret": self.CLIENT_SECRET,
            "refresh_token": self.REFRESH_TOKEN,
            "token_uri": self.token_url,
        }

    def expire_tokens(self) -> None:
        """Refuse every access token issued so far (401)."""
        with self._lock:
            self._valid_tokens.clear()

    def revoke_refresh_token(self) -> None:
        """The token endpoint answers invalid_grant from now on."""
        with self._lock:
            self._refresh_ok = False

    # ----- data -----

    def set_traffic_stats(self, domain: str, day: date, obj: Mapping[str, Any] | None) -> None:
        """Serve `obj` as v1 TrafficStats of `domain` on `day` (None removes it)."""
        with self._lock:
            days = self._data.traffic.setdefault(domain, {})
            if obj is None:
                days.pop(day, None)
                return
            stored = copy.deepcopy(dict(obj))
            stored.setdefault("name", f"domains/{domain}/trafficStats/{day:%Y%m%d}")
            days[day] = stored

    def set_domain_stats(self, domain: str, day: date, values: Mapping[str, Any] | None) -> None:
        """Serve v2 values {metric name: number or StatisticValue} for `domain` on `day`."""
        with self._lock:
            days = self._data.domain_stats.setdefault(domain, {})
            if values is None:
                days.pop(day, None)
                return
            days[day] = {name: _stat_value(v) for name, v in values.items()}

    def set_compliance(self, domain: str, obj: Mapping[str, Any] | None) -> None:
        """Serve `obj` as the compliance status of `domain` (None: 404)."""
        with self._lock:
            if obj is None:
                self._data.compliance.pop(domain, None)
            else:
                self._data.compliance[domain] = copy.deepcopy(dict(obj))

    def deny_domain(self, domain: str) -> None:
        """403 PERMISSION_DENIED for every call about `domain`."""
        with self._lock:
            self._denied.add(domain)

    def allow_domain(self, domain: str) -> None:
        """Undo `deny_domain`."""
        with self._lock:
            self._denied.discard(domain)

    # ----- answers -----

    def _error(self, status: int) -> Response:
        if status == 429:
            return _json(429, json.loads((FIXTURES / "postmaster_error_429.json").read_text()))
        if status == 403:
            return _json(403, json.loads((FIXTURES / "postmaster_error_403.json").read_text()))
        return _google_error(status)

    def _garbage(self) -> Response:
        return 200, {"Content-Type": "application/json"}, b'{"trafficStats": [{"name": \x00'

    def _route(self, request: RecordedRequest) -> Response:
        path = request.path
        if path == "/token" and request.method == "POST":
            return self._token(request)
        if not self._authorized(request):
            return _google_error(401, "Request had invalid authentication credentials.")
        try:
            if request.method == "GET" and (m := _V1_LIST.match(path)):
                return self._v1_list(m["domain"], request)
            if request.method == "GET" and (m := _V1_GET.match(path)):
                return self._v1_get(m["domain"], m["day"])
            if request.method == "POST" and (m := _V2_QUERY.match(path)):
                return self._v2_query(m["domain"], request.json())
            if request.method == "POST" and path == "/v2/domainStats:batchQuery":
                return self._v2_batch(request.json())
            if request.method == "GET" and (m := _V2_COMPLIANCE.match(path)):
                return self._v2_compliance(m["domain"])
        except _Invalid as exc:
            return _google_error(400, str(exc))
        except ValueError:
            return _google_error(400, "Invalid JSON payload received.")
        return _google_error(404, "no such method")

    def _token(self, request: RecordedRequest) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        if form.get("grant_type") != "refresh_token":
            return _json(400, {"error": "unsupported_grant_type"})
        if form.get("client_id") != self.CLIENT_ID or form.get("client_secret") != (
            self.CLIENT_SECRET
        ):
            return _json(401, {"error": "invalid_client", "error_description": "Unauthorized"})
        with self._lock:
            if not self._refresh_ok or form.get("refresh_token") != self.REFRESH_TOKEN:
                return _json(
                    400, {"error": "invalid_grant", "error_description": "Token has been expired"}
                )
            token = f"ya29.fake-access-{len(self.issued_tokens) + 1:04d}-a1b2c3"
            self.issued_tokens.append(token)
            self._valid_tokens.add(token)
        return _json(
            200,
            {
                "access_token": token,
                "expires_in": self.token_expires_in_s,
                "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/postmaster.readonly",
            },
        )

    def _authorized(self, request: RecordedRequest) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        with self._lock:
            return token in self._valid_tokens

    def _denied_domain(self, domain: str) -> bool:
        with self._lock:
            return domain in self._denied

    def _v1_list(self, domain: str, request: RecordedRequest) -> Response:
        query = request.query
        given = [k for k in _V1_DATE_KEYS if k in query]
        if given and len(given) != len(_V1_DATE_KEYS):
            raise _Invalid("send both startDate and endDate, or neither")
        start, end = date.min, date.max
        if given:
            start, end = _v1_date(query, "startDate"), _v1_date(query, "endDate")
            if end <= start:
                raise _Invalid("endDate must be after startDate")
        if self._denied_domain(domain):
            return self._error(403)
        size = int(request.param("pageSize") or self.page_size)
        offset = int((request.param("pageToken") or "p0")[1:])
        with self._lock:
            days = sorted(
                (d for d in self._data.traffic.get(domain, {}) if start <= d < end),
                reverse=self.reverse_order,
            )
            items = [self._data.traffic[domain][d] for d in days]
        page = items[offset : offset + size]
        body: dict[str, Any] = {"trafficStats": page} if page else {}
        if offset + size < len(items):
            body["nextPageToken"] = f"p{offset + size}"
        elif self.last_page_token is not None:
            body["nextPageToken"] = self.last_page_token
        return _json(200, body)

    def _v1_get(self, domain: str, digits: str) -> Response:
        if self._denied_domain(domain):
            return self._error(403)
        try:
            day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            raise _Invalid("not a day") from None
        with self._lock:
            obj = self._data.traffic.get(domain, {}).get(day)
        if obj is not None:
            return _json(200, obj)
        if self.missing_day == "name_only":
            return _json(200, {"name": f"domains/{domain}/trafficStats/{digits}"})
        return _google_error(404, "Requested entity was not found.")

    def _v2_entries(self, domain: str, body: Any) -> tuple[list[dict[str, Any]], int]:
        """Every (date, metric) result of one query, in order, and the page size."""
        names, ranges = _v2_ranges(body)
        with self._lock:
            stats = copy.deepcopy(self._data.domain_stats.get(domain, {}))
        entries = []
        for day in sorted(stats):
            if not any(start <= day <= end for start, end in ranges):
                continue
            for i, (name, _) in enumerate(names):
                if name in stats[day]:
                    entries.append(
                        {
                            "name": f"domains/{domain}/domainStats/{day:%Y%m%d}{i:02d}",
                            "metric": name,
                            "date": {"year": day.year, "month": day.month, "day": day.day},
                            "value": stats[day][name],
                        }
                    )
        size = body.get("pageSize") or self.page_size
        return entries, int(size)

    def _v2_page(self, domain: str, body: Any) -> dict[str, Any]:
        entries, size = self._v2_entries(domain, body)
        token = body.get("pageToken") or "p0"
        offset = int(token[1:]) if re.fullmatch(r"p[0-9]+", token) else 0
        page = entries[offset : offset + size]
        out: dict[str, Any] = {"domainStats": page} if page else {}
        if offset + size < len(entries):
            out["nextPageToken"] = f"p{offset + size}"
        return out

    def _v2_query(self, domain: str, body: Any) -> Response:
        _v2_ranges(body)
        if self._denied_domain(domain):
            return self._error(403)
        return _json(200, self._v2_page(domain, body))

    def _v2_batch(self, body: Any) -> Response:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not 1 <= len(requests) <= 100:
            raise _Invalid("requests: 1 to 100 QueryDomainStatsRequest")
        results: list[dict[str, Any]] = []
        for item in requests:
            parent = item.get("parent", "") if isinstance(item, dict) else ""
            if not parent.startswith("domains/"):
                raise _Invalid("each request needs parent domains/{fqdn}")
            domain = parent[len("domains/") :]
            _v2_ranges(item)
            if self._denied_domain(domain):
                results.append(
                    {"error": {"code": 7, "message": "The caller does not have permission"}}
                )
            else:
                results.append({"response": self._v2_page(domain, item)})
        return _json(200, {"results": results})

    def _v2_compliance(self, domain: str) -> Response:
        if self._denied_domain(domain):
            return self._error(403)
        with self._lock:
            obj = self._data.compliance.get(domain)
        if obj is None:
            return _google_error(404, "Requested entity was not found.")
        return _json(200, obj)


# ----- SNDS ------------------------------------------------------------------------------


class FakeSnds(_FakeServer):
    """SNDS legacy automated access (`/snds/data.aspx`, `/snds/ipStatus.aspx`) on loopback."""

    KEY = "0f6c7b1e-5a2d-4c3b-9e8f-0123456789ab"

    def __init__(self, *, fixtures: bool = True, key: str = KEY) -> None:
        super().__init__()
        self.key = key
        self.wrong_key: Literal["html", "404"] = "html"
        self.content_type = "text/plain; charset=utf-8"
        self._data: dict[date, str] = {}
        self._status = ""
        self._expired = False
        if fixtures:
            self.set_data(date(2026, 3, 10), (FIXTURES / "snds_data.csv").read_bytes().decode())
            self.set_ip_status((FIXTURES / "snds_ipstatus.csv").read_bytes().decode())

    @property
    def base_url(self) -> str:
        """The root to give the client (`.../snds`)."""
        return f"{self.url}/snds"

    def set_data(self, day: date, csv_text: str | None) -> None:
        """Serve `csv_text` as `data.aspx` for `day` (None: 404 for that day)."""
        with self._lock:
            if csv_text is None:
                self._data.pop(day, None)
            else:
                self._data[day] = csv_text

    def set_ip_status(self, csv_text: str) -> None:
        """Serve `csv_text` as `ipStatus.aspx`."""
        with self._lock:
            self._status = csv_text

    def expire_key(self, expired: bool = True) -> None:
        """Answer every request 404, as Microsoft does for an expired link."""
        with self._lock:
            self._expired = expired

    def _error(self, status: int) -> Response:
        return status, {"Content-Type": "text/plain"}, f"HTTP {status}\r\n".encode()

    def _garbage(self) -> Response:
        return 200, {"Content-Type": self.content_type}, b"\x00\x01 not,a,csv,row\r\n"

    def _csv(self, text: str) -> Response:
        return 200, {"Content-Type": self.content_type}, text.encode()

    def _route(self, request: RecordedRequest) -> Response:
        with self._lock:
            expired = self._expired
        if expired:
            return self._error(404)
        if request.param("key") != self.key:
            if self.wrong_key == "html":
                return 200, {"Content-Type": "text/html; charset=utf-8"}, _HTML
            return self._error(404)
        if request.path == "/snds/ipStatus.aspx":
            with self._lock:
                return self._csv(self._status)
        if request.path == "/snds/data.aspx":
            wanted = request.param("date")
            with self._lock:
                if wanted is None:
                    day = max(self._data, default=None)
                else:
                    if not re.fullmatch(r"[0-9]{6}", wanted):
                        return self._error(400)
                    try:
                        day = date(2000 + int(wanted[4:]), int(wanted[:2]), int(wanted[2:4]))
                    except ValueError:
                        return self._error(400)
                text = self._data.get(day) if day is not None else None
            if text is None:
                return self._error(404)
            return self._csv(text)
        return self._error(404)


def days(first: date, count: int) -> list[date]:
    """`count` consecutive days from `first` (for scenario tests)."""
    return [first + timedelta(days=i) for i in range(count)]
