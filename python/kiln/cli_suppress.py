"""`kiln suppress add|remove|check|history|list|import|verify|export`: the suppression list
through the daemon's operator socket (docs/suppression.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.client import Client
from kiln.suppress.formats import EXPORT_FORMATS, SOURCES
from kiln.suppress.live import EVENTS

__all__ = ["add_suppress_verb", "suppress_main"]


def add_suppress_verb(verbs: Any, state_dir_help: str) -> None:
    """`kiln suppress ACTION ...` on the `kiln` parser's verbs."""
    top = verbs.add_parser("suppress", help="the suppression list: who kiln never sends to")
    actions = top.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="what to do (kiln suppress ACTION -h)"
    )

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, help=state_dir_help)
        p.add_argument("--socket", type=Path, help="default STATE_DIR/operator.sock")
        p.add_argument("--json", action="store_true", help="print the raw reply")
        return p

    add = action("add", "put an address on the list")
    add.add_argument("address", help="the recipient address")
    add.add_argument("--event", choices=EVENTS, default="manual", help="why (default manual)")
    add.add_argument(
        "--scope", default="", help="a sending domain, stream or tenant (default: all)"
    )
    add.add_argument("--for", dest="for_", metavar="DURATION", help="how long (soft_bounce)")
    add.add_argument("--reason", default="", help="for the log")
    remove = action("remove", "take an address off the list (an event of the log too)")
    remove.add_argument("address", help="the recipient address")
    remove.add_argument("--scope", default="", help="the scope it was listed in")
    remove.add_argument("--reason", default="", help="for the log")
    check = action("check", "which of these addresses are suppressed, and why")
    check.add_argument("addresses", nargs="+", metavar="ADDRESS", help="recipient addresses")
    check.add_argument("--scope", default="", help="also this scope's list")
    history = action("history", "every event of one address")
    history.add_argument("address", help="the recipient address")
    history.add_argument("--scope", default="", help="also this scope's events")
    listing = action("list", "the log, oldest first")
    listing.add_argument("--after-id", type=int, default=0, help="events after this id")
    listing.add_argument("--limit", type=int, default=100, help="how many (1-1000)")
    for name, text in (
        ("import", "put every address of a provider's export on the list"),
        ("verify", "check that every address of an export is on the list"),
    ):
        p = action(name, text)
        p.add_argument("--from", dest="source", choices=SOURCES, required=True, help="whose export")
        p.add_argument("file", type=Path, help="the export file (the daemon reads it)")
        p.add_argument("--scope", help="the scope of rows that name none")
        p.add_argument(
            "--fold-case",
            action="store_true",
            help="lower-case the local parts too (for an export that changed their case)",
        )
        if name == "import":
            p.add_argument(
                "--skip-bad-lines",
                action="store_true",
                help="import the readable lines even when some cannot be read",
            )
            p.add_argument("--dry-run", action="store_true", help="count, import nothing")
    export = action("export", "write the list for MTAs and tools that keep their own")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="csv", help="default csv")
    export.add_argument("file", type=Path, help="where (the daemon writes it)")
    export.add_argument(
        "--partial",
        action="store_true",
        help="write the list even when some listed addresses are kept only as hashes "
        "(hashed-only mode): those are left out, and counted",
    )


def _who() -> str:
    return f"{os.environ.get('USER') or 'an operator'} (kiln suppress)"


def suppress_main(args: argparse.Namespace, connect: Callable[[argparse.Namespace], Client]) -> int:
    """Send the request, print the answer; 0 when done, 1 otherwise (2: verify found gaps)."""
    op, req = _request(args)
    with connect(args) as c:
        reply = c.request(op, **req)
    if args.json or not reply.get("ok"):
        out = sys.stdout if reply.get("ok") else sys.stderr
        if not reply.get("ok") and not args.json:
            out.write(f"kiln suppress {args.action}: {reply.get('error')}\n")
            for p in reply.get("problems", []):
                out.write(f"  {p}\n")
        else:
            out.write(json.dumps(reply, indent=2) + "\n")
        return 0 if reply.get("ok") else 1
    _show(args.action, reply)
    if args.action == "verify" and not reply["verified"]:
        return 2
    return 0


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(op, fields) of the action."""
    a = args.action
    if a == "add":
        req: dict[str, Any] = {"action": "add", "address": args.address, "event": args.event}
        req |= {"scope": args.scope, "reason": args.reason, "by": _who()}
        if args.for_:
            req["for"] = args.for_
        return "suppress", req
    if a == "remove":
        return "suppress", {
            "action": "remove",
            "address": args.address,
            "scope": args.scope,
            "reason": args.reason,
            "by": _who(),
        }
    if a == "check":
        return "check", {"addresses": args.addresses, "scope": args.scope}
    if a == "history":
        return "suppress", {"action": "history", "address": args.address, "scope": args.scope}
    if a == "list":
        return "suppress", {"action": "list", "after_id": args.after_id, "limit": args.limit}
    if a == "export":
        return "suppress_file", {
            "action": "export",
            "format": args.format,
            "path": str(args.file.absolute()),
            "partial": args.partial,
        }
    req = {"action": a, "from": args.source, "path": str(args.file.absolute())}
    if args.scope is not None:
        req["scope"] = args.scope
    if args.fold_case:
        req["fold_case"] = True
    if a == "import":
        req |= {"skip_bad": args.skip_bad_lines, "dry_run": args.dry_run}
    return "suppress_file", req


def _show(action: str, reply: dict[str, Any]) -> None:
    """The reply for people."""
    w = sys.stdout.write
    if action in ("add", "remove"):
        w(f"{reply['address']}: {reply['event']} recorded (log id {reply['id']})\n")
    elif action == "check":
        for address, event in reply["suppressed"].items():
            w(f"{address}: {event or 'not suppressed'}\n")
    elif action in ("history", "list"):
        for e in reply["events"]:
            scope = f" [{e['scope']}]" if e["scope"] else ""
            who = e["address"] or f"#{e.get('fingerprint', '?')}"  # hashed-only: no address
            w(f"{e['id']}  {e['at_ms']}  {e['event']:<12} {who}{scope}  {e['source']}\n")
        w(f"{reply['listed']:,} addresses listed\n")
    elif action == "export":
        w(f"{reply['written']:,} addresses written to {reply['path']}\n")
        if reply.get("left_out_hashed"):
            w(
                f"{reply['left_out_hashed']:,} listed addresses left out: the log keeps only "
                "their keyed hashes (recorded in hashed-only mode)\n"
            )
    else:
        per = ", ".join(f"{k} {v:,}" for k, v in reply["per_type"].items()) or "none"
        w(f"{reply['rows']:,} rows: {per}; {reply['duplicates_in_file']:,} repeated in the file, ")
        w(f"{reply['already_listed']:,} already listed; {reply['problem_count']:,} unreadable\n")
        for p in reply["problems"]:
            w(f"  {p}\n")
        if action == "import":
            w(f"{reply.get('imported', 0):,} imported")
            w(f" ({reply['would_import']:,} would be)\n" if "would_import" in reply else "\n")
        else:
            state = "every address is suppressed" if reply["verified"] else "NOT all suppressed"
            w(f"{state}: {reply['missing_count']:,} missing\n")
            for m in reply["missing"]:
                w(f"  missing: {m}\n")
