"""DNS blocklists (DNSBLs): is a sending IP listed on Spamhaus ZEN, Barracuda, SpamCop, ...?

Format: docs/signals.md ("Blocklists"). A lookup asks for the A records of the reversed IP
under the zone (`192.0.2.10` on ZEN is `10.2.0.192.zen.spamhaus.org`; IPv6 uses the nibble
form). Each (ip, zone) pair gets one of four outcomes, kept apart on purpose:

- `clean`: NXDOMAIN (or a name with no A record): not listed;
- `listed`: one or more return codes that mean "listed" (the policy says: pause the IP);
- `policy`: only policy codes (Spamhaus PBL, 127.0.0.10/11): a configuration alert, never a pause;
- `unknown`: timeout, SERVFAIL, REFUSED, an error code (127.255.255.0/24, DBL's 127.0.1.255),
  an answer outside 127.0.0.0/8 (a resolver rewriting NXDOMAIN) or a code the zone does not
  use. Errors never count as a listing; the ones that come from an answer set
  `resolver_error`, so the caller raises a resolver alert instead of pausing anything.

Spamhaus DQS keys are part of the query name (`<reversed-ip>.<key>.zen.dq.spamhaus.net`); they
are replaced by `***` in every log line, error text and result kiln produces.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import structlog

from kiln.signals import SourceError

__all__ = [
    "SOURCE",
    "ZEN_CODES",
    "DnsblCode",
    "DnsblReading",
    "DnsblResult",
    "DnsblSource",
    "Outcome",
    "Zone",
    "classify",
    "query_name",
]

#: Name of this source in `SourceError`s and logs.
SOURCE = "dnsbl"

#: The outcome of one (ip, zone) lookup.
Outcome = Literal["clean", "listed", "policy", "unknown"]

#: Spamhaus ZEN return codes (docs/signals.md, "Blocklists"): code -> (meaning, policy-only?).
ZEN_CODES: Mapping[str, tuple[str, bool]] = {
    "127.0.0.2": ("SBL", False),
    "127.0.0.3": ("CSS", False),
    "127.0.0.4": ("XBL", False),
    "127.0.0.9": ("DROP", False),
    "127.0.0.10": ("PBL (ISP maintained)", True),
    "127.0.0.11": ("PBL (Spamhaus maintained)", True),
    "127.0.0.30": ("BCL", False),
}

_REDACTED = "***"
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_LISTING_NET = ipaddress.IPv4Network("127.0.0.0/24")
_ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
_DBL_ERROR = ipaddress.IPv4Address("127.0.1.255")
_SPAMHAUS_ERRORS = {
    "127.255.255.252": "typing error in the zone name",
    "127.255.255.254": "query through a public or open resolver",
    "127.255.255.255": "too many queries",
}
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_TXT_CHARS = 500
_MAX_LABEL_CHARS = 63


@dataclass(frozen=True, slots=True)
class Zone:
    """One blocklist zone and how its return codes read.

    `name` is what results and logs call the zone (never holds a secret); `suffix` is what
    the query appends to the reversed IP (it holds the DQS key, if any). `codes` maps known
    return codes to (meaning, policy-only?). A 127.0.0.x code not in `codes` is a listing
    named `other_meaning`; with `strict`, it is `unknown` (and a resolver alert) instead.
    """

    name: str
    suffix: str
    codes: Mapping[str, tuple[str, bool]] = field(default_factory=dict)
    other_meaning: str = "listed"
    strict: bool = False
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Check the zone names (a bad zone is a configuration error)."""
        for text in (self.name, self.suffix):
            if not text or text != text.strip().strip(".") or " " in text:
                raise ValueError(f"bad DNSBL zone name: {self.redact(text)!r}")

    def __repr__(self) -> str:
        """The zone without its secret."""
        return f"Zone(name={self.name!r}, suffix={self.redact(self.suffix)!r})"

    @classmethod
    def zen(cls, dqs_key: str | None = None) -> Zone:
        """Spamhaus ZEN: the public mirror, or the DQS zone when `dqs_key` is given."""
        if dqs_key is None:
            return cls("zen.spamhaus.org", "zen.spamhaus.org", ZEN_CODES, "ZEN (unrecognised code)")
        key = dqs_key.strip().lower()
        if not key or not _KEY_CHARS.issuperset(key) or len(key) > _MAX_LABEL_CHARS:
            raise ValueError("bad Spamhaus DQS key: must be one DNS label of letters and digits")
        return cls(
            "zen.dq.spamhaus.net",
            f"{key}.zen.dq.spamhaus.net",
            ZEN_CODES,
            "ZEN (unrecognised code)",
            secret=key,
        )

    @classmethod
    def barracuda(cls) -> Zone:
        """Barracuda BRBL (`b.barracudacentral.org`): any 127.0.0.x is a listing."""
        return cls.generic("b.barracudacentral.org", meaning="BRBL")

    @classmethod
    def spamcop(cls) -> Zone:
        """SpamCop (`bl.spamcop.net`): any 127.0.0.x is a listing."""
        return cls.generic("bl.spamcop.net", meaning="SCBL")

    @classmethod
    def generic(cls, zone: str, *, meaning: str = "listed") -> Zone:
        """Any other IP blocklist: every 127.0.0.x answer is a listing called `meaning`."""
        name = zone.strip().strip(".").lower()
        return cls(name, name, {}, meaning)

    @classmethod
    def named(cls, zone: str, *, dqs_key: str | None = None) -> Zone:
        """The zone a configuration names: ZEN, Barracuda and SpamCop get their own tables.

        `zen.dq.spamhaus.net` (or any zone with `dqs_key`) is Spamhaus DQS.
        """
        name = zone.strip().strip(".").lower()
        if dqs_key is not None or name == "zen.dq.spamhaus.net":
            if dqs_key is None:
                raise ValueError("zen.dq.spamhaus.net needs a DQS key")
            return cls.zen(dqs_key)
        if name == "zen.spamhaus.org":
            return cls.zen()
        if name == "b.barracudacentral.org":
            return cls.barracuda()
        if name == "bl.spamcop.net":
            return cls.spamcop()
        return cls.generic(name)

    def redact(self, text: str) -> str:
        """`text` with this zone's secret (if any) replaced by `***`."""
        if not self.secret:
            return text
        return text.replace(self.secret, _REDACTED)


