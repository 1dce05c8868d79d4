"""Recipient domain -> provider: the MX rollup rules, then real lookups against loopback DNS."""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsserver import DnsServer
from kiln.mx import NULL_MX, MxResolver, ProviderTable, ascii_domain, system_nameservers
from kiln.planfile import load_plan
from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS, ProviderDef

ROLLUP_CSV = Path(__file__).parent / "fixtures" / "warmup" / "rollup.csv"
T0_MS = 1_800_000_000_000


def _rollup_rows() -> list[tuple[str, list[str], str]]:
    """(domain, MX hosts, expected provider) for every row of the rollup fixture."""
    with ROLLUP_CSV.open(newline="", encoding="utf-8") as f:
        return [
            (r["domain"], r["mx_hosts"].split(" "), r["expected_provider"])
            for r in csv.DictReader(f)
        ]


ROLLUP = _rollup_rows()
DEFAULT = ProviderTable.default()
#: The shipped suffixes without the domain table, so every lookup has to go through DNS.
MX_ONLY = ProviderTable(
    {name: ProviderDef(mx_suffixes=p.mx_suffixes) for name, p in DEFAULT_PROVIDERS.items()}
)


@pytest.fixture
def server() -> Iterator[DnsServer]:
    """A running loopback DNS server with no records."""
    with DnsServer() as running:
        yield running


def resolver_for(server: DnsServer, table: ProviderTable = MX_ONLY, **settings: Any) -> MxResolver:
    """An MxResolver that asks `server`, with short timeouts unless told otherwise."""
    settings.setdefault("timeout_s", 0.5)
    settings.setdefault("lifetime_s", 1.0)
    return MxResolver(table, ["127.0.0.1"], port=server.port, **settings)


def lookup(resolver: MxResolver, domain: str, now_ms: int = T0_MS) -> str:
    """One `provider()` call on a fresh event loop."""
    return asyncio.run(resolver.provider(domain, now_ms))


# ----- the fixture rows -----


def test_fixture_is_inside_the_repository() -> None:
    """The fixture is read from tests/fixtures, inside the repository, and has rows."""
    assert ROLLUP_CSV.is_file(), ROLLUP_CSV
    assert ROLLUP_CSV.resolve().is_relative_to(Path(__file__).resolve().parent / "fixtures")
    assert len(ROLLUP) >= 8


@pytest.mark.parametrize(("domain", "hosts", "expected"), ROLLUP, ids=[r[0] for r in ROLLUP])
def test_rollup_rows_by_mx(domain: str, hosts: list[str], expected: str) -> None:
    """Every fixture MX set maps to its provider; `default` rows match none (None)."""
    assert DEFAULT.by_mx(hosts) == (None if expected == DEFAULT_PROVIDER else expected)
    assert MX_ONLY.by_mx(hosts) == (None if expected == DEFAULT_PROVIDER else expected)


@pytest.mark.parametrize(("domain", "hosts", "expected"), ROLLUP, ids=[r[0] for r in ROLLUP])
def test_rollup_rows_through_dns(
    server: DnsServer, domain: str, hosts: list[str], expected: str
) -> None:
    """The fixture MX sets, served over DNS, resolve to the same providers end to end."""
    server.mx(domain, hosts)
    assert lookup(resolver_for(server), domain) == expected
    assert server.count(domain, "MX") == 1


def test_rollup_domains_listed_in_the_table_need_no_query(server: DnsServer) -> None:
    """With the shipped table, gmail.com, hotmail.com, yahoo.com, icloud.com never reach DNS."""
    resolver = resolver_for(server, DEFAULT)
    for domain, hosts, expected in ROLLUP:
        server.mx(domain, hosts)
        assert lookup(resolver, domain) == expected
    for domain in ("gmail.com", "hotmail.com", "yahoo.com", "icloud.com"):
        assert server.count(domain) == 0
    assert server.count("workspace.example", "MX") == 1


