"""The daemon's side of the signal sources: build them from the plan, poll them, keep the facts.

`Poller` turns the plan's `signals` section into source objects (Postmaster Tools, SNDS,
blocklists), polls one on request and writes what it said into a `policy.SignalBook`: the
facts policy reads (spam rate, reputation, SNDS colour and block status, listings) and each
source's health (last good reading, failures, last error). A source that fails is recorded as
failed and never changes a fact, so a failing source can only ever make ramps hold (through
`stale_after`), never advance. Secrets (the SNDS key, OAuth tokens) stay inside the sources;
error texts reaching the book and the log are the sources' own, redacted ones.

Each HTTP source gets the plan's `max_body_bytes` and `deadline` as its `FetchLimits`: an
answer too large or too slow is a failed poll (`oversize`, `timeout`), and parsing runs off
the event loop, so a poll never holds up the daemon's decisions; cancelling a poll (shutdown)
stops it at its next await.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dns.exception
import httpx

from kiln.errors import KilnError
from kiln.log import get_logger
from kiln.mx import parse_nameservers
from kiln.records import SignalBook
from kiln.schedule import Plan
from kiln.signals import SourceError
from kiln.signals.dnsbl import DnsblReading, DnsblSource, Zone
from kiln.signals.http import FetchLimits
from kiln.signals.oauth import load_authorized_user
from kiln.signals.postmaster import PostmasterReading, PostmasterSource
from kiln.signals.snds import SndsReading, SndsSource
from kiln.signals.thread import SignalLoop

__all__ = ["SOURCES", "SOURCE_KINDS", "Poller", "SourceKind"]

#: Modules httpx (through httpcore) and dnspython import at their first request.
_FIRST_USE_IMPORTS = (
    "anyio._backends._asyncio",
    "httpcore._backends.anyio",
    "dns._asyncio_backend",
)

Sleep = Callable[[float], Awaitable[None]]


class Poller:
    """Polls the plan's signal sources into a SignalBook; see the module docstring."""

    def __init__(
        self,
        plan: Plan,
        *,
        now_ms: Callable[[], int],
        sleep: Sleep = asyncio.sleep,
        timeout_s: float = 20.0,
    ) -> None:
        self.plan = plan
        self.base = Path(plan.source).parent if plan.source else Path()
        self.now_ms = now_ms
        self.sleep = sleep
        self.log = get_logger(component="signals")
        self._client: httpx.AsyncClient | None = None
        self._timeout_s = timeout_s
        self._sources: dict[str, Any] = {}

    def replan(self, plan: Plan) -> None:
        """A reloaded plan: sources are rebuilt from it on their next poll (the HTTP client
        is kept; the sources only borrow it)."""
        self.plan = plan
        self.base = Path(plan.source).parent if plan.source else Path()
        self._sources.clear()

    def configured(self) -> list[str]:
        """Names of the sources the plan configures."""
        s = self.plan.signals
        return [n for n in SOURCES if getattr(s, n) is not None]

    def interval_ms(self, name: str) -> int:
        """How often `name` is polled."""
        spec = getattr(self.plan.signals, name)
        return int(spec.poll_every)

    def prepare(self) -> None:
        """Build the HTTP client now (its TLS context loads the CA certificates, tens of ms)
        and import what httpx and dnspython import at their first request, before the daemon
        serves, if any source is configured: done at the first poll, both stalled the event
        loop (about 30 ms)."""
        if self.configured():
            self.http()
            for module in _FIRST_USE_IMPORTS:
                try:
                    importlib.import_module(module)
                except ImportError:  # a dependency's layout changed: only the warm-up is lost
                    pass

    def _source(self, name: str) -> Any:
        """The source object, built on first use (config errors surface as poll failures)."""
        if name not in self._sources:
            self._sources[name] = SOURCE_KINDS[name].build(self, getattr(self.plan.signals, name))
        return self._sources[name]

    async def poll(
        self, name: str, book: SignalBook, now_ms: int, *, on: SignalLoop | None = None
    ) -> bool:
        """Poll one source into `book`; True when the reading was good. The fetch (network and
        parsing) runs on `on`, the signal sources' own loop, when given; the book is written
        here, by the caller's loop only."""
        try:
            fetch = self._fetch(name, now_ms)
            fetched = await (on.run(fetch) if on is not None else fetch)
            self._apply(name, fetched, book)
        except (SourceError, KilnError, httpx.HTTPError, OSError, dns.exception.DNSException) as e:
            book.failed(name, now_ms, str(e))
            h = book.health[name]
            self.log.error(
                "signal source failed; ramps it covers hold once it is stale",
                source=name,
                error=str(e),
                failures=h.failures,
                last_good_ms=h.last_good_ms,
            )
            return False
        book.good(name, now_ms)
        self.log.info("signal source read", source=name)
        return True

    async def _fetch(self, name: str, now_ms: int) -> Any:
        """What one source says (any loop; touches no book)."""
        spec = getattr(self.plan.signals, name)
        return await SOURCE_KINDS[name].fetch(self, self._source(name), spec, now_ms)

    def _apply(self, name: str, fetched: Any, book: SignalBook) -> None:
        """Write what a fetch found into `book` (SourceError: the reading is not good)."""
        SOURCE_KINDS[name].apply(self, fetched, book)

    def days(self, now_ms: int, back: int) -> list[date]:
        """The `back` local days before today, oldest first."""
        today = self.plan.local_date(now_ms)
        return [today - timedelta(days=i) for i in range(back, 0, -1)]

    def http(self) -> httpx.AsyncClient:
        """The HTTP client the sources share (built once)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False)
        return self._client

    def path(self, text: str) -> Path:
        """A path from the plan, relative to the plan's folder."""
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base / p

    async def aclose(self) -> None:
        """Close the HTTP client the sources share."""
        self._sources.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# ----- the sources: how each is built, fetched and written into the book -----


