"""`kiln exim-config`: the Exim router and transport that send each message from the IP kiln
picks, and defer it while no IP of the pool has room (docs/integrations/exim.md).

Exim asks kiln once per remote address, when it routes it: the `kiln_pick` router's
`address_data` is a `pick` over the native socket (`${readsocket}`), kept only when granted;
otherwise the expansion is forced to fail, the router declines, and `kiln_defer` defers the
address, which Exim retries on its queue runs. The transport sends from the chosen IP
(`interface`). A daemon that does not answer defers mail too: nothing leaves a warming IP
without kiln's word. `address_data` is used rather than `condition` because Exim checks a
router's `condition` before it expands `address_data`, so a `condition` cannot see the reply.
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


@dataclass(frozen=True)
class EximConfig:
    """The two parts of an Exim configuration kiln needs: routers and a transport."""

    routers: str
    transports: str

    def text(self) -> str:
        """Both parts, each under the section it belongs to, as `kiln exim-config` prints."""
        return (
            "# ---- put these first in the routers section (after `begin routers`) ----\n"
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
) -> EximConfig:
    """The routers and transport for remote mail of `pool`, asking the daemon at `socket`.
    `smarthost` ("host" or "host:port"): send everything there (a relay, or a test's sink)
    instead of looking up MX records. `when_down`: what mail does while kiln does not answer
    (`WHEN_DOWN`). KilnError for an unknown pool, a bad smarthost or `when_down`."""
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
    request = '\\{"op":"pick","pool":"' + pool + '","domain":"$domain"\\}\\n'
    unreachable = (
        '\\{"ok":false,"error":"kiln unreachable"\\}'
        if when_down == "defer"
        else '\\{"ok":true,"granted":1,"ip":"","error":"kiln unreachable"\\}'
    )
    routers = (
        f"# kiln: plan {plan.name!r}, pool {pool!r} (kiln exim-config)\n"
        "kiln_pick:\n" + route + "  domains = ! +local_domains\n"
        "  address_data = ${if match\\\n"
        f"    {{${{readsocket{{{socket}}}\\\n"
        f"      {{{request}}}\\\n"
        f"      {{{timeout_s}s}}{{\\n}}{{{unreachable}}}}}}}\\\n"
        '    {\\N^(\\{.*"granted":[1-9].*)$\\N}{$1}fail}\n'
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
    return EximConfig(routers=routers, transports=transports)


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
