"""Microsoft SNDS: per-IP data (`data.aspx`) and block status (`ipStatus.aspx`).

The legacy automated feeds are CSV behind a URL whose `key=` parameter is a per-account
secret, so the full URL is a credential: it never reaches a log line, an exception or a
repr() (every message goes through `kiln.signals.http.redact`, and the key is registered
as a literal secret too).

`parse_data_csv` reads the 14 headerless columns of docs/signals.md (extra columns ignored;
a header row, as the 2026 format is guessed to have, is detected and its columns are mapped
by name), CRLF or LF, blank lines skipped. Datetimes use a 12-hour clock without padding and
stay naive (the legacy feed uses Pacific time, the 2026 one reportedly UTC). The complaint
rate `< 0.1%` reads as (0.001, upper bound) and `0.4%` as 0.004; empty trap hits are `None`
(unknown), never 0. `parse_ip_status_csv` reads `first IP, last IP, Yes|No, reason` and
matches IPs numerically against the inclusive ranges.

HTTP: an HTML body (Content-Type `text/html` or a first non-blank `<`), even with status 200,
is `SourceError(kind="auth")`, never zero rows; a 404 is `not_found` ("the automated link may
have expired": Microsoft's links expire after 30 days, or there is no data for the day).
Every answer is bounded by the source's `FetchLimits` (size, deadline: see
`kiln.signals.http`), and decoding and parsing run off the event loop (`off_loop`): a large
data.aspx never holds up the daemon's decisions. The parsers are pure functions of the text.

`SndsFeed` is the interface (legacy CSV now, the 2026 REST API later); `SndsSource.poll(day)`
returns an `SndsReading`.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import functools
import heapq
import io
import ipaddress
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Protocol, TypeVar

import httpx

from kiln.signals import SourceError
from kiln.signals.http import FetchLimits, HttpError, HttpFetcher, RetryPolicy, Secret, off_loop

__all__ = [
    "DEFAULT_BASE_URL",
    "FILTER_RESULTS",
    "IpBlockStatus",
    "IpStatusRange",
    "IpStatusTable",
    "LegacySndsFeed",
    "SndsFeed",
    "SndsIpData",
    "SndsReading",
    "SndsSource",
    "parse_data_csv",
    "parse_ip_status_csv",
]

SOURCE = "snds"
#: The legacy automated-access root since the 2026 portal move (postmaster.live.com before).
DEFAULT_BASE_URL = "https://sendersupport.olc.protection.outlook.com/snds"
#: The documented filter colours; any other string is kept as it came.
FILTER_RESULTS = ("GREEN", "YELLOW", "RED")
_COLUMNS = 14
_R = TypeVar("_R")
_DATETIME = re.compile(
    r"^\s*(\d{1,2})/(\d{1,2})/(\d{4})\s+(\d{1,2}):(\d{2})(?::(\d{2}))?\s*([AaPp])\.?[Mm]\.?\s*$"
)
_RATE = re.compile(r"^\s*([<>]?)\s*([0-9]*\.?[0-9]+)\s*%?\s*$")
_EXPIRED_HINT = (
    "the automated-access link may have expired (links expire after 30 days; "
    "create a new one in the SNDS portal) or there is no data for that day"
)


def _bad(message: str) -> SourceError:
    """A bad_data error for this source."""
    return SourceError(SOURCE, "bad_data", message)


def _short(value: str) -> str:
    """A field shown in an error message, cut short."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


# ----- data.aspx -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SndsIpData:
    """One IP's day in SNDS. Counts and times are None when the field was empty.

    `complaint_rate` is a fraction; `complaint_rate_upper_bound` is True for the `< 0.1%`
    form (the true rate is below the value). `trap_hits` is None when the column is empty
    (unknown, as after the reported 2026-07-22 change), never 0 by default.
    """

    ip: str
    activity_start: datetime | None
    activity_end: datetime | None
    rcpt_commands: int | None
    data_commands: int | None
    recipients: int | None
    filter_result: str | None
    complaint_rate: float | None
    complaint_rate_upper_bound: bool
    trap_start: datetime | None
    trap_end: datetime | None
    trap_hits: int | None
    sample_helo: str | None
    sample_mail_from: str | None
    comments: str | None


