"""The fetch layer shared by the HTTP signal sources (Postmaster Tools, SNDS).

`HttpFetcher` wraps an `httpx.AsyncClient` (owned by the caller) and adds what every source
needs: a per-request timeout, retries with exponential backoff and jitter, `Retry-After`
(seconds or an HTTP-date, capped), and one mapping from HTTP outcomes to `SourceError` kinds:

| outcome | retried | kind when it gives up |
|---|---|---|
| 400 (and other 4xx not listed) | no | `client` |
| 401, 403 | no | `auth` |
| 404 | no | `not_found` |
| 408, 429 | yes | `rate_limited` (429) / `unavailable` (408) |
| 5xx, timeouts, connection errors | yes | `unavailable` |

Google's error envelope `{"error": {"code", "status", "message"}}` is read by `code` and
`status` only (the message text is not stable and never copied into errors); an OAuth error
body `{"error": "invalid_grant"}` is read by its code. Both land on `HttpError`.

Secrets: every URL and message that reaches an exception or a log line goes through
`redact()` first, which hides `key=`, `access_token=`, `refresh_token=`, `client_secret=`
values, `Bearer` tokens and their JSON forms, plus any literal secret registered with the
fetcher. Exceptions are raised `from None`, so no httpx object (which knows the full URL) is
chained to them. httpx's and httpcore's own loggers get a filter that redacts their records.
`Secret` holds a credential whose `repr()` and `str()` never show it.

Sleeping, randomness and the clock are injected, so tests never wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from kiln.clock import SystemClock
from kiln.log import get_logger
from kiln.signals import ErrorKind, SourceError

__all__ = [
    "REDACTED",
    "HttpError",
    "HttpFetcher",
    "RetryPolicy",
    "Secret",
    "parse_retry_after_s",
    "redact",
]

REDACTED = "<redacted>"

_SECRET_PARAM = re.compile(
    r"((?:^|[?&;\s\"'(,])(?:key|access_token|refresh_token|client_secret|id_token|code|"
    r"password|token)=)[^&\s\"'#,)]*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(bearer\s+)[^\s\"',;]+", re.IGNORECASE)
_SECRET_JSON = re.compile(
    r"([\"'](?:access_token|refresh_token|client_secret|id_token|key)[\"']\s*:\s*[\"'])[^\"']*",
    re.IGNORECASE,
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret-looking value replaced by `<redacted>`.

    Covers query parameters (`key=`, `access_token=`, `refresh_token=`, `client_secret=`,
    ...), `Bearer` tokens, JSON members with those names, and each literal in `secrets`.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _SECRET_PARAM.sub(rf"\1{REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    return _SECRET_JSON.sub(rf"\1{REDACTED}", text)


class Secret:
    """A credential: `reveal()` gives the value; `repr()`/`str()` never do."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        """Wrap `value`."""
        self._value = value

    def reveal(self) -> str:
        """The secret value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        """`Secret('<redacted>')`."""
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        """Equal to another Secret holding the same value."""
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        """Hash of the value (never shown)."""
        return hash(self._value)


class _RedactingFilter(logging.Filter):
    """Rewrites a stdlib log record so its message holds no secret (httpx logs full URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Render, redact, keep."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact(message)
        record.args = ()
        return True


_FILTER = _RedactingFilter()
for _name in (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
):
    _logger = logging.getLogger(_name)
    if _FILTER not in _logger.filters:
        _logger.addFilter(_FILTER)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one request tries.

    The n-th retry (n = 0, 1, ...) waits `min(backoff_max_s, backoff_base_s * 2**n)`, of
    which the share `jitter` is randomised (0 = fixed, 1 = "full jitter"). A `Retry-After`
    header replaces that wait, capped at `retry_after_max_s`.
    """

    max_attempts: int = 4
    timeout_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter: float = 0.5
    retry_after_max_s: float = 600.0

    def backoff_s(self, retry: int, rand: float) -> float:
        """The wait before retry number `retry` (0-based) given a uniform `rand` in [0, 1)."""
        base = min(self.backoff_max_s, self.backoff_base_s * (2.0 ** min(retry, 62)))
        return base * (1.0 - self.jitter) + base * self.jitter * rand


class HttpError(SourceError):
    """A source error that came from an HTTP answer (or the lack of one).

    `status_code` is the HTTP status (None for timeouts and connection errors),
    `api_status` Google's `error.status` (e.g. `PERMISSION_DENIED`), `oauth_error` the OAuth
    error code (e.g. `invalid_grant`), `retry_after_s` the server's Retry-After if any.
    """

    def __init__(
        self,
        source: str,
        kind: ErrorKind,
        message: str,
        *,
        status_code: int | None = None,
        api_status: str | None = None,
        oauth_error: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(source, kind, message)
        self.status_code = status_code
        self.api_status = api_status
        self.oauth_error = oauth_error
        self.retry_after_s = retry_after_s


def parse_retry_after_s(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when.timestamp() * 1000 - now_ms) / 1000)


