"""`kiln exim-config`: the Exim routers and transports that send each message from the IP kiln
picks, fail a recipient on kiln's suppression list, and defer the rest while no IP of the pool
has room; and, when asked, the RCPT ACL statement that refuses suppressed recipients at
submission (docs/integrations/exim.md).

Exim asks kiln once per remote address, when it routes it: the `kiln_pick` router (a
`redirect`) keeps the reply of a `pick` over the native socket (`${readsocket}`, with the
recipient's address) as `$address_data` and fails the address when the reply says it is
suppressed; otherwise it declines, `kiln_send` sends a granted one through the transport of
the chosen IP, and `kiln_defer` defers the rest, which Exim retries on its queue runs. One
request decides: Exim checks a router's `condition` before it expands `address_data`, so the
reply is asked in the first router and read by the conditions of the next. A daemon that does
not answer defers mail too: nothing leaves a warming IP without kiln's word.

As for Postfix (kiln.postfix), there is one `smtp` transport per IP kiln may pick for the pool
(the pool's and those of the pools it overflows to), bound to it (`interface`): Exim sends the
addresses of a message that share a transport and a host list together, over one connection
whose `interface` it sets once, so recipients picked on different IPs must not share a
transport. `kiln_send` names the transport from a table of those IPs; a granted IP the table
does not hold makes it decline, and `kiln_defer` defers the address rather than send it from
another address. Each transport's `event_action` reports every delivery, deferral and bounce
back to kiln for its IP, naming the recipient, which feeds kiln's suppression list.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.schedule import Plan
from kiln.suppress.address import mta_scope

__all__ = ["DEFAULT_TRANSPORT", "WHEN_DOWN", "EximConfig", "exim_config", "transport_name"]

#: What mail does while kiln does not answer: `defer` (wait in Exim's queue: nothing leaves
#: without kiln's word, the default) or `default-ip` (leave unthrottled from the host's
#: default address, which must then be a warm IP).
WHEN_DOWN = ("defer", "default-ip")

_SMARTHOST = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?$")

#: The recipient's local part in a router, or in the events of the transport it chose
#: (`caseful_local_part` on both kiln_pick and kiln_send: as written, not lower-cased), quoted
#: again as RFC 5322 wants it (`"ann smith"`; `ann.smith` stays bare).
_ROUTER_LOCAL = "${{quote_local_part:$local_part}}"
#: The recipient's local part in the RCPT ACL, as the client wrote it: there `$local_part` is
#: lower-cased, so it is read from the RCPT command's argument (its `<path>`, any source route
#: and ESMTP parameters left out). `{}` is where a line may break.
_ACL_LOCAL = (
    "${{local_part:${{address:${{if match{{$smtp_command_argument}}{}"
    '{{\\N^\\s*(<(?:[^">]|"(?:[^"\\\\]|\\\\.)*")*>)\\N}}{{$1}}}}}}}}'
)


def _address(local: str, indent: int) -> str:
    """The recipient as a JSON string's contents, in Exim's expansion language: the local part
    (expanded from `local`, its `{}` replaced by a line break) with `"` and `\\` escaped, `@`,
    the domain; continuation lines are indented by `indent` spaces."""
    brk = "\\\n" + " " * indent
    return "${sg{" + local.format(brk) + "}" + brk + '{\\N(["\\\\])\\N}{\\\\\\\\\\$1}}@$domain'


#: When the address is sent to kiln: no control character (JSON cannot carry one as it is) and
#: well under the list's 320 bytes (a longer one would make kiln answer an error, which would
#: defer the address for good). Other recipients are not checked.
_CHECKABLE = "and{{!match{$local_part}{\\N[[:cntrl:]]\\N}}{<{${strlen:$local_part@$domain}}{300}}}"
#: The text a suppressed recipient is refused or failed with (no comma, which a redirect
#: list could take for a separator); the event follows in brackets.
_SUPPRESSED = "5.7.1 kiln: the recipient is on the suppression list"
#: The IP of kiln's reply, in the routers (`$address_data` holds the reply).
_REPLY_IP = "${extract jsons{ip}{$address_data}}"
#: Whether the reply in `$address_data` grants the address.
_GRANTED = '${if match{$address_data}{\\N^\\{.*"granted":[1-9]\\N}'
#: The `ip` of the reply `readsocket` gives while kiln does not answer, with `--when-down
#: default-ip`; the transport table sends it through `DEFAULT_TRANSPORT`.
_DOWN_IP = "default"
#: The transport of mail sent while kiln does not answer (`--when-down default-ip`): no
#: `interface`, so the host's default address.
DEFAULT_TRANSPORT = "kiln_smtp_default"


def transport_name(ip: str) -> str:
    """The Exim transport of a sending IP: `kiln_smtp_192_0_2_10`, `kiln_smtp_2001_db8__10`
    (Exim's driver names are letters, digits and underscores)."""
    return "kiln_smtp_" + re.sub(r"[^0-9A-Za-z]", "_", ip)


def _reply_form(ip: str) -> str:
    """`ip` as kiln's replies write it (the core's text form): as the plan holds it, except
    an IPv4-mapped IPv6 address, which ends in dotted decimal (`::ffff:192.0.2.1`)."""
    mapped = ipaddress.ip_address(ip)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        return f"::ffff:{mapped.ipv4_mapped}"
    return ip


def _pool_ips(plan: Plan, pool: str) -> list[str]:
    """Every IP kiln may pick for `pool`: its own (warm and warming) and those of the pools it
    overflows to, in turn; in the order of `Plan.all_ips` (as `kiln postfix-config` renders
    its transports)."""
    chain: list[str] = []
    at: str | None = pool
    while at is not None and at in plan.pools and at not in chain:
        chain.append(at)
        at = plan.pools[at].overflow
    own = {ip for b in plan.batches.values() if b.pool in chain for ip in b.ips}
    own |= {m.ip for name in chain for m in plan.pools[name].members()}
    return [ip for ip in plan.all_ips() if ip in own]


def _transport_table(names: dict[str, str], indent: int) -> str:
    """The `${extract}` table from the IP of kiln's reply to its transport: `{IP=NAME ...}`,
    a pair a line, the lines after the first indented by `indent` + 1 spaces (continuation
    lines: Exim joins them, keeping the space before each `\\`)."""
    pairs = [f"{ip}={name}" for ip, name in names.items()]
    return "{" + (" \\\n" + " " * (indent + 1)).join(pairs) + "}"


def _address_field(indent: int) -> str:
    """`,"address":"LOCAL@DOMAIN"` (the recipient, `_address` of `_ROUTER_LOCAL`) when
    `_CHECKABLE`, else nothing: the one spelling of the recipient in every request the
    routers and the transport send kiln (`pick`, `report`). Their `$local_part` must be
    caseful (`caseful_local_part` on the router, and on the router that chose the transport,
    whose local part the transport's events see). Three lines, the first indented by `indent`
    spaces (Exim drops a continuation line's leading white space)."""
    pad = " " * indent
    return (
        pad
        + "${if "
        + _CHECKABLE
        + "\\\n"
        + pad
        + '  {,"address":"'
        + _address(_ROUTER_LOCAL, indent + 4)
        + '"}}'
    )


@dataclass(frozen=True)
class EximConfig:
    """The parts of an Exim configuration kiln needs: routers, transports (one per IP) and,
    when asked for (`reject_suppressed`), a statement for the RCPT ACL (else "")."""

    routers: str
    transports: str
    acl: str = ""

    def text(self) -> str:
        """Every part, each under the section it belongs to, as `kiln exim-config` prints."""
        acl = (
            "# ---- put this in your RCPT ACL (the one acl_smtp_rcpt names), before its first"
            " accept ----\n" + self.acl + "\n"
            if self.acl
            else ""
        )
        return (
            acl
            + "# ---- put these first in the routers section (after `begin routers`) ----\n"
            + self.routers
            + "\n# ---- and these in the transports section (after `begin transports`) ----\n"
            + self.transports
        )


def exim_config(
    plan: Plan,
    pool: str,
    socket: Path,
    *,
    smarthost: str | None = None,
    timeout_s: int = 2,
    when_down: str = "defer",
    reject_suppressed: bool = False,
    scope: str = "",
) -> EximConfig:
    """The routers and transports for remote mail of `pool`, asking the daemon at `socket`:
    one transport per IP kiln may pick for the pool (its own and its overflow pools'), bound
    to it. `smarthost` ("host" or "host:port"): send everything there (a relay, or a test's
    sink) instead of looking up MX records. `when_down`: what mail does while kiln does not
    answer (`WHEN_DOWN`). `reject_suppressed`: also the RCPT ACL statement that refuses a
    recipient on kiln's suppression list (it refuses nothing while kiln does not answer).
    `scope`: recipients are checked against that scope's suppression list as well as the
    global one (`kiln.suppress.address.mta_scope` says which scopes a configuration can
    name). KilnError for an unknown pool, a bad smarthost, `when_down` or `scope`."""
    if when_down not in WHEN_DOWN:
        raise KilnError(f"when_down must be one of {', '.join(WHEN_DOWN)}, got {when_down!r}")
    if pool not in plan.pools:
        raise KilnError(
            f"pool {pool!r} is not in plan {plan.name!r}; its pools: " + ", ".join(plan.pools)
        )
    if not 1 <= timeout_s <= 60:
        raise KilnError(f"timeout must be 1 to 60 s, got {timeout_s}")
    try:
        scoped = f',"scope":"{mta_scope(scope)}"' if scope else ""
    except ValueError as exc:
        raise KilnError(str(exc)) from None
    port = None
    loopback = False  # Exim refuses to send to its own machine unless told
    if smarthost is None:
        route = "  driver = dnslookup\n"
    else:
        m = _SMARTHOST.match(smarthost)
        if m is None or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
            raise KilnError(f"smarthost must be HOST or HOST:PORT, got {smarthost!r}")
        port = m["port"]
        host = m["host"].strip("[]")
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        # route_list's host list is colon-separated: an IPv6 address's colons are doubled.
        listed = host.replace(":", "::")
        route = f"  driver = manualroute\n  route_list = * {listed}\n  self = send\n"
    ips = _pool_ips(plan, pool)
    names = {_reply_form(ip): transport_name(ip) for ip in ips}
    if len(set(names.values())) < len(ips):
        raise KilnError(f"two IPs of pool {pool!r} would share an Exim transport name")
    if when_down == "default-ip":
        names[_DOWN_IP] = DEFAULT_TRANSPORT
    request = (
        '\\{"op":"pick","pool":"'
        + pool
        + '","domain":"$domain"'
        + scoped
        + "\\\n"
        + _address_field(6)
        + "\\}\\n"
    )
    unreachable = (
        '\\{"ok":false,"error":"kiln unreachable"\\}'
        if when_down == "defer"
        else '\\{"ok":true,"granted":1,"ip":"' + _DOWN_IP + '","error":"kiln unreachable"\\}'
    )
    routers = (
        f"# kiln: plan {plan.name!r}, pool {pool!r} (kiln exim-config)\n"
        "kiln_pick:\n"
        "  driver = redirect\n"
        "  domains = ! +local_domains\n"
        "  caseful_local_part\n"
        "  allow_fail\n"
        f"  address_data = ${{readsocket{{{socket}}}\\\n"
        f"    {{{request}}}\\\n"
        f"    {{{timeout_s}s}}{{\\n}}{{{unreachable}}}}}\n"
        '  data = ${if match{$address_data}{\\N^\\{"ok":true,.*"reason":"suppressed"\\N}\\\n'
        "    {:fail: " + _SUPPRESSED + " (${extract jsons{event}{$address_data}})}}\n"
        "\n"
        # Granted, and on an IP this configuration has a transport for (else it declines and
        # kiln_defer defers the address: never sent from another address).
        "kiln_send:\n" + route + "  domains = ! +local_domains\n"
        "  caseful_local_part\n"
        f"  condition = {_GRANTED}\\\n"
        f"    {{${{extract{{{_REPLY_IP}}}\\\n"
        f"      {_transport_table(names, 6)}{{yes}}{{no}}}}}}}}\n"
        f"  transport = ${{extract{{{_REPLY_IP}}}\\\n"
        f"    {_transport_table(names, 4)}{{$value}}fail}}\n"
        "\n"
        "kiln_defer:\n"
        "  driver = redirect\n"
        "  domains = ! +local_domains\n"
        "  allow_defer\n"
        f"  data = :defer: kiln: {_GRANTED}\\\n"
        f"    {{IP {_REPLY_IP} was granted but kiln_send did not take it \\\n"
        "     (no transport for that IP here or no host for $domain)}\\\n"
        "    {no IP of pool " + pool + " has room for $domain now}}\n"
    )
    transports = "\n".join(
        _transport(name, ip, socket, timeout_s, port, loopback) for ip, name in names.items()
    )
    acl = _suppressed_acl(socket, timeout_s, scoped) if reject_suppressed else ""
    return EximConfig(routers=routers, transports=transports, acl=acl)


def _transport(
    name: str, ip: str, socket: Path, timeout_s: int, port: str | None, loopback: bool
) -> str:
    """The `smtp` transport `name`, bound to `ip` (an IPv6 one in a `<;` list: Exim's lists
    are colon-separated) and reporting for it, or for `_DOWN_IP` the host's default address,
    reporting nothing (kiln takes a report for an IP of its plan only, and it is down)."""
    if ip == _DOWN_IP:
        head = (
            "  # kiln: only while kiln does not answer (--when-down default-ip): the host's\n"
            "  # default address, unthrottled and unreported\n"
            "  driver = smtp\n"
        )
    else:
        head = "  driver = smtp\n  interface = " + ("<; " if ":" in ip else "") + ip + "\n"
    return (
        f"{name}:\n"
        + head
        + (f"  port = {port}\n" if port else "")
        + ("  allow_localhost\n" if loopback else "")
        + ("" if ip == _DOWN_IP else _report_event(socket, timeout_s, ip))
    )


def _suppressed_acl(socket: Path, timeout_s: int, scoped: str) -> str:
    """The RCPT ACL's `deny` for a recipient on kiln's suppression list: a `check` (which
    charges nothing) of the recipient as the client wrote it (`_ACL_LOCAL`), refused with
    550 5.7.1 and the event when it is listed. Not refused: anything while kiln does not
    answer (the fail string is empty), an address kiln calls `invalid`, one `_CHECKABLE`
    leaves out. While kiln is down the `kiln_pick` router still holds the mail, and fails a
    listed recipient once kiln is back. `scoped`: the request's scope field, or ""."""
    request = (
        '\\{"op":"check","addresses":["\\\n          '
        + _address(_ACL_LOCAL, 12)
        + '"]'
        + scoped
        + "\\}\\n"
    )
    return (
        "  # kiln: refuse a recipient on kiln's suppression list (kiln exim-config\n"
        "  # --reject-suppressed). While kiln does not answer nothing is refused here.\n"
        "  deny\n"
        "    domains = ! +local_domains\n"
        "    condition = ${if " + _CHECKABLE + "}\n"
        "    set acl_m_kiln_event = ${if match\\\n"
        f"      {{${{readsocket{{{socket}}}\\\n"
        f"        {{{request}}}\\\n"
        f"        {{{timeout_s}s}}{{\\n}}{{}}}}}}\\\n"
        '      {\\N:"([a-z_]+)"\\}\\}$\\N}{$1}}\n'
        "    condition = ${if and{{def:acl_m_kiln_event}{!eq{$acl_m_kiln_event}{invalid}}}}\n"
        "    message = 550 " + _SUPPRESSED + " ($acl_m_kiln_event)\n"
    )


def _report_event(socket: Path, timeout_s: int, ip: str) -> str:
    """The `event_action` of `ip`'s transport: each delivery, deferral and bounce goes to kiln
    as a `report` (docs/protocol.md) for `ip`, the transport's own (`kiln_send` chose it by
    the IP kiln picked; Exim's `$sending_ip_address` is empty by the time the event runs),
    with the remote reply's code, enhanced status code and text (quotes, backslashes and
    control characters blanked: the JSON stays valid), and the recipient (`_address_field`),
    so kiln's suppression list hears of hard bounces and of the failures its soft-bounce
    rules count. kiln's answer is not used: a daemon that is down loses the report, not
    mail."""
    result = (
        "${if eq{$event_name}{msg:delivery}{delivered}"
        "{${if eq{$event_name}{msg:rcpt:defer}{deferred}{bounced}}}}"
    )
    # The remote reply follows ": " in $event_data ("SMTP error from remote mail server after
    # RCPT TO:<x@y>: 550 5.1.1 <x@y>: ..."). Its code as a JSON number, or "" (kiln reads that
    # as not given); the enhanced status code after it (RFC 3463, as kiln accepts it), or "".
    reply = "\\N: ([245][0-9][0-9])[ -]"
    code = "${if match{$event_data}{" + reply + '\\N}{$1}{""}}'
    enhanced = (
        "${if match{$event_data}{" + reply + "([245][.][0-9]{1,3}[.][0-9]{1,3})(?![.0-9])\\N}{$2}}"
    )
    text = '${sg{${substr_0_900:$event_data}}{\\N[^ -~]|["\\\\]\\N}{ }}'
    request = (
        '\\{"op":"report","ip":"' + ip + '","domain":"$domain",\\\n'
        f'        "result":"{result}","code":{code},\\\n'
        f'        "enhanced":"{enhanced}",\\\n'
        f'        "text":"{text}"\\\n' + _address_field(8) + "\\}\\n"
    )
    return (
        "  # kiln: every outcome, as a report (the reply is not used)\n"
        "  event_action = ${if match{$event_name}"
        "{\\N^msg:(delivery|rcpt:defer|fail:delivery)$\\N}\\\n"
        f"    {{${{readsocket{{{socket}}}\\\n"
        f"      {{{request}}}\\\n"
        f"      {{{timeout_s}s}}{{\\n}}{{}}}}}}{{}}}}\n"
    )
