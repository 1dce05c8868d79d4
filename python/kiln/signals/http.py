"""The fetch layer shared by the HTTP signal sources (Postmaster Tools, SNDS).

`HttpFetcher` wraps an `httpx.AsyncClient` (owned by the caller) and adds what every source
needs: bounded answers, retries with exponential backoff and jitter, `Retry-After` (seconds or
an HTTP-date, capped), and one mapping from HTTP outcomes to `SourceError` kinds:

| outcome | retried | kind when it gives up |
|---|---|---|
| 400 (and other 4xx not listed) | no | `client` |
| 401, 403 | no | `auth` |
| 404 | no | `not_found` |
| 408, 429 | yes | `rate_limited` (429) / `unavailable` (408) |
| 5xx, connection errors | yes | `unavailable` |
| a 2xx body over `FetchLimits.max_body_bytes` | no | `oversize` |
| no complete answer within `FetchLimits.deadline_s`, a connect/read timeout | yes | `timeout` |
| a credential about to go over plain http:// to a non-loopback host | no | `client` |

Bounded answers (`FetchLimits`, per source): the body is streamed, never read whole first. A
`Content-Length` over the limit is refused before a byte of the body is read; a body that
grows past it is dropped as soon as it does (memory stays near the limit, whatever the server
sends). Oversize is not retried: the same request a few seconds later gets the same answer;
the source is marked failed and the next poll asks again. Each attempt (connect, request,
headers and the whole body) has one wall-clock deadline: httpx's read timeout restarts with
every byte, so a server trickling a byte a second would never trip it; the deadline does
(the slow-drip guard). A timed-out attempt is retried like a 5xx. Non-2xx bodies are read up
to `ERROR_BODY_BYTES` only (their error code is all kiln uses). Requests ask for
`Accept-Encoding: identity`, so the limit counts what the server sends; a compressed answer is
still decoded and counted after decoding.

Parsing runs off the event loop: `off_loop(fn, ...)` runs a parser in a daemon thread of its
own, and the sources decode and parse every body there (`HttpFetcher.parse_json`). Parsers
are pure functions of the body: they never touch the engine or the daemon's state.

Google's error envelope `{"error": {"code", "status", "message"}}` is read by `code` and
`status` only (the message text is not stable and never copied into errors); an OAuth error
body `{"error": "invalid_grant"}` is read by its code. Both land on `HttpError`.

Secrets: every URL and message that reaches an exception or a log line goes through
`redact()` first, which hides `key=`, `access_token=`, `refresh_token=`, `client_secret=`
values, `Bearer` tokens and their JSON forms, plus any literal secret registered with the
fetcher. Exceptions are raised `from None`, so no httpx object (which knows the full URL) is
chained to them. httpx's and httpcore's own loggers get a filter that redacts their records.
`Secret` holds a credential whose `repr()` and `str()` never show it. A request that carries
a credential (a registered secret anywhere in it, an `Authorization` header, or a parameter
named like one) is refused over plain http:// unless the host is loopback
(`kiln.signals.urls`); redirects are never followed.

Sleeping, randomness and the clock are injected, so tests never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import json as jsonlib
import logging
import random
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import httpx

from kiln.clock import SystemClock
from kiln.log import get_logger
from kiln.signals import ErrorKind, SourceError
from kiln.signals.urls import LOOPBACK_RULE, is_loopback_host

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_BODY_BYTES",
    "ERROR_BODY_BYTES",
    "REDACTED",
    "FetchLimits",
    "HttpError",
    "HttpFetcher",
    "RetryPolicy",
    "Secret",
    "format_bytes",
    "off_loop",
    "parse_retry_after_s",
    "redact",
]

REDACTED = "<redacted>"
#: A 2xx body larger than this is `oversize` (per source, `signals.*.max_body_bytes`).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: One attempt, connect to last body byte (per source, `signals.*.deadline`).
DEFAULT_DEADLINE_S = 30.0
#: How much of a non-2xx body is read (only its error code is used); the rest is dropped.
ERROR_BODY_BYTES = 64 * 1024
_P = ParamSpec("_P")
_R = TypeVar("_R")

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
    header replaces that wait, capped at `retry_after_max_s`. `timeout_s` is httpx's
    per-phase timeout (connect, each read, each write); the whole attempt is bounded by
    `FetchLimits.deadline_s` as well.
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


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """What one HTTP attempt of a source may cost.

    `max_body_bytes`: the largest 2xx body accepted (after content decoding); larger is
    `oversize`, not retried. `deadline_s`: wall-clock seconds for one attempt, from connect
    to the last body byte; past it the attempt is abandoned (`timeout`, retried). A call's
    worst case is about `max_attempts * deadline_s` plus the backoff waits.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    deadline_s: float = DEFAULT_DEADLINE_S

    def __post_init__(self) -> None:
        """Both limits must be positive."""
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")