# ----- matching rules -----


def test_upper_case_hosts_match() -> None:
    """Host names compare case-insensitively."""
    assert DEFAULT.by_mx(["ASPMX.L.Google.COM", "Alt1.ASPMX.l.google.com"]) == "google"
    assert DEFAULT.by_mx(["HOTMAIL-COM.OLC.PROTECTION.OUTLOOK.COM."]) == "microsoft-consumer"


def test_upper_case_hosts_over_dns(server: DnsServer) -> None:
    """Upper case in the MX records themselves survives the wire and still matches."""
    server.mx("shouting.example", ["MX01.MAIL.ICLOUD.COM.", "Mx02.Mail.ICloud.com"])
    assert lookup(resolver_for(server), "shouting.example") == "apple"


def test_one_trailing_dot_on_hosts_and_suffixes_is_ignored() -> None:
    """`host.` matches like `host`, configured `suffix.` like `suffix`; two dots are not a name."""
    table = ProviderTable({"acme": ProviderDef(mx_suffixes=("Acme-Mail.NET.",))})
    assert table.by_mx(["in1.acme-mail.net"]) == "acme"
    assert table.by_mx(["in1.acme-mail.net."]) == "acme"
    assert table.by_mx(["in1.acme-mail.net.."]) is None


def test_suffix_needs_a_dot_boundary() -> None:
    """`mx.notgoogle.com` does not match `.google.com` (docs/providers.md rule 3)."""
    assert DEFAULT.by_mx(["mx.notgoogle.com"]) is None
    assert DEFAULT.by_host("mx.notgoogle.com") is None
    assert DEFAULT.by_mx(["aspmx.l.google.com", "mx.notgoogle.com"]) is None


def test_suffix_without_leading_dot_is_given_one() -> None:
    """A configured `google.com` behaves as `.google.com`."""
    table = ProviderTable({"g": ProviderDef(mx_suffixes=("google.com",))})
    assert table.by_mx(["mx.google.com"]) == "g"
    assert table.by_mx(["mx.notgoogle.com"]) is None


@pytest.mark.parametrize("broad_first", [True, False])
def test_longest_suffix_wins(broad_first: bool) -> None:
    """With `.protection.outlook.com` and `.olc.protection.outlook.com` both configured, each
    host goes to its longest match, whatever the table order (docs/providers.md rule 5)."""
    broad = ("ms-any", ProviderDef(mx_suffixes=(".protection.outlook.com",)))
    narrow = ("consumer", ProviderDef(mx_suffixes=(".olc.protection.outlook.com",)))
    table = ProviderTable(dict([broad, narrow] if broad_first else [narrow, broad]))
    assert table.by_mx(["hotmail-com.olc.protection.outlook.com"]) == "consumer"
    assert table.by_mx(["contoso-example.mail.protection.outlook.com"]) == "ms-any"
    both = ["hotmail-com.olc.protection.outlook.com", "x.mail.protection.outlook.com"]
    assert table.by_mx(both) is None


def test_shipped_microsoft_keys_stay_apart() -> None:
    """Consumer and 365 hosts never merge, and a mix of the two is no provider."""
    consumer = "outlook-com.olc.protection.outlook.com"
    tenant = "contoso-example.mail.protection.outlook.com"
    dane = "tenant-example.x-v1.mx.microsoft"
    assert DEFAULT.by_mx([consumer]) == "microsoft-consumer"
    assert DEFAULT.by_mx([tenant, dane]) == "microsoft-365"
    assert DEFAULT.by_mx([consumer, tenant]) is None


def test_exact_host_names_can_be_listed() -> None:
    """A configured name matches itself and hosts under it, not a longer label."""
    table = ProviderTable({"relay": ProviderDef(mx_suffixes=("smtp.relay.example",))})
    assert table.by_mx(["smtp.relay.example"]) == "relay"
    assert table.by_mx(["SMTP.RELAY.EXAMPLE."]) == "relay"
    assert table.by_mx(["a.smtp.relay.example"]) == "relay"
    assert table.by_mx(["xsmtp.relay.example"]) is None


