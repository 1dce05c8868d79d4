"""The daemon on its socket: throughput, round trips and CPU per decision, against an echo server.

    python benches/daemon_bench.py --json benches/results/daemon.json
        [--seconds 2] [--rounds 3] [--modes 1x1,1x16,...,1x1@same,1x1@cross]

Starts `kiln run` on benches/bench-plan.yaml (one warm, uncapped IP: every acquire is
granted) and benches/echo_server.py (the same asyncio serving path with a fixed reply and no
kiln), each as its own process, then drives both with benches/loadgen.py, also its own
process, in every mode `CONNECTIONSxDEPTH[@PLACEMENT]`. Each round runs every mode against
both servers back to back (which goes first alternates), so drift on a shared machine hits
both alike; the report takes medians over the rounds. Client and servers share the cores.

Placement: by default the kernel places client and server (`os`). At depth 1 that makes the
round trip bimodal on a small VM: about 20 us when the two happen to share a core, 35-70 us
when every wake-up crosses cores. So depth 1 also runs pinned: server and client on one CPU
(`same`: the software path only), and server and client on two (`cross`: every
request pays a cross-core wake-up); pinned modes are skipped on a single-CPU machine.

Targets (from the daemon issue): every pipelined mode (depth > 1, `os` placement) at least
500,000 decisions per second, and a depth-1 p50 round trip no more than 1.5 times the echo
server's (the median, over rounds, of kiln p50 / echo p50 from back-to-back runs) in every
depth-1 mode whose placement is fixed: `same`, `cross`, and 50 connections (where both
cores are busy anyway). One connection with `os` placement is reported, not judged. The
daemon's CPU per decision (user + system, /proc/PID/stat) is reported for every mode, as are
reply errors: a run with any error, out-of-order or lost reply fails, whatever its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "P50_RATIO_BOUND",
    "PIPELINED_BOUND_PER_S",
    "Mode",
    "ServerProc",
    "echo_server",
    "kiln_daemon",
    "run_mode",
]

BENCHES = Path(__file__).resolve().parent
PLAN = BENCHES / "bench-plan.yaml"
LOADGEN = BENCHES / "loadgen.py"
ECHO = BENCHES / "echo_server.py"
PIPELINED_BOUND_PER_S = 500_000
#: Least kiln's pipelined single-connection throughput may be, as a share of the echo server's.
PIPELINED_ECHO_RATIO_BOUND = 0.9
"""Decisions per second every pipelined mode must reach."""
P50_RATIO_BOUND = 1.5
"""Most kiln's depth-1 p50 round trip may be, as a multiple of the echo server's."""


@dataclass(frozen=True)
class Mode:
    """Connections, requests in flight on each, and who chooses the CPUs."""

    connections: int
    depth: int
    placement: str = "os"
    """`os` (the kernel), `same` (server and client on the first CPU this process may use)
    or `cross` (server on the first, client on the second)."""

    @property
    def name(self) -> str:
        """How the mode is keyed in the results: `c50-d128`, `c1-d1-same`."""
        suffix = "" if self.placement == "os" else f"-{self.placement}"
        return f"c{self.connections}-d{self.depth}{suffix}"

    @classmethod
    def parse(cls, text: str) -> Mode:
        """`50x128` or `1x1@same`."""
        shape, _, placement = text.strip().partition("@")
        connections, _, depth = shape.partition("x")
        mode = cls(int(connections), int(depth), placement or "os")
        if mode.placement not in ("os", "same", "cross"):
            raise ValueError(f"placement must be os, same or cross: {text!r}")
        return mode


DEFAULT_MODES = (
    *(Mode(c, d) for c in (1, 50) for d in (1, 16, 128)),
    Mode(1, 1, "same"),
    Mode(1, 1, "cross"),
)
"""What the issue asks for, plus depth 1 at fixed placements."""
_MEDIAN_FIELDS = (
    "decisions_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_decision",
    "client_cpu_us_per_decision",
    "requests",
)
_SUM_FIELDS = ("errors", "out_of_order", "lost")


class ServerProc:
    """A server process answering JSON lines on a Unix socket in its own temporary folder."""

    def __init__(self, name: str, argv: Sequence[str], folder: Path, socket_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.folder = folder
        self.socket = socket_path
        self.log_path = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> ServerProc:
        """Start the process and wait until it answers a `ping` line."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 (our interpreter, our arguments)
                self.argv, stdout=log, stderr=log, cwd=BENCHES.parent
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self._answers():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer within {timeout_s} s:\n{self.log()}")

    def _answers(self) -> bool:
        """Whether the socket takes a connection and answers `ping` with ok."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(str(self.socket))
            probe.sendall(b'{"op":"ping"}\n')
            return probe.recv(200).startswith(b'{"ok":true')
        except OSError:
            return False
        finally:
            probe.close()

    def log(self) -> str:
        """What the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait (SIGKILL if it will not go); return the exit code."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def cleanup(self) -> None:
        """Stop if running and remove the folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def _started(server: ServerProc) -> Iterator[ServerProc]:
    """`server`, started, and stopped and removed afterwards."""
    try:
        yield server.start()
    finally:
        server.cleanup()


def _folder(prefix: str) -> Path:
    """A new folder under /tmp: a Unix socket path must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def kiln_daemon(plan: Path = PLAN, mta_listener: str = "rust") -> ServerProc:
    """`kiln run` on `plan`, with its state and socket in a fresh folder (not started), its
    MTA socket served by `mta_listener` (`kiln run --mta-listener`)."""
    folder = _folder("kiln-bench-")
    argv = [
        sys.executable,
        "-m",
        "kiln",
        "run",
        "--config",
        str(plan),
        "--state-dir",
        str(folder),
        "--log-format",
        "json",
        "--nameserver",
        "127.0.0.1:9",  # nothing answers: no real DNS from a benchmark
        "--mta-listener",
        mta_listener,
    ]
    return ServerProc("kiln", argv, folder, folder / "kiln.sock")


