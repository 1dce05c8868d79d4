"""`kiln render`: PowerMTA's and KumoMTA's configuration from a `Shape` (kiln.mtashape), and
checks of what was rendered (docs/integrations/powermta.md, kumomta.md).

Pure functions: text in, text out. Writing the files (atomically, checked) and watching for
changes is kiln.cli_render's work.

Names: an IP's PowerMTA virtual MTA and KumoMTA egress source is `kiln-` and the IP with `.`
and `:` turned into `-` (`kiln-192-0-2-10`, `kiln-2001-db8--1`); a pool is `kiln-POOL`, a
provider `kiln-PROVIDER`; KumoMTA's single-source pool of an IP has the name of its source.

A key's rate is `KeyRoom.per_hour` messages per hour. Zero is where the two MTAs differ:
PowerMTA's `max-msg-rate` takes `0` beside `unlimited` (so `0` is not "no limit") and kiln
renders `max-msg-rate 0` to hold the mail; KumoMTA refuses a zero rate (its parser answers
"limit must be greater than 0" and the whole shaping file would fail), so a held key gets
the smallest rate it accepts, `1/d`, and a comment: on its own the shaping file lets at most
one message a day through a held key; the Lua throttle path, which asks kiln per message,
holds it completely (docs/integrations/kumomta.md).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.mtashape import KeyRoom, Shape
from kiln.provider import DEFAULT_PROVIDER

__all__ = [
    "HELD_KUMO_RATE",
    "KUMO_FILES",
    "STAMP_PREFIX",
    "RenderOptions",
    "check_kumomta",
    "check_pmta",
    "ehlo_name",
    "kumo_pool_name",
    "render_kumomta",
    "render_pmta",
    "same_content",
    "source_name",
]

#: The two files `render_kumomta` returns: egress sources and pools, then shaping.
KUMO_FILES = ("kiln-sources.toml", "kiln-shaping.toml")
#: KumoMTA's rate for a held key (per hour 0): the least its rate parser accepts.
HELD_KUMO_RATE = "1/d"
#: The header line naming when a file was rendered (`same_content` ignores it).
STAMP_PREFIX = "# rendered at "

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How to render: the EHLO name template, connection limits, which pools, and what the
    header says about where the caps came from."""

    #: EHLO name per IP: `{ip}` (the address) and `{ip_dashed}` (`192-0-2-10`) are replaced;
    #: required for PowerMTA (`smtp-source-host IP HOSTNAME`), optional for KumoMTA.
    hostname: str | None = None
    #: PowerMTA `max-smtp-out` on each limited warming key (connections per domain queue).
    max_smtp_out: int = 2
    #: KumoMTA `provider_connection_limit` / `connection_limit` on each limited warming key.
    connection_limit: int = 2
    #: KumoMTA: append `,max_burst=N` to each rate (KumoMTA 2025.01.29 and later); None: not.
    max_burst: int | None = None
    #: Only these pools and their IPs (empty: every pool of the plan).
    pools: tuple[str, ...] = ()
    #: "live" (the daemon's caps now) or "nominal" (the plan's caps at an instant).
    source: str = "nominal"
    #: Where the plan was read (shown in the header), if from a file.
    plan_path: str | None = None
    #: The local time the header shows (ISO 8601 with offset).
    local_time: str = ""

    def check(self) -> None:
        """KilnError naming the option that is out of range."""
        if not 1 <= self.max_smtp_out <= 1000:
            raise KilnError(f"max-smtp-out must be 1 to 1000, got {self.max_smtp_out}")
        if not 1 <= self.connection_limit <= 1000:
            raise KilnError(f"connection limit must be 1 to 1000, got {self.connection_limit}")
        if self.max_burst is not None and not 1 <= self.max_burst <= 1_000_000:
            raise KilnError(f"max burst must be 1 to 1000000, got {self.max_burst}")
        if self.source not in ("live", "nominal"):
            raise KilnError(f"source must be live or nominal, got {self.source!r}")
        if self.hostname is not None:
            ehlo_name(self.hostname, "192.0.2.1")


