"""Gmail Postmaster Tools: v1/v2 parsers on the fixtures and every reference trap, the client
and `PostmasterSource.poll` against the loopback `FakeGoogle`, and OAuth token handling."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from fakeapis import FIXTURES, Failure, FakeGoogle
from kiln.errors import ConfigError
from kiln.signals import SourceError
from kiln.signals.http import HttpFetcher, RetryPolicy
from kiln.signals.oauth import (
    SCOPE_DOMAIN,
    SCOPE_V1_READONLY,
    SCOPE_V2_TRAFFIC_READONLY,
    AuthorizedUser,
    CredentialsError,
    TokenSource,
    load_authorized_user,
)
from kiln.signals.postmaster import PostmasterReading, PostmasterSource
from kiln.signals.postmaster_wire import (
    DEFAULT_METRICS,
    DeliveryError,
    FeedbackLoop,
    IpReputation,
    MetricDefinition,
    parse_compliance,
    parse_domain_stats_page,
    parse_stat_value,
    parse_traffic_stats,
    parse_traffic_stats_page,
)

T0_MS = 1_773_100_800_000  # 2026-03-10T00:00:00Z
DOMAIN = "mail.example.com"
MAR = {d: date(2026, 3, d) for d in range(1, 32)}
_T = TypeVar("_T")


def fixture(name: str) -> Any:
    """A signal fixture file (tests/fixtures/signals/), parsed."""
    return json.loads((FIXTURES / name).read_text())


class Clock:
    """A settable clock."""

    def __init__(self, now_ms: int = T0_MS) -> None:
        self.ms = now_ms

    def now_ms(self) -> int:
        """The current fake time."""
        return self.ms


class Sleeps:
    """An injected sleep that records and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record."""
        self.calls.append(seconds)


def with_source(
    google: FakeGoogle,
    body: Callable[[PostmasterSource], Awaitable[_T]],
    *,
    domains: tuple[str, ...] = (DOMAIN,),
    clock: Clock | None = None,
    sleeps: Sleeps | None = None,
    credentials: AuthorizedUser | None = None,
    **settings: Any,
) -> _T:
    """Run `body(source)` with a PostmasterSource pointed at `google`."""
    settings.setdefault("policy", RetryPolicy(max_attempts=3, timeout_s=2.0))

    async def main() -> _T:
        async with httpx.AsyncClient() as client:
            source = PostmasterSource(
                client,
                credentials or google.authorized_user(),
                domains,
                now_ms=(clock or Clock()).now_ms,
                base_url=google.base_url,
                token_url=google.token_url,
                sleep=sleeps or Sleeps(),
                rand=lambda: 0.5,
                **settings,
            )
            return await body(source)

    return asyncio.run(main())


def poll(google: FakeGoogle, day: date, **kw: Any) -> PostmasterReading:
    """One poll of `day`."""
    return with_source(google, lambda s: s.poll(day), **kw)


def secrets_of(google: FakeGoogle) -> list[str]:
    """Every secret the fake knows: client secret, refresh token, access tokens issued."""
    return [google.CLIENT_SECRET, google.REFRESH_TOKEN, *google.issued_tokens]


# ----- v1 parser: fixtures -----------------------------------------------------------------


def test_v1_list_fixture_exact() -> None:
    """The healthy day: every field as written; LOW/BAD present without counts or IPs."""
    days, next_page = parse_traffic_stats_page(fixture("postmaster_v1_trafficstats_list.json"))
    assert next_page == "CgwIABIICgYI3u_FzQY"
    (day,) = days
    assert (day.domain, day.day) == (DOMAIN, MAR[10])
    assert (day.spam_ratio, day.spam_ratio_lower, day.spam_ratio_upper) == (0.0007, 0.0004, 0.001)
    assert dict(day.ip_reputations) == {
        "HIGH": IpReputation(2, ("192.0.2.10", "192.0.2.11")),
        "MEDIUM": IpReputation(1, ("192.0.2.12",)),
        "LOW": IpReputation(None, ()),
        "BAD": IpReputation(None, ()),
    }
    assert day.domain_reputation == "HIGH"
    assert day.spammy_feedback_loops is None
    assert day.spf_success_ratio == 1.0 and isinstance(day.spf_success_ratio, float)
    assert (day.dkim_success_ratio, day.dmarc_success_ratio) == (0.9991, 0.9991)
    assert day.outbound_encryption_ratio == 1.0 and isinstance(day.outbound_encryption_ratio, float)
    assert day.inbound_encryption_ratio == 0.9998
    assert day.delivery_errors == (DeliveryError("TEMPORARY_ERROR", "RATE_LIMIT_EXCEEDED", 0.0042),)
    assert day.spam_rate_for_threshold() == 0.001
    assert day.ip_reputation("192.0.2.12") == "MEDIUM"
    assert day.ip_reputation("203.0.113.9") is None
    assert day.has_data


def test_v1_degraded_fixture_exact() -> None:
    """The degraded day: LOW domain, two LOW IPs, a spammy loop, rejects; outbound absent."""
    day = parse_traffic_stats(fixture("postmaster_v1_trafficstats_degraded.json"))
    assert day.day == MAR[12]
    assert (day.spam_ratio, day.spam_ratio_lower, day.spam_ratio_upper) == (0.0042, 0.0031, 0.0053)
    assert day.spam_rate_for_threshold() == 0.0053
    assert day.domain_reputation == "LOW"
    assert day.ip_reputation_map() == {
        "192.0.2.10": "MEDIUM",
        "192.0.2.11": "LOW",
        "192.0.2.12": "LOW",
    }
    assert day.ip_reputations["HIGH"] == IpReputation(None, ())
    assert day.spammy_feedback_loops == (FeedbackLoop("spring-promo", 0.011),)
    assert day.outbound_encryption_ratio is None
    assert (day.spf_success_ratio, day.inbound_encryption_ratio) == (1.0, 0.9997)
    assert day.delivery_errors == (
        DeliveryError("TEMPORARY_ERROR", "RATE_LIMIT_EXCEEDED", 0.085),
        DeliveryError("PERMANENT_ERROR", "LOW_IP_REPUTATION", 0.012),
    )


# ----- v1 parser: traps ----------------------------------------------------------------------

NAME = f"domains/{DOMAIN}/trafficStats/20260310"


def test_v1_name_only_means_no_data() -> None:
    """Every field but the name is optional, and absent stays None (never 0)."""
    day = parse_traffic_stats({"name": NAME})
    assert not day.has_data
    assert day.spam_ratio is None and day.spam_rate_for_threshold() is None
    assert day.domain_reputation is None and day.delivery_errors is None
    assert day.ip_reputations == {} and day.ip_reputation("192.0.2.10") is None


def test_v1_ip_count_string_or_number_and_missing_pieces() -> None:
    """ipCount as a string or a bare number; entries without ipCount/sampleIps; numIps fallback."""
    day = parse_traffic_stats(
        {
            "name": NAME,
            "ipReputations": [
                {"reputation": "HIGH", "ipCount": 3, "sampleIps": ["192.0.2.10"]},
                {"reputation": "MEDIUM", "ipCount": "9007199254740993"},
                {"reputation": "LOW", "numIps": "2"},
                {"reputation": "REPUTATION_CATEGORY_UNSPECIFIED", "ipCount": "5"},
            ],
            "deliveryErrors": [{"errorClass": "PERMANENT_ERROR", "errorType": "IP_IN_RBL"}],
        }
    )
    assert day.ip_reputations["HIGH"] == IpReputation(3, ("192.0.2.10",))
    assert day.ip_reputations["MEDIUM"] == IpReputation(9007199254740993, ())
    assert day.ip_reputations["LOW"] == IpReputation(2, ())
    assert "BAD" not in day.ip_reputations and len(day.ip_reputations) == 3
    assert day.delivery_errors == (DeliveryError("PERMANENT_ERROR", "IP_IN_RBL", None),)


def test_v1_unknown_enums_kept_and_zero_enum_is_none() -> None:
    """Unknown strings are kept verbatim; *_UNSPECIFIED and "" read as None."""
    day = parse_traffic_stats(
        {
            "name": NAME,
            "domainReputation": "VERY_LOW",
            "ipReputations": [
                {"reputation": "SUSPICIOUS", "ipCount": "1", "sampleIps": ["192.0.2.10"]},
                {"reputation": "HIGH", "ipCount": "1", "sampleIps": ["192.0.2.10", "2001:DB8::1"]},
            ],
            "deliveryErrors": [
                {"errorClass": "DELIVERY_ERROR_CLASS_UNSPECIFIED", "errorType": "NEW_TYPE"},
                {"errorClass": "", "errorRatio": 0},
            ],
        }
    )
    assert day.domain_reputation == "VERY_LOW"
    assert day.ip_reputation("192.0.2.10") == "SUSPICIOUS"  # the worse of the two
    assert day.ip_reputation("2001:db8::1") == "HIGH"  # canonical IPv6 comparison
    assert day.delivery_errors == (
        DeliveryError(None, "NEW_TYPE", None),
        DeliveryError(None, None, 0.0),
    )
    assert parse_traffic_stats({"name": NAME, "domainReputation": ""}).domain_reputation is None


def test_v1_integer_doubles_and_explicit_zero() -> None:
    """`1` parses as 1.0; an explicit 0 stays 0.0 (distinct from absent)."""
    day = parse_traffic_stats({"name": NAME, "userReportedSpamRatio": 0, "dkimSuccessRatio": 1})
    assert day.spam_ratio == 0.0 and isinstance(day.spam_ratio, float)
    assert day.dkim_success_ratio == 1.0 and day.spf_success_ratio is None


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {},
        {"name": "domains/x/trafficStats/2026031"},
        {"name": "domains/x/trafficStats/20260231"},
        {"name": NAME, "userReportedSpamRatio": "high"},
        {"name": NAME, "userReportedSpamRatio": True},
        {"name": NAME, "ipReputations": {"reputation": "HIGH"}},
        {"name": NAME, "ipReputations": [{"reputation": "HIGH", "ipCount": "1.5"}]},
        {"name": NAME, "ipReputations": [{"reputation": "HIGH", "sampleIps": [7]}]},
        {"name": NAME, "domainReputation": 3},
    ],
)
def test_v1_malformed_is_bad_data(obj: object) -> None:
    """Shapes the reference does not allow raise bad_data."""
    with pytest.raises(SourceError) as info:
        parse_traffic_stats(obj)
    assert info.value.kind == "bad_data"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_V1_KEYS = [
    "userReportedSpamRatio",
    "userReportedSpamRatioUpperBound",
    "ipReputations",
    "domainReputation",
    "spammyFeedbackLoops",
    "deliveryErrors",
    "spfSuccessRatio",
]
_IP_REP = st.fixed_dictionaries(
    {},
    optional={
        "reputation": _JSON | st.sampled_from(["HIGH", "BAD", "X"]),
        "ipCount": _JSON,
        "sampleIps": st.lists(st.text(max_size=8) | _JSON, max_size=3),
    },
)


@given(
    st.fixed_dictionaries(
        {"name": st.just(NAME) | _JSON},
        optional={k: _JSON | st.lists(_IP_REP, max_size=3) for k in _V1_KEYS},
    )
    | _JSON
)
def test_v1_parser_never_crashes(obj: object) -> None:
    """Any JSON value gives a TrafficStats or SourceError(bad_data), nothing else."""
    try:
        day = parse_traffic_stats(obj)
    except SourceError as exc:
        assert exc.kind == "bad_data"
    else:
        assert day.day == MAR[10]
        day.ip_reputation_map()
        day.spam_rate_for_threshold()


# ----- v2 parsers ------------------------------------------------------------------------------


def test_v2_response_fixture_keyed_by_metric_and_date() -> None:
    """Results keyed by metric then date; missing (date, metric) pairs are just absent."""
    stats, token = parse_domain_stats_page(fixture("postmaster_v2_domainstats_query_response.json"))
    assert token is None
    assert stats == {
        "spam_rate": {MAR[9]: 0.0008, MAR[10]: 0.0012},
        "dkim_pass": {MAR[9]: 0.9991},
    }


def test_v2_statistic_value_members() -> None:
    """intValue from a string, doubleValue, floatValue, stringValue, stringList; none -> None."""
    assert parse_stat_value({"intValue": "9007199254740993"}) == 9007199254740993
    assert parse_stat_value({"doubleValue": 1}) == 1.0
    assert parse_stat_value({"floatValue": 0.25}) == 0.25
    assert parse_stat_value({"stringValue": "a:b:c"}) == "a:b:c"
    assert parse_stat_value({"stringList": {"values": ["x", "y"]}}) == ("x", "y")
    assert parse_stat_value({"stringList": {}}) == ()
    assert parse_stat_value({"newMember": 1}) is None


def test_v2_overall_has_no_date() -> None:
    """OVERALL results carry no date: keyed under None."""
    page = {"domainStats": [{"metric": "spam_rate", "value": {"doubleValue": 0.001}}]}
    assert parse_domain_stats_page(page) == ({"spam_rate": {None: 0.001}}, None)


def test_v2_compliance_fixture_exact() -> None:
    """rowData[].status.status, reason missing when compliant and present when not."""
    compliance = parse_compliance(fixture("postmaster_v2_compliance.json"))
    assert compliance.name == "domains/example.com/complianceStatus"
    assert compliance.subdomain is None and compliance.deliverability is None
    data = compliance.domain
    assert data is not None and data.domain_id == "example.com"
    assert [(r.requirement, r.status) for r in data.rows] == [
        ("SPF_AND_DKIM", "COMPLIANT"),
        ("DMARC_POLICY", "COMPLIANT"),
        ("USER_REPORTED_SPAM_RATE", "NEEDS_WORK"),
    ]
    assert data.status("DMARC_POLICY") == "COMPLIANT" and data.status("SPF") is None
    assert data.one_click_unsubscribe is not None
    assert (data.one_click_unsubscribe.status, data.one_click_unsubscribe.reason) == (
        "COMPLIANT",
        None,
    )
    assert data.honor_unsubscribe is not None
    assert data.honor_unsubscribe.reason == "NOT_HONORING"
    assert data.needs_work == ("USER_REPORTED_SPAM_RATE", "HONOR_UNSUBSCRIBE_VERDICT")


def test_v2_compliance_subdomain_preview_and_unknown_keys() -> None:
    """subdomainComplianceData, the preview verdict (state, not status), unknown keys."""
    obj = fixture("postmaster_v2_compliance.json")
    obj["subdomainComplianceData"] = {
        "domainId": "mail.example.com",
        "rowData": [{"requirement": "NEW_RULE", "status": {"status": "SOMETHING_NEW"}, "x": 1}],
    }
    obj["deliverabilityStatusVerdict"] = {"reason": "NEW_REASON", "state": {"status": "NEEDS_WORK"}}
    obj["futureKey"] = {"a": [1]}
    compliance = parse_compliance(obj)
    assert compliance.subdomain is not None
    assert compliance.subdomain.rows[0].status == "SOMETHING_NEW"
    assert compliance.deliverability is not None
    assert (compliance.deliverability.status, compliance.deliverability.reason) == (
        "NEEDS_WORK",
        "NEW_REASON",
    )


# ----- the client on the wire --------------------------------------------------------------------


def test_v1_dates_are_dotted_and_end_exclusive_on_the_wire() -> None:
    """9-10 March is sent as start 2026-3-9, end 2026-3-11, unpadded, as the fixture says."""
    with FakeGoogle() as google:
        days = with_source(google, lambda s: s.api.traffic_stats(DOMAIN, MAR[9], MAR[10]))
        (request,) = [r for r in google.requests if r.path.endswith("/trafficStats")]
    assert [d.day for d in days] == [MAR[10]]
    assert request.path == f"/v1/domains/{DOMAIN}/trafficStats"
    assert {k: v for k, v in request.query.items() if "Date" in k} == {
        "startDate.year": ["2026"],
        "startDate.month": ["3"],
        "startDate.day": ["9"],
        "endDate.year": ["2026"],
        "endDate.month": ["3"],
        "endDate.day": ["11"],
    }
    assert request.headers["authorization"].startswith("Bearer ya29.")


def test_v1_end_exclusive_across_a_month_end() -> None:
    """The day after 31 March is 1 April."""
    with FakeGoogle(fixtures=False) as google:
        with_source(google, lambda s: s.api.traffic_stats(DOMAIN, MAR[31], MAR[31]))
        request = google.requests[-1]
    assert (request.param("endDate.month"), request.param("endDate.day")) == ("4", "1")


def test_fake_refuses_padded_or_one_sided_dates() -> None:
    """The fake answers 400 INVALID_ARGUMENT like Google; the client does not retry a 400."""
    sleeps = Sleeps()
    with FakeGoogle() as google:

        async def body(source: PostmasterSource) -> list[int]:
            token = await source.tokens.token()
            codes = []
            for query in (
                "startDate.year=2026&startDate.month=03&startDate.day=9"
                "&endDate.year=2026&endDate.month=3&endDate.day=10",
                "startDate.year=2026&startDate.month=3&startDate.day=9",
                "startDate.year=2026&startDate.month=3&startDate.day=9"
                "&endDate.year=2026&endDate.month=3&endDate.day=9",
            ):
                response = await source.fetcher.client.get(
                    f"{google.base_url}/v1/domains/{DOMAIN}/trafficStats?{query}",
                    headers={"Authorization": f"Bearer {token}"},
                )
                codes.append(response.status_code)
                assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
            return codes

        assert with_source(google, body, sleeps=sleeps) == [400, 400, 400]
        google.fail_next(Failure.bad_request(), path="trafficStats")
        with pytest.raises(SourceError) as info:
            with_source(
                google, lambda s: s.api.traffic_stats(DOMAIN, MAR[9], MAR[10]), sleeps=sleeps
            )
        assert google.count("trafficStats") == 4
    assert info.value.kind == "client" and sleeps.calls == []


def test_v1_pagination_sorts_and_stops_on_empty_token() -> None:
    """Pages of one, newest first, last page token "": all days, sorted, no extra request."""
    with FakeGoogle() as google:
        google.set_traffic_stats(DOMAIN, MAR[11], {"userReportedSpamRatio": 0.002})
        google.reverse_order = True
        google.last_page_token = ""
        days = with_source(
            google, lambda s: s.api.traffic_stats(DOMAIN, MAR[1], MAR[31]), page_size=1
        )
        pages = [r for r in google.requests if r.path.endswith("/trafficStats")]
    assert [d.day for d in days] == [MAR[10], MAR[11], MAR[12]]
    assert [r.param("pageToken") for r in pages] == [None, "p1", "p2"]
    assert all(r.param("pageSize") == "1" for r in pages)


def test_v1_day_no_data_404_or_name_only() -> None:
    """trafficStats.get: 404 and a name-only object both mean None."""
    with FakeGoogle() as google:
        assert with_source(google, lambda s: s.api.traffic_stats_day(DOMAIN, MAR[11])) is None
        google.missing_day = "name_only"
        assert with_source(google, lambda s: s.api.traffic_stats_day(DOMAIN, MAR[11])) is None
        day = with_source(google, lambda s: s.api.traffic_stats_day(DOMAIN, MAR[12]))
        assert day is not None and day.domain_reputation == "LOW"
        assert google.requests[-1].path == f"/v1/domains/{DOMAIN}/trafficStats/20260312"


def test_v2_dates_nested_and_inclusive_on_the_wire() -> None:
    """9-10 March is sent as start 9, end 10, in timeQuery.dateRanges.dateRanges."""
    with FakeGoogle() as google:
        stats = with_source(google, lambda s: s.api.domain_stats(DOMAIN, MAR[9], MAR[10]))
        (request,) = [r for r in google.requests if r.path.endswith("domainStats:query")]
    body = request.json()
    expected = fixture("postmaster_v2_domainstats_query_request.json")
    assert body["timeQuery"] == expected["timeQuery"]
    assert body["aggregationGranularity"] == "DAILY"
    assert body["metricDefinitions"] == [m.to_json() for m in DEFAULT_METRICS]
    assert body["metricDefinitions"][2] == {
        "name": "reject_rate",
        "baseMetric": {"standardMetric": "DELIVERY_ERROR_RATE"},
        "filter": 'error_type = "reject"',
    }
    assert stats == {"spam_rate": {MAR[9]: 0.0008, MAR[10]: 0.0012}}


def test_fake_accepts_the_documented_request_fixture() -> None:
    """The request fixture, posted as is, is valid for the fake (same checks as the client)."""
    with FakeGoogle() as google:

        async def body(source: PostmasterSource) -> Any:
            token = await source.tokens.token()
            response = await source.fetcher.client.post(
                f"{google.base_url}/v2/domains/{DOMAIN}/domainStats:query",
                json=fixture("postmaster_v2_domainstats_query_request.json"),
                headers={"Authorization": f"Bearer {token}"},
            )
            return response.json()

        answer = with_source(google, body)
    stats, _ = parse_domain_stats_page(answer)
    assert stats == {"spam_rate": {MAR[9]: 0.0008, MAR[10]: 0.0012}, "dkim_pass": {MAR[9]: 0.9991}}


def test_v2_pagination_and_value_members() -> None:
    """Pages of two across four results; intValue and stringList values come through."""
    metrics = (
        MetricDefinition("spam_rate", "SPAM_RATE"),
        MetricDefinition("loops", "FEEDBACK_LOOP_ID"),
        MetricDefinition(
            "tls_count", "TLS_ENCRYPTION_MESSAGE_COUNT", 'traffic_direction = "inbound"'
        ),
    )
    with FakeGoogle(fixtures=False) as google:
        google.set_domain_stats(DOMAIN, MAR[9], {"spam_rate": 0.001, "loops": ["a", "b"]})
        google.set_domain_stats(DOMAIN, MAR[10], {"tls_count": 1200, "spam_rate": 0.002})
        google.set_domain_stats(DOMAIN, MAR[11], {"spam_rate": 0.5})
        stats = with_source(
            google, lambda s: s.api.domain_stats(DOMAIN, MAR[9], MAR[10], metrics), page_size=2
        )
        tokens = [r.json().get("pageToken") for r in google.requests if "query" in r.path]
    assert stats == {
        "spam_rate": {MAR[9]: 0.001, MAR[10]: 0.002},
        "loops": {MAR[9]: ("a", "b")},
        "tls_count": {MAR[10]: 1200},
    }
    assert tokens == [None, "p2"]


def test_v2_batch_query_per_item_errors() -> None:
    """batchQuery: results in request order; a denied domain is a per-item gRPC 7 -> auth."""
    with FakeGoogle() as google:
        google.deny_domain("denied.example.com")
        out = with_source(
            google,
            lambda s: s.api.batch_domain_stats(["denied.example.com", DOMAIN], MAR[9], MAR[10]),
        )
    denied = out["denied.example.com"]
    assert isinstance(denied, SourceError) and denied.kind == "auth"
    assert out[DOMAIN] == {"spam_rate": {MAR[9]: 0.0008, MAR[10]: 0.0012}}


# ----- poll ---------------------------------------------------------------------------------------


def test_poll_healthy_day() -> None:
    """The reading the policy gets for 10 March: v1 figures, v2 values, compliance."""
    with FakeGoogle() as google:
        reading = poll(google, MAR[10])
    assert reading.complete and reading.failed == {}
    day = reading.domains[DOMAIN]
    assert (day.spam_rate, day.spam_rate_upper, day.spam_rate_for_threshold) == (
        0.0007,
        0.001,
        0.001,
    )
    assert day.domain_reputation == "HIGH"
    assert day.ip_reputation == {"192.0.2.10": "HIGH", "192.0.2.11": "HIGH", "192.0.2.12": "MEDIUM"}
    assert day.delivery_errors == (DeliveryError("TEMPORARY_ERROR", "RATE_LIMIT_EXCEEDED", 0.0042),)
    assert day.v2_metrics == {"spam_rate": 0.0012}
    assert day.delivery_error_rate is None and day.reject_rate is None
    assert day.compliance is not None and day.compliance.domain is not None
    assert day.has_data and day.errors == ()


def test_poll_v2_only_day_and_v2_error_rates() -> None:
    """Without v1 data, the v2 spam rate is used; the upper bound stays unknown."""
    with FakeGoogle() as google:
        google.set_domain_stats(
            DOMAIN,
            MAR[11],
            {
                "spam_rate": 0.003,
                "reject_rate": 0.01,
                "temp_fail_rate": 0.02,
                "delivery_error_rate": 0.03,
            },
        )
        day = poll(google, MAR[11]).domains[DOMAIN]
    assert day.traffic_stats is None and day.domain_reputation is None
    assert (day.spam_rate, day.spam_rate_upper) == (0.003, None)
    assert (day.delivery_error_rate, day.reject_rate, day.temp_fail_rate) == (0.03, 0.01, 0.02)
    assert day.ip_reputation == {}


def test_poll_empty_day_is_unknown_not_zero() -> None:
    """No data anywhere: every figure None, no failure."""
    with FakeGoogle() as google:
        day = poll(google, MAR[20]).domains[DOMAIN]
    assert not day.has_data
    assert day.spam_rate is None and day.spam_rate_upper is None and day.delivery_errors is None


def test_poll_403_marks_one_domain_without_failing_others() -> None:
    """A denied domain is in `failed` (kind auth); the other domain is read normally."""
    with FakeGoogle() as google:
        google.deny_domain("other.example.com")
        reading = poll(google, MAR[12], domains=(DOMAIN, "other.example.com"))
        denied_calls = google.count("other.example.com")
    assert set(reading.domains) == {DOMAIN}
    failure = reading.failed["other.example.com"]
    assert failure.kind == "auth" and {p.part for p in failure.parts} == {"v1", "v2", "compliance"}
    assert all(p.kind == "auth" for p in failure.parts)
    assert denied_calls == 3  # one per part: 403 is not retried
    assert reading.domains[DOMAIN].domain_reputation == "LOW"


def test_poll_raises_only_when_nothing_could_be_read() -> None:
    """Every domain denied: SourceError(auth)."""
    with FakeGoogle() as google:
        google.deny_domain(DOMAIN)
        with pytest.raises(SourceError) as info:
            poll(google, MAR[10])
    assert info.value.kind == "auth" and "no domain could be read" in str(info.value)


def test_poll_partial_failure_is_recorded_per_part() -> None:
    """Compliance missing (404) and v2 failing with 500s: v1 still read, parts listed."""
    sleeps = Sleeps()
    with FakeGoogle() as google:
        google.set_compliance(DOMAIN, None)
        google.fail_path("domainStats", Failure.server_error())
        day = poll(google, MAR[10], sleeps=sleeps).domains[DOMAIN]
    assert day.domain_reputation == "HIGH"
    assert {(e.part, e.kind) for e in day.errors} == {
        ("compliance", "not_found"),
        ("v2", "unavailable"),
    }
    assert day.compliance is None and day.v2_metrics == {}
    assert sleeps.calls == [0.75, 1.5]


def test_poll_versions_select_the_apis() -> None:
    """versions=("v1",) and no compliance: only v1 is called."""
    with FakeGoogle() as google:
        poll(google, MAR[10], versions=("v1",), with_compliance=False)
        paths = [r.path for r in google.requests if r.path != "/token"]
    assert paths == [f"/v1/domains/{DOMAIN}/trafficStats/20260310"]


def test_429_retry_after_and_garbage_and_timeout_via_poll() -> None:
    """429 with Retry-After is honoured; garbage JSON is bad_data; a slow server times out."""
    sleeps = Sleeps()
    with FakeGoogle() as google:
        google.fail_next(Failure.rate_limited(retry_after="11"), path="trafficStats")
        day = poll(google, MAR[10], sleeps=sleeps, versions=("v1",), with_compliance=False)
        assert day.domains[DOMAIN].spam_rate == 0.0007
        assert sleeps.calls == [11.0]
        google.fail_next(Failure.garbage(), path="trafficStats")
        with pytest.raises(SourceError) as info:
            poll(google, MAR[10], versions=("v1",), with_compliance=False)
        assert info.value.kind == "bad_data"
        google.fail_path("trafficStats", Failure.slow(5.0))
        with pytest.raises(SourceError) as info:
            poll(
                google,
                MAR[10],
                versions=("v1",),
                with_compliance=False,
                policy=RetryPolicy(max_attempts=2, timeout_s=0.2),
            )
        assert info.value.kind == "timeout"


# ----- OAuth -----------------------------------------------------------------------------------


def test_scopes() -> None:
    """The documented scope URLs."""
    assert SCOPE_V1_READONLY == "https://www.googleapis.com/auth/postmaster.readonly"
    assert SCOPE_V2_TRAFFIC_READONLY == (
        "https://www.googleapis.com/auth/postmaster.traffic.readonly"
    )
    assert SCOPE_DOMAIN == "https://www.googleapis.com/auth/postmaster.domain"


def test_token_is_cached_then_refreshed_before_expiry() -> None:
    """One refresh for many calls; a new one once within the margin of expires_in."""
    clock = Clock()

    async def body(source: PostmasterSource) -> list[int]:
        counts = []
        await source.poll(MAR[10])
        counts.append(source.tokens.refresh_count)
        clock.ms += 3_600_000 - 61_000  # still more than the 60 s margin left
        await source.api.traffic_stats_day(DOMAIN, MAR[10])
        counts.append(source.tokens.refresh_count)
        clock.ms += 2_000  # now inside the margin
        await source.api.traffic_stats_day(DOMAIN, MAR[10])
        counts.append(source.tokens.refresh_count)
        return counts

    with FakeGoogle() as google:
        assert with_source(google, body, clock=clock) == [1, 1, 2]
        assert google.count("/token") == 2
        form = google.requests[0].body.decode()
    assert "grant_type=refresh_token" in form


def test_401_refreshes_once_and_retries() -> None:
    """An access token the API refuses is dropped; the call is retried once with a new one."""
    with FakeGoogle() as google:

        async def body(source: PostmasterSource) -> Any:
            await source.tokens.token()
            google.expire_tokens()
            return await source.api.traffic_stats_day(DOMAIN, MAR[12])

        day = with_source(google, body)
        assert day is not None and google.count("/token") == 2
        assert google.count("trafficStats") == 2


def test_persistent_401_is_auth() -> None:
    """A 401 after the refresh is not retried again: auth."""
    with FakeGoogle() as google:
        google.fail_path("trafficStats", Failure.status_code(401))
        with pytest.raises(SourceError) as info:
            with_source(google, lambda s: s.api.traffic_stats_day(DOMAIN, MAR[12]))
        assert google.count("trafficStats") == 2
    assert info.value.kind == "auth"


def test_invalid_grant_is_auth_and_secret_free(caplog: pytest.LogCaptureFixture) -> None:
    """A revoked refresh token: every domain fails with auth; no secret in errors or logs."""
    caplog.set_level(logging.DEBUG)
    with FakeGoogle() as google, capture_logs() as logs:
        google.revoke_refresh_token()
        with pytest.raises(SourceError) as info:
            poll(google, MAR[10])
        secrets = secrets_of(google)
    error = info.value
    assert error.kind == "auth" and "invalid_grant" in str(error)
    for secret in secrets:
        assert secret not in str(error) and secret not in repr(error)
        assert secret not in caplog.text
        assert all(secret not in repr(entry) for entry in logs)


def test_no_secret_anywhere_after_failures(caplog: pytest.LogCaptureFixture) -> None:
    """Access tokens, refresh token, client secret: never in readings, errors, reprs or logs."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with FakeGoogle() as google, capture_logs() as logs:
        google.deny_domain("other.example.com")
        google.fail_next(Failure.server_error(), path="trafficStats")

        async def body(source: PostmasterSource) -> None:
            reading = await source.poll(MAR[10])
            texts.extend([repr(reading), repr(source), repr(source.tokens), repr(source.api)])
            texts.append(repr(source.tokens.credentials))
            google.fail_path("trafficStats", Failure.status_code(401))
            try:
                await source.api.traffic_stats_day(DOMAIN, MAR[10])
            except SourceError as exc:
                texts.extend([str(exc), repr(exc)])

        with_source(google, body, domains=(DOMAIN, "other.example.com"))
        secrets = secrets_of(google)
    assert len(secrets) >= 3
    everything = "\n".join(texts) + caplog.text + "\n".join(repr(e) for e in logs)
    for secret in secrets:
        assert secret not in everything