def _ip(text: str, where: str) -> str:
    """A canonical IP address, or bad_data."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise _bad(f"{where}: {_short(text)} is not an IP address") from None


def _datetime(text: str, where: str) -> datetime | None:
    """`M/D/YYYY h:mm AM/PM` (lenient padding, optional seconds); empty -> None."""
    if not text.strip():
        return None
    match = _DATETIME.match(text)
    if match is None:
        raise _bad(f"{where}: {_short(text)} is not a M/D/YYYY h:mm AM/PM time")
    month, day, year, hour, minute, second, half = match.groups()
    hour12 = int(hour)
    if not 1 <= hour12 <= 12:
        raise _bad(f"{where}: {_short(text)} has an hour outside 1-12")
    hour24 = hour12 % 12 + (12 if half.upper() == "P" else 0)
    try:
        return datetime(int(year), int(month), int(day), hour24, int(minute), int(second or 0))
    except ValueError:
        raise _bad(f"{where}: {_short(text)} is not a valid time") from None


def _count(text: str, where: str) -> int | None:
    """A non-negative integer (thousands separators tolerated); empty -> None."""
    cleaned = text.strip().replace(",", "")
    if not cleaned:
        return None
    if not cleaned.isascii() or not cleaned.isdigit():
        raise _bad(f"{where}: {_short(text)} is not a count")
    return int(cleaned)


def _complaint_rate(text: str, where: str) -> tuple[float | None, bool]:
    """`< 0.1%` -> (0.001, True); `0.4%` -> (0.004, False); empty -> (None, False)."""
    if not text.strip():
        return None, False
    match = _RATE.match(text)
    if match is None:
        raise _bad(f"{where}: {_short(text)} is not a complaint rate")
    try:
        value = Decimal(match[2]) / 100
    except InvalidOperation:
        raise _bad(f"{where}: {_short(text)} is not a complaint rate") from None
    return float(value), match[1] == "<"


def _optional_text(text: str) -> str | None:
    """Stripped text, None when empty (empty HELO, MAIL FROM or comments are normal)."""
    stripped = text.strip()
    return stripped or None


def _normal(name: str) -> str:
    """A header name reduced to letters and digits, lower case."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


#: Header names (normalised) -> our field, for the legacy names and the guessed 2026 ones.
_HEADER_FIELDS = {
    "ipaddress": "ip",
    "ip": "ip",
    "activitystart": "activity_start",
    "activityend": "activity_end",
    "activityperiod": "activity_period",
    "rcptcommands": "rcpt",
    "datacommands": "data",
    "messagerecipients": "recipients",
    "filterresult": "filter",
    "complaintrate": "complaint",
    "trapmessagestart": "trap_start",
    "trapmessageend": "trap_end",
    "trapmessageperiod": "trap_period",
    "traphits": "trap_hits",
    "samplehelo": "helo",
    "jmrp1sender": "mail_from",
    "samplemailfrom": "mail_from",
    "comments": "comments",
}
_LEGACY_ORDER = (
    "ip",
    "activity_start",
    "activity_end",
    "rcpt",
    "data",
    "recipients",
    "filter",
    "complaint",
    "trap_start",
    "trap_end",
    "trap_hits",
    "helo",
    "mail_from",
    "comments",
)