def test_same_suffix_twice_later_provider_wins() -> None:
    """A provider added later (a plan's own) takes a suffix or domain over an earlier one."""
    table = ProviderTable(
        {
            "google": ProviderDef(domains=("gmail.com",), mx_suffixes=(".google.com",)),
            "mine": ProviderDef(domains=("GMAIL.com.",), mx_suffixes=("google.com",)),
        }
    )
    assert table.by_mx(["aspmx.l.google.com"]) == "mine"
    assert table.by_domain("gmail.com") == "mine"


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ([], None),
        (["."], NULL_MX),
        ([""], NULL_MX),
        ([".", "."], None),
        ([".", "aspmx.l.google.com"], None),
        (["aspmx.l.google.com", "mx.other-host.example"], None),
        (["mx.other-host.example"], None),
    ],
)
def test_empty_null_and_mixed_sets(hosts: list[str], expected: str | None) -> None:
    """No hosts or a mixed set: no provider; just `.` is a null MX (docs/providers.md rule 6)."""
    assert DEFAULT.by_mx(hosts) == expected


def test_by_mx_rejects_a_single_string() -> None:
    """A bare string would be iterated as characters; it is a TypeError instead."""
    with pytest.raises(TypeError, match="sequence of host names"):
        DEFAULT.by_mx("aspmx.l.google.com")


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("gmail.com", "google"),
        ("GMail.Com.", "google"),
        (" yahoo.co.jp ", "yahoo-jp"),
        ("mail.com", "gmx-webde"),
        ("sub.gmail.com", None),
        ("example.com", None),
        ("", None),
        ("a..b", None),
    ],
)
def test_by_domain(domain: str, expected: str | None) -> None:
    """Static domain table: exact domain, case and one trailing dot ignored, no subdomains."""
    assert DEFAULT.by_domain(domain) == expected


def test_unicode_domains_in_the_table() -> None:
    """Domains may be configured and asked for in unicode or IDNA form alike."""
    table = ProviderTable({"buch": ProviderDef(domains=("Bücher.example",))})
    assert table.by_domain("xn--bcher-kva.example") == "buch"
    assert table.by_domain("BÜCHER.example.") == "buch"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("", None),
        (".", None),
        ("a..b", None),
        ("exa mple.com", None),
        ("user@example.com", None),
        ("a" * 64 + ".com", None),
        ("ü" * 70 + ".de", None),
        ("\udcff.com", None),
        ("a." * 127 + "com", None),
    ],
)
def test_ascii_domain(domain: str, expected: str | None) -> None:
    """Normalisation: lower-case IDNA without one trailing dot; None for non-host names."""
    assert ascii_domain(domain) == expected


def test_from_plan_adds_and_overrides(tmp_path: Path) -> None:
    """A plan's providers extend the shipped table; shipped ones still answer."""
    path = tmp_path / "plan.yaml"
    path.write_text(
        "name: test\n"
        "timezone: Europe/Berlin\n"
        "providers:\n"
        "  barracuda: {mx_suffixes: [.barracudanetworks.com]}\n"
        "  corp: {domains: [Corp.Example.]}\n"
        "pools:\n"
        "  tx: {ips: [198.51.100.1]}\n"
    )
    table = ProviderTable.from_plan(load_plan(path))
    assert table.by_mx(["d123.ess.barracudanetworks.com"]) == "barracuda"
    assert table.by_domain("corp.example") == "corp"
    assert table.by_domain("gmail.com") == "google"
    assert {"barracuda", "corp", "google"} <= table.names


# ----- properties -----