def format_bytes(count: int) -> str:
    """`4194304` -> `4 MiB`, `1536` -> `1.5 KiB`, `100` -> `100 bytes`."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{count} bytes"


async def off_loop(fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """`fn(*args, **kwargs)` in a worker thread of its own, so the event loop keeps running.

    For CPU work on a body (decoding, CSV and JSON parsing, lookups over a parsed body): `fn`
    must be pure, touching neither the engine nor anything the event loop owns. The thread is
    a daemon thread: if the awaiting task is cancelled (a reload, a shutdown), `fn` runs to
    its end (bounded by the body limit) and its result is dropped, and it never holds up the
    process's exit. Its exception, if any, is raised in the awaiting task.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_R] = loop.create_future()
    context = contextvars.copy_context()

    def deliver(result: _R | None, error: Exception | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: _R | None = None
        error: Exception | None = RuntimeError("the parser thread ended without a result")
        try:
            result, error = context.run(fn, *args, **kwargs), None
        except Exception as exc:  # noqa: BLE001  (forwarded: raised in the awaiting task)
            error = exc
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name=f"kiln-parse-{_thread_name(fn)}", daemon=True).start()
    return await future


def _thread_name(fn: Callable[..., Any]) -> str:
    """A short name for a parser thread."""
    return str(getattr(fn, "__name__", type(fn).__name__))[:40]


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
#: Parameter and form-field names whose values are credentials.
_SECRET_NAMES = re.compile(
    r"^(?:key|api_?key|access_token|refresh_token|client_secret|id_token|password|token)$",
    re.IGNORECASE,
)
#: Headers that carry credentials.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
#: Response headers that describe the wire form of a body we hand on decoded and whole.
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class _Oversize(Exception):
    """A 2xx body over the limit (caught inside `HttpFetcher`)."""

    def __init__(self, declared: int | None) -> None:
        super().__init__(declared)
        self.declared = declared


