"""DNSBL lookups against a real loopback DNS server: codes, errors, policy listings, secrets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from dnsserver import DnsServer
from kiln.signals import SourceError
from kiln.signals.dnsbl import (
    ZEN_CODES,
    DnsblReading,
    DnsblSource,
    Zone,
    classify,
    query_name,
)

IP = "192.0.2.10"
OTHER_IP = "192.0.2.11"
ZEN = Zone.zen()
DQS_KEY = "s3cr3tdqskey0123"


@pytest.fixture
def server() -> Iterator[DnsServer]:
    """A running loopback DNS server with no records."""
    with DnsServer() as running:
        yield running


def source(server: DnsServer, zones: list[Zone] | None = None, **settings: Any) -> DnsblSource:
    """A DnsblSource asking `server`, with short timeouts."""
    settings.setdefault("timeout_s", 0.3)
    return DnsblSource(zones or [ZEN], ["127.0.0.1"], port=server.port, **settings)


def poll(src: DnsblSource, ips: list[str]) -> DnsblReading:
    """One poll on a fresh event loop."""
    return asyncio.run(src.poll(ips))


def test_query_names() -> None:
    """IPv4 octets are reversed; IPv6 uses the nibble form; DQS puts the key before the zone."""
    assert query_name("192.0.2.10", ZEN) == "10.2.0.192.zen.spamhaus.org"
    v6 = query_name("2001:db8::1", ZEN)
    assert v6 == ("1.0.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.zen.spamhaus.org")
    assert query_name("192.0.2.10", Zone.zen(DQS_KEY)) == (
        f"10.2.0.192.{DQS_KEY}.zen.dq.spamhaus.net"
    )


@pytest.mark.parametrize(("code", "meaning"), [(c, m) for c, (m, _) in ZEN_CODES.items()])
def test_every_zen_code(server: DnsServer, code: str, meaning: str) -> None:
    """Each ZEN code is classified: PBL codes are policy-only, the rest are listings."""
    server.set(query_name(IP, ZEN), "A", [code])
    result = poll(source(server), [IP]).result(IP, "zen.spamhaus.org")
    assert result is not None
    policy = code in {"127.0.0.10", "127.0.0.11"}
    assert result.outcome == ("policy" if policy else "listed")
    assert [(c.code, c.meaning, c.policy) for c in result.codes] == [(code, meaning, policy)]
    assert not result.resolver_error


def test_several_a_records_each_classified(server: DnsServer) -> None:
    """SBL plus DROP plus PBL in one answer: listed, with every code and the TXT reason."""
    name = query_name(IP, ZEN)
    server.set(name, "A", ["127.0.0.9", "127.0.0.2", "127.0.0.10"])
    server.set(name, "TXT", ['"https://check.spamhaus.org/sbl/query/SBL1"'])
    result = poll(source(server), [IP]).result(IP, "zen.spamhaus.org")
    assert result is not None
    assert result.outcome == "listed" and result.listed
    assert [(c.code, c.meaning) for c in result.codes] == [
        ("127.0.0.2", "SBL"),
        ("127.0.0.9", "DROP"),
        ("127.0.0.10", "PBL (ISP maintained)"),
    ]
    assert result.reason == "https://check.spamhaus.org/sbl/query/SBL1"


def test_pbl_only_is_policy_not_listed(server: DnsServer) -> None:
    """Both PBL codes alone are a policy listing: never in `listed_ips`."""
    server.set(query_name(IP, ZEN), "A", ["127.0.0.10", "127.0.0.11"])
    reading = poll(source(server), [IP])
    result = reading.result(IP, "zen.spamhaus.org")
    assert result is not None and result.outcome == "policy" and not result.listed
    assert reading.listed_ips == frozenset()
    assert not reading.resolver_error


@pytest.mark.parametrize(
    "code", ["127.255.255.254", "127.255.255.255", "127.255.255.252", "127.255.255.1"]
)
def test_error_codes_are_never_listings(server: DnsServer, code: str) -> None:
    """127.255.255.0/24 is unknown with a resolver alert, even beside a real listing code."""
    server.set(query_name(IP, ZEN), "A", ["127.0.0.2", code])
    with capture_logs() as logs:
        reading = poll(source(server), [IP, OTHER_IP])
    result = reading.result(IP, "zen.spamhaus.org")
    assert result is not None and result.outcome == "unknown" and not result.listed
    assert result.codes == () and result.resolver_error and reading.resolver_error
    assert code in (result.error or "")
    assert reading.listed_ips == frozenset()
    assert [e["event"] for e in logs] == ["dnsbl_resolver_error"]


def test_dbl_error_code_is_unknown() -> None:
    """DBL's 127.0.1.255 (IP asked of a domain list) is an error on any zone."""
    result = classify(IP, Zone.generic("dbl.example.test"), ["127.0.1.255"])
    assert result.outcome == "unknown" and result.resolver_error


