"""The `kiln` command. `main(argv)` returns an exit code, so tests call it as a function."""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import json
import os
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kiln import __version__
from kiln.cli_mta import add_mta_verbs, exim_config_main, postfix_config_main
from kiln.cli_plan import add_plan_verbs, check_main, load_one, plan_main, schema_main
from kiln.cli_render import add_render_verb, render_main
from kiln.cli_simulate import add_simulate_verb, simulate_main
from kiln.cli_suppress import add_suppress_verb, suppress_main
from kiln.client import Client, ClientError
from kiln.clock import MAX_SPEED, MIN_SPEED, ScaledClock, SystemClock
from kiln.postfix import valid_nexthop
from kiln.starter import add_init_arguments, example_plan_path, init_main

if TYPE_CHECKING:
    from kiln.daemon.postfix import PostfixSettings

__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "build_parser",
    "console",
    "main",
    "state_dir",
]

#: The state folder when neither --state-dir nor $KILN_STATE_DIR names one.
DEFAULT_STATE_DIR = Path(".state")
STATE_DIR_ENV = "KILN_STATE_DIR"
_STATE_DIR_HELP = "database and sockets go here (default: $KILN_STATE_DIR, else ./.state)"
_EMBEDDED_NOTE = (
    "no --config: running kiln's embedded example plan, whose IPs are documentation addresses; "
    "`kiln init DIR` writes a copy to make your own"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="kiln", description="IP warm-up scheduler and throttle daemon for email senders."
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    run = verbs.add_parser("run", help="run the daemon beside your MTAs")
    run.add_argument(
        "--config", help="warm-up plan (YAML); default: the embedded example plan (kiln init)"
    )
    run.add_argument("--state-dir", type=Path, help=_STATE_DIR_HELP)
    run.add_argument(
        "--database-url",
        help="e.g. postgresql://kiln@db/kiln (default: SQLite in the state folder)",
    )
    run.add_argument("--socket", type=Path, help="native socket (default STATE_DIR/kiln.sock)")
    run.add_argument(
        "--socket-mode",
        type=_octal,
        default=0o660,
        help="file mode of the socket, octal (default 0660)",
    )
    run.add_argument("--socket-group", help="group that owns the socket")
    run.add_argument(
        "--operator-socket",
        type=Path,
        help="operator socket: reload, cancel, explain, status (default STATE_DIR/operator.sock)",
    )
    run.add_argument(
        "--operator-socket-mode",
        type=_octal,
        default=0o600,
        help="file mode of the operator socket, octal (default 0600)",
    )
    run.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="open client connections at most (default: the open-files limit less 256)",
    )
    run.add_argument(
        "--mta-listener",
        choices=["rust", "asyncio"],
        default="rust",
        help="who serves the MTA socket: a thread of the Rust core, where decisions never wait "
        "for Python (default), or the event loop (docs/daemon.md, Latency)",
    )
    run.add_argument(
        "--postfix",
        action="store_true",
        help="serve Postfix's transport table and release the mail it holds "
        "(docs/integrations/postfix.md; kiln postfix-config prints Postfix's side)",
    )
    run.add_argument(
        "--postfix-socket", type=Path, help="its socket (default STATE_DIR/postfix.sock)"
    )
    run.add_argument(
        "--postfix-nexthop",
        default="",
        metavar="HOST[:PORT]",
        help="send all of Postfix's kiln-routed mail to this relay (default: recipients' MX)",
    )
    run.add_argument(
        "--postfix-release",
        default="postqueue -i",
        metavar="COMMAND",
        help="hands a held message back to Postfix; its queue id is appended (default "
        "'postqueue -i'; another instance: 'postqueue -c /etc/postfix-out -i')",
    )
    run.add_argument(
        "--resp-socket",
        type=Path,
        help="the Redis-protocol socket: CL.THROTTLE, KILN.ACQUIRE, KILN.PICK "
        "(default STATE_DIR/resp.sock; docs/integrations/resp.md)",
    )
    run.add_argument("--no-resp", action="store_true", help="do not serve the Redis protocol")
    run.add_argument(
        "--http",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="the HTTP API, metrics and dashboard (default 127.0.0.1:8470; 'off': none; "
        "docs/http.md)",
    )
    run.add_argument(
        "--http-public",
        action="store_true",
        help="allow --http beyond loopback; every request then needs the token",
    )
    run.add_argument(
        "--resp-tcp",
        type=_loopback_address,
        metavar="HOST:PORT",
        help="also serve the Redis protocol on this loopback TCP address, e.g. 127.0.0.1:6380 "
        "(off by default; only loopback: RESP has no authentication)",
    )
    run.add_argument(
        "--snapshot-interval-ms",
        type=int,
        default=1000,
        help="how often counters are saved (default 1000)",
    )
    run.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="DNS server for MX lookups (default: /etc/resolv.conf); repeatable",
    )
    run.add_argument("--node", help="name of this daemon in a shared database (default: host)")
    run.add_argument(
        "--reinitialise",
        action="store_true",
        help="start afresh when the state folder's database is lost, empty or replaced "
        "(ramps back to step 1, today's budget granted again; see docs/state.md)",
    )
    run.add_argument(
        "--clock-start",
        type=_instant,
        metavar="ISO8601",
        help="for drills and tests: the daemon's clock starts at this instant (with its "
        "offset, e.g. 2026-03-09T21:00:00+01:00) instead of now",
    )
    run.add_argument(
        "--clock-speed",
        type=_speed,
        metavar="N",
        help="for drills and tests: the daemon's clock runs N times faster than real time "
        "from --clock-start (or now); 360 makes an hour last 10 s",
    )
    run.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="auto: console on a terminal, JSON lines otherwise",
    )
    for verb, text in (
        ("status", "every ramp's step, state, caps and usage, from the running daemon"),
        ("reload", "re-read the plan; the running one stays if the new one has errors"),
        ("query", "send JSON requests (arguments, or lines on stdin) and print the replies"),
    ):
        client = verbs.add_parser(verb, help=text)
        client.add_argument("--state-dir", type=Path, help=_STATE_DIR_HELP)
        client.add_argument("--socket", type=Path, help="default STATE_DIR/operator.sock")
        if verb == "status":
            client.add_argument("--json", action="store_true", help="print the raw reply")
        if verb == "query":
            client.add_argument(
                "requests",
                nargs="*",
                metavar="JSON",
                help="requests, one JSON object each (none: read lines from standard input)",
            )
    for verb, text in (
        ("automations", "what policy is doing now: suspensions, slow-downs, holds, pauses"),
        ("cancel", "end an automation early (a cancelled step-down gives its steps back)"),
        ("explain", "why an IP has the limit it has right now, for one provider"),
        ("queue", "what waits in the release queue, per pool and provider"),
        ("pause", "pause an IP or a batch, at one provider or all, for a while or until resumed"),
        ("resume", "end the pauses of an IP or a batch (at one provider, or all)"),
    ):
        client = verbs.add_parser(verb, help=text)
        client.add_argument("--state-dir", type=Path, help=_STATE_DIR_HELP)
        client.add_argument("--socket", type=Path, help="default STATE_DIR/operator.sock")
        client.add_argument("--json", action="store_true", help="print the raw reply")
        if verb == "automations":
            client.add_argument(
                "--all", action="store_true", help="also those ended in the last three days"
            )
        if verb == "cancel":
            client.add_argument("id", metavar="ID", help="automation id, such as A12")
        if verb in ("pause", "resume"):
            client.add_argument("target", metavar="IP|BATCH", help="a sending IP or a batch")
            client.add_argument(
                "provider", nargs="?", metavar="PROVIDER", help="one provider (default: all)"
            )
        if verb == "pause":
            client.add_argument(
                "--for",
                dest="for_",
                metavar="DURATION",
                help="90m, 2h, 1d (default: until resumed)",
            )
            client.add_argument("--reason", required=True, help="why, for the decision log")
        if verb == "explain":
            client.add_argument("ip", metavar="IP", help="a sending IP of the plan")
            client.add_argument(
                "provider", metavar="PROVIDER", help="a provider of the plan, e.g. google"
            )
    token = verbs.add_parser("token", help="print the HTTP API's token (made if there is none)")
    token.add_argument("--state-dir", type=Path, help=_STATE_DIR_HELP)
    add_plan_verbs(verbs)
    add_init_arguments(
        verbs.add_parser("init", help="write a starter plan and a systemd unit into a folder")
    )
    add_mta_verbs(verbs, _STATE_DIR_HELP)
    add_suppress_verb(verbs, _STATE_DIR_HELP)
    add_render_verb(verbs, _STATE_DIR_HELP, _instant)
    add_simulate_verb(verbs)
    from kiln.rules import add_classify_arguments  # the verb lives in rules.py

    add_classify_arguments(
        verbs.add_parser("classify", help="classify an SMTP reply with the reply rules")
    )
    return parser


