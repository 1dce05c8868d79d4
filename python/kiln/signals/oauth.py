"""OAuth 2 access tokens for Google Postmaster Tools, from operator-supplied credentials.

kiln reads Google's `authorized_user` JSON (what `gcloud auth application-default login
--client-id-file=... --scopes=...` writes): `client_id`, `client_secret`, `refresh_token`,
and optionally `token_uri`. `TokenSource` trades the refresh token for an access token at the
token endpoint (`grant_type=refresh_token`), caches it until `refresh_margin_ms` before it
expires, and is told by the API client to drop it after a 401 (the client then retries once).

Token endpoint: the `token_url` argument if given, else the file's `token_uri`, else
`DEFAULT_TOKEN_URL`. The scopes the refresh token must have been granted are
`SCOPE_V1_READONLY` (v1 reputation and traffic stats) and `SCOPE_V2_TRAFFIC_READONLY`
(v2 domainStats and compliance); `SCOPE_DOMAIN` only to list domains.

File permissions: a credentials file readable by everyone (mode `o+r`) is still used, but
`load_authorized_user` logs `credentials_file_world_readable` as a warning, because refusing
to start over a mode bit would take the ramp's signals away on a restart. Fix it with
`chmod 600`.

Errors: a missing, unreadable or malformed file is a `CredentialsError` (a `ConfigError`)
naming the file and the missing key, never a value. An `invalid_grant` (refresh token revoked
or expired) or `invalid_client` answer is a `SourceError` of kind `auth`.

Limits: the token request goes through the source's `HttpFetcher`, so it has the source's
deadline, and its answer is bounded like every other one, at `TOKEN_MAX_BODY_BYTES` (a token
answer is well under a kilobyte) or the source's own limit if that is smaller; it is parsed
off the event loop. The client secret and refresh token travel in the form body, so the
fetcher refuses a plain http:// token endpoint that is not loopback (kind `client`).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import ConfigError
from kiln.log import get_logger
from kiln.signals.http import HttpError, HttpFetcher, Secret

__all__ = [
    "DEFAULT_TOKEN_URL",
    "SCOPE_DOMAIN",
    "SCOPE_V1_READONLY",
    "SCOPE_V2_TRAFFIC_READONLY",
    "TOKEN_MAX_BODY_BYTES",
    "AuthorizedUser",
    "CredentialsError",
    "TokenSource",
    "load_authorized_user",
]

DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105  (a URL, not a secret)
#: v1 (and v1beta1): everything kiln reads from v1.
SCOPE_V1_READONLY = "https://www.googleapis.com/auth/postmaster.readonly"
#: v2: domainStats.query, batchQuery, getComplianceStatus.
SCOPE_V2_TRAFFIC_READONLY = "https://www.googleapis.com/auth/postmaster.traffic.readonly"
#: v2: domains.get and domains.list (only needed to list domains).
SCOPE_DOMAIN = "https://www.googleapis.com/auth/postmaster.domain"

#: The largest token endpoint answer read (a real one is a few hundred bytes).
TOKEN_MAX_BODY_BYTES = 64 * 1024
#: Used when the token endpoint gives no `expires_in`.
_DEFAULT_LIFETIME_MS = 300_000
_AUTH_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope"}
)


class CredentialsError(ConfigError):
    """A credentials file kiln cannot use; the message names the file and the key, no value."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True, slots=True)
class AuthorizedUser:
    """Google `authorized_user` credentials; secrets are `Secret`s, hidden from repr()."""

    client_id: str
    client_secret: Secret = field(repr=False)
    refresh_token: Secret = field(repr=False)
    token_uri: str | None = None