def _rows(text: str, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) for every non-blank CSV record.

    Records are taken one at a time in a Python loop (not `list(reader)`, one long C call):
    run in a worker thread, the parse then lets the event loop's thread take the GIL back
    between records.
    """
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    number = 0
    try:
        for fields in reader:
            number += 1
            if any(f.strip() for f in fields):
                out.append((number, fields))
    except csv.Error as exc:
        raise _bad(f"{what}: not CSV ({exc})") from None
    return out


def _is_header(fields: Sequence[str]) -> bool:
    """A first row whose first field is a column name rather than an IP."""
    first = _normal(fields[0]) if fields else ""
    return first in {"ipaddress", "ip", "ipaddr"}


def _period(text: str, where: str) -> tuple[datetime | None, datetime | None]:
    """A guessed `start - end` period column (2026 format)."""
    if not text.strip():
        return None, None
    pieces = re.split(r"\s+-\s+|\s+to\s+", text.strip())
    if len(pieces) != 2:
        raise _bad(f"{where}: {_short(text)} is not a start - end period")
    return _datetime(pieces[0], where), _datetime(pieces[1], where)


def _row(cells: Mapping[str, str], where: str) -> SndsIpData:
    """One data row from its named cells (missing names read as empty)."""

    def cell(name: str) -> str:
        return cells.get(name, "")

    start, end = (
        _datetime(cell("activity_start"), f"{where}: activity start"),
        _datetime(cell("activity_end"), f"{where}: activity end"),
    )
    if "activity_period" in cells:
        start, end = _period(cell("activity_period"), f"{where}: activity period")
    trap_start = _datetime(cell("trap_start"), f"{where}: trap start")
    trap_end = _datetime(cell("trap_end"), f"{where}: trap end")
    if "trap_period" in cells:
        trap_start, trap_end = _period(cell("trap_period"), f"{where}: trap period")
    rate, upper = _complaint_rate(cell("complaint"), f"{where}: complaint rate")
    return SndsIpData(
        ip=_ip(cell("ip"), f"{where}: IP"),
        activity_start=start,
        activity_end=end,
        rcpt_commands=_count(cell("rcpt"), f"{where}: RCPT commands"),
        data_commands=_count(cell("data"), f"{where}: DATA commands"),
        recipients=_count(cell("recipients"), f"{where}: message recipients"),
        filter_result=_optional_text(cell("filter")),
        complaint_rate=rate,
        complaint_rate_upper_bound=upper,
        trap_start=trap_start,
        trap_end=trap_end,
        trap_hits=_count(cell("trap_hits"), f"{where}: trap hits"),
        sample_helo=_optional_text(cell("helo")),
        sample_mail_from=_optional_text(cell("mail_from")),
        comments=_optional_text(cell("comments")),
    )


def parse_data_csv(text: str) -> list[SndsIpData]:
    """A `data.aspx` body -> one `SndsIpData` per row; `SourceError(bad_data)` if malformed."""
    rows = _rows(text, "data.aspx")
    if not rows:
        return []
    names: list[str | None] = list(_LEGACY_ORDER)
    headerless = not _is_header(rows[0][1])
    if not headerless:
        names = [_HEADER_FIELDS.get(_normal(h)) for h in rows[0][1]]
        rows = rows[1:]
    out = []
    for number, fields in rows:
        where = f"data.aspx line {number}"
        if headerless and len(fields) < _COLUMNS:
            raise _bad(f"{where}: {len(fields)} columns, expected {_COLUMNS}")
        cells = {name: value for name, value in zip(names, fields, strict=False) if name}
        out.append(_row(cells, where))
    return out


# ----- ipStatus.aspx ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpStatusRange:
    """An inclusive IP range with its status: `blocked` True (Yes), False (No), None (unknown)."""

    first_ip: str
    last_ip: str
    blocked: bool | None
    reason: str | None

    def __contains__(self, ip: object) -> bool:
        """Whether `ip` (text) lies in the range, compared as integers."""
        if not isinstance(ip, str):
            return False
        try:
            value = ipaddress.ip_address(ip.strip())
            first = ipaddress.ip_address(self.first_ip)
            last = ipaddress.ip_address(self.last_ip)
        except ValueError:
            return False
        if not (value.version == first.version == last.version):
            return False
        return int(first) <= int(value) <= int(last)


@dataclass(frozen=True, slots=True)
class IpBlockStatus:
    """One IP's status in `ipStatus.aspx`: listed (in some range), blocked, the reason."""

    listed: bool
    blocked: bool | None
    reason: str | None