LABELS = st.sampled_from(
    ["mx", "alt1", "aspmx", "l", "google", "notgoogle", "com", "outlook", "protection",
     "olc", "mail", "example", "gmail-smtp-in", "yahoodns", "net", "x"]
)  # fmt: skip
HOSTS = st.lists(LABELS, min_size=1, max_size=5).map(".".join)
SUFFIXES = st.lists(LABELS, min_size=1, max_size=3).map(lambda labels: "." + ".".join(labels))
TABLES = st.dictionaries(
    st.sampled_from(["p1", "p2", "p3", "p4"]),
    st.lists(SUFFIXES, max_size=4).map(lambda s: ProviderDef(mx_suffixes=tuple(s))),
    max_size=4,
)


def _reference_host(table: dict[str, ProviderDef], host: str) -> str | None:
    """docs/providers.md read literally: endswith or equal, longest suffix, later on a tie."""
    best: tuple[int, int, str] | None = None
    name = host.lower().removesuffix(".")
    for index, (provider, spec) in enumerate(table.items()):
        for raw in spec.mx_suffixes:
            suffix = "." + raw.lower().removesuffix(".").lstrip(".")
            if name.endswith(suffix) or name == suffix[1:]:
                candidate = (len(suffix), index, provider)
                best = candidate if best is None or candidate[:2] > best[:2] else best
    return None if best is None else best[2]


def _vary(data: st.DataObject, text: str) -> str:
    """`text` with random letters upper-cased and maybe one trailing dot."""
    flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    varied = "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))
    return varied + "." if data.draw(st.booleans()) else varied


@given(table=TABLES, host=HOSTS)
def test_matching_agrees_with_the_literal_rules(table: dict[str, ProviderDef], host: str) -> None:
    """The label walk finds what comparing against every suffix finds."""
    assert ProviderTable(table).by_host(host) == _reference_host(table, host)


@given(data=st.data(), table=TABLES, hosts=st.lists(HOSTS, max_size=4))
def test_case_and_one_trailing_dot_never_change_the_answer(
    data: st.DataObject, table: dict[str, ProviderDef], hosts: list[str]
) -> None:
    """Varying case and one trailing dot on hosts and on configured suffixes changes nothing."""
    varied_table = {
        name: ProviderDef(mx_suffixes=tuple(_vary(data, s) for s in spec.mx_suffixes))
        for name, spec in table.items()
    }
    varied_hosts = [_vary(data, h) for h in hosts]
    expected = ProviderTable(table).by_mx(hosts)
    assert ProviderTable(varied_table).by_mx(varied_hosts) == expected
    assert ProviderTable(table).by_mx(varied_hosts) == expected


@given(table=TABLES, hosts=st.lists(HOSTS, min_size=1, max_size=5))
def test_a_set_gets_p_iff_every_host_gets_p(
    table: dict[str, ProviderDef], hosts: list[str]
) -> None:
    """by_mx(hosts) is P exactly when every host on its own maps to P (and P is a provider)."""
    compiled = ProviderTable(table)
    each = {compiled.by_mx([h]) for h in hosts}
    expected = next(iter(each)) if len(each) == 1 else None
    assert compiled.by_mx(hosts) == expected
    for provider in compiled.names:
        assert (compiled.by_mx(hosts) == provider) == all(
            compiled.by_host(h) == provider for h in hosts
        )


@given(
    data=st.data(),
    domain=st.sampled_from(sorted(d for p in DEFAULT_PROVIDERS.values() for d in p.domains)),
)
def test_domain_case_and_trailing_dot_never_matter(data: st.DataObject, domain: str) -> None:
    """Every shipped domain is found whatever its case and with or without a trailing dot."""
    assert DEFAULT.by_domain(_vary(data, domain)) == DEFAULT.by_domain(domain) is not None


# ----- the resolver: caching -----


