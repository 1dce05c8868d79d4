"""`kiln postfix-config`: the `master.cf` and `main.cf` lines that put kiln in Postfix's
delivery path (docs/integrations/postfix.md), and the names both sides share.

Postfix's queue manager resolves every recipient through its own `trivial-rewrite` service,
`kiln-rewrite`, whose `transport_maps` is kiln's socketmap table for one pool. kiln answers
each address with the transport of the IP it picked (one `smtp` transport per sending IP,
bound to that IP with its own `syslog_name`), or with `retry:` and "kiln: waiting for room at
PROVIDER in pool POOL" when no IP has room; the log line of that deferral puts the recipient
in kiln's release queue, and kiln hands the message back (`postqueue -i`) when room opens.
SMTP-time address checks (smtpd) keep using the default `rewrite` service and never ask kiln.

While kiln does not answer, the lookup fails and Postfix defers the recipient (nothing leaves
a warming IP without kiln's word); the deferred mail is retried on Postfix's own schedule,
which `retry_s` sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.schedule import Plan
from kiln.suppress.address import mta_scope

__all__ = [
    "WAIT_TEXT",
    "PostfixConfig",
    "postfix_config",
    "syslog_name",
    "transport_name",
    "valid_nexthop",
    "wait_of",
]

#: The deferral text of a `retry:` answer (rust/src/socketmap), as Postfix logs it.
WAIT_TEXT = re.compile(r"kiln: waiting for room at (?P<provider>\S+) in pool (?P<pool>\S+)")

_NEXTHOP = re.compile(r"^(\[[0-9A-Za-z.:\-]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?$")


def valid_nexthop(text: str) -> bool:
    """Whether `text` is a next hop Postfix's smtp transport reads: HOST, [HOST], :PORT."""
    return _NEXTHOP.match(text) is not None


def transport_name(ip: str) -> str:
    """The `master.cf` transport of a sending IP: `kiln-192.0.2.10`, `kiln-2001-db8--10`."""
    return "kiln-" + ip.replace(":", "-")


def syslog_name(ip: str) -> str:
    """The `syslog_name` of a sending IP's transport, which the log reader maps back."""
    return "postfix/" + transport_name(ip)


def wait_of(text: str | None) -> tuple[str, str] | None:
    """(pool, provider) of a deferral kiln asked for, from its logged text; None otherwise."""
    if text is None:
        return None
    m = WAIT_TEXT.search(text)
    return None if m is None else (m["pool"], m["provider"])


@dataclass(frozen=True)
class PostfixConfig:
    """What goes into Postfix's two files, and the plan lines that let kiln read its log."""

    master_cf: str
    main_cf: str
    plan_feedback: str

    def text(self) -> str:
        """All three, each under the file it belongs to, as `kiln postfix-config` prints."""
        return (
            "# ---- master.cf: add these services, and give the qmgr line the -o shown ----\n"
            + self.master_cf
            + "\n# ---- main.cf: add these lines ----\n"
            + self.main_cf
            + "\n# ---- kiln's plan: so kiln reads Postfix's log (results and waits) ----\n"
            + self.plan_feedback
        )


def postfix_config(
    plan: Plan,
    pool: str,
    socket: Path,
    *,
    nexthop: str = "",
    retry_s: int = 60,
    log_file: str | None = None,
    reject_suppressed: bool = False,
    scope: str = "",
) -> PostfixConfig:
    """The lines for remote mail of `pool`, asking the daemon's socketmap table at `socket`.
    `nexthop`: what `kiln run --postfix-nexthop` is given (shown in a comment; the daemon
    adds it to its answers). `retry_s`: how soon Postfix retries mail it deferred on its own
    (kiln down or restarting). `log_file`: Postfix's `maillog_file`, when it logs to a file
    of its own. `reject_suppressed`: also refuse suppressed recipients at submission (smtpd
    then answers 451 while kiln is down). `scope`: recipients are checked against that
    scope's suppression list as well as the global one (`kiln.suppress.address.mta_scope`
    says which scopes a configuration can name). KilnError for an unknown pool or a bad
    value."""
    if pool not in plan.pools:
        raise KilnError(
            f"pool {pool!r} is not in plan {plan.name!r}; its pools: " + ", ".join(plan.pools)
        )
    if not 10 <= retry_s <= 4000:
        raise KilnError(f"retry must be 10 to 4000 s, got {retry_s}")
    if nexthop and not valid_nexthop(nexthop):
        raise KilnError(f"nexthop must be HOST, [HOST] or either with :PORT, got {nexthop!r}")
    try:
        scoped = f"/{mta_scope(scope)}" if scope else ""
    except ValueError as exc:
        raise KilnError(str(exc)) from None
    ips = plan.all_ips()
    lines = [
        f"# kiln: plan {plan.name!r}, pool {pool!r} (kiln postfix-config)",
        "# The queue manager resolves recipients through kiln's transport table:",
        "qmgr      unix  n       -       n       300     1       qmgr",
        "  -o rewrite_service_name=kiln-rewrite",
        "kiln-rewrite unix -     -       n       -       -       trivial-rewrite",
        f"  -o transport_maps=socketmap:unix:{socket}:{pool}{scoped}",
        "# One smtp transport per sending IP"
        + (f" (kiln run --postfix-nexthop {nexthop})" if nexthop else "")
        + ":",
    ]
    for ip in ips:
        bind = "smtp_bind_address6" if ":" in ip else "smtp_bind_address"
        lines += [
            f"{transport_name(ip)} unix -     -       n       -       -       smtp",
            f"  -o {bind}={ip}",
            f"  -o syslog_name={syslog_name(ip)}",
        ]
    main = [
        f"# kiln: plan {plan.name!r}, pool {pool!r} (kiln postfix-config)",
        "# Mail deferred while kiln was down or restarting is retried this often (kiln",
        "# releases the recipients it asked to wait itself, as soon as the caps open):",
        f"queue_run_delay = {retry_s}s",
        f"minimal_backoff_time = {retry_s}s",
        f"maximal_backoff_time = {max(retry_s, 300)}s",
    ]
    if reject_suppressed:
        main += [
            "# Recipients on kiln's suppression list are refused at submission, before any",
            "# permit (docs/suppression.md); while kiln is down smtpd answers 451 and senders",
            "# retry. Merge with your own restrictions:",
            f"smtpd_recipient_restrictions = check_recipient_access socketmap:unix:{socket}:"
            f"kiln.suppressed{scoped},",
            "    permit_mynetworks, reject_unauth_destination",
        ]
    if log_file:
        main.append(f"maillog_file = {log_file}")
    names = "\n".join(f'        "{syslog_name(ip)}": "{ip}"' for ip in ips)
    feedback = (
        "signals:\n"
        "  feedback:\n"
        "    postfix:\n"
        f"      path: {log_file or '/var/log/mail.log'}\n"
        "      syslog_names:\n" + names + "\n"
    )
    return PostfixConfig("\n".join(lines) + "\n", "\n".join(main) + "\n", feedback)