@dataclass(frozen=True)
class IpStatusTable:
    """The `ipStatus.aspx` ranges, with lookups by IP.

    Lookups go through an index built once per table (elementary segments between range
    ends, each with its answer, found by bisection): a status for every IP of a large
    account costs O(log ranges) per IP, not a scan of every range with three address parses.
    """

    ranges: tuple[IpStatusRange, ...]

    @functools.cached_property
    def _index(self) -> dict[int, tuple[list[int], list[IpStatusRange | None]]]:
        """Per IP version: segment starts and the answer for each segment."""
        spans: dict[int, list[tuple[int, int, int]]] = {}
        for position, r in enumerate(self.ranges):
            try:
                first, last = ipaddress.ip_address(r.first_ip), ipaddress.ip_address(r.last_ip)
            except ValueError:
                continue
            if first.version == last.version and int(first) <= int(last):
                spans.setdefault(first.version, []).append((int(first), int(last), position))
        return {version: self._segments(found) for version, found in spans.items()}

    def _segments(
        self, spans: list[tuple[int, int, int]]
    ) -> tuple[list[int], list[IpStatusRange | None]]:
        """Sweep the (first, last, position) spans of one version into answered segments."""
        bounds = sorted({v for first, last, _ in spans for v in (first, last + 1)})
        by_first = sorted(spans)
        blocked: list[tuple[int, int]] = []  # (position, last): heaps, lazily pruned
        every: list[tuple[int, int]] = []
        answers: list[IpStatusRange | None] = []
        i = 0
        for start in bounds:
            while i < len(by_first) and by_first[i][0] <= start:
                _, last, position = by_first[i]
                heapq.heappush(every, (position, last))
                if self.ranges[position].blocked is True:
                    heapq.heappush(blocked, (position, last))
                i += 1
            for heap in (blocked, every):
                while heap and heap[0][1] < start:
                    heapq.heappop(heap)
            top = blocked[0] if blocked else every[0] if every else None
            answers.append(self.ranges[top[0]] if top is not None else None)
        return bounds, answers

    def lookup(self, ip: str) -> IpStatusRange | None:
        """The range holding `ip` (the first blocked one, else the first one), or None."""
        try:
            value = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
        bounds, answers = self._index.get(value.version, ([], []))
        at = bisect.bisect_right(bounds, int(value)) - 1
        return answers[at] if at >= 0 else None

    def status(self, ip: str) -> IpBlockStatus:
        """`ip`'s status; unlisted IPs are `IpBlockStatus(False, False, None)`."""
        found = self.lookup(ip)
        if found is None:
            return _UNLISTED
        return IpBlockStatus(listed=True, blocked=found.blocked, reason=found.reason)

    def blocked_reason(self, ip: str) -> str | None:
        """The reason text if `ip` is in a range marked blocked, else None."""
        found = self.lookup(ip)
        if found is None or found.blocked is not True:
            return None
        return found.reason or ""


_UNLISTED = IpBlockStatus(listed=False, blocked=False, reason=None)
_YES = {"yes": True, "true": True, "no": False, "false": False}


def parse_ip_status_csv(text: str) -> IpStatusTable:
    """An `ipStatus.aspx` body -> `IpStatusTable`; `SourceError(bad_data)` if malformed."""
    ranges = []
    for index, (number, fields) in enumerate(_rows(text, "ipStatus.aspx")):
        where = f"ipStatus.aspx line {number}"
        if index == 0 and _normal(fields[0]) in {"firstip", "beginningipaddress", "startip"}:
            continue
        if len(fields) < 3:
            raise _bad(f"{where}: {len(fields)} columns, expected 4")
        first, last = _ip(fields[0], f"{where}: first IP"), _ip(fields[1], f"{where}: last IP")
        a, b = ipaddress.ip_address(first), ipaddress.ip_address(last)
        if a.version != b.version or int(a) > int(b):
            raise _bad(f"{where}: {first} - {last} is not a range")
        blocked = _YES.get(fields[2].strip().lower())  # an unknown word: status unknown
        reason = ",".join(fields[3:]).strip() if len(fields) > 3 else ""
        ranges.append(IpStatusRange(first, last, blocked, reason or None))
    return IpStatusTable(tuple(ranges))


