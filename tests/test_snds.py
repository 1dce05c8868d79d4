"""Microsoft SNDS: the CSV parsers on the fixtures and every reference trap, and
`SndsSource.poll` against the loopback `FakeSnds` (HTML with 200, 404, retries, redaction)."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from fakeapis import FIXTURES, Failure, FakeSnds
from kiln.signals import SourceError
from kiln.signals.http import RetryPolicy
from kiln.signals.snds import (
    IpBlockStatus,
    IpStatusRange,
    IpStatusTable,
    SndsIpData,
    SndsReading,
    SndsSource,
    parse_data_csv,
    parse_ip_status_csv,
)

DAY = date(2026, 3, 10)
DATA = (FIXTURES / "snds_data.csv").read_bytes().decode()
STATUS = (FIXTURES / "snds_ipstatus.csv").read_bytes().decode()
_T = TypeVar("_T")


class Sleeps:
    """An injected sleep that records and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record."""
        self.calls.append(seconds)


def with_source(
    snds: FakeSnds,
    body: Callable[[SndsSource], Awaitable[_T]],
    *,
    key: str | None = None,
    sleeps: Sleeps | None = None,
    **settings: Any,
) -> _T:
    """Run `body(source)` with a legacy SndsSource pointed at `snds`."""
    settings.setdefault("policy", RetryPolicy(max_attempts=3, timeout_s=2.0))

    async def main() -> _T:
        async with httpx.AsyncClient() as client:
            source = SndsSource.legacy(
                client,
                key if key is not None else snds.key,
                base_url=snds.base_url,
                now_ms=lambda: 1_773_100_800_000,
                sleep=sleeps or Sleeps(),
                rand=lambda: 0.5,
                **settings,
            )
            return await body(source)

    return asyncio.run(main())


def poll(snds: FakeSnds, day: date = DAY, **kw: Any) -> SndsReading:
    """One poll."""
    return with_source(snds, lambda s: s.poll(day), **kw)


def poll_error(snds: FakeSnds, day: date = DAY, **kw: Any) -> SourceError:
    """The SourceError one poll raises."""
    with pytest.raises(SourceError) as info:
        poll(snds, day, **kw)
    return info.value


# ----- data.aspx ------------------------------------------------------------------------------


def test_data_fixture_exact() -> None:
    """Three rows, every column as written; trap hits 0 stays 0; empty text is None."""
    green, yellow, red = parse_data_csv(DATA)
    assert green == SndsIpData(
        ip="192.0.2.10",
        activity_start=datetime(2026, 3, 10, 6, 2),
        activity_end=datetime(2026, 3, 10, 21, 47),
        rcpt_commands=5230,
        data_commands=5198,
        recipients=5190,
        filter_result="GREEN",
        complaint_rate=0.001,
        complaint_rate_upper_bound=True,
        trap_start=None,
        trap_end=None,
        trap_hits=0,
        sample_helo="mta1.mail.example.com",
        sample_mail_from="bounce@mail.example.com",
        comments=None,
    )
    assert yellow.filter_result == "YELLOW" and yellow.trap_hits == 7
    assert (yellow.trap_start, yellow.trap_end) == (
        datetime(2026, 3, 10, 8, 15),
        datetime(2026, 3, 10, 19, 31),
    )
    assert (yellow.rcpt_commands, yellow.data_commands, yellow.recipients) == (48211, 48102, 47950)
    assert red == SndsIpData(
        ip="192.0.2.12",
        activity_start=datetime(2026, 3, 10, 7, 40),
        activity_end=datetime(2026, 3, 10, 11, 58),
        rcpt_commands=14121,
        data_commands=14121,
        recipients=12960,
        filter_result="RED",
        complaint_rate=0.001,
        complaint_rate_upper_bound=True,
        trap_start=datetime(2026, 3, 10, 8, 7),
        trap_end=datetime(2026, 3, 10, 11, 53),
        trap_hits=26,
        sample_helo=None,
        sample_mail_from=None,
        comments=None,
    )


ROW = "192.0.2.10,3/10/2026 12:05 PM,3/10/2026 12:59 AM,10,9,8,GREEN,0.4%,,,,,,"


def test_rates_clock_and_empty_trap_hits() -> None:
    """0.4% -> 0.004 exact; 12 PM is noon and 12 AM midnight; empty trap hits -> None."""
    (row,) = parse_data_csv(ROW)
    assert (row.complaint_rate, row.complaint_rate_upper_bound) == (0.004, False)
    assert row.activity_start == datetime(2026, 3, 10, 12, 5)
    assert row.activity_end == datetime(2026, 3, 10, 0, 59)
    assert row.trap_hits is None
    assert row.sample_helo is None and row.sample_mail_from is None and row.comments is None


def test_lf_blank_lines_no_final_newline_extra_columns_unknown_colour() -> None:
    """LF endings, stray blank lines, a missing final newline, extra columns, a new colour."""
    text = "\n\n" + ROW.replace("GREEN", "PURPLE") + ",extra,more\n\r\n" + DATA.splitlines()[0]
    first, second = parse_data_csv(text)
    assert first.filter_result == "PURPLE"
    assert second.ip == "192.0.2.10" and second.trap_hits == 0
    assert parse_data_csv("") == [] and parse_data_csv("\r\n\r\n") == []


def test_header_row_is_detected() -> None:
    """A header (legacy names, or the guessed 2026 ones with periods) is read by name."""
    legacy = (
        "IP Address,Activity Start,Activity End,RCPT Commands,DATA Commands,Message Recipients,"
        "Filter Result,Complaint Rate,Trap Message Start,Trap Message End,Trap Hits,Sample HELO,"
        "JMR P1 Sender,Comments\r\n" + DATA
    )
    assert parse_data_csv(legacy) == parse_data_csv(DATA)
    guessed = (
        "Ip Address,Activity period,RCPT commands,DATA commands,Message recipients,Filter result,"
        "Complaint rate,Trap message period,Trap hits,JMR P1 Sender,Comments\r\n"
        "192.0.2.11,3/10/2026 6:05 AM - 3/10/2026 9:51 PM,48211,48102,47950,YELLOW,< 0.1%,"
        ",,bounce@mail.example.com,\r\n"
    )
    (row,) = parse_data_csv(guessed)
    assert row.activity_end == datetime(2026, 3, 10, 21, 51)
    assert (row.recipients, row.filter_result, row.complaint_rate) == (47950, "YELLOW", 0.001)
    assert row.trap_hits is None and row.trap_start is None
    assert row.sample_mail_from == "bounce@mail.example.com" and row.sample_helo is None


@pytest.mark.parametrize(
    "text",
    [
        "not-an-ip,3/10/2026 6:02 AM,3/10/2026 9:47 PM,1,1,1,GREEN,< 0.1%,,,0,,,",
        "192.0.2.10,3/10/2026 16:02 PM,3/10/2026 9:47 PM,1,1,1,GREEN,< 0.1%,,,0,,,",
        "192.0.2.10,2026-03-10 06:02,3/10/2026 9:47 PM,1,1,1,GREEN,< 0.1%,,,0,,,",
        "192.0.2.10,3/10/2026 6:02 AM,3/10/2026 9:47 PM,many,1,1,GREEN,< 0.1%,,,0,,,",
        "192.0.2.10,3/10/2026 6:02 AM,3/10/2026 9:47 PM,1,1,1,GREEN,low,,,0,,,",
        "192.0.2.10,3/10/2026 6:02 AM,3/10/2026 9:47 PM,1,1,1,GREEN",
        "192.0.2.10,3/10/2026 6:02 AM,3/10/2026 9:47 PM,1,1,1,GREEN,< 0.1%,,,-1,,,",
        "a,\x00b",
    ],
)
def test_malformed_rows_are_bad_data(text: str) -> None:
    """Bad IPs, 24-hour times with PM, other date forms, words in counts, short rows."""
    with pytest.raises(SourceError) as info:
        parse_data_csv(text)
    assert info.value.kind == "bad_data" and info.value.source == "snds"


# ----- ipStatus.aspx ---------------------------------------------------------------------------


def test_ip_status_fixture_exact() -> None:
    """A single-IP Yes block and a /24 No (junked) range, reasons verbatim."""
    table = parse_ip_status_csv(STATUS)
    assert table.ranges == (
        IpStatusRange(
            "192.0.2.12",
            "192.0.2.12",
            True,
            "Blocked due to user complaints or other evidence of spamming",
        ),
        IpStatusRange(
            "198.51.100.0",
            "198.51.100.255",
            False,
            "Junked due to user complaints or other evidence of spamming",
        ),
    )
    assert table.blocked_reason("192.0.2.12") == (
        "Blocked due to user complaints or other evidence of spamming"
    )
    assert table.blocked_reason("192.0.2.10") is None
    assert table.blocked_reason("198.51.100.77") is None  # listed, but not blocked
    assert table.status("198.51.100.77") == IpBlockStatus(
        True, False, "Junked due to user complaints or other evidence of spamming"
    )
    assert table.status("203.0.113.1") == IpBlockStatus(False, False, None)


def test_ranges_compare_as_integers_across_octets() -> None:
    """Inclusive ranges that cross octet boundaries; never matched on the first IP alone."""
    table = parse_ip_status_csv(
        "192.0.2.250,198.51.100.3,Yes,SpamHaus SBL/XBL\n"
        "2001:db8::1:fffe,2001:db8::2:1,Yes,E-mail address harvesting\n"
        "203.0.113.5,203.0.113.9,No,Some new reason, with a comma\n"
    )
    assert table.blocked_reason("192.0.2.250") == "SpamHaus SBL/XBL"
    assert table.blocked_reason("192.0.3.0") == "SpamHaus SBL/XBL"
    assert table.blocked_reason("198.51.100.3") == "SpamHaus SBL/XBL"
    assert table.blocked_reason("198.51.100.4") is None
    assert table.blocked_reason("192.0.2.249") is None
    assert table.blocked_reason("2001:db8::2:0") == "E-mail address harvesting"
    assert table.blocked_reason("2001:db8::3:0") is None
    assert table.status("203.0.113.9").reason == "Some new reason, with a comma"
    assert table.status("203.0.113.10").listed is False


@pytest.mark.parametrize(
    "text",
    ["192.0.2.9,192.0.2.1,Yes,x", "192.0.2.1,2001:db8::1,Yes,x", "192.0.2.1,Yes", "nope,x,Yes,x"],
)
def test_bad_ip_status_rows(text: str) -> None:
    """Reversed or mixed-family ranges, short rows and non-IPs are bad_data."""
    with pytest.raises(SourceError) as info:
        parse_ip_status_csv(text)
    assert info.value.kind == "bad_data"


# ----- property tests --------------------------------------------------------------------------

_FIELD = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["192.0.2.10", "3/10/2026 6:02 AM", "< 0.1%", "0.4%", "12", "", "GREEN", "<html>"]
)


def _csv_text(rows: list[list[str]], newline: str) -> str:
    """Rows written as CSV with `newline` endings."""
    out = io.StringIO()
    csv.writer(out, lineterminator=newline).writerows(rows)
    return out.getvalue()


@given(
    st.lists(st.lists(_FIELD, min_size=0, max_size=16), max_size=4), st.sampled_from(["\r\n", "\n"])
)
def test_data_parser_never_crashes(rows: list[list[str]], newline: str) -> None:
    """Arbitrary rows give readings or SourceError(bad_data), nothing else."""
    try:
        parsed = parse_data_csv(_csv_text(rows, newline))
    except SourceError as exc:
        assert exc.kind == "bad_data"
    else:
        assert all(r.trap_hits is None or r.trap_hits >= 0 for r in parsed)


@given(st.text(max_size=200))
def test_parsers_never_crash_on_any_text(text: str) -> None:
    """Any text at all: a result or bad_data, for both parsers."""
    for parse in (parse_data_csv, parse_ip_status_csv):
        try:
            parse(text)
        except SourceError as exc:
            assert exc.kind == "bad_data"


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_range_match_is_numeric(a: int, b: int, probe: int) -> None:
    """An IP is in a range exactly when first <= ip <= last as integers."""
    import ipaddress

    low, high = sorted((a, b))
    first, last = ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)
    table = parse_ip_status_csv(f"{first},{last},Yes,r\r\n")
    ip = str(ipaddress.IPv4Address(probe))
    assert (table.blocked_reason(ip) == "r") == (low <= probe <= high)
    assert table.blocked_reason(str(first)) == "r" and table.blocked_reason(str(last)) == "r"


_SMALL_RANGE = st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([True, False]))


@given(st.lists(_SMALL_RANGE, max_size=12), st.lists(st.integers(0, 45), max_size=20))
def test_indexed_lookup_agrees_with_a_scan_of_every_range(
    spans: list[tuple[int, int, bool]], probes: list[int]
) -> None:
    """Overlapping, nested and repeated ranges: the indexed lookup gives what a scan of the
    ranges in file order gives (the first blocked range holding the IP, else the first one)."""
    ranges = tuple(
        IpStatusRange(f"10.0.0.{min(a, b)}", f"10.0.0.{max(a, b)}", blocked, f"r{i}")
        for i, (a, b, blocked) in enumerate(spans)
    )
    table = IpStatusTable(ranges)
    for probe in [*probes, *(a for a, _, _ in spans), *(b + 1 for _, b, _ in spans)]:
        ip = f"10.0.0.{probe}"
        holding = [r for r in ranges if ip in r]
        expected = next((r for r in holding if r.blocked is True), holding[0] if holding else None)
        assert table.lookup(ip) is expected
    assert table.lookup("2001:db8::1") is None and table.lookup("not an ip") is None


def test_status_of_many_ips_against_many_ranges_is_fast() -> None:
    """20,000 IPs against 20,000 ranges (a 4 MiB ipStatus is about 100,000): indexed, about
    half a second on a 2-core VM (asserted under 5 s), where a scan of every range per IP
    would take the better part of an hour."""
    ranges = tuple(
        IpStatusRange(f"10.{i >> 8}.{i & 255}.0", f"10.{i >> 8}.{i & 255}.127", i % 7 == 0, None)
        for i in range(20_000)
    )
    table = IpStatusTable(ranges)
    started = time.monotonic()
    statuses = [table.status(f"10.{i >> 8}.{i & 255}.{i % 256}") for i in range(20_000)]
    assert time.monotonic() - started < 5.0
    assert sum(s.listed for s in statuses) == sum(1 for i in range(20_000) if i % 256 < 128)


@given(
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 10**9),
    st.decimals(min_value=0, max_value=100, places=2),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_valid_rows_round_trip(
    month: int, day: int, hour: int, minute: int, count: int, rate: Any, traps: int | None
) -> None:
    """Rows written the SNDS way read back as the values that were written."""
    when = datetime(2026, month, day, hour, minute)
    stamp = f"{month}/{day}/2026 {(hour % 12) or 12}:{minute:02d} {'PM' if hour >= 12 else 'AM'}"
    row = [
        "192.0.2.11",
        stamp,
        stamp,
        str(count),
        str(count),
        str(count),
        "YELLOW",
        f"{rate}%",
        "",
        "",
        "" if traps is None else str(traps),
        "",
        "",
        "",
    ]
    (parsed,) = parse_data_csv(_csv_text([row], "\r\n"))
    assert parsed.activity_start == when and parsed.recipients == count
    assert parsed.trap_hits == traps
    assert parsed.complaint_rate == float(rate / 100)


# ----- the source against FakeSnds ------------------------------------------------------------


def test_poll_reads_data_and_status() -> None:
    """The fixture day: three IPs with their rows; block status for those and configured IPs."""
    with FakeSnds() as snds:
        reading = poll(snds, ips=["192.0.2.13"])
        paths = {r.path: r for r in snds.requests}
    assert paths["/snds/data.aspx"].query == {"key": [FakeSnds.KEY], "date": ["031026"]}
    assert paths["/snds/ipStatus.aspx"].query == {"key": [FakeSnds.KEY]}
    assert reading.ips is not None and list(reading.ips) == [
        "192.0.2.10",
        "192.0.2.11",
        "192.0.2.12",
    ]
    assert reading.ips["192.0.2.11"].filter_result == "YELLOW"
    assert reading.block_status["192.0.2.12"] == IpBlockStatus(
        True, True, "Blocked due to user complaints or other evidence of spamming"
    )
    assert reading.block_status["192.0.2.13"] == IpBlockStatus(False, False, None)
    assert reading.blocked_reason("192.0.2.12") is not None
    assert reading.data_error is None


def test_404_day_is_no_data_with_expiry_hint() -> None:
    """A day without data (404) while ipStatus works: ips None, the reason says the link may
    have expired; not retried."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        reading = poll(snds, date(2026, 3, 11), sleeps=sleeps)
        assert snds.count("data.aspx") == 1
    assert reading.ips is None
    assert reading.data_error is not None and "expired" in reading.data_error
    assert "30 days" in reading.data_error
    assert reading.block_status == {} and len(reading.ranges) == 2
    assert sleeps.calls == []