@dataclass(frozen=True, slots=True)
class DnsblCode:
    """One return code of a listing: the A record, what it means, and whether it is policy-only."""

    code: str
    meaning: str
    policy: bool = False


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """The outcome for one IP on one zone.

    `codes` holds every classified A record (listed and policy ones); `reason` the TXT
    record's text when the IP is listed and the zone published one; `error` why the outcome
    is `unknown`; `resolver_error` is True when an answer came back that is an error in
    disguise (error codes, answers outside 127/8, unexpected codes): alert, never pause.
    """

    ip: str
    zone: str
    outcome: Outcome
    codes: tuple[DnsblCode, ...] = ()
    reason: str | None = None
    error: str | None = None
    resolver_error: bool = False

    @property
    def listed(self) -> bool:
        """True for a real listing (never for policy-only or unknown)."""
        return self.outcome == "listed"


@dataclass(frozen=True, slots=True)
class DnsblReading:
    """One poll: a result per (ip, zone), in the order asked (IPs outer, zones inner)."""

    results: tuple[DnsblResult, ...]

    @property
    def resolver_error(self) -> bool:
        """True when any zone answered with a resolver error: raise a resolver alert."""
        return any(r.resolver_error for r in self.results)

    def result(self, ip: str, zone: str) -> DnsblResult | None:
        """The result for `ip` on the zone named `zone`, or None if it was not asked."""
        wanted = _normal_ip(ip)
        for r in self.results:
            if r.ip == wanted and r.zone == zone:
                return r
        return None

    def by_outcome(self, outcome: Outcome) -> tuple[DnsblResult, ...]:
        """Every result with `outcome`."""
        return tuple(r for r in self.results if r.outcome == outcome)

    @property
    def listed_ips(self) -> frozenset[str]:
        """IPs listed on at least one zone (policy-only and unknown results excluded)."""
        return frozenset(r.ip for r in self.results if r.outcome == "listed")