def test_answer_is_cached_for_its_ttl(server: DnsServer) -> None:
    """A second lookup within the TTL asks nobody; once `now_ms` reaches the TTL it asks again."""
    server.mx("tenant.example", ["tenant-example.mail.protection.outlook.com"], ttl_s=300)
    resolver = resolver_for(server)
    assert lookup(resolver, "tenant.example", T0_MS) == "microsoft-365"
    assert lookup(resolver, "Tenant.Example.", T0_MS + 299_999) == "microsoft-365"
    assert server.count("tenant.example") == 1
    assert lookup(resolver, "tenant.example", T0_MS + 300_000) == "microsoft-365"
    assert server.count("tenant.example") == 2


@pytest.mark.parametrize(
    ("ttl_s", "cached_ms"), [(5, 60_000), (0, 60_000), (10_000_000, 86_400_000)]
)
def test_ttl_is_clamped(server: DnsServer, ttl_s: int, cached_ms: int) -> None:
    """TTLs below 60 s count as 60 s, above a day as a day."""
    server.mx("clamp.example", ["mx.qq.com"], ttl_s=ttl_s)
    resolver = resolver_for(server)
    assert lookup(resolver, "clamp.example", T0_MS) == "qq"
    assert resolver.cached("clamp.example", T0_MS + cached_ms - 1) == "qq"
    assert resolver.cached("clamp.example", T0_MS + cached_ms) is None
    assert lookup(resolver, "clamp.example", T0_MS + cached_ms) == "qq"
    assert server.count("clamp.example") == 2


def test_clamp_limits_are_settings(server: DnsServer) -> None:
    """min_ttl_s and max_ttl_s are the resolver's to choose."""
    server.mx("short.example", ["mx.qq.com"], ttl_s=5)
    resolver = resolver_for(server, min_ttl_s=10, max_ttl_s=20)
    lookup(resolver, "short.example", T0_MS)
    assert resolver.cached("short.example", T0_MS + 9_999) == "qq"
    assert resolver.cached("short.example", T0_MS + 10_000) is None


def test_nxdomain_is_default_and_cached_for_the_soa_minimum(server: DnsServer) -> None:
    """NXDOMAIN -> default, remembered for the SOA's negative TTL."""
    server.soa_minimum_s = 120
    resolver = resolver_for(server)
    assert lookup(resolver, "no-such.example", T0_MS) == DEFAULT_PROVIDER
    assert lookup(resolver, "no-such.example", T0_MS + 119_999) == DEFAULT_PROVIDER
    assert server.count("no-such.example") == 1
    assert lookup(resolver, "no-such.example", T0_MS + 120_000) == DEFAULT_PROVIDER
    assert server.count("no-such.example") == 2


def test_negative_answer_without_soa_is_cached_for_the_default(server: DnsServer) -> None:
    """No SOA in the negative answer: cached for negative_ttl_s (300 s unless set)."""
    server.with_soa = False
    resolver = resolver_for(server)
    assert lookup(resolver, "no-soa.example", T0_MS) == DEFAULT_PROVIDER
    assert resolver.cached("no-soa.example", T0_MS + 299_999) == DEFAULT_PROVIDER
    assert resolver.cached("no-soa.example", T0_MS + 300_000) is None


def test_no_mx_records_is_default_and_cached(server: DnsServer) -> None:
    """A domain with an A record but no MX (NOERROR, no answer) is default, cached negatively."""
    server.set("a-only.example", "A", ["192.0.2.10"])
    server.soa_minimum_s = 600
    resolver = resolver_for(server)
    assert lookup(resolver, "a-only.example", T0_MS) == DEFAULT_PROVIDER
    assert resolver.cached("a-only.example", T0_MS + 599_999) == DEFAULT_PROVIDER
    assert resolver.cached("a-only.example", T0_MS + 600_000) is None
    assert server.count("a-only.example", "MX") == 1


def test_null_mx_is_cached_like_an_answer(server: DnsServer) -> None:
    """A null MX is `none` and cached for its TTL."""
    server.mx("nomail.example", ["."], ttl_s=3_600)
    resolver = resolver_for(server)
    assert lookup(resolver, "nomail.example", T0_MS) == NULL_MX
    assert resolver.cached("nomail.example", T0_MS + 3_599_999) == NULL_MX


