"""Gmail Postmaster Tools: v1 traffic stats (reputation), v2 domain stats and compliance.

Parsers follow the wire format (docs/signals.md): every field but `name` is optional and an
absent value stays `None` (never a favourable default); `ipCount` may be a string or a number;
doubles may be written without a decimal point; unknown enum strings are kept verbatim (the
"other" value: anything not in the documented set, see `REPUTATIONS`); the zero enum
(`*_UNSPECIFIED`) and `""` mean "no data" and read as `None`. A body that does not have the
documented shape raises `SourceError(kind="bad_data")`.

`PostmasterClient` makes the calls (v1 `trafficStats.list`/`get` with dotted, end-exclusive
dates; v2 `domainStats:query` with nested, inclusive date ranges; `complianceStatus`;
`domainStats:batchQuery`), follows page tokens, and refreshes the OAuth token once after a
401. `PostmasterSource.poll(day)` reads everything the ramp policy needs for one day and every
configured domain into a `PostmasterReading`; one domain's failure (e.g. 403) never hides the
others, and `SourceError` is raised only when no domain could be read at all.

Every answer (the token endpoint's too) is bounded by the source's `FetchLimits` (size and
deadline, see `kiln.signals.http`), and its JSON is decoded and parsed off the event loop: the
`parse_*` functions are pure functions of the decoded JSON and run in a parser thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import quote

import httpx

from kiln.signals import ErrorKind, SourceError
from kiln.signals.http import FetchLimits, HttpError, HttpFetcher, RetryPolicy, off_loop
from kiln.signals.oauth import AuthorizedUser, TokenSource

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_METRICS",
    "REPUTATIONS",
    "Compliance",
    "ComplianceData",
    "ComplianceRow",
    "ComplianceStatus",
    "DeliveryError",
    "DomainDay",
    "DomainFailure",
    "DomainStats",
    "FeedbackLoop",
    "IpReputation",
    "MetricDefinition",
    "PartFailure",
    "PostmasterClient",
    "PostmasterReading",
    "PostmasterSource",
    "StatValue",
    "TrafficStats",
    "parse_compliance",
    "parse_domain_stats_page",
    "parse_stat_value",
    "parse_traffic_stats",
    "parse_traffic_stats_page",
]

SOURCE = "postmaster"
DEFAULT_BASE_URL = "https://gmailpostmastertools.googleapis.com"
#: The documented reputation categories, best first. Any other string is kept as is.
REPUTATIONS = ("HIGH", "MEDIUM", "LOW", "BAD")
#: Worst first, for an IP sampled in more than one category; unknown strings rank after LOW.
_RANK = {"BAD": 0, "LOW": 1, "MEDIUM": 3, "HIGH": 4}
_UNKNOWN_RANK = 2
_NAME_DAY = re.compile(r"^domains/(?P<domain>[^/]+)/trafficStats/(?P<day>[0-9]{8})$")
_MAX_PAGES = 1000

#: A v2 StatisticValue: `intValue` -> int, `doubleValue`/`floatValue` -> float,
#: `stringValue` -> str, `stringList` -> tuple of str.
StatValue = int | float | str | tuple[str, ...]
#: v2 results: metric name (as defined in the request) -> date (None for OVERALL) -> value.
DomainStats = dict[str, dict[date | None, StatValue]]

_T = TypeVar("_T")


def _bad(message: str) -> SourceError:
    """A bad_data error for this source."""
    return SourceError(SOURCE, "bad_data", message)


def _short(value: object) -> str:
    """A value shown in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, where: str) -> float | None:
    """A JSON number (or numeric string) as a float; absent -> None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad(f"{where}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _bad(f"{where}: expected a number, got {_short(value)}") from None
    if not math.isfinite(number):
        raise _bad(f"{where}: expected a finite number, got {_short(value)}")
    return number


def _int64(value: object, where: str) -> int | None:
    """An int64 as Google encodes it (a JSON string), or a bare integer; absent -> None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,19}\s*", value):
        return int(value)
    raise _bad(f"{where}: expected an integer, got {_short(value)}")


def _enum(value: object, where: str) -> str | None:
    """An enum string; absent, `""` and `*_UNSPECIFIED` -> None; unknown strings kept."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{where}: expected an enum string, got {_short(value)}")
    if not value or value.endswith("_UNSPECIFIED"):
        return None
    return value


def _text(value: object, where: str) -> str | None:
    """A string; absent or empty -> None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a string, got {_short(value)}")
    return value or None


