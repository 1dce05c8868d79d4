"""Gmail Postmaster Tools on the wire: the v1 and v2 answers as plain records.

Parsers follow the wire format (docs/signals.md): every field but `name` is optional and an
absent value stays `None` (never a favourable default); `ipCount` may be a string or a number;
doubles may be written without a decimal point; unknown enum strings are kept verbatim (the
"other" value: anything not in the documented set, see `REPUTATIONS`); the zero enum
(`*_UNSPECIFIED`) and `""` mean "no data" and read as `None`. A body that does not have the
documented shape raises `SourceError(kind="bad_data")`. Every `parse_*` function is a pure
function of the decoded JSON, so it runs in a parser thread.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from kiln.signals import SourceError

__all__ = [
    "DEFAULT_METRICS",
    "MAX_PAGES",
    "REPUTATIONS",
    "SOURCE",
    "Compliance",
    "ComplianceData",
    "ComplianceRow",
    "ComplianceStatus",
    "DeliveryError",
    "DomainStats",
    "FeedbackLoop",
    "IpReputation",
    "MetricDefinition",
    "StatValue",
    "TrafficStats",
    "as_list",
    "as_object",
    "bad_data",
    "date_json",
    "merge_stats",
    "parse_compliance",
    "parse_domain_stats_page",
    "parse_stat_value",
    "parse_traffic_stats",
    "parse_traffic_stats_page",
]

#: The source name errors carry.
SOURCE = "postmaster"
#: The documented reputation categories, best first. Any other string is kept as is.
REPUTATIONS = ("HIGH", "MEDIUM", "LOW", "BAD")
#: Worst first, for an IP sampled in more than one category; unknown strings rank after LOW.
_RANK = {"BAD": 0, "LOW": 1, "MEDIUM": 3, "HIGH": 4}
_UNKNOWN_RANK = 2
_NAME_DAY = re.compile(r"^domains/(?P<domain>[^/]+)/trafficStats/(?P<day>[0-9]{8})$")
MAX_PAGES = 1000

#: A v2 StatisticValue: `intValue` -> int, `doubleValue`/`floatValue` -> float,
#: `stringValue` -> str, `stringList` -> tuple of str.
StatValue = int | float | str | tuple[str, ...]
#: v2 results: metric name (as defined in the request) -> date (None for OVERALL) -> value.
DomainStats = dict[str, dict[date | None, StatValue]]

_T = TypeVar("_T")


def bad_data(message: str) -> SourceError:
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
        raise bad_data(f"{where}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise bad_data(f"{where}: expected a number, got {_short(value)}") from None
    if not math.isfinite(number):
        raise bad_data(f"{where}: expected a finite number, got {_short(value)}")
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
    raise bad_data(f"{where}: expected an integer, got {_short(value)}")


def _enum(value: object, where: str) -> str | None:
    """An enum string; absent, `""` and `*_UNSPECIFIED` -> None; unknown strings kept."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_data(f"{where}: expected an enum string, got {_short(value)}")
    if not value or value.endswith("_UNSPECIFIED"):
        return None
    return value


def _text(value: object, where: str) -> str | None:
    """A string; absent or empty -> None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_data(f"{where}: expected a string, got {_short(value)}")
    return value or None


def as_list(value: object, where: str) -> list[Any] | None:
    """A JSON array; absent -> None."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_data(f"{where}: expected a list, got {_short(value)}")
    return value


def as_object(value: object, where: str) -> dict[str, Any]:
    """A JSON object (required)."""
    if not isinstance(value, dict):
        raise bad_data(f"{where}: expected a JSON object, got {_short(value)}")
    return value


def _optional_object(value: object, where: str) -> dict[str, Any] | None:
    """A JSON object; absent -> None."""
    return None if value is None else as_object(value, where)


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
        raise bad_data(f"name: expected domains/{{fqdn}}/trafficStats/YYYYMMDD, got {_short(name)}")
    digits = match["day"]
    try:
        day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise bad_data(f"name: {digits} is not a calendar day") from None
    return match["domain"], day