def test_mixed_mx_set_is_default(server: DnsServer) -> None:
    """A vanity domain mixing Google and its own host is default (docs/providers.md rule 4)."""
    server.mx("vanity2.example", ["aspmx.l.google.com", "backup.vanity2.example"])
    assert lookup(resolver_for(server), "vanity2.example") == DEFAULT_PROVIDER


def test_domain_table_wins_over_mx(server: DnsServer) -> None:
    """A domain listed in the table is answered from it, whatever DNS says, without a query."""
    server.mx("gmail.com", ["mx.other-host.example"])
    table = ProviderTable(
        {
            **DEFAULT_PROVIDERS,
            "corp": ProviderDef(domains=("corp.example",), mx_suffixes=(".corp-mx.example",)),
        }
    )
    server.mx("corp.example", ["aspmx.l.google.com"])
    resolver = resolver_for(server, table)
    assert lookup(resolver, "GMAIL.COM.") == "google"
    assert lookup(resolver, "corp.example") == "corp"
    assert resolver.cached("gmail.com", T0_MS) == "google"
    assert server.total_queries == 0


def test_large_mx_set_falls_back_to_tcp(server: DnsServer) -> None:
    """An MX set too big for a 512-byte UDP reply comes back truncated and is fetched over TCP."""
    hosts = [f"mx{i:02d}-with-a-rather-long-name.mail.protection.outlook.com" for i in range(30)]
    server.mx("big.example", hosts)
    assert lookup(resolver_for(server), "big.example") == "microsoft-365"
    assert server.count("big.example", "MX") == 2  # once over UDP (truncated), once over TCP


# ----- the resolver: failures -----


def test_timeout_is_default_quickly_and_cached_briefly(server: DnsServer) -> None:
    """A server that never answers costs one lifetime, then default is cached for 30 s."""
    server.drop_all = True
    resolver = resolver_for(server, timeout_s=0.1, lifetime_s=0.3)
    started = time.perf_counter()
    assert lookup(resolver, "silent.example", T0_MS) == DEFAULT_PROVIDER
    assert time.perf_counter() - started < 2.0
    asked = server.count("silent.example")
    assert asked >= 1
    assert lookup(resolver, "silent.example", T0_MS + 29_999) == DEFAULT_PROVIDER
    assert server.count("silent.example") == asked
    assert resolver.cached("silent.example", T0_MS + 30_000) is None


def test_slow_answer_within_the_lifetime_is_used(server: DnsServer) -> None:
    """An answer late for one attempt but within the lifetime still counts."""
    server.mx("slow.example", ["mx.qq.com"])
    server.delay_s["slow.example"] = 0.15
    resolver = resolver_for(server, timeout_s=0.5, lifetime_s=1.0)
    assert lookup(resolver, "slow.example") == "qq"


def test_answer_later_than_the_lifetime_is_default(server: DnsServer) -> None:
    """An answer that arrives after the lifetime is no answer."""
    server.mx("too-slow.example", ["mx.qq.com"])
    server.delay_s["too-slow.example"] = 1.0
    resolver = resolver_for(server, timeout_s=0.1, lifetime_s=0.2)
    assert lookup(resolver, "too-slow.example") == DEFAULT_PROVIDER


def test_servfail_is_default_and_cached_for_error_ttl(server: DnsServer) -> None:
    """SERVFAIL -> default, remembered for error_ttl_s only."""
    server.mx("broken.example", ["mx.qq.com"])
    server.servfail.add("broken.example")
    resolver = resolver_for(server, error_ttl_s=45)
    assert lookup(resolver, "broken.example", T0_MS) == DEFAULT_PROVIDER
    assert resolver.cached("broken.example", T0_MS + 44_999) == DEFAULT_PROVIDER
    server.servfail.clear()
    assert lookup(resolver, "broken.example", T0_MS + 45_000) == "qq"