def load_authorized_user(path: str | os.PathLike[str]) -> AuthorizedUser:
    """Read an `authorized_user` JSON file; warn if it is world-readable."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(file, "credentials file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(file, f"cannot read the credentials file ({reason})") from None
    if mode & stat.S_IROTH:
        get_logger().warning(
            "credentials_file_world_readable", path=str(file), fix=f"chmod 600 {file}"
        )
    try:
        data = json.loads(text)
    except ValueError:
        raise CredentialsError(file, "not a JSON file") from None
    if not isinstance(data, dict):
        raise CredentialsError(file, "expected a JSON object")
    kind = data.get("type")
    if kind is not None and kind != "authorized_user":
        shown = kind if isinstance(kind, str) and len(kind) < 40 else "?"
        raise CredentialsError(
            file, f'"type" is {shown!r}; kiln reads "authorized_user" credentials'
        )
    values: dict[str, str] = {}
    for key in ("client_id", "client_secret", "refresh_token"):
        value = data.get(key)
        if value is None:
            raise CredentialsError(file, f'missing key "{key}"')
        if not isinstance(value, str) or not value.strip():
            raise CredentialsError(file, f'"{key}" must be a non-empty string')
        values[key] = value.strip()
    token_uri = data.get("token_uri")
    if token_uri is not None and (not isinstance(token_uri, str) or not token_uri.strip()):
        raise CredentialsError(file, '"token_uri" must be a non-empty string')
    return AuthorizedUser(
        client_id=values["client_id"],
        client_secret=Secret(values["client_secret"]),
        refresh_token=Secret(values["refresh_token"]),
        token_uri=token_uri.strip() if isinstance(token_uri, str) else None,
    )


class TokenSource:
    """Access tokens for one set of credentials, refreshed when (nearly) expired or refused.

    `now_ms` is the clock. The fetcher's secrets list is given the client secret, the refresh
    token and each access token, so none of them can appear in its messages.
    """

    def __init__(
        self,
        credentials: AuthorizedUser,
        fetcher: HttpFetcher,
        *,
        now_ms: Callable[[], int],
        token_url: str | None = None,
        refresh_margin_ms: int = 60_000,
    ) -> None:
        self.credentials = credentials
        self.token_url = token_url or credentials.token_uri or DEFAULT_TOKEN_URL
        self._fetcher = fetcher
        self._now_ms = now_ms
        self._margin_ms = refresh_margin_ms
        self._token: Secret | None = None
        self._expires_at_ms = 0
        self._lock = asyncio.Lock()
        self.refresh_count = 0
        fetcher.add_secret(credentials.client_secret.reveal())
        fetcher.add_secret(credentials.refresh_token.reveal())

    def __repr__(self) -> str:
        """Token URL and client id only."""
        client_id = self.credentials.client_id
        return f"TokenSource(token_url={self.token_url!r}, client_id={client_id!r})"

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is still `token`, when given): the API refused it."""
        if self._token is not None and (token is None or self._token.reveal() == token):
            self._token = None
            self._expires_at_ms = 0

    async def token(self) -> str:
        """A valid access token, from the cache or a fresh refresh."""
        async with self._lock:
            now_ms = self._now_ms()
            if self._token is not None and now_ms < self._expires_at_ms - self._margin_ms:
                return self._token.reveal()
            return await self._refresh(now_ms)

    async def _refresh(self, now_ms: int) -> str:
        """POST grant_type=refresh_token and cache the answer."""
        fetcher = self._fetcher
        form = {
            "grant_type": "refresh_token",
            "client_id": self.credentials.client_id,
            "client_secret": self.credentials.client_secret.reveal(),
            "refresh_token": self.credentials.refresh_token.reveal(),
        }
        shown = fetcher.describe("POST", self.token_url)
        limit = min(fetcher.limits.max_body_bytes, TOKEN_MAX_BODY_BYTES)
        try:
            response = await fetcher.request(
                "POST", self.token_url, data=form, max_body_bytes=limit
            )
        except HttpError as exc:
            if exc.oauth_error in _AUTH_OAUTH_ERRORS or exc.status_code in (400, 401):
                what = exc.oauth_error or f"HTTP {exc.status_code}"
                raise fetcher.error(
                    "auth",
                    f"{shown}: the token endpoint refused the credentials ({what}); "
                    "create new authorized_user credentials",
                    status_code=exc.status_code,
                    oauth_error=exc.oauth_error,
                ) from None
            raise
        body = await fetcher.parse_json(response, shown)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise fetcher.error("bad_data", f"{shown}: no access_token in the answer")
        fetcher.add_secret(token)
        expires_in = body.get("expires_in")
        lifetime_ms = _DEFAULT_LIFETIME_MS
        if isinstance(expires_in, (int, float, str)) and not isinstance(expires_in, bool):
            try:
                lifetime_ms = max(0, int(float(expires_in) * 1000))
            except (ValueError, OverflowError):
                pass
        self._token = Secret(token)
        self._expires_at_ms = now_ms + lifetime_ms
        self.refresh_count += 1
        return token
