"""Recipient domain -> mailbox provider: the static domain table, then the MX rollup.

Matching rules: docs/providers.md. `ProviderTable` is the pure part: it matches a
domain or a set of MX host names against the providers' domains and MX suffixes, with no I/O.
`MxResolver` is the daemon's part: it looks a domain up in the table, then in its cache, then
asks DNS for the MX set (dnspython's asyncio resolver), and never raises for DNS trouble: what
it cannot resolve is `DEFAULT_PROVIDER`. `MxLookups` runs the daemon's background lookups
through one resolver: a bounded queue, a bounded number in flight, results to a callback.

Time is an argument: cache expiry is decided against the caller's `now_ms`; only the DNS
query's own timeout runs on wall time, inside dnspython.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from kiln.errors import KilnError
from kiln.log import get_logger
from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS

if TYPE_CHECKING:
    from kiln.schedule import Plan

__all__ = [
    "NULL_MX",
    "MxLookups",
    "MxResolver",
    "OnRoute",
    "ProviderLike",
    "ProviderTable",
    "ascii_domain",
    "parse_nameservers",
    "system_nameservers",
]

#: What a domain with a null MX (RFC 7505: a single MX of ".") maps to: it accepts no mail.
NULL_MX = "none"

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_NAME_CHARS = 253
_MAX_LABEL_CHARS = 63


class ProviderLike(Protocol):
    """Anything that names a provider's recipient domains and MX host suffixes.

    `kiln.provider.ProviderDef` and `kiln.schedule.ProviderSpec` both qualify.
    """

    @property
    def domains(self) -> Sequence[str]:
        """Recipient domains that belong to the provider outright."""
        ...

    @property
    def mx_suffixes(self) -> Sequence[str]:
        """MX host suffixes (or exact host names) that identify the provider."""
        ...


def ascii_domain(domain: str) -> str | None:
    """`domain` as the resolver sees it: lower-case ASCII (IDNA), one trailing dot removed.

    Surrounding white space is ignored. Returns None for what cannot be a host name: empty,
    an empty or over-long label, characters other than letters, digits, `-`, `_` and `.`, or
    unicode that the IDNA codec rejects.
    """
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    name = name.lower()
    if not name or len(name) > _MAX_NAME_CHARS or not _HOST_CHARS.issuperset(name):
        return None
    if any(not label or len(label) > _MAX_LABEL_CHARS for label in name.split(".")):
        return None
    return name


def _host(host: str) -> str:
    """An MX host name as matched: lower-case, one trailing dot gone (docs/providers.md rule 2)."""
    name = host.lower()
    return name[:-1] if name.endswith(".") else name


def _suffix(suffix: str) -> str | None:
    """A configured suffix as matched: lower-case, no trailing dot, one leading dot."""
    name = suffix.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.startswith("."):
        name = "." + name
    if not name[1:].isascii():
        try:
            name = "." + name[1:].encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if len(name) > 1 else None


class ProviderTable:
    """Providers' recipient domains and MX suffixes, compiled for matching. Pure: no I/O.

    When two providers list the same domain or the same suffix, the one later in the mapping
    wins, so a plan's own providers (added after the shipped ones) take precedence.
    """

    __slots__ = ("_domains", "_names", "_suffixes")

    def __init__(self, providers: Mapping[str, ProviderLike]) -> None:
        """Compile `providers` (provider name -> its domains and MX suffixes)."""
        self._domains: dict[str, str] = {}
        self._suffixes: dict[str, str] = {}
        for name, spec in providers.items():
            for domain in spec.domains:
                key = ascii_domain(domain)
                if key is not None:
                    self._domains[key] = name
            for suffix in spec.mx_suffixes:
                key = _suffix(suffix)
                if key is not None:
                    self._suffixes[key] = name
        self._names = frozenset(providers)

    @classmethod
    def default(cls) -> ProviderTable:
        """The providers kiln ships (`kiln.provider.DEFAULT_PROVIDERS`)."""
        return cls(DEFAULT_PROVIDERS)

    @classmethod
    def from_plan(cls, plan: Plan) -> ProviderTable:
        """The shipped providers, extended and overridden by the plan's `providers` section."""
        return cls(plan.provider_table())

    @property
    def names(self) -> frozenset[str]:
        """Every provider name in the table."""
        return self._names

    def by_domain(self, domain: str) -> str | None:
        """The provider that lists `domain` itself (docs/providers.md rule 7), or None.

        Case, one trailing dot and unicode vs. IDNA spelling make no difference.
        """
        key = ascii_domain(domain)
        return None if key is None else self._domains.get(key)

    def by_host(self, host: str) -> str | None:
        """The provider whose longest matching suffix (or exact name) ends `host`, or None."""
        name = _host(host)
        return self._match(name) if name else None

    def by_mx(self, hosts: Sequence[str]) -> str | None:
        """The provider of a domain whose MX set is `hosts`, or None for the default.

        `NULL_MX` for a null MX (exactly one host, `.`). Otherwise every host must map to the
        same provider (longest suffix wins per host); a mixed set, a host matching nothing,
        or an empty list gives None.
        """
        if isinstance(hosts, str):
            raise TypeError("by_mx takes a sequence of host names, not one string")
        names = [_host(h) for h in hosts]
        if len(names) == 1 and not names[0]:
            return NULL_MX
        found: str | None = None
        for name in names:
            provider = self._match(name) if name else None
            if provider is None or (found is not None and provider != found):
                return None
            found = provider
        return found

    def _match(self, name: str) -> str | None:
        """Longest configured suffix of a normalised, non-empty host name, exact name first."""
        hit = self._suffixes.get("." + name)
        if hit is not None:
            return hit
        i = name.find(".")
        while i != -1:
            hit = self._suffixes.get(name[i:])
            if hit is not None:
                return hit
            i = name.find(".", i + 1)
        return None


