"""`kiln exim-config`: the Exim routers and transport that send each message from the IP kiln
picks, fail a recipient on kiln's suppression list, and defer the rest while no IP of the pool
has room; and, when asked, the RCPT ACL statement that refuses suppressed recipients at
submission (docs/integrations/exim.md).

Exim asks kiln once per remote address, when it routes it: the `kiln_pick` router (a
`redirect`) keeps the reply of a `pick` over the native socket (`${readsocket}`, with the
recipient's address) as `$address_data` and fails the address when the reply says it is
suppressed; otherwise it declines, `kiln_send` sends a granted one from the chosen IP
(`interface`), and `kiln_defer` defers the rest, which Exim retries on its queue runs. One
request decides: Exim checks a router's `condition` before it expands `address_data`, so the
reply is asked in the first router and read by the conditions of the next. A daemon that does
not answer defers mail too: nothing leaves a warming IP without kiln's word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.schedule import Plan

__all__ = ["WHEN_DOWN", "EximConfig", "exim_config"]

#: What mail does while kiln does not answer: `defer` (wait in Exim's queue: nothing leaves
#: without kiln's word, the default) or `default-ip` (leave unthrottled from the host's
#: default address, which must then be a warm IP).
WHEN_DOWN = ("defer", "default-ip")

_SMARTHOST = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?$")

#: The recipient's local part in a router (`caseful_local_part`: as written, not lower-cased),
#: quoted again as RFC 5322 wants it (`"ann smith"`; `ann.smith` stays bare).
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


@dataclass(frozen=True)
class EximConfig:
    """The parts of an Exim configuration kiln needs: routers, a transport and, when asked
    for (`reject_suppressed`), a statement for the RCPT ACL (else "")."""

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
            + "\n# ---- and this in the transports section (after `begin transports`) ----\n"
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
) -> EximConfig:
    """The routers and transport for remote mail of `pool`, asking the daemon at `socket`.
    `smarthost` ("host" or "host:port"): send everything there (a relay, or a test's sink)
    instead of looking up MX records. `when_down`: what mail does while kiln does not answer
    (`WHEN_DOWN`). `reject_suppressed`: also the RCPT ACL statement that refuses a recipient
    on kiln's suppression list (it refuses nothing while kiln does not answer). KilnError for
    an unknown pool, a bad smarthost or `when_down`."""
    if when_down not in WHEN_DOWN:
        raise KilnError(f"when_down must be one of {', '.join(WHEN_DOWN)}, got {when_down!r}")
    if pool not in plan.pools:
        raise KilnError(
            f"pool {pool!r} is not in plan {plan.name!r}; its pools: " + ", ".join(plan.pools)
        )
    if not 1 <= timeout_s <= 60:
        raise KilnError(f"timeout must be 1 to 60 s, got {timeout_s}")
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
        route = f"  driver = manualroute\n  route_list = * {host}\n  self = send\n"
    request = (
        '\\{"op":"pick","pool":"' + pool + '","domain":"$domain"\\\n'
        "      ${if " + _CHECKABLE + "\\\n"
        '        {,"address":"' + _address(_ROUTER_LOCAL, 10) + '"}}\\}\\n'
    )
    unreachable = (
        '\\{"ok":false,"error":"kiln unreachable"\\}'
        if when_down == "defer"
        else '\\{"ok":true,"granted":1,"ip":"","error":"kiln unreachable"\\}'
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
        "kiln_send:\n" + route + "  domains = ! +local_domains\n"
        '  condition = ${if match{$address_data}{\\N^\\{.*"granted":[1-9]\\N}}\n'
        "  transport = kiln_smtp\n"
        "\n"
        "kiln_defer:\n"
        "  driver = redirect\n"
        "  domains = ! +local_domains\n"
        "  allow_defer\n"
        "  data = :defer: kiln: no IP of pool " + pool + " has room for $domain now\n"
    )
    transports = (
        "kiln_smtp:\n"
        "  driver = smtp\n"
        "  interface = ${extract jsons{ip}{$address_data}}\n"
        + (f"  port = {port}\n" if port else "")
        + ("  allow_localhost\n" if loopback else "")
        + _report_event(socket, timeout_s)
    )
    acl = _suppressed_acl(socket, timeout_s) if reject_suppressed else ""
    return EximConfig(routers=routers, transports=transports, acl=acl)


def _suppressed_acl(socket: Path, timeout_s: int) -> str:
    """The RCPT ACL's `deny` for a recipient on kiln's suppression list: a `check` (which
    charges nothing) of the recipient as the client wrote it (`_ACL_LOCAL`), refused with
    550 5.7.1 and the event when it is listed. Not refused: anything while kiln does not
    answer (the fail string is empty), an address kiln calls `invalid`, one `_CHECKABLE`
    leaves out. While kiln is down the `kiln_pick` router still holds the mail, and fails a
    listed recipient once kiln is back."""
    request = '\\{"op":"check","addresses":["\\\n          ' + _address(_ACL_LOCAL, 12) + '"]\\}\\n'
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


def _report_event(socket: Path, timeout_s: int) -> str:
    """The transport's `event_action`: each delivery, deferral and bounce goes to kiln as a
    `report` (docs/protocol.md) with the IP kiln picked for it (`$address_data`; Exim's
    `$sending_ip_address` is empty by the time the event runs), the remote reply's code and text
    (quotes, backslashes and control characters blanked: the JSON stays valid). kiln's
    answer is not waited on for anything: a daemon that is down loses the report, not mail."""
    result = (
        "${if eq{$event_name}{msg:delivery}{delivered}"
        "{${if eq{$event_name}{msg:rcpt:defer}{deferred}{bounced}}}}"
    )
    # The reply code as a JSON number, or "" (kiln reads that as not given).
    code = '${if match{$event_data}{\\N: ([245][0-9][0-9])[ -]\\N}{$1}{""}}'
    text = '${sg{${substr_0_900:$event_data}}{\\N[^ -~]|["\\\\]\\N}{ }}'
    request = (
        '\\{"op":"report","ip":"${extract jsons{ip}{$address_data}}","domain":"$domain",'
        f'"result":"{result}","code":{code},"text":"{text}"\\}}\\n'
    )
    return (
        "  # kiln: every outcome, as a report (the reply is not used)\n"
        "  event_action = ${if match{$event_name}"
        "{\\N^msg:(delivery|rcpt:defer|fail:delivery)$\\N}\\\n"
        f"    {{${{readsocket{{{socket}}}{{{request}}}{{{timeout_s}s}}{{\\n}}{{}}}}}}{{}}}}\n"
    )