def test_unreachable_nameserver_is_default(server: DnsServer) -> None:
    """A nameserver port with nobody listening gives default, not an exception."""
    port = server.port
    server.stop()
    resolver = MxResolver(MX_ONLY, ["127.0.0.1"], port=port, timeout_s=0.1, lifetime_s=0.3)
    assert lookup(resolver, "nobody.example") == DEFAULT_PROVIDER


# ----- the resolver: concurrency, names, the cache bound -----


def test_concurrent_lookups_share_one_query(server: DnsServer) -> None:
    """Twenty callers asking for one domain at once cause one query and get one answer."""
    server.mx("popular.example", ["mx1.comcast.net", "mx2.comcast.net"])
    server.delay_s["popular.example"] = 0.05
    resolver = resolver_for(server)

    async def many() -> list[str]:
        return await asyncio.gather(
            *(resolver.provider("popular.example", T0_MS) for _ in range(20))
        )

    assert asyncio.run(many()) == ["comcast"] * 20
    assert server.count("popular.example") == 1


def test_a_caller_giving_up_does_not_cancel_the_shared_lookup(server: DnsServer) -> None:
    """One waiter timing out leaves the query running for the others."""
    server.mx("shared.example", ["mx.qq.com"])
    server.delay_s["shared.example"] = 0.1
    resolver = resolver_for(server)

    async def scenario() -> str:
        impatient = asyncio.wait_for(resolver.provider("shared.example", T0_MS), 0.01)
        patient = resolver.provider("shared.example", T0_MS)
        results = await asyncio.gather(impatient, patient, return_exceptions=True)
        assert isinstance(results[0], TimeoutError)
        assert isinstance(results[1], str)
        return results[1]

    assert asyncio.run(scenario()) == "qq"
    assert server.count("shared.example") == 1
    assert resolver.cached("shared.example", T0_MS) == "qq"


def test_aclose_cancels_lookups_in_flight(server: DnsServer) -> None:
    """aclose() ends pending lookups; their callers see CancelledError, nothing is cached."""
    server.drop_all = True
    resolver = resolver_for(server, timeout_s=5.0, lifetime_s=5.0)

    async def scenario() -> None:
        waiter = asyncio.create_task(resolver.provider("hang.example", T0_MS))
        assert await asyncio.to_thread(server.wait_for_query, "hang.example")
        await resolver.aclose()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    started = time.perf_counter()
    asyncio.run(scenario())
    assert time.perf_counter() - started < 2.0
    assert resolver.cache_size == 0


def test_cancel_stops_lookups_in_flight_without_waiting(server: DnsServer) -> None:
    """cancel() (the synchronous half of aclose) ends pending lookups; nothing is cached."""
    server.drop_all = True
    resolver = resolver_for(server, timeout_s=5.0, lifetime_s=5.0)

    async def scenario() -> None:
        waiter = asyncio.create_task(resolver.provider("hang.example", T0_MS))
        assert await asyncio.to_thread(server.wait_for_query, "hang.example")
        resolver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    started = time.perf_counter()
    asyncio.run(scenario())
    assert time.perf_counter() - started < 2.0
    assert resolver.cache_size == 0


def test_unicode_domain_is_queried_in_idna(server: DnsServer) -> None:
    """`Bücher.example` is asked for as `xn--bcher-kva.example` and cached under that name."""
    server.mx("xn--bcher-kva.example", ["mx00.gmx.net", "mx01.gmx.net"])
    resolver = resolver_for(server)
    assert lookup(resolver, "Bücher.example", T0_MS) == "gmx-webde"
    assert server.count("xn--bcher-kva.example", "MX") == 1
    assert resolver.cached("xn--bcher-kva.example", T0_MS) == "gmx-webde"
    assert resolver.cached("BÜCHER.example.", T0_MS) == "gmx-webde"