def _dashed(ip: str) -> str:
    """`192-0-2-10`, `2001-db8--1`: the IP (compressed) with `.` and `:` as `-`."""
    return ipaddress.ip_address(ip).compressed.replace(".", "-").replace(":", "-")


def source_name(ip: str) -> str:
    """The virtual MTA (PowerMTA) and egress source (KumoMTA) of a sending IP."""
    return "kiln-" + _dashed(ip)


def kumo_pool_name(ip: str) -> str:
    """KumoMTA's pool holding only this IP's source: named as the source, because
    contrib/kumomta/kiln.lua sets a message's tenant, and its tenant's `egress_pool`, to the
    source name of the IP kiln picked (pools and sources are separate names in KumoMTA)."""
    return source_name(ip)


def ehlo_name(template: str, ip: str) -> str:
    """The EHLO host name of `ip` from `template` (`{ip}`, `{ip_dashed}`); KilnError if the
    template has another placeholder or the result is not a host name."""
    try:
        name = template.format(ip=ipaddress.ip_address(ip).compressed, ip_dashed=_dashed(ip))
    except (KeyError, IndexError, ValueError) as e:
        raise KilnError(
            f"hostname template {template!r}: only {{ip}} and {{ip_dashed}} may be used ({e})"
        ) from None
    if not _HOSTNAME.match(name):
        raise KilnError(
            f"hostname template {template!r} gives {name!r} for {ip}, which is not a host name"
            + (" (use {ip_dashed} for IPv6 addresses)" if ":" in name else "")
        )
    return name


def _selected(shape: Shape, options: RenderOptions) -> list[str]:
    """The pools rendered (KilnError for one the plan does not have)."""
    unknown = [p for p in options.pools if p not in shape.pools]
    if unknown:
        raise KilnError(
            f"pool {', '.join(map(repr, unknown))} is not in plan {shape.plan!r}; its pools: "
            + ", ".join(shape.pools)
        )
    return sorted(set(options.pools) if options.pools else shape.pools)


def _ips(shape: Shape, pools: Iterable[str]) -> tuple[list[str], list[str]]:
    """(warming, warm) IPs of `pools`, each sorted by address, each IP once."""
    warming: set[str] = set()
    warm: set[str] = set()
    for name in pools:
        warming |= set(shape.pools[name].warming)
        warm |= set(shape.pools[name].warm)

    def order(ips: Iterable[str]) -> list[str]:
        """Sorted by address family and value."""
        return sorted(
            ips, key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip))
        )

    return order(warming), order(warm - warming)


def _keys(shape: Shape, ips: Iterable[str]) -> dict[str, dict[str, KeyRoom]]:
    """IP -> provider -> key, for the warming IPs rendered."""
    wanted = set(ips)
    out: dict[str, dict[str, KeyRoom]] = {}
    for k in shape.keys:
        if k.ip in wanted:
            out.setdefault(k.ip, {})[k.provider] = k
    return out


def _header(shape: Shape, options: RenderOptions, what: str) -> list[str]:
    """The comment lines at the top of every rendered file."""
    where = f" ({options.plan_path})" if options.plan_path else ""
    caps = (
        "live caps from the running daemon (pauses, suspensions, slow-downs, today's use)"
        if options.source == "live"
        else "nominal caps of the plan (every ramp advanced each day since its start)"
    )
    return [
        f"# {what}: rendered by kiln render; do not edit (the next render replaces it).",
        f"# plan {shape.plan!r}{where}, time zone {shape.timezone}; {caps}.",
        f"{STAMP_PREFIX}{options.local_time or shape.local_hour} (local hour {shape.local_hour})",
    ]


def _why(k: KeyRoom) -> str:
    """A short reason for a key's rate, for a comment."""
    return f"{k.bound}; daily cap {k.daily_cap}, hourly cap {k.hourly_cap}, used today {k.day_used}"


# ---------------------------------------------------------------- PowerMTA