_TOKENISH = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _error_codes(response: httpx.Response) -> tuple[str | None, str | None]:
    """(Google `error.status`, OAuth `error` code) from an error body, if it has them."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if isinstance(error, dict):
        status = error.get("status")
        return (status if isinstance(status, str) and _TOKENISH.match(status) else None), None
    if isinstance(error, str) and _TOKENISH.match(error):
        return None, error
    return None, None


_NO_RETRY_KIND: dict[int, ErrorKind] = {400: "client", 401: "auth", 403: "auth", 404: "not_found"}


class HttpFetcher:
    """Requests with retries for one source; the caller owns (and closes) `client`.

    `sleep` is awaited between attempts, `rand` gives uniform floats in [0, 1) for jitter, and
    `now_ms` turns an HTTP-date Retry-After into a wait. `secrets` are literals scrubbed from
    every message (add more with `add_secret`).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        source: str,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        now_ms: Callable[[], int] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.client = client
        self.source = source
        self.policy = policy if policy is not None else RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._now_ms = now_ms if now_ms is not None else SystemClock().now_ms
        self._secrets: list[str] = [s for s in secrets if s]
        self._log = get_logger(source=source)

    def __repr__(self) -> str:
        """Source and policy; never a secret."""
        return f"HttpFetcher(source={self.source!r}, policy={self.policy!r})"

    def add_secret(self, value: str) -> None:
        """Scrub `value` from every message this fetcher produces from now on."""
        if value and value not in self._secrets:
            self._secrets.append(value)

    def redact(self, text: str) -> str:
        """`redact()` with this fetcher's registered secrets."""
        return redact(text, self._secrets)

    def describe(self, method: str, url: str) -> str:
        """`GET https://host/path?...` with secrets hidden, for messages and logs."""
        return self.redact(f"{method} {url}")

    def error(self, kind: ErrorKind, message: str, **facts: Any) -> HttpError:
        """An `HttpError` for this source whose message is redacted."""
        return HttpError(self.source, kind, self.redact(message), **facts)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send until a 2xx comes back, retrying what may succeed later; raise `HttpError`.

        The returned response is fully read. Params are appended to `url` for messages.
        """
        shown = self.describe(method, str(httpx.URL(url, params=params) if params else url))
        policy = self.policy
        attempts = max(1, policy.max_attempts)
        last: HttpError | None = None
        for attempt in range(attempts):
            if attempt:
                assert last is not None
                delay_s = policy.backoff_s(attempt - 1, self._rand())
                if last.retry_after_s is not None:
                    delay_s = min(last.retry_after_s, policy.retry_after_max_s)
                self._log.warning(
                    "signal_fetch_retried",
                    request=shown,
                    attempt=attempt + 1,
                    delay_s=round(delay_s, 3),
                    reason=last.detail,
                )
                await self._sleep(delay_s)
            try:
                response = await self.client.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    data=data,
                    headers=headers,
                    timeout=policy.timeout_s,
                )
            except httpx.TimeoutException:
                last = self.error(
                    "unavailable", f"{shown}: no answer within {policy.timeout_s:g} s"
                )
                continue
            except httpx.TransportError as exc:
                last = self.error("unavailable", f"{shown}: {type(exc).__name__}")
                continue
            except httpx.HTTPError as exc:
                raise self.error("unavailable", f"{shown}: {type(exc).__name__}") from None
            code = response.status_code
            if 200 <= code < 300:
                return response
            last = self._status_error(shown, response)
            if code in _NO_RETRY_KIND or (400 <= code < 500 and code not in (408, 429)):
                break
        assert last is not None
        self._log.warning("signal_fetch_failed", request=shown, kind=last.kind, reason=last.detail)
        raise last

    def _status_error(self, shown: str, response: httpx.Response) -> HttpError:
        """The error a non-2xx answer stands for."""
        code = response.status_code
        api_status, oauth_error = _error_codes(response)
        retry_after_s = parse_retry_after_s(response.headers.get("retry-after"), self._now_ms())
        kind: ErrorKind
        if code in _NO_RETRY_KIND:
            kind = _NO_RETRY_KIND[code]
        elif code == 429:
            kind = "rate_limited"
        elif 400 <= code < 500 and code != 408:
            kind = "client"
        else:
            kind = "unavailable"
        parts = [f"{shown}: HTTP {code}"]
        if api_status:
            parts.append(api_status)
        if oauth_error:
            parts.append(oauth_error)
        return self.error(
            kind,
            " ".join(parts),
            status_code=code,
            api_status=api_status,
            oauth_error=oauth_error,
            retry_after_s=retry_after_s,
        )

    def json_body(self, response: httpx.Response, shown: str) -> Any:
        """The JSON in a 2xx response, or `bad_data`."""
        try:
            return response.json()
        except ValueError:
            raise self.error("bad_data", f"{shown}: the body is not JSON") from None