def _normal_ip(ip: str) -> str:
    """`ip` in its canonical text form; raises ValueError for what is not an IP."""
    return str(ipaddress.ip_address(ip.strip()))


def query_name(ip: str, zone: Zone) -> str:
    """The name to look up: reversed IPv4 octets or IPv6 nibbles, then the zone's suffix."""
    address = ipaddress.ip_address(ip.strip())
    reverse = address.reverse_pointer  # "10.2.0.192.in-addr.arpa" / "....ip6.arpa"
    reverse = reverse.rsplit(".", 2)[0]
    return f"{reverse}.{zone.suffix}"


def classify(ip: str, zone: Zone, addresses: Sequence[str]) -> DnsblResult:
    """Read the A records of one answer. Pure: no I/O.

    Any error code, answer outside 127.0.0.0/8 or (for strict zones) unknown code makes the
    whole answer `unknown` with `resolver_error`: a listing is never read out of an answer
    that also carries an error.
    """
    codes: list[DnsblCode] = []
    errors: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            errors.append(f"answer {text!r} is not an IPv4 address")
            continue
        code = str(address)
        if address not in _LOOPBACK:
            errors.append(f"answer {code} is outside 127.0.0.0/8 (resolver rewrote NXDOMAIN?)")
        elif address in _ERROR_NET:
            what = _SPAMHAUS_ERRORS.get(code, "query error")
            errors.append(f"error code {code} ({what})")
        elif address == _DBL_ERROR:
            errors.append(f"error code {code} (IP queried against a domain list)")
        elif code in zone.codes:
            meaning, policy = zone.codes[code]
            codes.append(DnsblCode(code, meaning, policy))
        elif address in _LISTING_NET and not zone.strict:
            codes.append(DnsblCode(code, zone.other_meaning, False))
        else:
            errors.append(f"unexpected return code {code}")
    if errors:
        return DnsblResult(ip, zone.name, "unknown", error="; ".join(errors), resolver_error=True)
    if not codes:
        return DnsblResult(ip, zone.name, "clean")
    outcome: Outcome = "policy" if all(c.policy for c in codes) else "listed"
    return DnsblResult(ip, zone.name, outcome, codes=tuple(sorted(set(codes), key=_code_key)))


def _code_key(code: DnsblCode) -> tuple[int, ...]:
    """Sort codes numerically."""
    return tuple(int(part) for part in code.code.split("."))