def _list(value: object, where: str) -> list[Any] | None:
    """A JSON array; absent -> None."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(f"{where}: expected a list, got {_short(value)}")
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    """A JSON object (required)."""
    if not isinstance(value, dict):
        raise _bad(f"{where}: expected a JSON object, got {_short(value)}")
    return value


def _optional_object(value: object, where: str) -> dict[str, Any] | None:
    """A JSON object; absent -> None."""
    return None if value is None else _object(value, where)


def _ip_key(ip: str) -> str:
    """An IP in canonical text form (so 2001:DB8::1 and 2001:db8::1 match); other text as is."""
    try:
        return str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        return ip.strip()


# ----- v1 ------------------------------------------------------------------------------------


class IpReputation(NamedTuple):
    """One `ipReputations[]` entry: `ip_count` (None when absent) and the sample IPs."""

    ip_count: int | None
    sample_ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FeedbackLoop:
    """A Feedback-ID with an unusually high spam ratio."""

    id: str | None
    spam_ratio: float | None


@dataclass(frozen=True, slots=True)
class DeliveryError:
    """One `deliveryErrors[]` entry; enums kept verbatim, `None` when absent or unspecified."""

    error_class: str | None
    error_type: str | None
    error_ratio: float | None


@dataclass(frozen=True)
class TrafficStats:
    """One v1 TrafficStats day for one domain. Every field but the name may be `None`.

    `ip_reputations` maps a category (`HIGH`, ..., or an unknown string) to its entry; a
    category the API left out is simply not a key. `spammy_feedback_loops` and
    `delivery_errors` are `None` when absent (which can mean "none" or "no data").
    """

    name: str
    domain: str
    day: date
    spam_ratio: float | None = None
    spam_ratio_lower: float | None = None
    spam_ratio_upper: float | None = None
    ip_reputations: Mapping[str, IpReputation] = field(default_factory=lambda: MappingProxyType({}))
    domain_reputation: str | None = None
    spammy_feedback_loops: tuple[FeedbackLoop, ...] | None = None
    spf_success_ratio: float | None = None
    dkim_success_ratio: float | None = None
    dmarc_success_ratio: float | None = None
    outbound_encryption_ratio: float | None = None
    inbound_encryption_ratio: float | None = None
    delivery_errors: tuple[DeliveryError, ...] | None = None

    @property
    def has_data(self) -> bool:
        """False for a name-only object (Google's possible way of saying "no data")."""
        return bool(self.ip_reputations) or any(
            getattr(self, name) is not None
            for name in (
                "spam_ratio",
                "spam_ratio_lower",
                "spam_ratio_upper",
                "domain_reputation",
                "spammy_feedback_loops",
                "spf_success_ratio",
                "dkim_success_ratio",
                "dmarc_success_ratio",
                "outbound_encryption_ratio",
                "inbound_encryption_ratio",
                "delivery_errors",
            )
        )

    def spam_rate_for_threshold(self) -> float | None:
        """The figure for spam thresholds: the upper bound if present, else the ratio."""
        return self.spam_ratio_upper if self.spam_ratio_upper is not None else self.spam_ratio

    def ip_reputation(self, ip: str) -> str | None:
        """The category whose sample holds `ip` (the worst, if several); None if in no sample."""
        return self.ip_reputation_map().get(_ip_key(ip))

    def ip_reputation_map(self) -> dict[str, str]:
        """Every sampled IP (canonical text) -> its category (the worst, if several)."""
        out: dict[str, str] = {}
        for category, entry in self.ip_reputations.items():
            for ip in entry.sample_ips:
                key = _ip_key(ip)
                old = out.get(key)
                if old is None or _RANK.get(category, _UNKNOWN_RANK) < _RANK.get(
                    old, _UNKNOWN_RANK
                ):
                    out[key] = category
        return out


def _day_from_name(name: str) -> tuple[str, date]:
    """(domain, day) from `domains/{fqdn}/trafficStats/{YYYYMMDD}`."""
    match = _NAME_DAY.match(name)
    if match is None:
        raise _bad(f"name: expected domains/{{fqdn}}/trafficStats/YYYYMMDD, got {_short(name)}")
    digits = match["day"]
    try:
        day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise _bad(f"name: {digits} is not a calendar day") from None
    return match["domain"], day


def parse_traffic_stats(obj: object) -> TrafficStats:
    """One v1 TrafficStats JSON object -> `TrafficStats`; `SourceError(bad_data)` if malformed."""
    data = _object(obj, "trafficStats")
    name = data.get("name")
    if not isinstance(name, str):
        raise _bad("trafficStats: the name is missing")
    domain, day = _day_from_name(name)
    where = f"{name}"
    reputations: dict[str, IpReputation] = {}
    for i, raw in enumerate(_list(data.get("ipReputations"), f"{where}: ipReputations") or []):
        entry = _object(raw, f"{where}: ipReputations[{i}]")
        category = _enum(entry.get("reputation"), f"{where}: ipReputations[{i}].reputation")
        if category is None:
            continue
        count = _int64(entry.get("ipCount"), f"{where}: ipReputations[{i}].ipCount")
        if count is None and "numIps" in entry:
            count = _int64(entry.get("numIps"), f"{where}: ipReputations[{i}].numIps")
        ips = _list(entry.get("sampleIps"), f"{where}: ipReputations[{i}].sampleIps") or []
        for ip in ips:
            if not isinstance(ip, str):
                raise _bad(f"{where}: ipReputations[{i}].sampleIps: {_short(ip)} is not text")
        old = reputations.get(category)
        if old is not None:  # a repeated category: merge
            both = None if old.ip_count is None or count is None else old.ip_count + count
            count = both if both is not None else (old.ip_count if count is None else count)
            ips = list(old.sample_ips) + [ip for ip in ips if ip not in old.sample_ips]
        reputations[category] = IpReputation(count, tuple(ips))
    loops_raw = _list(data.get("spammyFeedbackLoops"), f"{where}: spammyFeedbackLoops")
    loops = None
    if loops_raw is not None:
        loops = tuple(
            FeedbackLoop(
                id=_text(_object(raw, f"{where}: spammyFeedbackLoops[{i}]").get("id"), "id"),
                spam_ratio=_number(raw.get("spamRatio"), f"{where}: spammyFeedbackLoops[{i}]"),
            )
            for i, raw in enumerate(loops_raw)
        )
    errors_raw = _list(data.get("deliveryErrors"), f"{where}: deliveryErrors")
    errors = None
    if errors_raw is not None:
        errors = tuple(
            DeliveryError(
                error_class=_enum(
                    _object(raw, f"{where}: deliveryErrors[{i}]").get("errorClass"),
                    f"{where}: deliveryErrors[{i}].errorClass",
                ),
                error_type=_enum(raw.get("errorType"), f"{where}: deliveryErrors[{i}].errorType"),
                error_ratio=_number(
                    raw.get("errorRatio"), f"{where}: deliveryErrors[{i}].errorRatio"
                ),
            )
            for i, raw in enumerate(errors_raw)
        )

    def ratio(key: str) -> float | None:
        return _number(data.get(key), f"{where}: {key}")

    return TrafficStats(
        name=name,
        domain=domain,
        day=day,
        spam_ratio=ratio("userReportedSpamRatio"),
        spam_ratio_lower=ratio("userReportedSpamRatioLowerBound"),
        spam_ratio_upper=ratio("userReportedSpamRatioUpperBound"),
        ip_reputations=MappingProxyType(reputations),
        domain_reputation=_enum(data.get("domainReputation"), f"{where}: domainReputation"),
        spammy_feedback_loops=loops,
        spf_success_ratio=ratio("spfSuccessRatio"),
        dkim_success_ratio=ratio("dkimSuccessRatio"),
        dmarc_success_ratio=ratio("dmarcSuccessRatio"),
        outbound_encryption_ratio=ratio("outboundEncryptionRatio"),
        inbound_encryption_ratio=ratio("inboundEncryptionRatio"),
        delivery_errors=errors,
    )


def _page_token(data: Mapping[str, Any]) -> str | None:
    """`nextPageToken`, or None on the last page (missing or empty)."""
    token = data.get("nextPageToken")
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise _bad(f"nextPageToken: expected a string, got {_short(token)}")
    return token


def parse_traffic_stats_page(obj: object) -> tuple[list[TrafficStats], str | None]:
    """A `trafficStats.list` page -> (days, next page token or None)."""
    data = _object(obj, "trafficStats.list")
    items = _list(data.get("trafficStats"), "trafficStats") or []
    return [parse_traffic_stats(item) for item in items], _page_token(data)


# ----- v2 ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricDefinition:
    """A v2 metric to query: our `name` for it, a StandardMetric, an optional filter."""

    name: str
    standard_metric: str
    filter: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `metricDefinitions[]` entry."""
        base = {"standardMetric": self.standard_metric}
        out: dict[str, Any] = {"name": self.name, "baseMetric": base}
        if self.filter:
            out["filter"] = self.filter
        return out


#: What the policy reads from v2: spam rate and delivery error rates (all, reject, temp_fail).
DEFAULT_METRICS: tuple[MetricDefinition, ...] = (
    MetricDefinition("spam_rate", "SPAM_RATE"),
    MetricDefinition("delivery_error_rate", "DELIVERY_ERROR_RATE"),
    MetricDefinition("reject_rate", "DELIVERY_ERROR_RATE", 'error_type = "reject"'),
    MetricDefinition("temp_fail_rate", "DELIVERY_ERROR_RATE", 'error_type = "temp_fail"'),
)


def _date_json(day: date) -> dict[str, int]:
    """A google.type.Date object."""
    return {"year": day.year, "month": day.month, "day": day.day}


def _parse_date(value: object, where: str) -> date | None:
    """A google.type.Date object -> date; absent -> None."""
    if value is None:
        return None
    data = _object(value, where)
    parts = [_int64(data.get(k), f"{where}.{k}") for k in ("year", "month", "day")]
    if any(p is None for p in parts):
        raise _bad(f"{where}: a full date (year, month, day) is needed, got {_short(value)}")
    try:
        return date(*(p for p in parts if p is not None))
    except (ValueError, OverflowError):
        raise _bad(f"{where}: {_short(value)} is not a calendar day") from None


def parse_stat_value(value: object, where: str = "value") -> StatValue | None:
    """A StatisticValue union -> its value (any member); None when no known member is set."""
    data = _object(value, where)
    if data.get("intValue") is not None:
        return _int64(data["intValue"], f"{where}.intValue")
    for key in ("doubleValue", "floatValue"):
        if data.get(key) is not None:
            return _number(data[key], f"{where}.{key}")
    if data.get("stringValue") is not None:
        text = data["stringValue"]
        if not isinstance(text, str):
            raise _bad(f"{where}.stringValue: expected a string, got {_short(text)}")
        return text
    if data.get("stringList") is not None:
        values = _list(_object(data["stringList"], f"{where}.stringList").get("values"), where)
        if values is None:
            return ()
        if not all(isinstance(v, str) for v in values):
            raise _bad(f"{where}.stringList: expected strings")
        return tuple(values)
    return None


def parse_domain_stats_page(obj: object) -> tuple[DomainStats, str | None]:
    """A `domainStats:query` page -> ({metric: {date: value}}, next page token or None)."""
    data = _object(obj, "domainStats:query")
    out: DomainStats = {}
    for i, raw in enumerate(_list(data.get("domainStats"), "domainStats") or []):
        entry = _object(raw, f"domainStats[{i}]")
        metric = entry.get("metric")
        if not isinstance(metric, str) or not metric:
            raise _bad(f"domainStats[{i}]: the metric is missing")
        day = _parse_date(entry.get("date"), f"domainStats[{i}].date")
        if entry.get("value") is None:
            continue
        value = parse_stat_value(entry["value"], f"domainStats[{i}].value")
        if value is not None:
            out.setdefault(metric, {})[day] = value
    return out, _page_token(data)


def _merge(into: DomainStats, more: DomainStats) -> None:
    """Add one page's results to the running total."""
    for metric, values in more.items():
        into.setdefault(metric, {}).update(values)


@dataclass(frozen=True, slots=True)
class ComplianceStatus:
    """A status with an optional reason (`None` when absent or unspecified)."""

    status: str | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ComplianceRow:
    """One requirement (`SPF`, `DMARC_POLICY`, ...) and its status (`COMPLIANT`, `NEEDS_WORK`)."""

    requirement: str | None
    status: str | None


@dataclass(frozen=True, slots=True)
class ComplianceData:
    """`complianceData` or `subdomainComplianceData`."""

    domain_id: str | None
    rows: tuple[ComplianceRow, ...]
    one_click_unsubscribe: ComplianceStatus | None
    honor_unsubscribe: ComplianceStatus | None

    def status(self, requirement: str) -> str | None:
        """The status of one requirement, None if it is not listed."""
        for row in self.rows:
            if row.requirement == requirement:
                return row.status
        return None

    @property
    def needs_work(self) -> tuple[str, ...]:
        """Requirements (and unsubscribe verdicts) whose status is `NEEDS_WORK`."""
        out = [r.requirement or "?" for r in self.rows if r.status == "NEEDS_WORK"]
        if self.one_click_unsubscribe and self.one_click_unsubscribe.status == "NEEDS_WORK":
            out.append("ONE_CLICK_UNSUBSCRIBE_VERDICT")
        if self.honor_unsubscribe and self.honor_unsubscribe.status == "NEEDS_WORK":
            out.append("HONOR_UNSUBSCRIBE_VERDICT")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Compliance:
    """A v2 compliance status: the registrable domain's, a subdomain's, the preview verdict."""

    name: str | None
    domain: ComplianceData | None
    subdomain: ComplianceData | None = None
    deliverability: ComplianceStatus | None = None


def _verdict(value: object, where: str, status_key: str = "status") -> ComplianceStatus | None:
    """`{reason?, status: {status}}` (or `state: {status}` for the preview verdict)."""
    data = _optional_object(value, where)
    if data is None:
        return None
    inner = _optional_object(data.get(status_key), f"{where}.{status_key}")
    status = _enum(inner.get("status"), f"{where}.{status_key}.status") if inner else None
    return ComplianceStatus(status=status, reason=_enum(data.get("reason"), f"{where}.reason"))


def _compliance_data(value: object, where: str) -> ComplianceData | None:
    """One compliance data object."""
    data = _optional_object(value, where)
    if data is None:
        return None
    rows = []
    for i, raw in enumerate(_list(data.get("rowData"), f"{where}.rowData") or []):
        row = _object(raw, f"{where}.rowData[{i}]")
        status = _optional_object(row.get("status"), f"{where}.rowData[{i}].status")
        rows.append(
            ComplianceRow(
                requirement=_enum(row.get("requirement"), f"{where}.rowData[{i}].requirement"),
                status=_enum(status.get("status"), f"{where}.rowData[{i}].status.status")
                if status
                else None,
            )
        )
    return ComplianceData(
        domain_id=_text(data.get("domainId"), f"{where}.domainId"),
        rows=tuple(rows),
        one_click_unsubscribe=_verdict(
            data.get("oneClickUnsubscribeVerdict"), f"{where}.oneClickUnsubscribeVerdict"
        ),
        honor_unsubscribe=_verdict(
            data.get("honorUnsubscribeVerdict"), f"{where}.honorUnsubscribeVerdict"
        ),
    )


def parse_compliance(obj: object) -> Compliance:
    """A `complianceStatus` body -> `Compliance`."""
    data = _object(obj, "complianceStatus")
    return Compliance(
        name=_text(data.get("name"), "name"),
        domain=_compliance_data(data.get("complianceData"), "complianceData"),
        subdomain=_compliance_data(data.get("subdomainComplianceData"), "subdomainComplianceData"),
        deliverability=_verdict(
            data.get("deliverabilityStatusVerdict"), "deliverabilityStatusVerdict", "state"
        ),
    )


# ----- the client ------------------------------------------------------------------------


class PostmasterClient:
    """Postmaster Tools calls with a bearer token, one refresh-and-retry after a 401."""

    def __init__(
        self,
        fetcher: HttpFetcher,
        tokens: TokenSource,
        *,
        base_url: str = DEFAULT_BASE_URL,
        page_size: int | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.tokens = tokens
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size

    def __repr__(self) -> str:
        """Base URL only."""
        return f"PostmasterClient(base_url={self.base_url!r})"

    def _url(self, version: str, domain: str, tail: str = "") -> str:
        """`{base}/{version}/domains/{fqdn}{tail}`."""
        return f"{self.base_url}/{version}/domains/{quote(domain, safe='')}{tail}"

    async def _call(
        self,
        method: str,
        url: str,
        parse: Callable[[Any], _T],
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
    ) -> _T:
        """One API call with the bearer token; after a 401 drop the token and retry once.

        The answer's JSON is decoded and handed to `parse` off the event loop.
        """
        for attempt in range(2):
            token = await self.tokens.token()
            try:
                headers = {"Authorization": f"Bearer {token}"}
                response = await self.fetcher.request(
                    method, url, params=params, json=json, headers=headers
                )
            except HttpError as exc:
                if exc.status_code == 401 and attempt == 0:
                    self.tokens.invalidate(token)
                    continue
                raise
            shown = self.fetcher.describe(method, url)
            parsed: _T = await self.fetcher.parse_json(response, shown, parse)
            return parsed
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pages(
        self,
        fetch: Callable[[str | None], Awaitable[tuple[_T, str | None]]],
        merge: Callable[[_T], None],
    ) -> None:
        """Call `fetch(token)` until the page token is missing or empty."""
        token: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            page, token = await fetch(token)
            merge(page)
            if token is None:
                return
            if token in seen:
                raise _bad("the server repeated a nextPageToken")
            seen.add(token)
        raise _bad(f"more than {_MAX_PAGES} pages")

    async def traffic_stats(
        self, domain: str, first_day: date, last_day: date
    ) -> list[TrafficStats]:
        """v1 `trafficStats.list` for `first_day`..`last_day` (both included), sorted by day."""
        end = last_day + timedelta(days=1)  # v1's endDate is exclusive
        params: dict[str, str | int] = {
            "startDate.year": first_day.year,
            "startDate.month": first_day.month,
            "startDate.day": first_day.day,
            "endDate.year": end.year,
            "endDate.month": end.month,
            "endDate.day": end.day,
        }
        if self.page_size:
            params["pageSize"] = self.page_size
        url = self._url("v1", domain, "/trafficStats")
        days: dict[date, TrafficStats] = {}

        async def fetch(token: str | None) -> tuple[list[TrafficStats], str | None]:
            query = dict(params, pageToken=token) if token else params
            return await self._call("GET", url, parse_traffic_stats_page, params=query)

        def merge(page: list[TrafficStats]) -> None:
            for stats in page:
                days[stats.day] = stats

        await self._pages(fetch, merge)
        return [days[d] for d in sorted(days)]

    async def traffic_stats_day(self, domain: str, day: date) -> TrafficStats | None:
        """v1 `trafficStats.get` for one day; None when there is no data (404 or name only)."""
        url = self._url("v1", domain, f"/trafficStats/{day:%Y%m%d}")

        def parse(body: Any) -> TrafficStats | None:
            if isinstance(body, dict) and not (set(body) - {"name"}):
                return None
            stats = parse_traffic_stats(body)
            if stats.day != day:
                raise _bad(f"asked for {day:%Y%m%d}, got {stats.name}")
            return stats if stats.has_data else None

        try:
            return await self._call("GET", url, parse)
        except HttpError as exc:
            if exc.kind == "not_found":
                return None
            raise

    def _query_body(
        self,
        first_day: date,
        last_day: date,
        metrics: Sequence[MetricDefinition],
        granularity: Literal["DAILY", "OVERALL"],
    ) -> dict[str, Any]:
        """A QueryDomainStatsRequest; both ends of the range are inclusive in v2."""
        body: dict[str, Any] = {
            "metricDefinitions": [m.to_json() for m in metrics],
            "timeQuery": {
                "dateRanges": {
                    "dateRanges": [{"start": _date_json(first_day), "end": _date_json(last_day)}]
                }
            },
            "aggregationGranularity": granularity,
        }
        if self.page_size:
            body["pageSize"] = self.page_size
        return body

    async def domain_stats(
        self,
        domain: str,
        first_day: date,
        last_day: date,
        metrics: Sequence[MetricDefinition] = DEFAULT_METRICS,
        granularity: Literal["DAILY", "OVERALL"] = "DAILY",
    ) -> DomainStats:
        """v2 `domainStats:query`: {metric name: {date (None if OVERALL): value}}, all pages."""
        url = self._url("v2", domain, "/domainStats:query")
        body = self._query_body(first_day, last_day, metrics, granularity)
        out: DomainStats = {}

        async def fetch(token: str | None) -> tuple[DomainStats, str | None]:
            payload = dict(body, pageToken=token) if token else body
            return await self._call("POST", url, parse_domain_stats_page, json=payload)

        await self._pages(fetch, lambda page: _merge(out, page))
        return out

    async def batch_domain_stats(
        self,
        domains: Sequence[str],
        first_day: date,
        last_day: date,
        metrics: Sequence[MetricDefinition] = DEFAULT_METRICS,
    ) -> dict[str, DomainStats | SourceError]:
        """v2 `domainStats:batchQuery` (at most 100 domains): per domain, stats or its error.

        A per-item error is a google.rpc Status (gRPC code, no status string); it becomes a
        SourceError (code 7/16 -> auth, 5 -> not_found, 3 -> client, 8 -> rate_limited,
        else unavailable). Items with more pages are completed with `domain_stats`.
        """
        if len(domains) > 100:
            raise ValueError("batchQuery takes at most 100 requests")
        requests = [
            dict(self._query_body(first_day, last_day, metrics, "DAILY"), parent=f"domains/{d}")
            for d in domains
        ]
        url = f"{self.base_url}/v2/domainStats:batchQuery"

        def parse(obj: Any) -> list[tuple[str, DomainStats | SourceError, bool]]:
            """(domain, stats or error, more pages) per item."""
            body = _object(obj, "batchQuery")
            results = _list(body.get("results"), "results") or []
            if len(results) != len(domains):
                raise _bad(f"batchQuery: {len(domains)} requests but {len(results)} results")
            items: list[tuple[str, DomainStats | SourceError, bool]] = []
            for domain, raw in zip(domains, results, strict=True):
                item = _object(raw, "results[]")
                if item.get("error") is not None:
                    items.append((domain, _rpc_error(domain, item["error"]), False))
                    continue
                stats, token = parse_domain_stats_page(item.get("response") or {})
                items.append((domain, stats, token is not None))
            return items

        out: dict[str, DomainStats | SourceError] = {}
        for domain, result, more in await self._call(
            "POST", url, parse, json={"requests": requests}
        ):
            if more:
                result = await self.domain_stats(domain, first_day, last_day, metrics)
            out[domain] = result
        return out

    async def compliance(self, domain: str) -> Compliance:
        """v2 `domains.getComplianceStatus`."""
        url = self._url("v2", domain, "/complianceStatus")
        return await self._call("GET", url, parse_compliance)


_RPC_KIND: dict[int, ErrorKind] = {
    3: "client",
    5: "not_found",
    7: "auth",
    8: "rate_limited",
    16: "auth",
}


def _rpc_error(domain: str, value: object) -> SourceError:
    """A batchQuery per-item google.rpc Status -> SourceError (by its gRPC code only)."""
    status = value if isinstance(value, dict) else {}
    code = status.get("code")
    number = code if isinstance(code, int) and not isinstance(code, bool) else -1
    kind = _RPC_KIND.get(number, "unavailable")
    return SourceError(SOURCE, kind, f"{domain}: batchQuery item failed with gRPC code {number}")


# ----- the source ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartFailure:
    """One part of a domain's reading (`v1`, `v2`, `compliance`) that could not be read."""

    part: str
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class DomainDay:
    """What Postmaster Tools says about one domain on one day, for the ramp policy.

    - `spam_rate`: fraction; v1 `userReportedSpamRatio`, else v2 `spam_rate` when it is a
      fraction in [0, 1] (v2's unit is unconfirmed); None when unknown.
    - `spam_rate_upper`: v1 upper bound of the 95% interval, or None. Compare thresholds with
      `spam_rate_for_threshold`.
    - `domain_reputation`: `HIGH`/`MEDIUM`/`LOW`/`BAD`, an unknown string kept as is, or None.
    - `ip_reputation`: sampled IP -> category (IPs in no sample are absent: unknown).
    - `delivery_errors`: v1 entries (None when absent); `delivery_error_rate`, `reject_rate`,
      `temp_fail_rate`: v2 metrics of those names (None when absent).
    - `v2_metrics`: every v2 metric for the day by name; `compliance`: None if not read.
    - `errors`: the parts that failed although others worked.
    """

    domain: str
    day: date
    spam_rate: float | None = None
    spam_rate_upper: float | None = None
    domain_reputation: str | None = None
    ip_reputation: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    delivery_errors: tuple[DeliveryError, ...] | None = None
    delivery_error_rate: float | None = None
    reject_rate: float | None = None
    temp_fail_rate: float | None = None
    v2_metrics: Mapping[str, StatValue] = field(default_factory=lambda: MappingProxyType({}))
    compliance: Compliance | None = None
    traffic_stats: TrafficStats | None = None
    errors: tuple[PartFailure, ...] = ()

    @property
    def spam_rate_for_threshold(self) -> float | None:
        """The upper bound when known, else the spam rate."""
        return self.spam_rate_upper if self.spam_rate_upper is not None else self.spam_rate

    @property
    def has_data(self) -> bool:
        """Whether any figure came back for the day (early warm-up days are often empty)."""
        return self.traffic_stats is not None or bool(self.v2_metrics)


@dataclass(frozen=True, slots=True)
class DomainFailure:
    """A domain none of whose parts could be read; `kind` is the first part's kind."""

    domain: str
    kind: ErrorKind
    message: str
    parts: tuple[PartFailure, ...]


@dataclass(frozen=True)
class PostmasterReading:
    """One poll: per configured domain either a `DomainDay` or a `DomainFailure`."""

    day: date
    domains: Mapping[str, DomainDay]
    failed: Mapping[str, DomainFailure]

    @property
    def complete(self) -> bool:
        """True when every domain and every part was read."""
        return not self.failed and all(not d.errors for d in self.domains.values())


def _fraction(value: StatValue | None) -> float | None:
    """A v2 value usable as a fraction, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


class PostmasterSource:
    """Reads Postmaster Tools for the configured domains; `poll(day)` is the one entry point.

    `client` is owned by the caller. `versions` picks the APIs (`"v1"` for reputation and
    spam ratio, `"v2"` for spam and delivery error rates); `with_compliance` adds the v2
    compliance status. `policy` and `limits` bound every request (the token endpoint's too).
    `now_ms`, `sleep` and `rand` are the injected clock, sleep and jitter.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        credentials: AuthorizedUser,
        domains: Sequence[str],
        *,
        now_ms: Callable[[], int],
        base_url: str = DEFAULT_BASE_URL,
        token_url: str | None = None,
        versions: Iterable[Literal["v1", "v2"]] = ("v1", "v2"),
        metrics: Sequence[MetricDefinition] = DEFAULT_METRICS,
        with_compliance: bool = True,
        page_size: int | None = None,
        policy: RetryPolicy | None = None,
        limits: FetchLimits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.domains = tuple(domains)
        self.versions = frozenset(versions)
        self.metrics = tuple(metrics)
        self.with_compliance = with_compliance
        self.fetcher = HttpFetcher(
            client, SOURCE, policy=policy, limits=limits, sleep=sleep, rand=rand, now_ms=now_ms
        )
        self.tokens = TokenSource(credentials, self.fetcher, now_ms=now_ms, token_url=token_url)
        self.api = PostmasterClient(
            self.fetcher, self.tokens, base_url=base_url, page_size=page_size
        )

    def __repr__(self) -> str:
        """Domains and APIs; no credential."""
        return (
            f"PostmasterSource(domains={self.domains!r}, versions={sorted(self.versions)!r}, "
            f"base_url={self.api.base_url!r})"
        )

    async def poll(self, day: date) -> PostmasterReading:
        """Everything the policy needs for `day`, for every domain; raises only if none worked."""
        results = await asyncio.gather(*(self._domain(d, day) for d in self.domains))
        domains = {r.domain: r for r in results if isinstance(r, DomainDay)}
        failed = {r.domain: r for r in results if isinstance(r, DomainFailure)}
        if self.domains and not domains:
            first = next(iter(failed.values()))
            summary = "; ".join(f"{f.domain}: {f.message}" for f in failed.values())
            raise SourceError(SOURCE, first.kind, f"no domain could be read ({summary})")
        return PostmasterReading(
            day=day, domains=MappingProxyType(domains), failed=MappingProxyType(failed)
        )

    async def _domain(self, domain: str, day: date) -> DomainDay | DomainFailure:
        """One domain's parts, read side by side."""
        parts: list[tuple[str, Awaitable[Any]]] = []
        if "v1" in self.versions:
            parts.append(("v1", self.api.traffic_stats_day(domain, day)))
        if "v2" in self.versions:
            parts.append(("v2", self.api.domain_stats(domain, day, day, self.metrics)))
        if self.with_compliance:
            parts.append(("compliance", self.api.compliance(domain)))
        outcomes = await asyncio.gather(*(p[1] for p in parts), return_exceptions=True)
        values: dict[str, Any] = {}
        errors: list[PartFailure] = []
        for (name, _), outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, SourceError):
                errors.append(PartFailure(name, outcome.kind, outcome.detail))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                values[name] = outcome
        if errors and not values:
            message = "; ".join(f"{e.part}: {e.kind}: {e.message}" for e in errors)
            return DomainFailure(domain, errors[0].kind, message, tuple(errors))
        stats: TrafficStats | None = values.get("v1")
        ip_map = await off_loop(stats.ip_reputation_map) if stats is not None else {}
        v2: DomainStats = values.get("v2") or {}
        metrics = {name: by_day[day] for name, by_day in v2.items() if day in by_day}
        spam_rate = stats.spam_ratio if stats is not None else None
        if spam_rate is None:
            spam_rate = _fraction(metrics.get("spam_rate"))
        return DomainDay(
            domain=domain,
            day=day,
            spam_rate=spam_rate,
            spam_rate_upper=stats.spam_ratio_upper if stats is not None else None,
            domain_reputation=stats.domain_reputation if stats is not None else None,
            ip_reputation=MappingProxyType(ip_map),
            delivery_errors=stats.delivery_errors if stats is not None else None,
            delivery_error_rate=_fraction(metrics.get("delivery_error_rate")),
            reject_rate=_fraction(metrics.get("reject_rate")),
            temp_fail_rate=_fraction(metrics.get("temp_fail_rate")),
            v2_metrics=MappingProxyType(metrics),
            compliance=values.get("compliance"),
            traffic_stats=stats,
            errors=tuple(errors),
        )
