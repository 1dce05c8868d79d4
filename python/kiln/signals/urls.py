"""Where a signal source may send a credential: over https://, or plain http:// to loopback only.

An SNDS key travels in the URL, an OAuth client secret and refresh token in the token
request's form, an access token in the `Authorization` header: over plain http:// anyone on
the path reads them. kiln therefore refuses plain http:// for every URL that carries a
credential unless the host is loopback (`127.0.0.0/8`, `::1`, `localhost`), where the bytes
never leave the machine (the tests' fake servers, a local proxy that speaks TLS onwards).

The check runs twice: when a plan is loaded (`kiln.policyspec`, so `kiln check` and a reload
refuse the plan) and in the fetch layer before every request that carries a secret
(`kiln.signals.http.HttpFetcher`), for URLs that do not come from the plan (a credentials
file's `token_uri`, a caller's own source).

Standard library only, so plan checking does not import the HTTP client.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["LOOPBACK_RULE", "credential_url_problem", "is_loopback_host"]

#: The rule in one line, for messages.
LOOPBACK_RULE = "plain http:// is allowed only to loopback: 127.0.0.0/8, ::1, localhost"


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, an address in 127.0.0.0/8, or `::1` (brackets and a final dot ok)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def credential_url_problem(url: str, what: str) -> str | None:
    """Why `url` must not carry `what` (e.g. "the SNDS key"), or None when it may.

    https:// with a host is fine; http:// only to a loopback host; anything else is refused.
    The message names the scheme and the host, never the rest of the URL (a query string
    could hold a secret).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        return "is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}://" if scheme else "no scheme"
        return f"must be an https:// URL (got {shown})"
    if not host:
        return "has no host"
    if scheme == "https" or is_loopback_host(host):
        return None
    return f"plain http:// would send {what} unencrypted to {host}; use https:// ({LOOPBACK_RULE})"