def test_only_error_answers_still_give_a_reading(server: DnsServer) -> None:
    """An open resolver answering 127.255.255.254 everywhere is a resolver alert, not a raise."""
    server.set(query_name(IP, ZEN), "A", ["127.255.255.254"])
    reading = poll(source(server), [IP])
    assert reading.resolver_error and reading.by_outcome("unknown") == reading.results


@pytest.mark.parametrize("answer", ["192.0.2.200", "203.0.113.1", "10.0.0.1"])
def test_answer_outside_loopback_is_resolver_error(server: DnsServer, answer: str) -> None:
    """A resolver that rewrites NXDOMAIN to an ad server's address gives unknown, not listed."""
    server.set(query_name(IP, ZEN), "A", [answer])
    reading = poll(source(server), [IP, OTHER_IP])
    result = reading.result(IP, "zen.spamhaus.org")
    assert result is not None and result.outcome == "unknown" and result.resolver_error
    assert "outside 127.0.0.0/8" in (result.error or "")


def test_nxdomain_is_clean(server: DnsServer) -> None:
    """A name the zone does not hold is not listed, and no TXT is asked."""
    reading = poll(source(server), [IP])
    result = reading.result(IP, "zen.spamhaus.org")
    assert result is not None and result.outcome == "clean" and result.error is None
    assert server.count(query_name(IP, ZEN), "TXT") == 0


def test_timeout_and_servfail_are_unknown(server: DnsServer) -> None:
    """A dropped query and a SERVFAIL are unknown, never clean; a good lookup still answers."""
    server.drop.add(query_name(IP, ZEN))
    server.servfail.add(query_name(OTHER_IP, ZEN))
    server.set(query_name("192.0.2.12", ZEN), "A", ["127.0.0.4"])
    with capture_logs() as logs:
        reading = poll(source(server, timeout_s=0.2), [IP, OTHER_IP, "192.0.2.12"])
    timed_out = reading.result(IP, "zen.spamhaus.org")
    failed = reading.result(OTHER_IP, "zen.spamhaus.org")
    assert timed_out is not None and timed_out.outcome == "unknown"
    assert timed_out.error == "timeout" and not timed_out.resolver_error
    assert failed is not None and failed.outcome == "unknown" and "SERVFAIL" in (failed.error or "")
    assert reading.listed_ips == {"192.0.2.12"}
    assert not reading.resolver_error
    assert sorted(e["event"] for e in logs) == ["dnsbl_lookup_failed"] * 2


def test_refused_is_unknown(server: DnsServer) -> None:
    """REFUSED (an unregistered querying server) is unknown, never clean."""
    server.refused.add(query_name(IP, Zone.barracuda()))
    reading = poll(source(server, [Zone.barracuda(), ZEN]), [IP])
    result = reading.result(IP, "b.barracudacentral.org")
    assert result is not None and result.outcome == "unknown" and "REFUSED" in (result.error or "")
    zen = reading.result(IP, "zen.spamhaus.org")
    assert zen is not None and zen.outcome == "clean"


def test_every_lookup_failed_raises(server: DnsServer) -> None:
    """When nothing answered, the poll is a SourceError, not a reading full of unknowns."""
    server.servfail_all = True
    with pytest.raises(SourceError) as caught:
        poll(source(server), [IP, OTHER_IP])
    assert caught.value.kind == "unavailable" and caught.value.source == "dnsbl"