def test_expired_key_is_not_found() -> None:
    """Every request 404: poll raises not_found mentioning the expired link."""
    with FakeSnds() as snds:
        snds.expire_key()
        error = poll_error(snds)
        key = snds.key
    assert error.kind == "not_found" and "expired" in str(error)
    assert key not in str(error) and key not in repr(error)


@pytest.mark.parametrize("where", ["data.aspx", "ipStatus"])
def test_html_with_200_is_auth(where: str) -> None:
    """A 200 text/html page on either feed is auth, never zero rows."""
    with FakeSnds() as snds:
        snds.fail_path(where, Failure.html())
        error = poll_error(snds)
    assert error.kind == "auth" and "HTML" in str(error)


def test_html_without_html_content_type_is_auth() -> None:
    """A body starting with `<` after blanks is HTML whatever the Content-Type says."""
    with FakeSnds() as snds:
        snds.set_data(DAY, "\r\n  <html><body>Sign in</body></html>")
        assert poll_error(snds).kind == "auth"


def test_wrong_key_login_page_is_auth() -> None:
    """The wrong key gets the login page: auth, and neither key leaks."""
    with FakeSnds() as snds:
        error = poll_error(snds, key="ffffffff-wrong-key-0000")
    assert error.kind == "auth"
    assert "ffffffff-wrong-key-0000" not in str(error)