# ----- credentials files -------------------------------------------------------------------------


def write(path: Path, obj: Any, mode: int = 0o600) -> Path:
    """Write `obj` as JSON with `mode`."""
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    os.chmod(path, mode)
    return path


GOOD = {
    "type": "authorized_user",
    "client_id": "id.apps.googleusercontent.com",
    "client_secret": "GOCSPX-top-secret",
    "refresh_token": "1//refresh-secret",
}


def test_load_authorized_user(tmp_path: Path) -> None:
    """A good file loads; token_uri is optional; repr shows no secret."""
    creds = load_authorized_user(write(tmp_path / "c.json", GOOD))
    assert creds.client_id == GOOD["client_id"] and creds.token_uri is None
    assert creds.refresh_token.reveal() == "1//refresh-secret"
    assert "secret" not in repr(creds).replace("client_secret", "")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not a JSON file"),
        ("[]", "expected a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "refresh_token"}, 'missing key "refresh_token"'),
        ({**GOOD, "client_secret": ""}, '"client_secret" must be a non-empty string'),
        ({**GOOD, "type": "service_account"}, "authorized_user"),
    ],
)
def test_bad_credentials_files(tmp_path: Path, content: Any, expected: str) -> None:
    """Each mistake names the file and the key, and never prints a secret value."""
    path = write(tmp_path / "creds.json", content)
    with pytest.raises(CredentialsError) as info:
        load_authorized_user(path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "GOCSPX-top-secret" not in message and "1//refresh-secret" not in message
    assert isinstance(info.value, ConfigError)


def test_missing_and_unreadable_credentials(tmp_path: Path) -> None:
    """A missing file and a directory both say so, naming the path."""
    with pytest.raises(CredentialsError, match="not found"):
        load_authorized_user(tmp_path / "nope.json")
    with pytest.raises(CredentialsError, match="cannot read"):
        load_authorized_user(tmp_path)


def test_world_readable_credentials_warn(tmp_path: Path) -> None:
    """Mode o+r is used but logged as a warning with the fix."""
    with capture_logs() as logs:
        load_authorized_user(write(tmp_path / "c.json", GOOD, 0o644))
        load_authorized_user(write(tmp_path / "d.json", GOOD, 0o600))
    warned = [e for e in logs if e["event"] == "credentials_file_world_readable"]
    assert len(warned) == 1 and warned[0]["path"].endswith("c.json")
    assert warned[0]["log_level"] == "warning"


def test_token_source_from_file_against_fake(tmp_path: Path) -> None:
    """The file's token_uri is used when no token_url is configured."""
    with FakeGoogle() as google:
        creds = load_authorized_user(write(tmp_path / "c.json", google.credentials_json()))

        async def main() -> str:
            async with httpx.AsyncClient() as client:
                fetcher = HttpFetcher(client, "postmaster", sleep=Sleeps(), now_ms=lambda: T0_MS)
                return await TokenSource(creds, fetcher, now_ms=lambda: T0_MS).token()

        assert asyncio.run(main()) == google.issued_tokens[0]
