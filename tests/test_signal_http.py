"""The shared fetch layer: status mapping, retries, Retry-After, timeouts and redaction.

Requests go to the real loopback fakes of `fakeapis.py`; sleeps are recorded, never slept.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

import httpx
import pytest
from structlog.testing import capture_logs

from fakeapis import Failure, FakeGoogle, FakeSnds
from kiln.signals import SourceError
from kiln.signals.http import (
    REDACTED,
    HttpError,
    HttpFetcher,
    RetryPolicy,
    Secret,
    parse_retry_after_s,
    redact,
)

T0_MS = 1_773_100_800_000  # 2026-03-10T00:00:00Z
_T = TypeVar("_T")
FAST = RetryPolicy(max_attempts=3, timeout_s=2.0, backoff_base_s=1.0, backoff_max_s=8.0)


class Sleeps:
    """An injected sleep that records the waits and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record `seconds`."""
        self.calls.append(seconds)


def fetch_with(
    policy: RetryPolicy, body: Callable[[HttpFetcher], Awaitable[_T]], sleeps: Sleeps
) -> _T:
    """Run `body(fetcher)` on a fresh client and event loop."""

    async def main() -> _T:
        async with httpx.AsyncClient() as client:
            fetcher = HttpFetcher(
                client, "test", policy=policy, sleep=sleeps, rand=lambda: 0.5, now_ms=lambda: T0_MS
            )
            return await body(fetcher)

    return asyncio.run(main())


def snds_get(snds: FakeSnds, sleeps: Sleeps, policy: RetryPolicy = FAST) -> httpx.Response:
    """GET the fake's ipStatus page with the right key."""

    async def body(fetcher: HttpFetcher) -> httpx.Response:
        fetcher.add_secret(snds.key)
        return await fetcher.request(
            "GET", f"{snds.base_url}/ipStatus.aspx", params={"key": snds.key}
        )

    return fetch_with(policy, body, sleeps)


def failing(snds: FakeSnds, sleeps: Sleeps, policy: RetryPolicy = FAST) -> HttpError:
    """The HttpError an ipStatus GET raises."""
    with pytest.raises(HttpError) as info:
        snds_get(snds, sleeps, policy)
    return info.value


# ----- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET https://h/snds/data.aspx?key=abc-123&date=031026", "abc-123"),
        ("https://h/x?date=031026&key=abc-123", "abc-123"),
        ("POST /token access_token=ya29.zzz&x=1", "ya29.zzz"),
        ("refresh_token=1//0abc client_secret=GOCSPX-1", "1//0abc"),
        ("refresh_token=1//0abc client_secret=GOCSPX-1", "GOCSPX-1"),
        ("Authorization: Bearer ya29.tok-en_123", "ya29.tok-en_123"),
        ('{"access_token": "ya29.json", "expires_in": 3599}', "ya29.json"),
        ("{'refresh_token': '1//dict'}", "1//dict"),
    ],
)
def test_redact_hides_secret_values(text: str, secret: str) -> None:
    """Query keys, Bearer tokens and JSON members named like secrets lose their values."""
    out = redact(text)
    assert secret not in out
    assert REDACTED in out


def test_redact_keeps_the_rest_and_scrubs_literals() -> None:
    """Other parameters stay readable; registered literals are scrubbed wherever they are."""
    out = redact("https://h/snds/data.aspx?key=K1&date=031026 path/K2/x", ["K2"])
    assert out == f"https://h/snds/data.aspx?key={REDACTED}&date=031026 path/{REDACTED}/x"


def test_secret_never_shows_itself() -> None:
    """repr() and str() of a Secret hide the value; reveal() gives it."""
    secret = Secret("s3cr3t")
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret)
    assert secret.reveal() == "s3cr3t"
    assert secret == Secret("s3cr3t") and secret != Secret("other")


# ----- Retry-After and backoff -------------------------------------------------------------