def _out(text: str, stream: TextIO | None = None) -> None:
    """Write a line to stdout (or `stream`)."""
    (stream or sys.stdout).write(text if text.endswith("\n") else text + "\n")


def _local(ms: int, timezone: str) -> str:
    """Epoch ms as ISO 8601 in `timezone` with its offset (UTC if the zone is unknown here)."""
    try:
        zone: tzinfo = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = UTC
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone).isoformat(timespec="seconds")


def _loopback_address(text: str) -> str:
    """`HOST:PORT` on loopback (`127.0.0.1:6380`, `[::1]:6380`, `localhost:6380`), as the
    core's TCP listener takes it."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        address, number = None, -1
    if not sep or address is None or not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not HOST:PORT (e.g. 127.0.0.1:6380): {text!r}")
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(
            f"{host} is not a loopback address: the Redis protocol has no authentication, "
            "so kiln serves it on loopback only (127.0.0.0/8, ::1)"
        )
    return f"[{host}]:{number}" if address.version == 6 else f"{host}:{number}"


def _octal(text: str) -> int:
    """A file mode written in octal (0660, 660 or 0o660)."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"file mode out of range: {text!r}")
    return mode


def _instant(text: str) -> int:
    """An ISO 8601 instant with its UTC offset (or Z), as ms since the epoch."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 instant such as 2026-03-09T21:00:00+01:00: {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"give the instant's offset (2026-03-09T21:00:00+01:00 or ...Z): {text!r}"
        )
    ms = int(moment.timestamp() * 1000)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"an instant before 1970: {text!r}")
    return ms


def _speed(text: str) -> float:
    """A clock speed factor (see kiln.clock.ScaledClock)."""
    try:
        speed = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_SPEED <= speed <= MAX_SPEED:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"clock speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}, got {text!r}"
        )
    return speed


def _run(args: argparse.Namespace) -> int:
    """`kiln run`: validate the plan, then run the daemon until SIGTERM/SIGINT."""
    clock = _drill_clock(args)  # first: the drill clock reads --clock-start at process start
    _enable_faulthandler()
    plan_path = example_plan_path() if args.config is None else Path(args.config)
    plan = load_one(plan_path)
    if plan is None:
        return 1
    if args.http != "off":
        from kiln.web.serve import is_loopback, parse_address

        try:
            host, _ = parse_address(args.http)
        except ValueError as e:
            _out(f"kiln run: --http: {e}", sys.stderr)
            return 2
        if not is_loopback(host) and not args.http_public:
            _out(
                f"kiln run: --http {args.http} is not loopback; add --http-public to serve it "
                "there (every request then needs the token: kiln token)",
                sys.stderr,
            )
            return 2
    from kiln import daemon, log  # the daemon's dependencies load only for `run`

    log.configure(args.log_format)
    folder, folder_from = state_dir(args.state_dir)
    log.get_logger(component="cli").info(
        "plan",
        plan=plan.name,
        path=str(plan_path),
        embedded=args.config is None,
        state_dir=str(folder),
        state_dir_from=folder_from,
        **({"note": _EMBEDDED_NOTE} if args.config is None else {}),
    )
    config = daemon.DaemonConfig(
        plan_path=plan_path,
        state_dir=folder,
        database_url=args.database_url,
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        operator_socket_path=args.operator_socket,
        operator_socket_mode=args.operator_socket_mode,
        max_connections=args.max_connections,
        mta_listener=args.mta_listener,
        snapshot_interval_ms=args.snapshot_interval_ms,
        nameservers=tuple(args.nameserver),
        **({"node": args.node} if args.node else {}),
        reinitialise=args.reinitialise,
        postfix=_postfix_settings(args, folder),
        resp_socket_path=args.resp_socket,
        resp=not args.no_resp,
        resp_tcp=args.resp_tcp,
        http=None if args.http == "off" else args.http,
        http_public=args.http_public,
    )
    return daemon.run(config, clock)


def _postfix_settings(args: argparse.Namespace, folder: Path) -> PostfixSettings | None:
    """What --postfix and its options ask for (any of them turns it on)."""
    from kiln.daemon.postfix import PostfixSettings

    if not (args.postfix or args.postfix_socket or args.postfix_nexthop):
        return None
    release = tuple(shlex.split(args.postfix_release))
    if not release:
        raise SystemExit("kiln run: --postfix-release must name a command")
    if args.postfix_nexthop and not valid_nexthop(args.postfix_nexthop):
        raise SystemExit(
            f"kiln run: --postfix-nexthop must be HOST, [HOST] or either with :PORT, "
            f"got {args.postfix_nexthop!r}"
        )
    return PostfixSettings(
        socket=(args.postfix_socket or folder / "postfix.sock").absolute(),
        nexthop=args.postfix_nexthop,
        release_command=release,
    )


def _drill_clock(args: argparse.Namespace) -> ScaledClock | None:
    """The clock --clock-start/--clock-speed ask for; None: the real clock."""
    if args.clock_start is None and args.clock_speed is None:
        return None
    start = SystemClock().now_ms() if args.clock_start is None else args.clock_start
    return ScaledClock(start, 1.0 if args.clock_speed is None else args.clock_speed)


def _enable_faulthandler() -> None:
    """A fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) prints every thread's Python
    traceback on stderr, where the service manager's log collects it, before the process dies."""
    stream = sys.__stderr__
    if stream is not None:
        try:
            faulthandler.enable(file=stream, all_threads=True)
        except (OSError, ValueError):  # a stderr without a file descriptor: nothing to write to
            pass