# ----- feeds and the source --------------------------------------------------------------


class SndsFeed(Protocol):
    """Where SNDS data comes from (the legacy CSV links now, the 2026 REST API later)."""

    async def ip_data(self, day: date) -> list[SndsIpData]:
        """Per-IP rows for `day`; `SourceError(not_found)` when the day has no data."""
        ...

    async def ip_status(self) -> IpStatusTable:
        """The current block status ranges."""
        ...


_HTML_START = re.compile(r"\s*<")


def _reject_html(response: httpx.Response, text: str, shown: str, fetcher: HttpFetcher) -> None:
    """An HTML page (login or portal) instead of CSV is an auth/endpoint failure."""
    content_type = response.headers.get("content-type", "").lower()
    if "html" in content_type or _HTML_START.match(text):
        raise fetcher.error(
            "auth",
            f"{shown}: got an HTML page instead of CSV (HTTP {response.status_code}); the "
            "automated-access key is wrong or expired, or the endpoint moved",
        )


class LegacySndsFeed:
    """The legacy automated-access links: `{base}/data.aspx?key=K&date=MMDDYY`, `ipStatus.aspx`."""

    def __init__(
        self, fetcher: HttpFetcher, key: str | Secret, *, base_url: str = DEFAULT_BASE_URL
    ) -> None:
        self._key = key if isinstance(key, Secret) else Secret(key)
        if not self._key.reveal().strip():
            raise ValueError("the SNDS key is empty")
        self.fetcher = fetcher
        self.base_url = base_url.rstrip("/")
        fetcher.add_secret(self._key.reveal())

    def __repr__(self) -> str:
        """Base URL only; the key is a credential."""
        return f"LegacySndsFeed(base_url={self.base_url!r})"

    async def _fetch(self, page: str, params: dict[str, str], parse: Callable[[str], _R]) -> _R:
        """GET a page, then decode, refuse HTML and parse it off the event loop."""
        url = f"{self.base_url}/{page}"
        query = {"key": self._key.reveal(), **params}
        shown = self.fetcher.describe("GET", str(httpx.URL(url, params=query)))
        try:
            response = await self.fetcher.request("GET", url, params=query)
        except HttpError as exc:
            if exc.kind == "not_found":
                raise self.fetcher.error(
                    "not_found", f"{shown}: HTTP 404: {_EXPIRED_HINT}", status_code=404
                ) from None
            raise
        return await off_loop(self._read, response, shown, parse, page)

    def _read(
        self, response: httpx.Response, shown: str, parse: Callable[[str], _R], page: str
    ) -> _R:
        """Decode, refuse HTML, parse (runs in a parser thread; touches nothing shared)."""
        return self._parse(parse, self._decode(response, shown), page)

    def _decode(self, response: httpx.Response, shown: str) -> str:
        """The body as text (its charset, else UTF-8); an HTML page is `auth`."""
        try:
            text = response.content.decode(response.encoding or "utf-8")
        except (UnicodeDecodeError, LookupError):
            try:
                text = response.content.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fetcher.error("bad_data", f"{shown}: the body is not text") from None
        _reject_html(response, text, shown, self.fetcher)
        return text.lstrip("\ufeff")

    def _parse(self, parse: Callable[[str], _R], text: str, page: str) -> _R:
        """Run a parser, redacting its message just in case."""
        try:
            return parse(text)
        except SourceError as exc:
            raise self.fetcher.error("bad_data", f"{page}: {exc.detail}") from None

    async def ip_data(self, day: date) -> list[SndsIpData]:
        """`data.aspx` for `day` (sent as `date=MMDDYY`)."""
        return await self._fetch("data.aspx", {"date": f"{day:%m%d%y}"}, parse_data_csv)

    async def ip_status(self) -> IpStatusTable:
        """`ipStatus.aspx`."""
        return await self._fetch("ipStatus.aspx", {}, parse_ip_status_csv)