@dataclass(frozen=True, slots=True)
class SourceKind:
    """One kind of signal source: a new source is its module plus an entry in
    `SOURCE_KINDS` (and its settings in the plan's `signals` section).

    - `build(poller, spec)`: the source object from its plan settings (on first poll);
    - `fetch(poller, source, spec, now_ms)`: what it says, on the signal loop (no book);
    - `apply(poller, fetched, book)`: write that into the book, on the serving loop
      (SourceError: the reading is not good; facts written before it stay).
    """

    build: Callable[[Poller, Any], Any]
    fetch: Callable[[Poller, Any, Any, int], Awaitable[Any]]
    apply: Callable[[Poller, Any, SignalBook], None]


def _build_postmaster(p: Poller, pm: Any) -> PostmasterSource:
    return PostmasterSource(
        p.http(),
        load_authorized_user(p.path(pm.credentials)),
        pm.domains,
        now_ms=p.now_ms,
        base_url=pm.base_url,
        token_url=pm.token_url,
        versions=pm.api,
        with_compliance=False,  # policy does not read it (yet)
        limits=FetchLimits(max_body_bytes=pm.max_body_bytes, deadline_s=pm.deadline / 1000),
        sleep=p.sleep,
    )


def _build_snds(p: Poller, snds: Any) -> SndsSource:
    key_path = p.path(snds.key_file)
    try:
        key = key_path.read_text().strip()
    except OSError as e:
        raise KilnError(f"cannot read the SNDS key file {key_path}: {e.strerror}") from None
    if not key:
        raise KilnError(f"the SNDS key file {key_path} is empty")
    return SndsSource.legacy(
        p.http(),
        key,
        ips=p.plan.all_ips(),
        base_url=snds.base_url,
        now_ms=p.now_ms,
        limits=FetchLimits(max_body_bytes=snds.max_body_bytes, deadline_s=snds.deadline / 1000),
        sleep=p.sleep,
    )


def _build_dnsbl(p: Poller, spec: Any) -> DnsblSource:
    del p
    hosts, port = parse_nameservers(spec.nameservers)
    return DnsblSource([Zone.named(z) for z in spec.zones], hosts, port=port)


async def _fetch_days(p: Poller, src: Any, spec: Any, now_ms: int) -> list[tuple[date, Any]]:
    """One reading per day of the last `spec.days_back` local days, oldest first."""
    return [(day, await src.poll(day)) for day in p.days(now_ms, spec.days_back)]


async def _fetch_dnsbl(p: Poller, src: DnsblSource, spec: Any, now_ms: int) -> DnsblReading:
    del spec, now_ms
    return await src.poll(p.plan.all_ips())


def _apply_postmaster(
    p: Poller, fetched: list[tuple[date, PostmasterReading]], book: SignalBook
) -> None:
    del p
    failures: list[str] = []
    for day, reading in fetched:
        for domain, d in reading.domains.items():
            if not d.has_data:
                continue
            rate = d.spam_rate_for_threshold
            if rate is not None:
                SignalBook.put(book.spam_rate, domain, day, rate)
            if d.domain_reputation is not None:
                SignalBook.put(book.domain_reputation, domain, day, d.domain_reputation)
            for ip, category in d.ip_reputation.items():
                SignalBook.put(book.ip_reputation, ip, day, category)
        failures += [f"{f.domain}: {f.kind}: {f.message}" for f in reading.failed.values()]
    if failures:
        # Some domain could not be read: the source is not good (fail safe).
        raise SourceError("postmaster", "unavailable", "; ".join(sorted(set(failures))))


def _apply_snds(p: Poller, fetched: list[tuple[date, SndsReading]], book: SignalBook) -> None:
    del p
    blocked: dict[str, str] = {}
    for day, reading in fetched:
        for ip, row in (reading.ips or {}).items():
            if row.filter_result is not None:
                SignalBook.put(book.snds, ip, day, row.filter_result)
        for ip, status in reading.block_status.items():
            if status.blocked:
                blocked[ip] = status.reason or "blocked"
    book.snds_blocked = blocked


def _apply_dnsbl(p: Poller, reading: DnsblReading, book: SignalBook) -> None:
    for r in reading.results:
        if r.outcome in ("listed", "policy"):
            codes = ", ".join(f"{c.code} ({c.meaning})" for c in r.codes)
            text = f"{r.outcome} {codes}".strip()
        else:
            text = r.outcome
        book.dnsbl.setdefault(r.ip, {})[r.zone] = text
    if reading.resolver_error:
        p.log.error(
            "a blocklist answered with an error code: its answers count as unknown, "
            "check the resolver (public resolvers are refused by Spamhaus)"
        )


#: Every signal source, in the order they are polled at start.
SOURCE_KINDS: dict[str, SourceKind] = {
    "postmaster": SourceKind(_build_postmaster, _fetch_days, _apply_postmaster),
    "snds": SourceKind(_build_snds, _fetch_days, _apply_snds),
    "dnsbl": SourceKind(_build_dnsbl, _fetch_dnsbl, _apply_dnsbl),
}
SOURCES = tuple(SOURCE_KINDS)