def echo_server() -> ServerProc:
    """benches/echo_server.py in a fresh folder (not started)."""
    folder = _folder("kiln-echo-")
    sock = folder / "echo.sock"
    return ServerProc("echo", [sys.executable, str(ECHO), str(sock)], folder, sock)


def _pin(pid: int, cpus: set[int]) -> None:
    """Let every thread of process `pid` run only on `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def run_mode(
    server: ServerProc,
    connections: int,
    depth: int,
    *,
    seconds: float = 2.0,
    warmup_s: float = 0.3,
    check_ids: bool = False,
    client_cpu: int | None = None,
) -> dict[str, Any]:
    """One benches/loadgen.py process against `server`; its parsed result."""
    argv = [
        sys.executable,
        str(LOADGEN),
        "--socket",
        str(server.socket),
        "--connections",
        str(connections),
        "--depth",
        str(depth),
        "--seconds",
        str(seconds),
        "--warmup-seconds",
        str(warmup_s),
        "--pid",
        str(server.pid),
        *(["--check-ids"] if check_ids else []),
        *(["--cpu", str(client_cpu)] if client_cpu is not None else []),
    ]
    done = subprocess.run(  # noqa: S603 (our interpreter, our arguments)
        argv, capture_output=True, check=False, timeout=seconds + warmup_s + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr.decode()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values present, or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summary(mode: Mode, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and error sums) over one mode's rounds, with the runs themselves."""
    out: dict[str, Any] = {
        "connections": mode.connections,
        "depth": mode.depth,
        "placement": mode.placement,
        "seconds": runs[0]["seconds"],
    }
    for name in _MEDIAN_FIELDS:
        out[name] = _median([r[name] for r in runs])
    out["daemon_cpu_us_per_decision"] = out.pop("server_cpu_us_per_decision")
    for name in _SUM_FIELDS:
        out[name] = sum(int(r[name]) for r in runs)
    out["runs"] = [
        {k: r[k] for k in ("decisions_per_s", "p50_us", "p99_us", "server_cpu_us_per_decision")}
        for r in runs
    ]
    return out


def _target(
    name: str, measured: float | None, bound: float, unit: str, at_most: bool
) -> dict[str, Any]:
    """A target as compare.py reads it, with its status."""
    if measured is None:
        status = "n/a"
    else:
        status = "PASS" if (measured <= bound if at_most else measured >= bound) else "MISS"
    return {
        "name": name,
        "measured": measured,
        "bound": bound,
        "unit": unit,
        "at_most": at_most,
        "status": status,
    }