def test_retry_after_seconds_and_http_date() -> None:
    """Delta-seconds as given; an HTTP-date relative to now_ms; garbage is None."""
    assert parse_retry_after_s("7", T0_MS) == 7.0
    when = datetime.fromtimestamp(T0_MS / 1000 + 90, UTC)
    assert parse_retry_after_s(format_datetime(when, usegmt=True), T0_MS) == 90.0
    past = datetime.fromtimestamp(T0_MS / 1000 - 90, UTC)
    assert parse_retry_after_s(format_datetime(past, usegmt=True), T0_MS) == 0.0
    assert parse_retry_after_s("soon", T0_MS) is None
    assert parse_retry_after_s(None, T0_MS) is None


def test_backoff_doubles_with_jitter_and_caps() -> None:
    """Exponential, capped at backoff_max_s, the jitter share randomised."""
    policy = RetryPolicy(backoff_base_s=1.0, backoff_max_s=8.0, jitter=0.5)
    assert [policy.backoff_s(n, 0.0) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [policy.backoff_s(n, 1.0) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert RetryPolicy(jitter=0.0).backoff_s(2, 0.9) == 4.0


# ----- status mapping against a real server -------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"), [(400, "client"), (401, "auth"), (403, "auth"), (404, "not_found")]
)
def test_client_errors_are_not_retried(code: int, kind: str) -> None:
    """400/401/403/404 give up at once with their kind."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_path("ipStatus", Failure.status_code(code))
        error = failing(snds, sleeps)
        assert snds.count("ipStatus") == 1
    assert error.kind == kind and error.status_code == code
    assert sleeps.calls == []


def test_429_honours_retry_after_then_succeeds() -> None:
    """The injected sleep gets exactly the Retry-After value, then the retry succeeds."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_next(Failure.rate_limited(retry_after="7"), n=1)
        response = snds_get(snds, sleeps)
        assert snds.count("ipStatus") == 2
    assert response.status_code == 200
    assert sleeps.calls == [7.0]


def test_429_http_date_retry_after_and_cap() -> None:
    """An HTTP-date Retry-After is turned into seconds, and capped at retry_after_max_s."""
    when = format_datetime(datetime.fromtimestamp(T0_MS / 1000 + 30, UTC), usegmt=True)
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_next(Failure.rate_limited(retry_after=when), n=1)
        snds.fail_next(Failure.rate_limited(retry_after="86400"), n=1)
        snds_get(snds, sleeps, RetryPolicy(max_attempts=3, retry_after_max_s=120.0))
    assert sleeps.calls == [30.0, 120.0]


def test_429_until_exhausted_is_rate_limited() -> None:
    """429 on every attempt -> rate_limited, after max_attempts requests."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_path("ipStatus", Failure.rate_limited(retry_after="3"))
        error = failing(snds, sleeps)
        assert snds.count() == FAST.max_attempts
    assert error.kind == "rate_limited" and error.retry_after_s == 3.0
    assert sleeps.calls == [3.0, 3.0]


def test_500_is_retried_with_backoff_then_unavailable() -> None:
    """5xx is retried with exponential backoff (rand 0.5: 0.75 s, 1.5 s), then unavailable."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_path("ipStatus", Failure.server_error(503))
        error = failing(snds, sleeps)
        assert snds.count() == 3
    assert error.kind == "unavailable" and error.status_code == 503
    assert sleeps.calls == [0.75, 1.5]


def test_500_then_success() -> None:
    """One 500 then a good answer: the caller sees the good answer."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        snds.fail_next(Failure.server_error())
        assert snds_get(snds, sleeps).status_code == 200
    assert len(sleeps.calls) == 1


def test_timeout_is_retried_then_timeout() -> None:
    """A server slower than the per-request timeout: retried, then kind `timeout`."""
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=2, timeout_s=0.2)
    with FakeSnds() as snds:
        snds.fail_path("ipStatus", Failure.slow(5.0))
        error = failing(snds, sleeps, policy)
        assert snds.count() == 2
    assert error.kind == "timeout" and error.status_code is None
    assert "no answer within 0.2 s" in str(error)


def test_connection_refused_is_unavailable() -> None:
    """Nothing listening: retried, then unavailable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()

    async def body(fetcher: HttpFetcher) -> httpx.Response:
        return await fetcher.request("GET", f"http://127.0.0.1:{port}/x?key=K")

    with pytest.raises(HttpError) as info:
        fetch_with(FAST, body, sleeps)
    assert info.value.kind == "unavailable" and len(sleeps.calls) == 2


def test_google_envelope_is_read_by_code_and_status_only() -> None:
    """403 PERMISSION_DENIED is kept as api_status; Google's free-text message is not copied."""
    sleeps = Sleeps()
    with FakeGoogle() as google:

        async def body(fetcher: HttpFetcher) -> httpx.Response:
            return await fetcher.request("GET", f"{google.base_url}/v1/domains/x/trafficStats")

        google.fail_next(Failure.forbidden())
        with pytest.raises(HttpError) as info:
            fetch_with(FAST, body, sleeps)
    error = info.value
    assert (error.kind, error.status_code, error.api_status) == ("auth", 403, "PERMISSION_DENIED")
    assert "does not have permission" not in str(error)
    assert isinstance(error, SourceError) and error.source == "test"


def test_no_secret_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The key never reaches an exception, its cause, structlog lines or httpx's own log lines."""
    sleeps = Sleeps()
    caplog.set_level(logging.DEBUG)
    with FakeSnds() as snds, capture_logs() as logs:
        snds.fail_path("ipStatus", Failure.server_error())
        error = failing(snds, sleeps)
        key = snds.key
    assert key not in str(error) and key not in repr(error)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    assert logs and all(key not in repr(entry) for entry in logs)
    assert {e["event"] for e in logs} >= {"signal_fetch_retried", "signal_fetch_failed"}
    assert key not in caplog.text
    assert any("ipStatus.aspx" in r.getMessage() for r in caplog.records)


def test_fetcher_repr_has_no_secret() -> None:
    """repr(fetcher) names the source and policy only."""
    seen: list[str] = []

    async def body(fetcher: HttpFetcher) -> None:
        fetcher.add_secret("hunter2")
        seen.append(repr(fetcher))
        seen.append(fetcher.describe("GET", "https://h/p?x=hunter2"))

    fetch_with(FAST, body, Sleeps())
    assert all("hunter2" not in s for s in seen)


def test_json_body_garbage_is_bad_data() -> None:
    """A 2xx whose body is not JSON is bad_data."""
    sleeps = Sleeps()
    with FakeGoogle() as google:

        async def body(fetcher: HttpFetcher) -> Any:
            response = await fetcher.request("POST", google.token_url, data={"a": "b"})
            return fetcher.json_body(response, "POST token")

        google.fail_next(Failure.garbage(), path="/token")
        with pytest.raises(SourceError) as info:
            fetch_with(FAST, body, sleeps)
    assert info.value.kind == "bad_data"


def test_answers_are_buffered_whole_and_uncompressed_is_asked_for() -> None:
    """A 2xx comes back fully read (content, charset, status) after streaming; requests ask
    for `Accept-Encoding: identity` unless the caller says otherwise."""
    sleeps = Sleeps()
    with FakeSnds() as snds:
        response = snds_get(snds, sleeps)

        async def body(fetcher: HttpFetcher) -> httpx.Response:
            return await fetcher.request(
                "GET",
                f"{snds.base_url}/ipStatus.aspx",
                params={"key": snds.key},
                headers={"accept-encoding": "gzip"},
            )

        fetch_with(FAST, body, sleeps)
        first, second = snds.requests
    assert response.status_code == 200 and response.encoding == "utf-8"
    assert response.content.decode().startswith("192.0.2.12,192.0.2.12,Yes")
    assert first.headers["accept-encoding"] == "identity"
    assert second.headers["accept-encoding"] == "gzip"