def _failure(error: BaseException) -> str:
    """A short, secret-free description of a failed lookup."""
    if isinstance(error, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "timeout"
    if isinstance(error, dns.resolver.NoNameservers):
        rcodes = sorted(
            {str(item[3]) for item in error.kwargs.get("errors") or [] if isinstance(item[3], str)}
        )
        return "no nameserver answered" + (f" ({', '.join(rcodes)})" if rcodes else "")
    if isinstance(error, OSError):
        return f"network error ({error.strerror or type(error).__name__})"
    return type(error).__name__


class DnsblSource:
    """Polls DNSBL zones for the warm-up IPs with dnspython's asyncio resolver.

    One instance per daemon; `poll(ips)` is called from the signal job. Queries run
    concurrently, at most `max_concurrency` at a time. `timeout_s` bounds one attempt at one
    server, `lifetime_s` (default: twice `timeout_s`) a whole lookup. The TXT record is
    read only for listings (it is optional; a failed TXT lookup leaves `reason` None).
    """

    def __init__(
        self,
        zones: Iterable[Zone],
        nameservers: Sequence[str],
        *,
        port: int = 53,
        timeout_s: float = 2.0,
        lifetime_s: float | None = None,
        max_concurrency: int = 16,
        read_reason: bool = True,
    ) -> None:
        """Ask `nameservers` (IP addresses) on `port` about `zones`."""
        self._zones = tuple(zones)
        if not self._zones:
            raise ValueError("DnsblSource needs at least one zone")
        names = [z.name for z in self._zones]
        if len(set(names)) != len(names):
            raise ValueError(f"DNSBL zones named twice: {sorted(names)}")
        if not nameservers:
            raise ValueError("DnsblSource needs at least one nameserver")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.timeout = timeout_s
        resolver.lifetime = lifetime_s if lifetime_s is not None else 2 * timeout_s
        self._resolver = resolver
        self._max_concurrency = max_concurrency
        self._read_reason = read_reason
        self._log = structlog.get_logger().bind(source=SOURCE)

    @property
    def zones(self) -> tuple[Zone, ...]:
        """The zones asked, in order."""
        return self._zones

    async def poll(self, ips: Iterable[str]) -> DnsblReading:
        """Look every IP up on every zone.

        Never raises for one failed lookup (that result is `unknown`); raises `SourceError`
        (kind `unavailable`) only when every lookup failed without an answer (timeouts,
        SERVFAIL, REFUSED). When the zones did answer, even if only with error codes, the
        reading comes back so `resolver_error` can raise its alert. Raises ValueError for
        an argument that is not an IP address.
        """
        wanted = list(dict.fromkeys(_normal_ip(ip) for ip in ips))
        if not wanted:
            return DnsblReading(())
        gate = asyncio.Semaphore(self._max_concurrency)

        async def bounded(ip: str, zone: Zone) -> DnsblResult:
            async with gate:
                return await self._lookup(ip, zone)

        results = await asyncio.gather(
            *(bounded(ip, zone) for ip in wanted for zone in self._zones)
        )
        reading = DnsblReading(tuple(results))
        failed = [r for r in results if r.outcome == "unknown" and not r.resolver_error]
        if len(failed) == len(results):
            errors = sorted({r.error or "unknown" for r in failed})
            raise SourceError(SOURCE, "unavailable", f"every lookup failed: {'; '.join(errors)}")
        return reading

    async def _lookup(self, ip: str, zone: Zone) -> DnsblResult:
        """The result for one IP on one zone; never raises for DNS trouble."""
        qname = query_name(ip, zone)
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(qname), dns.rdatatype.A, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return DnsblResult(ip, zone.name, "clean")
        except (dns.exception.DNSException, OSError) as error:
            failure = _failure(error)
            self._warn("dnsbl_lookup_failed", zone, qname, ip=ip, error=failure)
            return DnsblResult(ip, zone.name, "unknown", error=failure)
        addresses = [rdata.address for rdata in answer.rrset] if answer.rrset is not None else []
        result = classify(ip, zone, addresses)
        if result.resolver_error:
            self._warn("dnsbl_resolver_error", zone, qname, ip=ip, error=result.error)
        elif result.outcome in {"listed", "policy"} and self._read_reason:
            reason = await self._reason(qname)
            if reason is not None:
                result = DnsblResult(
                    ip, zone.name, result.outcome, result.codes, reason=zone.redact(reason)
                )
        return result

    async def _reason(self, qname: str) -> str | None:
        """The TXT text published on `qname`, joined, or None (absent or failed)."""
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(qname), dns.rdatatype.TXT, raise_on_no_answer=False, search=False
            )
        except (dns.exception.DNSException, OSError):
            return None
        if answer.rrset is None:
            return None
        texts = [
            b"".join(rdata.strings).decode("utf-8", errors="replace") for rdata in answer.rrset
        ]
        return " | ".join(texts)[:_MAX_TXT_CHARS] or None

    def _warn(self, event: str, zone: Zone, qname: str, **context: Any) -> None:
        """Log a warning with the query name; the zone's secret never reaches the log."""
        self._log.warning(event, zone=zone.name, qname=zone.redact(qname), **context)