def measure(
    modes: Sequence[Mode],
    *,
    seconds: float,
    warmup_s: float,
    rounds: int,
    mta_listener: str = "rust",
) -> dict[str, Any]:
    """Run every mode `rounds` times against kiln and the echo server; the whole report."""
    all_cpus = os.sched_getaffinity(0)
    if len(all_cpus) < 2:
        modes = [m for m in modes if m.placement == "os"]
    first, second, *_ = [*sorted(all_cpus), -1]
    client_cpus = {"os": None, "same": first, "cross": second}
    raw: dict[str, dict[Mode, list[dict[str, Any]]]] = {"kiln": {}, "echo": {}}
    with _started(kiln_daemon(mta_listener=mta_listener)) as kiln, _started(echo_server()) as echo:
        for rnd in range(rounds):
            for i, mode in enumerate(modes):
                order = (kiln, echo) if (rnd + i) % 2 == 0 else (echo, kiln)
                for server in order:
                    if mode.placement != "os":
                        _pin(server.pid, {first})
                    try:
                        r = run_mode(
                            server,
                            mode.connections,
                            mode.depth,
                            seconds=seconds,
                            warmup_s=warmup_s,
                            client_cpu=client_cpus[mode.placement],
                        )
                    finally:
                        _pin(server.pid, all_cpus)
                    raw[server.name].setdefault(mode, []).append(r)
                    p50 = f"{r['p50_us']:.1f}" if r["p50_us"] is not None else "-"
                    print(
                        f"  round {rnd + 1}/{rounds} {server.name:<4} {mode.name:<12} "
                        f"{r['decisions_per_s']:>12,.0f}/s  p50 {p50:>7} us  "
                        f"errors {r['errors'] + r['out_of_order'] + r['lost']}",
                        file=sys.stderr,
                    )
        kiln_exit = kiln.stop()
        echo_exit = echo.stop()

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
        },
        "settings": {
            "seconds": seconds,
            "warmup_seconds": warmup_s,
            "rounds": rounds,
            "plan": str(PLAN.relative_to(BENCHES.parent)),
            "request": '{"op":"acquire","ip":"192.0.2.10","domain":"gmail.com","n":1}',
            "window": "sliding: depth requests in flight per connection, one sent per reply",
        },
        "kiln": {m.name: _summary(m, runs) for m, runs in raw["kiln"].items()},
        "echo": {m.name: _summary(m, runs) for m, runs in raw["echo"].items()},
        "exit_codes": {"kiln": kiln_exit, "echo": echo_exit},
    }
    ratios: dict[str, dict[str, float | None]] = {}
    for m, k_runs in raw["kiln"].items():
        e_runs = raw["echo"][m]
        paired = [
            k["p50_us"] / e["p50_us"]
            for k, e in zip(k_runs, e_runs, strict=True)
            if k["p50_us"] is not None and e["p50_us"]
        ]
        k, e = result["kiln"][m.name], result["echo"][m.name]
        ratios[m.name] = {
            "decisions_per_s_kiln_over_echo": (
                k["decisions_per_s"] / e["decisions_per_s"] if e["decisions_per_s"] else None
            ),
            "p50_kiln_over_echo": _median(paired),
            "daemon_cpu_kiln_over_echo": (
                k["daemon_cpu_us_per_decision"] / e["daemon_cpu_us_per_decision"]
                if k["daemon_cpu_us_per_decision"] and e["daemon_cpu_us_per_decision"]
                else None
            ),
        }
    result["ratios"] = ratios

    targets = []
    for m in raw["kiln"]:
        k = result["kiln"][m.name]
        if m.depth > 1 and m.placement == "os":
            targets.append(
                _target(
                    f"daemon {m.connections} conn x depth {m.depth}, decisions/s",
                    k["decisions_per_s"],
                    PIPELINED_BOUND_PER_S,
                    "/s",
                    at_most=False,
                )
            )
            if m.connections == 1:
                # Issue 12: the absolute figure is bound by the machine's cross-core wake-ups
                # (the client is one Python process); against the echo server in the same run
                # it says what kiln's own work costs.
                targets.append(
                    _target(
                        f"daemon 1 conn x depth {m.depth}, decisions/s / echo's",
                        ratios[m.name]["decisions_per_s_kiln_over_echo"],
                        PIPELINED_ECHO_RATIO_BOUND,
                        "x",
                        at_most=False,
                    )
                )
        elif m.depth == 1 and (m.placement != "os" or m.connections > 1):
            where = f", {m.placement} core" if m.placement != "os" else ""
            targets.append(
                _target(
                    f"daemon {m.connections} conn x depth 1{where}, p50 / echo p50",
                    ratios[m.name]["p50_kiln_over_echo"],
                    P50_RATIO_BOUND,
                    "x",
                    at_most=True,
                )
            )
    bad = sum(k["errors"] + k["out_of_order"] + k["lost"] for k in result["kiln"].values())
    bad += sum(e["errors"] + e["out_of_order"] + e["lost"] for e in result["echo"].values())
    targets.append(_target("daemon bench, bad replies (errors, lost)", bad, 0, "", at_most=True))
    result["targets"] = targets
    return result