def parse_traffic_stats(obj: object) -> TrafficStats:
    """One v1 TrafficStats JSON object -> `TrafficStats`; `SourceError(bad_data)` if malformed."""
    data = as_object(obj, "trafficStats")
    name = data.get("name")
    if not isinstance(name, str):
        raise bad_data("trafficStats: the name is missing")
    domain, day = _day_from_name(name)
    where = f"{name}"
    reputations: dict[str, IpReputation] = {}
    for i, raw in enumerate(as_list(data.get("ipReputations"), f"{where}: ipReputations") or []):
        entry = as_object(raw, f"{where}: ipReputations[{i}]")
        category = _enum(entry.get("reputation"), f"{where}: ipReputations[{i}].reputation")
        if category is None:
            continue
        count = _int64(entry.get("ipCount"), f"{where}: ipReputations[{i}].ipCount")
        if count is None and "numIps" in entry:
            count = _int64(entry.get("numIps"), f"{where}: ipReputations[{i}].numIps")
        ips = as_list(entry.get("sampleIps"), f"{where}: ipReputations[{i}].sampleIps") or []
        for ip in ips:
            if not isinstance(ip, str):
                raise bad_data(f"{where}: ipReputations[{i}].sampleIps: {_short(ip)} is not text")
        old = reputations.get(category)
        if old is not None:  # a repeated category: merge
            both = None if old.ip_count is None or count is None else old.ip_count + count
            count = both if both is not None else (old.ip_count if count is None else count)
            ips = list(old.sample_ips) + [ip for ip in ips if ip not in old.sample_ips]
        reputations[category] = IpReputation(count, tuple(ips))
    loops_raw = as_list(data.get("spammyFeedbackLoops"), f"{where}: spammyFeedbackLoops")
    loops = None
    if loops_raw is not None:
        loops = tuple(
            FeedbackLoop(
                id=_text(as_object(raw, f"{where}: spammyFeedbackLoops[{i}]").get("id"), "id"),
                spam_ratio=_number(raw.get("spamRatio"), f"{where}: spammyFeedbackLoops[{i}]"),
            )
            for i, raw in enumerate(loops_raw)
        )
    errors_raw = as_list(data.get("deliveryErrors"), f"{where}: deliveryErrors")
    errors = None
    if errors_raw is not None:
        errors = tuple(
            DeliveryError(
                error_class=_enum(
                    as_object(raw, f"{where}: deliveryErrors[{i}]").get("errorClass"),
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
        raise bad_data(f"nextPageToken: expected a string, got {_short(token)}")
    return token


def parse_traffic_stats_page(obj: object) -> tuple[list[TrafficStats], str | None]:
    """A `trafficStats.list` page -> (days, next page token or None)."""
    data = as_object(obj, "trafficStats.list")
    items = as_list(data.get("trafficStats"), "trafficStats") or []
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


def date_json(day: date) -> dict[str, int]:
    """A google.type.Date object."""
    return {"year": day.year, "month": day.month, "day": day.day}


def _parse_date(value: object, where: str) -> date | None:
    """A google.type.Date object -> date; absent -> None."""
    if value is None:
        return None
    data = as_object(value, where)
    parts = [_int64(data.get(k), f"{where}.{k}") for k in ("year", "month", "day")]
    if any(p is None for p in parts):
        raise bad_data(f"{where}: a full date (year, month, day) is needed, got {_short(value)}")
    try:
        return date(*(p for p in parts if p is not None))
    except (ValueError, OverflowError):
        raise bad_data(f"{where}: {_short(value)} is not a calendar day") from None


def parse_stat_value(value: object, where: str = "value") -> StatValue | None:
    """A StatisticValue union -> its value (any member); None when no known member is set."""
    data = as_object(value, where)
    if data.get("intValue") is not None:
        return _int64(data["intValue"], f"{where}.intValue")
    for key in ("doubleValue", "floatValue"):
        if data.get(key) is not None:
            return _number(data[key], f"{where}.{key}")
    if data.get("stringValue") is not None:
        text = data["stringValue"]
        if not isinstance(text, str):
            raise bad_data(f"{where}.stringValue: expected a string, got {_short(text)}")
        return text
    if data.get("stringList") is not None:
        values = as_list(as_object(data["stringList"], f"{where}.stringList").get("values"), where)
        if values is None:
            return ()
        if not all(isinstance(v, str) for v in values):
            raise bad_data(f"{where}.stringList: expected strings")
        return tuple(values)
    return None


def parse_domain_stats_page(obj: object) -> tuple[DomainStats, str | None]:
    """A `domainStats:query` page -> ({metric: {date: value}}, next page token or None)."""
    data = as_object(obj, "domainStats:query")
    out: DomainStats = {}
    for i, raw in enumerate(as_list(data.get("domainStats"), "domainStats") or []):
        entry = as_object(raw, f"domainStats[{i}]")
        metric = entry.get("metric")
        if not isinstance(metric, str) or not metric:
            raise bad_data(f"domainStats[{i}]: the metric is missing")
        day = _parse_date(entry.get("date"), f"domainStats[{i}].date")
        if entry.get("value") is None:
            continue
        value = parse_stat_value(entry["value"], f"domainStats[{i}].value")
        if value is not None:
            out.setdefault(metric, {})[day] = value
    return out, _page_token(data)


def merge_stats(into: DomainStats, more: DomainStats) -> None:
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
    for i, raw in enumerate(as_list(data.get("rowData"), f"{where}.rowData") or []):
        row = as_object(raw, f"{where}.rowData[{i}]")
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
    data = as_object(obj, "complianceStatus")
    return Compliance(
        name=_text(data.get("name"), "name"),
        domain=_compliance_data(data.get("complianceData"), "complianceData"),
        subdomain=_compliance_data(data.get("subdomainComplianceData"), "subdomainComplianceData"),
        deliverability=_verdict(
            data.get("deliverabilityStatusVerdict"), "deliverabilityStatusVerdict", "state"
        ),
    )