@dataclass(frozen=True)
class SndsReading:
    """One SNDS poll for one day.

    - `ips`: IP -> its row, or None when the day had no data (404 with a working key). An IP
      missing from a present mapping sent under 100 messages (or none) that day.
    - `block_status`: IP -> `IpBlockStatus`, for every configured IP and every IP in `ips`.
    - `ranges`: the raw ipStatus ranges.
    - `data_error`: why `ips` is None (a not_found SourceError message), else None.
    """

    day: date
    ips: Mapping[str, SndsIpData] | None
    block_status: Mapping[str, IpBlockStatus]
    ranges: tuple[IpStatusRange, ...]
    data_error: str | None = None

    def blocked_reason(self, ip: str) -> str | None:
        """The block reason if `ip` is in a blocked range, else None."""
        return IpStatusTable(self.ranges).blocked_reason(ip)


class SndsSource:
    """Reads SNDS through a feed; `poll(day)` is the one entry point.

    `ips` are the warm-up IPs whose block status is always reported. `poll` raises
    `SourceError` when the status feed fails, or when the data feed fails with anything but
    `not_found`; a data 404 with a working status feed is "no data for that day".
    """

    def __init__(self, feed: SndsFeed, *, ips: Iterable[str] = ()) -> None:
        self.feed = feed
        self.ips = tuple(str(ipaddress.ip_address(ip)) for ip in ips)

    @classmethod
    def legacy(
        cls,
        client: httpx.AsyncClient,
        key: str | Secret,
        *,
        ips: Iterable[str] = (),
        base_url: str = DEFAULT_BASE_URL,
        now_ms: Callable[[], int] | None = None,
        policy: RetryPolicy | None = None,
        limits: FetchLimits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> SndsSource:
        """A source on the legacy CSV links; `client` is owned by the caller."""
        fetcher = HttpFetcher(
            client, SOURCE, policy=policy, limits=limits, sleep=sleep, rand=rand, now_ms=now_ms
        )
        return cls(LegacySndsFeed(fetcher, key, base_url=base_url), ips=ips)

    def __repr__(self) -> str:
        """Feed and IPs; no key."""
        return f"SndsSource(feed={self.feed!r}, ips={self.ips!r})"

    async def poll(self, day: date) -> SndsReading:
        """Data for `day` and the current block status (assembled off the event loop: one
        range lookup per IP adds up for a large account)."""
        data_result, status_result = await asyncio.gather(
            self.feed.ip_data(day), self.feed.ip_status(), return_exceptions=True
        )
        if isinstance(status_result, BaseException):
            raise status_result
        data_error = None
        rows: list[SndsIpData] | None
        if isinstance(data_result, SourceError) and data_result.kind == "not_found":
            rows, data_error = None, data_result.detail
        elif isinstance(data_result, BaseException):
            raise data_result
        else:
            rows = data_result
        return await off_loop(self._reading, day, rows, status_result, data_error)

    def _reading(
        self,
        day: date,
        rows: list[SndsIpData] | None,
        table: IpStatusTable,
        data_error: str | None,
    ) -> SndsReading:
        """The reading from the parsed feeds (pure; runs in a parser thread)."""
        ips = {row.ip: row for row in rows} if rows is not None else None
        wanted = list(self.ips) + [ip for ip in (ips or {}) if ip not in self.ips]
        return SndsReading(
            day=day,
            ips=MappingProxyType(ips) if ips is not None else None,
            block_status=MappingProxyType({ip: table.status(ip) for ip in wanted}),
            ranges=table.ranges,
            data_error=data_error,
        )