def _fmt(x: float | None, digits: int = 1) -> str:
    """A number for the table, or -."""
    return "-" if x is None else f"{x:,.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    """The human table: one line per mode, kiln beside echo, then the targets."""
    print(
        f"{'mode':<12} {'kiln/s':>11} {'echo/s':>11} {'k/e':>5}  "
        f"{'kiln p50':>9} {'echo p50':>9} {'k/e':>5}  {'kiln p99':>9} {'echo p99':>9}  "
        f"{'kiln cpu':>9} {'echo cpu':>9}  errors"
    )
    for mode, k in result["kiln"].items():
        e = result["echo"][mode]
        r = result["ratios"][mode]
        print(
            f"{mode:<12} {_fmt(k['decisions_per_s'], 0):>11} {_fmt(e['decisions_per_s'], 0):>11} "
            f"{_fmt(r['decisions_per_s_kiln_over_echo'], 2):>5}  "
            f"{_fmt(k['p50_us']):>9} {_fmt(e['p50_us']):>9} "
            f"{_fmt(r['p50_kiln_over_echo'], 2):>5}  "
            f"{_fmt(k['p99_us']):>9} {_fmt(e['p99_us']):>9}  "
            f"{_fmt(k['daemon_cpu_us_per_decision'], 2):>9} "
            f"{_fmt(e['daemon_cpu_us_per_decision'], 2):>9}  "
            f"{k['errors'] + k['lost'] + e['errors'] + e['lost']}"
        )
    print(
        "(per second: decisions; p50/p99: round trip in us, depth 1 only; cpu: server us/decision)"
    )
    for t in result["targets"]:
        bound = f"{'<=' if t['at_most'] else '>='} {t['bound']:,g}{t['unit']}"
        print(f"  {t['name']:<52} {_fmt(t['measured'], 2):>14} {bound:>14}  {t['status']}")


def _parse_modes(text: str) -> list[Mode]:
    """`1x1,50x128,1x1@same` -> the modes."""
    return [Mode.parse(item) for item in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON if asked; exit 1 on bad replies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed window per run")
    parser.add_argument("--warmup-seconds", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode and server")
    parser.add_argument(
        "--mta-listener",
        choices=["rust", "asyncio"],
        default="rust",
        help="who serves kiln's MTA socket (kiln run --mta-listener)",
    )
    parser.add_argument(
        "--modes",
        type=_parse_modes,
        default=list(DEFAULT_MODES),
        help="CONNECTIONSxDEPTH[@os|same|cross],... (default: "
        + ",".join(f"{m.connections}x{m.depth}@{m.placement}" for m in DEFAULT_MODES)
        + ")",
    )
    args = parser.parse_args(argv)
    result = measure(
        args.modes,
        seconds=args.seconds,
        warmup_s=args.warmup_seconds,
        rounds=args.rounds,
        mta_listener=args.mta_listener,
    )
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = result["targets"][-1]["status"] != "PASS"
    return 1 if bad or any(code != 0 for code in result["exit_codes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