@pytest.mark.parametrize(
    "domain", ["", ".", "a..b", "exa mple.com", "a" * 64 + ".com", "\udcff.de"]
)
def test_invalid_domains_are_default_without_a_query(server: DnsServer, domain: str) -> None:
    """Names that cannot be host names are default and never reach DNS."""
    resolver = resolver_for(server)
    assert lookup(resolver, domain) == DEFAULT_PROVIDER
    assert resolver.cached(domain, T0_MS) == DEFAULT_PROVIDER
    assert server.total_queries == 0
    assert resolver.cache_size == 0


def test_cache_is_bounded_and_drops_the_least_recently_used(server: DnsServer) -> None:
    """With room for three, a fourth domain evicts the one used longest ago."""
    for name in ("d1", "d2", "d3", "d4"):
        server.mx(f"{name}.example", ["mx.qq.com"])
    resolver = resolver_for(server, max_entries=3)

    async def scenario() -> None:
        for name in ("d1", "d2", "d3"):
            await resolver.provider(f"{name}.example", T0_MS)
        assert resolver.cached("d1.example", T0_MS) == "qq"  # d1 is now the most recent
        await resolver.provider("d4.example", T0_MS)

    asyncio.run(scenario())
    assert resolver.cache_size == 3
    assert resolver.cached("d2.example", T0_MS) is None
    assert [resolver.cached(f"{n}.example", T0_MS) for n in ("d1", "d3", "d4")] == ["qq"] * 3
    lookup(resolver, "d2.example", T0_MS)
    assert server.count("d2.example") == 2


def test_cached_does_no_io(server: DnsServer) -> None:
    """cached() answers from the table or the cache, else None, without a query or a loop."""
    server.mx("fresh.example", ["mx.qq.com"])
    resolver = resolver_for(server, DEFAULT)
    assert resolver.cached("fresh.example", T0_MS) is None
    assert resolver.cached("Outlook.com.", T0_MS) == "microsoft-consumer"
    assert server.total_queries == 0
    assert resolver.cache_size == 0
    lookup(resolver, "fresh.example", T0_MS)
    assert resolver.cached("fresh.example", T0_MS + 1) == "qq"
    assert server.total_queries == 1


def test_expired_entries_leave_the_cache_when_looked_at(server: DnsServer) -> None:
    """An entry past its TTL is dropped on the next look, so cache_size shrinks."""
    server.mx("old.example", ["mx.qq.com"], ttl_s=60)
    resolver = resolver_for(server)
    lookup(resolver, "old.example", T0_MS)
    assert resolver.cache_size == 1
    assert resolver.cached("old.example", T0_MS + 60_000) is None
    assert resolver.cache_size == 0


# ----- construction -----


def test_system_reads_nameservers_from_resolv_conf(tmp_path: Path) -> None:
    """system_nameservers() takes the nameservers of a resolv.conf file, in order."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp.example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    resolver = MxResolver(DEFAULT, system_nameservers(str(conf)))
    assert resolver.nameservers == ("192.0.2.53", "2001:db8::53")
    assert resolver.table is DEFAULT


def test_system_without_nameservers_fails_at_start(tmp_path: Path) -> None:
    """A resolv.conf listing no nameserver is an error when the resolver is built."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp.example\n")
    with pytest.raises(dns.resolver.NoResolverConfiguration):
        system_nameservers(str(conf))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nameservers": []}, "at least one nameserver"),
        ({"min_ttl_s": 100, "max_ttl_s": 50}, "min_ttl_s <= max_ttl_s"),
        ({"max_entries": 0}, "max_entries must be at least 1"),
    ],
)
def test_bad_settings_are_rejected(settings: dict[str, Any], message: str) -> None:
    """Settings that cannot work raise ValueError at construction."""
    nameservers = settings.pop("nameservers", ["127.0.0.1"])
    with pytest.raises(ValueError, match=message):
        MxResolver(DEFAULT, nameservers, **settings)