def render_pmta(shape: Shape, options: RenderOptions) -> str:
    """PowerMTA configuration: one `<virtual-mta>` per IP, one `<virtual-mta-pool>` per pool,
    a `domain-macro` per provider with domains, and each warming IP's per-provider rates.
    KilnError for an unknown pool, a bad option or no `hostname` template."""
    options.check()
    if options.hostname is None:
        raise KilnError(
            "PowerMTA needs each IP's EHLO host name (smtp-source-host IP HOSTNAME): give a "
            "template such as --hostname 'mta-{ip_dashed}.example.com'"
        )
    pools = _selected(shape, options)
    warming, warm = _ips(shape, pools)
    keys = _keys(shape, warming)
    named = sorted(shape.providers)
    out = _header(shape, options, "PowerMTA virtual MTAs, pools and warm-up rates")
    out += [
        "# Include it from PowerMTA's config (include /etc/pmta/kiln.conf); `pmta reload`",
        "# re-reads it. A rate counts per domain queue of a virtual MTA (docs: powermta.md).",
        "",
    ]
    with_domains = [p for p in named if shape.providers[p].domains]
    for p in with_domains:
        out.append(f"domain-macro kiln-{p} {','.join(sorted(shape.providers[p].domains))}")
    for p in named:
        if not shape.providers[p].domains:
            out.append(
                f"# kiln: provider {p} has no domains (MX suffixes only), so PowerMTA sends "
                "its mail under <domain *>"
            )
    if named:
        out.append("")
    for ip in warming + warm:
        out += _pmta_vmta(ip, keys.get(ip), with_domains, options)
    for name in pools:
        pool = shape.pools[name]
        members = [ip for ip in warming + warm if ip in pool.warming or ip in pool.warm]
        out.append(f"<virtual-mta-pool kiln-{name}>")
        out += [f"    virtual-mta {source_name(ip)}" for ip in members]
        out.append("</virtual-mta-pool>")
        if pool.overflow:
            out.append(
                f"# kiln: pool {name} overflows to {pool.overflow}; PowerMTA cannot express it"
            )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _pmta_vmta(
    ip: str, keys: dict[str, KeyRoom] | None, providers: list[str], options: RenderOptions
) -> list[str]:
    """One `<virtual-mta>` block (with rates if `keys`: a warming IP)."""
    assert options.hostname is not None
    host = ehlo_name(options.hostname, ip)
    out = [
        f"<virtual-mta {source_name(ip)}>",
        f"    smtp-source-host {ipaddress.ip_address(ip).compressed} {host}",
    ]
    if keys is None:
        out.append("    # kiln: a warm IP; kiln sets no rate here")
    else:
        for p in [*providers, DEFAULT_PROVIDER]:
            k = keys.get(p)
            if k is None:
                continue
            target = "*" if p == DEFAULT_PROVIDER else f"$kiln-{p}"
            if k.per_hour is None:
                out.append(f"    # kiln: {p}: no limit ({k.batch})")
                continue
            rate = "0" if k.per_hour == 0 else f"{k.per_hour}/h"
            note = f"held ({k.bound}): 0 sends nothing" if k.per_hour == 0 else _why(k)
            out += [
                f"    <domain {target}>",
                f"        # kiln: {p}, batch {k.batch}: {note}",
                f"        max-msg-rate {rate}",
                f"        max-smtp-out {options.max_smtp_out}",
                "    </domain>",
            ]
    out += ["</virtual-mta>", ""]
    return out


#: What `check_pmta` accepts: block tags and directives kiln renders.
PMTA_TAGS = ("virtual-mta", "virtual-mta-pool", "domain")
PMTA_DIRECTIVES = (
    "smtp-source-host",
    "virtual-mta",
    "domain-macro",
    "max-msg-rate",
    "max-smtp-out",
)
_PMTA_RATE = re.compile(r"^(?:unlimited|0|[0-9]+/[0-9]*(?:d|day|h|hr|m|min|s|sec))$")