def _clamp(value: int, low: int, high: int) -> int:
    """`value` limited to [low, high]."""
    return max(low, min(high, value))


def _negative_ttl_s(response: dns.message.Message | None) -> int | None:
    """RFC 2308 negative TTL: min(SOA TTL, SOA minimum) from the authority section, if any."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            minimum: int = rrset[0].minimum
            return min(int(rrset.ttl), minimum)
    return None


class MxResolver:
    """Recipient domain -> provider for the daemon: domain table, cache, then an MX query.

    One instance per daemon, used from one event loop. Concurrent lookups of one domain
    share one query. Results are cached per domain:

    - an MX answer for its TTL, clamped to [`min_ttl_s`, `max_ttl_s`];
    - NXDOMAIN and "no MX records" as `DEFAULT_PROVIDER`, for the SOA's negative TTL (or
      `negative_ttl_s` when the reply has no SOA), clamped the same way;
    - timeouts, SERVFAIL and other failures as `DEFAULT_PROVIDER` for `error_ttl_s`, so a
      dead resolver costs one short wait per domain per `error_ttl_s`, not one per message.

    The cache holds at most `max_entries` domains and drops the least recently used first.
    """

    def __init__(
        self,
        table: ProviderTable,
        nameservers: Sequence[str],
        *,
        port: int = 53,
        timeout_s: float = 1.0,
        lifetime_s: float = 2.0,
        min_ttl_s: int = 60,
        max_ttl_s: int = 86_400,
        negative_ttl_s: int = 300,
        error_ttl_s: int = 30,
        max_entries: int = 100_000,
    ) -> None:
        """Ask `nameservers` (IP addresses) on `port`.

        `timeout_s` bounds one attempt at one server, `lifetime_s` the whole lookup.
        """
        if not nameservers:
            raise ValueError("MxResolver needs at least one nameserver")
        if not 0 <= min_ttl_s <= max_ttl_s:
            raise ValueError(f"need 0 <= min_ttl_s <= max_ttl_s, got {min_ttl_s}, {max_ttl_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.timeout = timeout_s
        resolver.lifetime = lifetime_s
        self._resolver = resolver
        self._table = table
        self._min_ttl_s = min_ttl_s
        self._max_ttl_s = max_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._error_ttl_s = error_ttl_s
        self._max_entries = max_entries
        # domain -> (provider, expires_ms); order is recency of use, oldest first.
        self._cache: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._in_flight: dict[str, asyncio.Task[tuple[str, int]]] = {}

    @property
    def table(self) -> ProviderTable:
        """The provider table consulted before DNS."""
        return self._table

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The nameservers asked, in order."""
        return tuple(str(ns) for ns in self._resolver.nameservers)

    @property
    def cache_size(self) -> int:
        """Domains held in the cache (expired ones included until looked up or evicted)."""
        return len(self._cache)

    def cached(self, domain: str, now_ms: int) -> str | None:
        """The provider if known without DNS (domain table or unexpired cache entry), else None.

        Never does I/O. An invalid domain is `DEFAULT_PROVIDER`, as `provider()` would say.
        """
        known = self._known(ascii_domain(domain), now_ms)
        return None if known is None else known[0]

    async def provider(self, domain: str, now_ms: int) -> str:
        """The provider of recipient `domain`: a table name, `NULL_MX` or `DEFAULT_PROVIDER`.

        Never raises for DNS problems: NXDOMAIN, no MX, timeouts, SERVFAIL and domains that
        are not valid host names all give `DEFAULT_PROVIDER`.
        """
        return (await self.route(domain, now_ms))[0]

    async def route(self, domain: str, now_ms: int) -> tuple[str, int]:
        """`provider(domain)` and the instant (ms) until which that answer holds.

        The daemon pushes both into the engine, which answers from them until they expire.
        Domain-table answers hold for `max_ttl_s` (the table changes only with the plan).
        """
        key = ascii_domain(domain)
        known = self._known(key, now_ms)
        if known is not None:
            return known
        assert key is not None  # an invalid domain is known: DEFAULT_PROVIDER
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.create_task(self._lookup(key, now_ms), name=f"kiln-mx:{key}")
            self._in_flight[key] = task
        # A caller that gives up must not cancel the lookup others are waiting for.
        return await asyncio.shield(task)

    def _known(self, key: str | None, now_ms: int) -> tuple[str, int] | None:
        """(provider, expires_ms) without DNS: an invalid domain, the table, or the cache."""
        if key is None:
            return DEFAULT_PROVIDER, now_ms + self._error_ttl_s * 1000
        table_hit = self._table.by_domain(key)
        if table_hit is not None:
            return table_hit, now_ms + self._max_ttl_s * 1000
        return self._cache_get(key, now_ms)

    def cancel(self) -> None:
        """Cancel lookups still in flight (their callers see CancelledError); no waiting."""
        for task in self._in_flight.values():
            task.cancel()

    async def aclose(self) -> None:
        """Cancel lookups still in flight and wait for them to finish."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()

    def _cache_get(self, key: str, now_ms: int) -> tuple[str, int] | None:
        """Unexpired cached (provider, expires_ms) of a normalised domain, refreshing its
        recency."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if now_ms >= entry[1]:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _cache_put(self, key: str, provider: str, ttl_s: int, now_ms: int) -> None:
        """Remember a result for `ttl_s` from `now_ms`, evicting the least recently used."""
        self._cache[key] = (provider, now_ms + ttl_s * 1000)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _lookup(self, key: str, now_ms: int) -> tuple[str, int]:
        """Query the MX set of `key`, cache the outcome and return (provider, expires_ms)."""
        try:
            provider, ttl_s = await self._query(key)
            self._cache_put(key, provider, ttl_s, now_ms)
            return provider, now_ms + ttl_s * 1000
        finally:
            self._in_flight.pop(key, None)

    async def _query(self, key: str) -> tuple[str, int]:
        """(provider, seconds to cache it) for one MX query of a normalised domain."""
        qname = dns.name.from_text(key)
        try:
            answer = await self._resolver.resolve(
                qname, dns.rdatatype.MX, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as error:
            # dnspython keeps the NXDOMAIN reply (with its SOA) in the exception's kwargs.
            responses: Mapping[dns.name.Name, dns.message.Message] = (
                error.kwargs.get("responses") or {}
            )
            return DEFAULT_PROVIDER, self._negative(_negative_ttl_s(responses.get(qname)))
        except (dns.exception.DNSException, OSError):
            # Timeout, SERVFAIL/REFUSED from every server, malformed replies, no route.
            return DEFAULT_PROVIDER, self._error_ttl_s
        if answer.rrset is None or len(answer.rrset) == 0:
            # The domain exists but publishes no MX: mail goes to its A record (RFC 5321 5.1).
            return DEFAULT_PROVIDER, self._negative(_negative_ttl_s(answer.response))
        hosts = [rdata.exchange.to_text() for rdata in answer.rrset]
        provider = self._table.by_mx(hosts)
        ttl_s = _clamp(answer.chaining_result.minimum_ttl, self._min_ttl_s, self._max_ttl_s)
        return (DEFAULT_PROVIDER if provider is None else provider), ttl_s

    def _negative(self, soa_ttl_s: int | None) -> int:
        """Seconds to cache a negative answer."""
        ttl_s = self._negative_ttl_s if soa_ttl_s is None else soa_ttl_s
        return _clamp(ttl_s, self._min_ttl_s, self._max_ttl_s)


#: `on_route(domain, provider, expires_ms)`: `provider` is a table name or `DEFAULT_PROVIDER`,
#: None for a null MX; the answer holds until `expires_ms`.
OnRoute = Callable[[str, "str | None", int], None]


class _FailureLog:
    """Failed lookups as log lines: once per domain, at most `per_minute` lines a minute.

    The domains already logged are remembered (the last `remember` of them). A failure not
    logged (domain already logged, or over the rate) is counted, and the count goes with the
    next line that is written as `suppressed`.
    """

    __slots__ = ("_count", "_log", "_per_minute", "_remember", "_seen", "_suppressed", "_window")

    def __init__(self, log: Any, per_minute: int, remember: int = 1024) -> None:
        """Write through `log` (a structlog logger)."""
        self._log = log
        self._per_minute = per_minute
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window = -60_000
        self._count = 0
        self._suppressed = 0

    def note(self, domain: str, error: BaseException, now_ms: int) -> bool:
        """Log the failure of `domain` if it is the first and the rate allows; True if logged."""
        if domain in self._seen:
            self._seen.move_to_end(domain)
            self._suppressed += 1
            return False
        if now_ms - self._window >= 60_000:
            self._window, self._count = now_ms, 0
        if self._count >= self._per_minute:
            self._suppressed += 1  # not remembered: its next failure may still be logged
            return False
        self._count += 1
        self._seen[domain] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._log.warning(
            "mx lookup failed",
            domain=domain,
            error=f"{type(error).__name__}: {error}",
            suppressed=self._suppressed,
        )
        self._suppressed = 0
        return True


class MxLookups:
    """The daemon's background MX lookups: bounded in flight, bounded waiting, no task per domain.

    `feed()` takes the domains the engine saw without a route (`Engine.take_unresolved()`);
    at most `max_in_flight` are looked up at once (through `resolver.route`, so the domain
    table and the resolver's cache answer first) and at most `max_waiting` wait. Beyond that a
    new domain is dropped and counted: it keeps counting as `default` and is fed again when
    the engine sees it again. A domain already waiting or in flight is ignored.

    Each answer goes to `on_route(domain, provider, expires_ms)` on the event loop, with None
    as the provider of a null MX. An exception from the lookup or the callback is counted in
    `failed` and logged once per domain, at most `failure_logs_per_minute` lines a minute.

    At most `max_in_flight` worker tasks exist, only while there is work: they end when the
    queue is empty, and the queue's memory goes with them. The lookups own `resolver`:
    `close()` / `aclose()` stop everything, including the resolver's queries in flight.
    Used from one event loop.
    """

    def __init__(
        self,
        resolver: MxResolver,
        on_route: OnRoute,
        now_ms: Callable[[], int],
        *,
        max_in_flight: int = 32,
        max_waiting: int = 10_000,
        failure_logs_per_minute: int = 10,
    ) -> None:
        """Look up through `resolver`; `now_ms()` is the time each lookup starts at."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must not be negative, got {max_waiting}")
        self._resolver = resolver
        self._on_route = on_route
        self._now_ms = now_ms
        self._max_in_flight = max_in_flight
        self._max_waiting = max_waiting
        self._waiting: deque[str] = deque()
        # Every domain waiting or in flight (for the duplicate check).
        self._queued: set[str] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._failures = _FailureLog(get_logger(component="mx"), failure_logs_per_minute)
        self._closed = False
        # Counters (read them, do not set them): lookups running now; since the start,
        # domains dropped because `max_waiting` were waiting, answers given to `on_route`,
        # lookups that raised; the most ever in flight and waiting at once.
        self.in_flight = 0
        self.dropped = 0
        self.done = 0
        self.failed = 0
        self.peak_in_flight = 0
        self.peak_waiting = 0

    @property
    def resolver(self) -> MxResolver:
        """The resolver the lookups go through."""
        return self._resolver

    @property
    def max_in_flight(self) -> int:
        """The most lookups running at once."""
        return self._max_in_flight

    @property
    def max_waiting(self) -> int:
        """The most domains waiting for a free lookup slot."""
        return self._max_waiting

    @property
    def waiting(self) -> int:
        """Domains queued and not yet started."""
        return len(self._waiting)

    @property
    def workers(self) -> int:
        """Worker tasks alive (0 when idle)."""
        return len(self._workers)

    @property
    def closed(self) -> bool:
        """True after `close()`: nothing more is looked up or reported."""
        return self._closed

    def stats(self) -> dict[str, int]:
        """The counters, named for the daemon's `stats` reply."""
        return {
            "mx_in_flight": self.in_flight,
            "mx_waiting": self.waiting,
            "mx_dropped": self.dropped,
            "mx_done": self.done,
            "mx_failed": self.failed,
            "mx_peak_in_flight": self.peak_in_flight,
            "mx_peak_waiting": self.peak_waiting,
        }

    @staticmethod
    def idle_stats() -> dict[str, int]:
        """`stats()` with every counter 0: what a daemon without lookups (no nameserver)
        reports, so the reply has the same keys either way."""
        return {
            "mx_in_flight": 0,
            "mx_waiting": 0,
            "mx_dropped": 0,
            "mx_done": 0,
            "mx_failed": 0,
            "mx_peak_in_flight": 0,
            "mx_peak_waiting": 0,
        }

    def feed(self, domains: Iterable[str]) -> int:
        """Queue `domains` for lookup; returns how many were queued (new and with room).

        Call on the event loop. Returns at once: the lookups run in the background.
        """
        if self._closed:
            return 0
        queued = 0
        waiting, seen, room = self._waiting, self._queued, self._max_waiting
        for domain in domains:
            if domain in seen:
                continue
            if len(waiting) >= room:
                self.dropped += 1
                continue
            seen.add(domain)
            waiting.append(domain)
            queued += 1
        self.peak_waiting = max(self.peak_waiting, len(waiting))
        self._spawn()
        return queued

    def _spawn(self) -> None:
        """Start workers until every waiting domain has one, up to `max_in_flight`."""
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        while len(self._workers) < self._max_in_flight:
            idle = len(self._workers) - self.in_flight
            if idle >= len(self._waiting):
                return
            task = loop.create_task(self._work(), name="kiln-mx-lookups")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        """Take waiting domains one at a time until none is left (then the task ends)."""
        while self._waiting and not self._closed:
            domain = self._waiting.popleft()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                provider, expires_ms = await self._resolver.route(domain, self._now_ms())
                self._on_route(domain, None if provider == NULL_MX else provider, expires_ms)
                self.done += 1
            except Exception as error:  # noqa: BLE001 - one bad domain must not stop the worker
                self.failed += 1
                self._failures.note(domain, error, self._now_ms())
            finally:
                self.in_flight -= 1
                self._queued.discard(domain)
                if not self._queued:
                    self._queued = set()  # a burst's hash table is not kept
            # An answer from the cache never suspends: let the loop serve between domains.
            await asyncio.sleep(0)

    def close(self) -> None:
        """Stop at once: forget the waiting domains, cancel the workers and the resolver's
        queries. No `on_route` call happens after this. Safe to call twice; needs the loop."""
        self._closed = True
        self._waiting.clear()
        self._queued = set()
        for task in self._workers:
            task.cancel()
        self._resolver.cancel()

    async def aclose(self) -> None:
        """`close()`, then wait until every worker and query has ended."""
        self.close()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._resolver.aclose()


def parse_nameservers(given: Sequence[str]) -> tuple[list[str], int]:
    """`host` or `host:port` entries (one port for all) as (hosts, port); none given: the
    system's (/etc/resolv.conf) on port 53. Raises KilnError for mixed ports."""
    if not given:
        return system_nameservers(), 53
    hosts, ports = [], set()
    for ns in given:
        host, _, port = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "53")
        hosts.append(host)
        ports.add(int(port))
    if len(ports) != 1:
        raise KilnError(f"every nameserver must use the same port, got {', '.join(given)}")
    return hosts, ports.pop()


def system_nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The nameservers listed in `resolv_conf` (its other options are not used).

    Raises `dns.resolver.NoResolverConfiguration` when the file is missing or lists no
    nameserver: call it before listening, so the daemon fails at start.
    """
    config = dns.resolver.Resolver(filename=resolv_conf, configure=True)
    return [str(ns) for ns in config.nameservers]