async def _read_body(response: httpx.Response, limit: int, *, truncate: bool) -> bytes:
    """The body, streamed, at most `limit` bytes (decoded).

    Over the limit: `_Oversize` at once (a `Content-Length` over it before any body byte is
    read), or with `truncate`, the first `limit` bytes and the rest left unread.
    """
    declared_text = response.headers.get("content-length", "")
    declared = int(declared_text) if declared_text.strip().isdigit() else None
    if declared is not None and declared > limit and not truncate:
        raise _Oversize(declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if not truncate:
                raise _Oversize(declared)
            chunks.append(chunk[: len(chunk) - (size - limit)])
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _buffered(response: httpx.Response, body: bytes) -> httpx.Response:
    """A plain, fully read Response with `body` (already decoded) in place of the stream."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _WIRE_HEADERS]
    return httpx.Response(
        response.status_code, headers=headers, content=body, request=response.request
    )


class HttpFetcher:
    """Requests with retries and limits for one source; the caller owns (and closes) `client`.

    `limits` bound every answer (size, and a deadline per attempt); `sleep` is awaited between
    attempts, `rand` gives uniform floats in [0, 1) for jitter, and `now_ms` turns an
    HTTP-date Retry-After into a wait. `secrets` are literals scrubbed from every message (add
    more with `add_secret`); a request carrying one never goes over plain http:// to a
    non-loopback host.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        source: str,
        *,
        policy: RetryPolicy | None = None,
        limits: FetchLimits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        now_ms: Callable[[], int] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.client = client
        self.source = source
        self.policy = policy if policy is not None else RetryPolicy()
        self.limits = limits if limits is not None else FetchLimits()
        self._sleep = sleep
        self._rand = rand
        self._now_ms = now_ms if now_ms is not None else SystemClock().now_ms
        self._secrets: list[str] = [s for s in secrets if s]
        self._log = get_logger(source=source)

    def __repr__(self) -> str:
        """Source, policy and limits; never a secret."""
        return (
            f"HttpFetcher(source={self.source!r}, policy={self.policy!r}, limits={self.limits!r})"
        )

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

    def carries_secret(
        self,
        url: httpx.URL,
        *,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether a request would send a credential: a registered secret anywhere in it, a
        credential header, or a query parameter or form field named like one."""
        if any(name.lower() in _SECRET_HEADERS for name in headers or {}):
            return True
        names = [name for name, _ in url.params.multi_items()] + list(data or {})
        if any(_SECRET_NAMES.match(name) for name in names):
            return True
        if not self._secrets:
            return False
        texts = [str(url), *(data or {}).values(), *(headers or {}).values()]
        if json is not None:
            texts.append(jsonlib.dumps(json, default=str))
        return any(secret in text for secret in self._secrets for text in texts)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_body_bytes: int | None = None,
    ) -> httpx.Response:
        """Send until a 2xx comes back, retrying what may succeed later; raise `HttpError`.

        The returned response is fully read (at most `max_body_bytes`, default the fetcher's
        limit) and decoded. Params are appended to `url` for messages.
        """
        try:
            target = httpx.URL(url, params=params) if params else httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise self.error("client", f"{method} {url}: not a valid URL") from None
        shown = self.describe(method, str(target))
        if (
            target.scheme != "https"
            and not is_loopback_host(target.host)
            and self.carries_secret(target, json=json, data=data, headers=headers)
        ):
            refused = self.error(
                "client",
                f"{shown}: refusing to send a credential over plain {target.scheme}:// to "
                f"{target.host or '?'}; use https:// ({LOOPBACK_RULE})",
            )
            self._log.error("signal_fetch_refused", request=shown, reason=refused.detail)
            raise refused
        limit = self.limits.max_body_bytes if max_body_bytes is None else max_body_bytes
        setting = f"signals.{self.source}.max_body_bytes" if max_body_bytes is None else None
        sent = dict(headers or {})
        if not any(name.lower() == "accept-encoding" for name in sent):
            sent["Accept-Encoding"] = "identity"  # the limit counts what the server sends
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
            outcome = await self._attempt(
                method,
                url,
                shown,
                limit,
                setting,
                params=params,
                json=json,
                data=data,
                headers=sent,
            )
            if isinstance(outcome, HttpError):
                last = outcome
                if outcome.kind in ("timeout", "unavailable") and outcome.status_code is None:
                    continue  # no answer: retried
                break  # oversize: retrying gets the same answer
            code = outcome.status_code
            if 200 <= code < 300:
                return outcome
            last = self._status_error(shown, outcome)
            if code in _NO_RETRY_KIND or (400 <= code < 500 and code not in (408, 429)):
                break
        assert last is not None
        self._log.warning("signal_fetch_failed", request=shown, kind=last.kind, reason=last.detail)
        raise last

    async def _attempt(
        self,
        method: str,
        url: str,
        shown: str,
        limit: int,
        setting: str | None,
        *,
        params: Mapping[str, str | int] | None,
        json: Any,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str],
    ) -> httpx.Response | HttpError:
        """One exchange within the deadline: the buffered response, or why there is none.

        `setting` names the plan key that sets `limit` (for the message), if one does.
        Raises `HttpError` only for failures no retry can mend.
        """
        deadline_s = self.limits.deadline_s
        timeout_s = min(self.policy.timeout_s, deadline_s)
        try:
            async with asyncio.timeout(deadline_s):
                async with self.client.stream(
                    method,
                    url,
                    params=params,
                    json=json,
                    data=data,
                    headers=headers,
                    timeout=timeout_s,
                    follow_redirects=False,
                ) as response:
                    ok = 200 <= response.status_code < 300
                    cap = limit if ok else min(limit, ERROR_BODY_BYTES)
                    try:
                        body = await _read_body(response, cap, truncate=not ok)
                    except _Oversize as exc:
                        declared = f" (it declares {exc.declared} bytes)" if exc.declared else ""
                        where = f" ({setting})" if setting else ""
                        return self.error(
                            "oversize",
                            f"{shown}: the answer is larger than the {format_bytes(limit)} "
                            f"limit{declared}; dropped unread{where}",
                            status_code=response.status_code,
                        )
                    return _buffered(response, body)
        except TimeoutError:
            return self.error(
                "timeout",
                f"{shown}: no complete answer within the {deadline_s:g} s deadline (connect, "
                f"headers and body; signals.{self.source}.deadline)",
            )
        except httpx.TimeoutException:
            return self.error("timeout", f"{shown}: no answer within {timeout_s:g} s")
        except httpx.TransportError as exc:
            return self.error("unavailable", f"{shown}: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            raise self.error("unavailable", f"{shown}: {type(exc).__name__}") from None

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
        """The JSON in a 2xx response, or `bad_data`. CPU-bound: call it through `parse_json`
        (or `off_loop`) for anything but a small body."""
        try:
            return response.json()
        except (ValueError, RecursionError):
            raise self.error("bad_data", f"{shown}: the body is not JSON") from None

    async def parse_json(
        self,
        response: httpx.Response,
        shown: str,
        parse: Callable[[Any], _R] | None = None,
    ) -> Any:
        """`parse(json_body(response))` (or the JSON itself) computed off the event loop."""

        def work() -> Any:
            body = self.json_body(response, shown)
            return body if parse is None else parse(body)

        return await off_loop(work)