@pytest.mark.parametrize("zone", [Zone.barracuda(), Zone.spamcop(), Zone.generic("dnsbl.test")])
def test_any_loopback_code_lists_on_other_zones(server: DnsServer, zone: Zone) -> None:
    """Barracuda, SpamCop and generic zones: any 127.0.0.x is a listing, per IP."""
    server.set(query_name(IP, zone), "A", ["127.0.0.2"])
    server.set(query_name(OTHER_IP, zone), "A", ["127.0.0.7"])
    reading = poll(source(server, [zone]), [IP, OTHER_IP, "192.0.2.12"])
    assert reading.listed_ips == {IP, OTHER_IP}
    clean = reading.result("192.0.2.12", zone.name)
    assert clean is not None and clean.outcome == "clean"
    listed = reading.result(OTHER_IP, zone.name)
    assert listed is not None and listed.codes[0].code == "127.0.0.7"
    assert Zone.named(zone.name) == zone


def test_unexpected_loopback_code_is_unknown() -> None:
    """A 127/8 code outside 127.0.0.x and the error ranges is not a listing."""
    result = classify(IP, Zone.spamcop(), ["127.0.1.2"])
    assert result.outcome == "unknown" and result.resolver_error


def test_ipv6_query(server: DnsServer) -> None:
    """An IPv6 sending IP is asked in nibble form and its answer classified."""
    server.set(query_name("2001:db8::10", ZEN), "A", ["127.0.0.3"])
    reading = poll(source(server), ["2001:DB8:0::10"])
    result = reading.result("2001:db8::10", "zen.spamhaus.org")
    assert result is not None and result.outcome == "listed" and result.codes[0].meaning == "CSS"


def test_concurrency_bound_answers_every_pair(server: DnsServer) -> None:
    """With one query at a time, every (ip, zone) pair still gets its own result."""
    zones = [ZEN, Zone.spamcop()]
    ips = [f"192.0.2.{n}" for n in range(1, 9)]
    server.set(query_name("192.0.2.5", Zone.spamcop()), "A", ["127.0.0.2"])
    reading = poll(source(server, zones, max_concurrency=1), ips)
    assert len(reading.results) == 16
    assert [(r.ip, r.zone) for r in reading.by_outcome("listed")] == [
        ("192.0.2.5", "bl.spamcop.net")
    ]


def test_dqs_key_is_redacted(server: DnsServer) -> None:
    """The DQS key is queried but never appears in results, logs, reprs or exceptions."""
    zone = Zone.zen(DQS_KEY)
    listed = query_name(IP, zone)
    server.set(listed, "A", ["127.255.255.254"])
    server.servfail.add(query_name(OTHER_IP, zone))
    with capture_logs() as logs:
        reading = poll(source(server, [zone]), [IP, OTHER_IP])
    assert server.count(listed, "A") == 1
    assert len(logs) == 2
    assert all(DQS_KEY not in repr(entry) for entry in logs)
    assert any("***.zen.dq.spamhaus.net" in str(entry.get("qname")) for entry in logs)
    assert DQS_KEY not in repr(reading)
    assert DQS_KEY not in repr(zone)
    server.servfail_all = True
    with capture_logs() as logs, pytest.raises(SourceError) as caught:
        poll(source(server, [zone]), [IP])
    assert DQS_KEY not in str(caught.value) and DQS_KEY not in repr(logs)
    server.servfail_all = False
    server.set(listed, "A", ["127.0.0.2"])
    server.set(listed, "TXT", [f'"see https://example.test/{DQS_KEY}"'])
    result = poll(source(server, [zone]), [IP]).result(IP, "zen.dq.spamhaus.net")
    assert result is not None and result.reason == "see https://example.test/***"


def test_bad_configuration_is_rejected() -> None:
    """Bad keys, duplicate zones and non-IP arguments are errors, not lookups."""
    with pytest.raises(ValueError, match="DQS key"):
        Zone.zen("bad key!")
    with pytest.raises(ValueError, match="twice"):
        DnsblSource([ZEN, Zone.zen()], ["127.0.0.1"])
    with pytest.raises(ValueError, match="DQS key"):
        Zone.named("zen.dq.spamhaus.net")
    src = DnsblSource([ZEN], ["127.0.0.1"], port=1)
    with pytest.raises(ValueError):
        asyncio.run(src.poll(["not-an-ip"]))
    assert asyncio.run(src.poll([])) == DnsblReading(())