def test_garbage_csv_is_bad_data() -> None:
    """A 200 body that is not the CSV: bad_data."""
    with FakeSnds() as snds:
        snds.fail_path("data.aspx", Failure.garbage())
        assert poll_error(snds).kind == "bad_data"


def test_500_retried_then_unavailable_and_429_retry_after() -> None:
    """5xx is retried with backoff then unavailable; 429's Retry-After is what we sleep."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_path("ipStatus", Failure.server_error())
        assert poll_error(snds, sleeps=sleeps).kind == "unavailable"
        assert snds.count("ipStatus") == 3 and sleeps.calls == [0.75, 1.5]
        snds.clear_failures()
        sleeps.calls.clear()
        snds.fail_next(Failure.rate_limited(retry_after="42"), path="data.aspx")
        reading = poll(snds, sleeps=sleeps)
    assert reading.ips is not None and sleeps.calls == [42.0]


def test_timeout_is_timeout() -> None:
    """A server slower than the timeout: retried, then kind `timeout` (never a reading)."""
    with FakeSnds() as snds:
        snds.fail_path("data.aspx", Failure.slow(5.0))
        error = poll_error(snds, policy=RetryPolicy(max_attempts=2, timeout_s=0.2))
        assert snds.count("data.aspx") == 2
    assert error.kind == "timeout"


def test_key_never_in_errors_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The key (the URL is a credential) never reaches exceptions, reprs or any log."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with FakeSnds() as snds, capture_logs() as logs:
        snds.fail_next(Failure.server_error(), n=2)

        async def body(source: SndsSource) -> None:
            texts.extend([repr(source), repr(source.feed)])
            texts.append(repr(await source.poll(DAY)))
            for failure in (Failure.garbage(), Failure.html(), Failure.not_found()):
                snds.fail_next(failure, n=3, path="ipStatus")
                try:
                    await source.poll(DAY)
                except SourceError as exc:
                    texts.extend([str(exc), repr(exc)])

        with_source(snds, body)
        key = snds.key
    assert len(texts) == 9 and logs
    everything = "\n".join(texts) + caplog.text + "\n".join(repr(e) for e in logs)
    assert key not in everything
    assert "key=<redacted>" in caplog.text


class MemoryFeed:
    """An SndsFeed with no HTTP: what a future REST feed plugs into."""

    async def ip_data(self, day: date) -> list[SndsIpData]:
        """The fixture rows for the fixture day, else not_found."""
        if day != DAY:
            raise SourceError("snds", "not_found", "no data")
        return parse_data_csv(DATA)

    async def ip_status(self) -> IpStatusTable:
        """The fixture ranges."""
        return parse_ip_status_csv(STATUS)


def test_source_takes_any_feed() -> None:
    """SndsSource works with any SndsFeed implementation."""
    source = SndsSource(MemoryFeed(), ips=["192.0.2.12"])
    reading = asyncio.run(source.poll(DAY))
    assert reading.ips is not None and reading.ips["192.0.2.12"].filter_result == "RED"
    assert reading.block_status["192.0.2.12"].blocked is True
    assert asyncio.run(source.poll(date(2026, 3, 11))).ips is None