def check_pmta(text: str) -> list[str]:
    """Problems of a PowerMTA file kiln rendered, `line N: what` each (empty: none):
    unbalanced or misplaced `<tag>`s, directives kiln does not render, bad arguments."""
    problems: list[str] = []
    stack: list[tuple[str, int]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("</"):
            m = re.fullmatch(r"</([a-z-]+)>", line)
            if m is None:
                problems.append(f"line {n}: malformed closing tag {line!r}")
            elif not stack or stack[-1][0] != m[1]:
                open_ = f"<{stack[-1][0]}> of line {stack[-1][1]}" if stack else "no open block"
                problems.append(f"line {n}: </{m[1]}> closes {open_}")
            else:
                stack.pop()
            continue
        if line.startswith("<"):
            m = re.fullmatch(r"<([a-z-]+) (\S+)>", line)
            if m is None or m[1] not in PMTA_TAGS:
                problems.append(f"line {n}: unknown or malformed block {line!r}")
                continue
            where = [t for t, _ in stack]
            allowed = where == ["virtual-mta"] if m[1] == "domain" else where == []
            if not allowed:
                problems.append(f"line {n}: <{m[1]}> may not be inside {where or 'the top'}")
            stack.append((m[1], n))
            continue
        words = line.split()
        name, args = words[0], words[1:]
        if name not in PMTA_DIRECTIVES:
            problems.append(f"line {n}: unknown directive {name!r}")
            continue
        problems += [f"line {n}: {p}" for p in _pmta_args(name, args, [t for t, _ in stack])]
    problems += [f"line {n}: <{tag}> is never closed" for tag, n in stack]
    return problems


def _pmta_args(name: str, args: list[str], where: list[str]) -> list[str]:
    """Problems of one directive's arguments and place."""
    place = {
        "smtp-source-host": ["virtual-mta"],
        "virtual-mta": ["virtual-mta-pool"],
        "domain-macro": [],
        "max-msg-rate": ["virtual-mta", "domain"],
        "max-smtp-out": ["virtual-mta", "domain"],
    }[name]
    problems = [] if where == place else [f"{name} may not be inside {where or 'the top'}"]
    if name == "smtp-source-host":
        ok = len(args) == 2 and _is_ip(args[0]) and _HOSTNAME.match(args[1]) is not None
        if not ok:
            problems.append(f"smtp-source-host needs IP HOSTNAME, got {' '.join(args)!r}")
    elif name == "virtual-mta":
        if len(args) != 1 or not _NAME.match(args[0]):
            problems.append(f"virtual-mta needs one name, got {' '.join(args)!r}")
    elif name == "domain-macro":
        ok = len(args) == 2 and _NAME.match(args[0]) is not None
        if not ok or not all(_HOSTNAME.match(d) for d in args[1].split(",")):
            problems.append(f"domain-macro needs NAME d1,d2,..., got {' '.join(args)!r}")
    elif name == "max-msg-rate":
        if len(args) != 1 or not _PMTA_RATE.match(args[0]):
            problems.append(f"max-msg-rate needs unlimited, 0 or N/h, got {' '.join(args)!r}")
    elif len(args) != 1 or not args[0].isdigit():
        problems.append(f"max-smtp-out needs a number, got {' '.join(args)!r}")
    return problems


def _is_ip(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- KumoMTA


def _q(text: str) -> str:
    """A TOML basic string (kiln's names need no escapes beyond these)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_kumomta(shape: Shape, options: RenderOptions) -> dict[str, str]:
    """KumoMTA's `kiln-sources.toml` (for policy-extras.sources) and `kiln-shaping.toml` (for
    policy-extras.shaping). KilnError for an unknown pool or a bad option."""
    options.check()
    pools = _selected(shape, options)
    warming, warm = _ips(shape, pools)
    return {
        KUMO_FILES[0]: _kumo_sources(shape, options, pools, warming, warm),
        KUMO_FILES[1]: _kumo_shaping(shape, options, warming),
    }


def _kumo_sources(
    shape: Shape, options: RenderOptions, pools: list[str], warming: list[str], warm: list[str]
) -> str:
    """Egress sources, the plan's pools and one single-source pool per IP."""
    out = _header(shape, options, "KumoMTA egress sources and pools (policy-extras.sources)")
    out.append("")
    for ip in warming + warm:
        out.append(f"[source.{_q(source_name(ip))}]")
        out.append(f"source_address = {_q(ipaddress.ip_address(ip).compressed)}")
        if options.hostname is not None:
            out.append(f"ehlo_domain = {_q(ehlo_name(options.hostname, ip))}")
        out.append("")
    for name in pools:
        pool = shape.pools[name]
        if pool.overflow:
            out.append(f"# kiln: pool {name} overflows to {pool.overflow} (the Lua path's work)")
        for ip in warming + warm:
            weight = pool.warming.get(ip, pool.warm.get(ip))
            if weight is None:
                continue
            out += [f"[pool.{_q('kiln-' + name)}.{_q(source_name(ip))}]", f"weight = {weight}", ""]
    for ip in warming + warm:
        out += [f"[pool.{_q(kumo_pool_name(ip))}.{_q(source_name(ip))}]", "weight = 1", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _kumo_rate(per_hour: int, options: RenderOptions) -> str:
    """A KumoMTA rate for `per_hour` (the held rate for 0), with the max burst asked for."""
    rate = HELD_KUMO_RATE if per_hour == 0 else f"{per_hour}/h"
    return rate if options.max_burst is None else f"{rate},max_burst={options.max_burst}"


def _kumo_shaping(shape: Shape, options: RenderOptions, warming: list[str]) -> str:
    """Per-provider (MX suffix) and per-domain rates of each warming source."""
    keys = _keys(shape, warming)
    out = _header(shape, options, "KumoMTA warm-up shaping (policy-extras.shaping)")
    out += [
        f"# A held key (0 an hour) is rendered {HELD_KUMO_RATE}, the least KumoMTA accepts: the",
        "# Lua throttle path holds it completely (docs: kumomta.md).",
        "# kiln's `default` provider (every other domain) is one bucket per IP that shaping",
        "# cannot express; the Lua throttle path enforces it.",
        "",
    ]
    for p in sorted(shape.providers):
        prov = shape.providers[p]
        if prov.mx_suffixes:
            out.append(f"[provider.{_q('kiln-' + p)}]")
            match = ", ".join(f"{{MXSuffix = {_q(s)}}}" for s in sorted(prov.mx_suffixes))
            out += [f"match = [{match}]", ""]
            for ip in warming:
                k = keys.get(ip, {}).get(p)
                if k is None:
                    continue
                head = f"[provider.{_q('kiln-' + p)}.sources.{_q(source_name(ip))}]"
                out += _kumo_limits(k, head, "provider_", options)
        elif prov.domains:
            out.append(f"# kiln: provider {p} has no MX suffixes: one block per domain")
            for d in sorted(prov.domains):
                out += [f"[{_q(d)}]", "mx_rollup = false", ""]
                for ip in warming:
                    k = keys.get(ip, {}).get(p)
                    if k is None:
                        continue
                    head = f"[{_q(d)}.sources.{_q(source_name(ip))}]"
                    out += _kumo_limits(k, head, "", options)
        else:
            out += [f"# kiln: provider {p} has neither domains nor MX suffixes: not rendered", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _kumo_limits(k: KeyRoom, head: str, prefix: str, options: RenderOptions) -> list[str]:
    """One source block: its rate and connection limit, or a comment without a limit."""
    if k.per_hour is None:
        return [f"# kiln: {k.ip} -> {k.provider}: no limit ({k.batch})", ""]
    note = (
        f"held ({k.bound}): {HELD_KUMO_RATE} is the least KumoMTA accepts"
        if k.per_hour == 0
        else _why(k)
    )
    return [
        f"# kiln: {k.ip} -> {k.provider}, batch {k.batch}: {note}",
        head,
        f"{prefix}max_message_rate = {_q(_kumo_rate(k.per_hour, options))}",
        f"{prefix}connection_limit = {options.connection_limit}",
        "",
    ]


_KUMO_RATE = re.compile(r"^[0-9]+/(?:h|d)(?:,max_burst=[0-9]+)?$")


def check_kumomta(files: dict[str, str]) -> list[str]:
    """Problems of the two KumoMTA files kiln rendered, `FILE: what` each (empty: none):
    TOML that does not parse, rates that are not `N/h` (or the held `1/d`), pool members
    without a source."""
    problems = [f"{name}: missing" for name in KUMO_FILES if name not in files]
    problems += [f"{name}: not a file kiln renders" for name in files if name not in KUMO_FILES]
    docs: dict[str, dict[str, object]] = {}
    for name in KUMO_FILES:
        if name in files:
            try:
                docs[name] = tomllib.loads(files[name])
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{name}: not TOML: {e}")
    sources_doc = docs.get(KUMO_FILES[0])
    if sources_doc is not None:
        problems += [f"{KUMO_FILES[0]}: {p}" for p in _check_sources(sources_doc)]
    shaping_doc = docs.get(KUMO_FILES[1])
    if shaping_doc is not None:
        problems += [f"{KUMO_FILES[1]}: {p}" for p in _check_shaping(shaping_doc)]
    return problems


def _check_sources(doc: dict[str, object]) -> list[str]:
    """Problems of the sources file."""
    problems = [f"unexpected table {k!r}" for k in doc if k not in ("source", "pool")]
    sources = doc.get("source", {})
    if not isinstance(sources, dict):
        return [*problems, "source is not a table"]
    for name, body in sources.items():
        if not isinstance(body, dict) or not _is_ip(str(body.get("source_address", ""))):
            problems.append(f"source {name!r} has no valid source_address")
    pools = doc.get("pool", {})
    if not isinstance(pools, dict):
        return [*problems, "pool is not a table"]
    for pool, members in pools.items():
        if not isinstance(members, dict) or not members:
            problems.append(f"pool {pool!r} has no members")
            continue
        for member, body in members.items():
            if member not in sources:
                problems.append(f"pool {pool!r} names source {member!r}, which is not defined")
            weight = body.get("weight", 1) if isinstance(body, dict) else None
            if not isinstance(weight, int) or weight < 0:
                problems.append(f"pool {pool!r} member {member!r}: bad weight {weight!r}")
    return problems


def _check_shaping(doc: dict[str, object]) -> list[str]:
    """Problems of the shaping file: every rate `N/h` (N >= 1) or `1/d`."""
    problems: list[str] = []

    def rates(where: str, body: object) -> None:
        """Check the rates and limits of one source block."""
        if not isinstance(body, dict):
            problems.append(f"{where} is not a table")
            return
        for key, value in body.items():
            if key.endswith("max_message_rate"):
                text = value if isinstance(value, str) else ""
                rate = text.split(",")[0]
                ok = _KUMO_RATE.match(text) is not None and not text.startswith("0")
                if not ok or (rate.endswith("/d") and rate != HELD_KUMO_RATE):
                    problems.append(f"{where}: rate {value!r} is not N/h (N >= 1) or 1/d")
            elif key.endswith("connection_limit"):
                if not isinstance(value, int) or value < 1:
                    problems.append(f"{where}: connection limit {value!r} is not a number >= 1")
            else:
                problems.append(f"{where}: unexpected key {key!r}")

    for name, body in doc.items():
        if not isinstance(body, dict):
            problems.append(f"{name!r} is not a table")
            continue
        if name == "provider":
            for prov, entry in body.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("match"), list):
                    problems.append(f"provider {prov!r} has no match list")
                    continue
                for src, limits in dict(entry.get("sources", {})).items():
                    rates(f"provider {prov!r} source {src!r}", limits)
        else:
            if body.get("mx_rollup") is not False:
                problems.append(f"domain {name!r} lacks mx_rollup = false")
            for src, limits in dict(body.get("sources", {})).items():
                rates(f"domain {name!r} source {src!r}", limits)
    return problems


def same_content(old: str, new: str) -> bool:
    """Whether two renders say the same, apart from the time they were rendered at."""

    def body(text: str) -> list[str]:
        """The lines without the time stamp."""
        return [ln for ln in text.splitlines() if not ln.startswith(STAMP_PREFIX)]

    return body(old) == body(new)