def state_dir(given: Path | None) -> tuple[Path, str]:
    """The state folder and where it came from: --state-dir, else $KILN_STATE_DIR, else
    ./.state. `kiln run` and the client verbs find it the same way."""
    if given is not None:
        return given, "--state-dir"
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env), f"${STATE_DIR_ENV}"
    return DEFAULT_STATE_DIR, f"the default: neither --state-dir nor ${STATE_DIR_ENV} is set"


def _client(args: argparse.Namespace) -> Client:
    """A connection to the daemon's operator socket: --socket, else STATE_DIR/operator.sock
    (`state_dir`). When nobody answers, the error says where it looked and why there."""
    if args.socket is not None:
        path, why = args.socket, "--socket"
    else:
        folder, folder_from = state_dir(args.state_dir)
        path, why = folder / "operator.sock", f"the state folder {folder} ({folder_from})"
    try:
        return Client(path)
    except ClientError as e:
        raise ClientError(
            f"{e}\n  looked for the operator socket at {path.absolute()}, from {why}; "
            f"name the daemon's with --socket, --state-dir or ${STATE_DIR_ENV}"
        ) from None


def _status(args: argparse.Namespace) -> int:
    """`kiln status`: one line per batch x provider, under the plan's name, time zone and the
    daemon's time in it (with its offset)."""
    with _client(args) as c:
        reply = c.request("status")
    if args.json or not reply.get("ok"):
        _out(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    head = [
        "batch",
        "provider",
        "state",
        "step",
        "daily_cap",
        "hourly_cap",
        "day_used",
        "hour_used",
        "idle_days",
    ]
    rows = [head] + [
        [str(r["batch"]), str(r["provider"]), str(r["state"]), f"{r['step']}/{r['steps']}"]
        + ["-" if r[c] is None else f"{r[c]:,}" for c in head[4:]]
        for r in reply["ramps"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    now = _local(reply["now_ms"], reply["timezone"])
    _out(f"plan {reply['plan']} ({reply['timezone']}), now {now}")
    for row in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _reload(args: argparse.Namespace) -> int:
    """`kiln reload`: 0 if the new plan is in force, 1 with its problems otherwise."""
    with _client(args) as c:
        reply = c.request("reload")
    if reply.get("ok"):
        _out(f"plan {reply['plan']!r} is in force")
        return 0
    _out(f"kiln reload: {reply.get('error')}", sys.stderr)
    for p in reply.get("problems", []):
        _out(f"  {p}", sys.stderr)
    return 1


def _queue(args: argparse.Namespace) -> int:
    """`kiln queue`: what waits per pool and provider, and when the next release is due."""
    with _client(args) as c:
        reply = c.request("queue")
    if args.json or not reply.get("ok"):
        _out(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    queues = reply["queues"]
    if not queues:
        _out("nothing waits")
        return 0
    rows = [["pool", "provider", "waiting", "oldest", "next release"]]
    for q in queues:
        nxt = q["next_release_ms"]
        rows.append(
            [
                q["pool"],
                q["provider"],
                str(q["waiting"]),
                _utc(q["oldest_ms"]) if q["oldest_ms"] is not None else "-",
                "when limits change" if nxt is None else _utc(nxt),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _utc(ms: int) -> str:
    """Epoch ms as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _automations(args: argparse.Namespace) -> int:
    """`kiln automations`: one line each, newest last."""
    with _client(args) as c:
        reply = c.request("automations", all=args.all)
    if args.json or not reply.get("ok"):
        _out(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    items = reply["automations"]
    if not items:
        _out("no automation is in force" + ("" if args.all else " (--all shows ended ones)"))
        return 0
    head = ["id", "kind", "state", "scope", "rule", "until"]
    rows = [head]
    for a in items:
        if a["state"] == "active" and a["expires"]:
            until = a["expires"]
        elif a["state"] == "active":
            until = a["ends_when"]
        else:
            until = f"{a['state']} ({a.get('ended_by') or a['ends_when']})"
        rows.append([a["id"], a["kind"], a["state"], a["scope"], a["rule"], until])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for a in items:
        _out(f"{a['id']}: {a['reason']}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    """`kiln cancel ID`: 0 when ended, 1 with the reason otherwise."""
    who = f"{os.environ.get('USER') or 'an operator'} (kiln cancel)"
    with _client(args) as c:
        reply = c.request("cancel", automation=args.id, by=who)
    if args.json:
        _out(json.dumps(reply, indent=2))
    elif reply.get("ok"):
        a = reply["automation"]
        _out(f"{a['id']} ({a['kind']} of {a['scope']}) cancelled")
    else:
        _out(f"kiln cancel: {reply.get('error')}", sys.stderr)
    return 0 if reply.get("ok") else 1


def _token(args: argparse.Namespace) -> int:
    """`kiln token`: the HTTP API's token, for `Authorization: Bearer TOKEN` (docs/http.md)."""
    from kiln.web.token import TokenError, read_or_make

    folder, _ = state_dir(args.state_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _out(read_or_make(folder))
    except (TokenError, OSError) as e:
        _out(f"kiln token: {e}", sys.stderr)
        return 1
    return 0


def _pause_or_resume(args: argparse.Namespace) -> int:
    """`kiln pause TARGET [PROVIDER] --for D --reason R` and `kiln resume TARGET [PROVIDER]`:
    TARGET is an IP if it parses as one, else a batch name."""
    try:
        target = {"ip": str(ipaddress.ip_address(args.target))}
    except ValueError:
        target = {"batch": args.target}
    req: dict[str, object] = {**target, "by": f"{os.environ.get('USER') or 'an operator'}"}
    if args.provider is not None:
        req["provider"] = args.provider
    if args.verb == "pause":
        req["reason"] = args.reason
        if args.for_ is not None:
            req["for"] = args.for_
    with _client(args) as c:
        reply = c.request(args.verb, **req)
    if args.json:
        _out(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        _out(f"kiln {args.verb}: {reply.get('error')}", sys.stderr)
    elif args.verb == "pause":
        a = reply["automation"]
        until = "until resumed" if a["expires_ms"] is None else f"until {_utc(a['expires_ms'])}"
        _out(f"{a['id']}: {a['scope']} paused {until} (kiln resume, or kiln cancel {a['id']})")
    else:
        for a in reply["automations"]:
            _out(f"{a['id']}: {a['scope']} resumed")
    return 0 if reply.get("ok") else 1


def _explain(args: argparse.Namespace) -> int:
    """`kiln explain IP PROVIDER`: one screen of reasons; 1 with the error for an IP outside
    the plan or an unknown provider. Times are the plan's, with their offset."""
    with _client(args) as c:
        reply = c.request("explain", ip=args.ip, provider=args.provider)
    if args.json or not reply.get("ok"):
        if not reply.get("ok") and not args.json:
            _out(f"kiln explain: {reply.get('error')}", sys.stderr)
            return 1
        _out(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    if reply["batch"] is None:
        where = f"pool {reply.get('pool') or '-'}, warm"
    else:
        where = (
            f"batch {reply['batch']}, step {reply['step']} of {reply['steps']}, {reply['state']}"
        )
        if reply.get("warmup_day") is not None:
            where += f", warm-up day {reply['warmup_day']}"
    _out(f"{reply['ip']} -> {reply['provider']}  ({where})")
    hour = _cap_text(reply["hourly_cap"], "an hour", "hourly", reply["hour_used"])
    day = _cap_text(reply["daily_cap"], "a day", "daily", reply["day_used"])
    _out(f"  now: {hour}, {day}")
    state = []
    if reply["paused"]:
        state.append("PAUSED")
    if reply["suspended_until"]:
        state.append(f"SUSPENDED until {reply['suspended_until']}")
    if reply["multiplier"] != 1.0:
        state.append(f"slowed to {reply['multiplier']:g}x")
    if state:
        _out("  " + ", ".join(state))
    _out("why:")
    for line in reply["why"]:
        _out(f"  - {line}")
    sig = reply.get("signals", {})
    facts = []
    if sig.get("snds"):
        facts.append("SNDS " + ", ".join(f"{d} {c}" for d, c in sig["snds"].items()))
    if sig.get("snds_blocked"):
        facts.append(f"SNDS blocked: {sig['snds_blocked']}")
    if sig.get("dnsbl"):
        facts.append("DNSBL " + ", ".join(f"{z} {o}" for z, o in sig["dnsbl"].items()))
    if sig.get("ip_reputation"):
        facts.append("Postmaster " + ", ".join(f"{d} {r}" for d, r in sig["ip_reputation"].items()))
    if facts:
        _out("signals:")
        for f in facts:
            _out(f"  - {f}")
    return 0


def _cap_text(cap: int | None, per: str, kind: str, used: int) -> str:
    """`5 an hour (3 used)`, or `no hourly cap (50 used)`."""
    limit = f"no {kind} cap" if cap is None else f"{cap:,} {per}"
    return f"{limit} ({used:,} used)"


def _query(args: argparse.Namespace) -> int:
    """`kiln query`: raw requests in, raw replies out; 1 if any reply is an error."""
    lines = [r.encode() for r in args.requests] or [
        line.encode() for line in sys.stdin.read().splitlines() if line.strip()
    ]
    failed = False
    with _client(args) as c:
        c.send_lines(lines)
        for _ in lines:
            reply = c.read_line()
            failed |= b'"ok":false' in reply
            _out(reply.decode())
    return 1 if failed else 0


def _classify(args: argparse.Namespace) -> int:
    """`kiln classify REPLY`: see `kiln.rules.classify_main` (exit 0 classified, 1 not, 2 bad
    rules)."""
    from kiln.rules import classify_main

    return classify_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments) and run the verb; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbs = {
        "run": _run,
        "check": check_main,
        "plan": plan_main,
        "schema": schema_main,
        "status": _status,
        "reload": _reload,
        "query": _query,
        "automations": _automations,
        "cancel": _cancel,
        "explain": _explain,
        "classify": _classify,
        "init": init_main,
        "exim-config": lambda a: exim_config_main(a, state_dir(a.state_dir)[0]),
        "postfix-config": lambda a: postfix_config_main(a, state_dir(a.state_dir)[0]),
        "render": lambda a: render_main(a, *state_dir(a.state_dir)),
        "simulate": simulate_main,
        "queue": _queue,
        "token": _token,
        "suppress": lambda a: suppress_main(a, _client),
        "pause": _pause_or_resume,
        "resume": _pause_or_resume,
    }
    if args.verb in verbs:
        try:
            return verbs[args.verb](args)
        except ClientError as e:
            _out(f"kiln {args.verb}: {e}", sys.stderr)
            return 1
    parser.print_help()
    return 2


def console() -> None:
    """Entry point of the `kiln` console script."""
    sys.exit(main())
