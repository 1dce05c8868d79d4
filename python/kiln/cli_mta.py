"""The MTA configuration verbs: `kiln exim-config` and `kiln postfix-config` (no daemon
needed; docs/integrations/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.cli_plan import load_one
from kiln.errors import KilnError
from kiln.exim import WHEN_DOWN, exim_config
from kiln.postfix import postfix_config
from kiln.schedule import Plan

__all__ = ["add_mta_verbs", "exim_config_main", "postfix_config_main"]


def add_mta_verbs(verbs: Any, state_dir_help: str) -> None:
    """`exim-config` and `postfix-config` on the `kiln` parser's verbs."""
    exim = verbs.add_parser(
        "exim-config",
        help="print the Exim routers and transports (one per IP) that send from kiln's pick",
    )
    _common(exim, state_dir_help, "kiln.sock", "the daemon's MTA socket as Exim reaches it")
    exim.add_argument(
        "--smarthost",
        metavar="HOST[:PORT]",
        help="send everything to this host (a relay) instead of the recipients' MX hosts",
    )
    exim.add_argument(
        "--timeout", type=int, default=2, help="seconds Exim waits for kiln (default 2)"
    )
    exim.add_argument(
        "--when-down",
        choices=list(WHEN_DOWN),
        default="defer",
        help="while kiln does not answer: defer (mail waits; the default) or default-ip "
        "(mail leaves unthrottled from the host's default address, which must be warm)",
    )
    exim.add_argument(
        "--reject-suppressed",
        action="store_true",
        help="also print the RCPT ACL statement that refuses suppressed recipients at "
        "submission (it refuses nothing while kiln is down); without it they bounce when routed",
    )
    postfix = verbs.add_parser(
        "postfix-config",
        help="print the master.cf and main.cf lines that route Postfix's mail through kiln",
    )
    _common(
        postfix,
        state_dir_help,
        "postfix.sock",
        "kiln's transport table as Postfix reaches it (kiln run --postfix)",
    )
    postfix.add_argument(
        "--nexthop",
        metavar="HOST[:PORT]",
        default="",
        help="the relay kiln run --postfix-nexthop names (shown; default: recipients' MX)",
    )
    postfix.add_argument(
        "--retry",
        type=int,
        default=60,
        metavar="SECONDS",
        help="how soon Postfix retries mail deferred while kiln was down (default 60)",
    )
    postfix.add_argument(
        "--log-file", help="have Postfix log to this file (maillog_file), which kiln reads"
    )
    postfix.add_argument(
        "--reject-suppressed",
        action="store_true",
        help="also refuse suppressed recipients at submission (check_recipient_access; smtpd "
        "answers 451 while kiln is down); without it they bounce when routed",
    )


def _common(parser: argparse.ArgumentParser, state_dir_help: str, sock: str, what: str) -> None:
    parser.add_argument("--config", required=True, type=Path, metavar="PLAN", help="plan file")
    parser.add_argument("--pool", help="the pool its mail goes through (default: the only one)")
    parser.add_argument(
        "--scope",
        default="",
        help="also check recipients against this scope's suppression list (a sending "
        "domain, stream or tenant; default: the global list only)",
    )
    parser.add_argument("--socket", type=Path, help=f"{what} (default: STATE_DIR/{sock})")
    parser.add_argument("--state-dir", type=Path, help=state_dir_help)


def _plan_and_pool(args: argparse.Namespace, verb: str) -> tuple[Plan, str] | None:
    """The plan and the pool named (or its only one); None after saying what is wrong."""
    plan = load_one(args.config)
    if plan is None:
        return None
    pool: str | None = args.pool
    if pool is None:
        if len(plan.pools) != 1:
            _err(
                f"kiln {verb}: the plan has several pools; name one with --pool: "
                + ", ".join(plan.pools)
            )
            return None
        pool = next(iter(plan.pools))
    return plan, pool


def exim_config_main(args: argparse.Namespace, state_dir: Path) -> int:
    """`kiln exim-config`: print the routers, transport and, with `--reject-suppressed`, the
    RCPT ACL statement (docs/integrations/exim.md)."""
    return _print(
        args,
        "exim-config",
        state_dir / "kiln.sock",
        lambda plan, pool, socket: exim_config(
            plan,
            pool,
            socket,
            smarthost=args.smarthost,
            timeout_s=args.timeout,
            when_down=args.when_down,
            reject_suppressed=args.reject_suppressed,
            scope=args.scope,
        ).text(),
    )


def postfix_config_main(args: argparse.Namespace, state_dir: Path) -> int:
    """`kiln postfix-config`: print the lines (docs/integrations/postfix.md)."""
    return _print(
        args,
        "postfix-config",
        state_dir / "postfix.sock",
        lambda plan, pool, socket: postfix_config(
            plan,
            pool,
            socket,
            nexthop=args.nexthop,
            retry_s=args.retry,
            log_file=args.log_file,
            reject_suppressed=args.reject_suppressed,
            scope=args.scope,
        ).text(),
    )


def _print(
    args: argparse.Namespace,
    verb: str,
    default_socket: Path,
    render: Callable[[Plan, str, Path], str],
) -> int:
    """Render for the plan's pool and the socket (`--socket`, else `default_socket`) and print
    it; 1 after saying what is wrong."""
    found = _plan_and_pool(args, verb)
    if found is None:
        return 1
    socket: Path = args.socket or default_socket
    try:
        text = render(*found, socket.absolute())
    except KilnError as e:
        _err(f"kiln {verb}: {e}")
        return 1
    sys.stdout.write(text)
    return 0


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
