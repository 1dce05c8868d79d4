"""Gmail Postmaster Tools: v1 traffic stats (reputation), v2 domain stats and compliance.

The answers are parsed into records by `kiln.signals.postmaster_wire` (the wire format,
docs/signals.md).

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
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx

from kiln.signals import ErrorKind, SourceError
from kiln.signals.http import FetchLimits, HttpError, HttpFetcher, RetryPolicy, off_loop
from kiln.signals.oauth import AuthorizedUser, TokenSource
from kiln.signals.postmaster_wire import (
    DEFAULT_METRICS,
    MAX_PAGES,
    SOURCE,
    Compliance,
    DeliveryError,
    DomainStats,
    MetricDefinition,
    StatValue,
    TrafficStats,
    as_list,
    as_object,
    bad_data,
    date_json,
    merge_stats,
    parse_compliance,
    parse_domain_stats_page,
    parse_traffic_stats,
    parse_traffic_stats_page,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DomainDay",
    "DomainFailure",
    "PartFailure",
    "PostmasterClient",
    "PostmasterReading",
    "PostmasterSource",
]

DEFAULT_BASE_URL = "https://gmailpostmastertools.googleapis.com"
_T = TypeVar("_T")


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
        for _ in range(MAX_PAGES):
            page, token = await fetch(token)
            merge(page)
            if token is None:
                return
            if token in seen:
                raise bad_data("the server repeated a nextPageToken")
            seen.add(token)
        raise bad_data(f"more than {MAX_PAGES} pages")

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
                raise bad_data(f"asked for {day:%Y%m%d}, got {stats.name}")
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
                    "dateRanges": [{"start": date_json(first_day), "end": date_json(last_day)}]
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

        await self._pages(fetch, lambda page: merge_stats(out, page))
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
            body = as_object(obj, "batchQuery")
            results = as_list(body.get("results"), "results") or []
            if len(results) != len(domains):
                raise bad_data(f"batchQuery: {len(domains)} requests but {len(results)} results")
            items: list[tuple[str, DomainStats | SourceError, bool]] = []
            for domain, raw in zip(domains, results, strict=True):
                item = as_object(raw, "results[]")
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
