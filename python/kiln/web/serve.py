"""Start and stop the HTTP API inside the serving daemon (kiln.daemon.serving calls these)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web

from kiln.web.api import HttpSettings, make_app
from kiln.web.token import TokenError, read_or_make

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["DEFAULT_HTTP", "parse_address", "start_http"]

#: Where the API listens unless told otherwise: loopback only.
DEFAULT_HTTP = "127.0.0.1:8470"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8470` for IPv6) -> (host, port); ValueError naming the form."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 <= number <= 65535:
        raise ValueError(f"not HOST:PORT (e.g. 127.0.0.1:8470): {text!r}")
    return host, number


def is_loopback(host: str) -> bool:
    """Whether `host` names loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_http(d: Daemon, address: str, public: bool) -> web.AppRunner | None:
    """Serve the API at `address`; None (logged) when it cannot: kiln goes on deciding
    without it, since mail must not wait for a dashboard's port."""
    host, port = parse_address(address)
    if not public and not is_loopback(host):
        d.log.error("http_not_started", error=f"{host} is not loopback; add --http-public")
        return None
    try:
        token = read_or_make(d.config.state_dir)
    except TokenError as e:
        d.log.error("http_not_started", error=str(e))
        return None
    bound = [port]
    settings = HttpSettings(host=host, port=port, token=token, public=public)
    runner = web.AppRunner(make_app(d, settings, lambda: bound[0]), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, shutdown_timeout=2.0)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        d.log.error("http_not_started", address=address, error=e.strerror or str(e))
        return None
    bound[0] = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    d.log.info("http_listening", url=f"http://{shown}:{bound[0]}", public=public)
    return runner
