"""kiln's Redis-protocol socket next to Redis itself, driven by the same tool in one run.

    python benches/resp_bench.py [--json benches/results/resp.json] [--quick]

Debian's `redis-benchmark` (50 clients, Unix socket, unpipelined and `-P 16`, random keys
from a space of 100,000) runs against:

- kiln (`MtaServer(protocol="resp")`, the core's serving thread): `CL.THROTTLE` and
  `KILN.ACQUIRE`;
- Redis 7 (the server binary Debian's redis-tools ships as `redis-check-rdb`, started here
  on a Unix socket with persistence off): a GCRA Lua script by `EVALSHA` (the same rule as
  `CL.THROTTLE`), `INCR` and `GET`.

Targets (issue 12): kiln's `CL.THROTTLE` at least 3x Redis's GCRA script, unpipelined and
pipelined; kiln's `KILN.ACQUIRE` pipelined at least Redis's `INCR` pipelined; kiln's
unpipelined p50 no worse than Redis's `GET`.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchkit import publish
from kiln import _core

REDIS_BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_SERVER = "/usr/bin/redis-check-rdb"  # the Redis server binary, chosen by its name
IP = "192.0.2.10"

#: GCRA in Lua for Redis, the rule `CL.THROTTLE` applies: KEYS[1]; ARGV: max_burst, count,
#: period (s), quantity. Returns {limited, remaining}.
GCRA_LUA = """
local burst, count, period, quantity = tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = period / count
local tolerance = interval * (burst + 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * quantity
if now < new_tat - tolerance then return {1, 0} end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000))
return {0, math.floor((tolerance - (new_tat - now)) / interval)}
"""


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def redis_server(folder: Path) -> Iterator[Path]:
    """Redis on a Unix socket in `folder`, persistence off; stopped afterwards."""
    binary = folder / "redis-server"
    shutil.copy(REDIS_SERVER, binary)
    path = folder / "redis.sock"
    proc = subprocess.Popen(  # noqa: S603 (Debian's Redis binary, our arguments)
        [
            str(binary),
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(path)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def kiln_server(folder: Path) -> Iterator[Path]:
    """kiln's RESP socket on an engine whose IP has no caps (every acquire grants)."""
    engine = _core.Engine()
    engine.set_default_provider("default")
    engine.set_limits(engine.key(IP, "default"))
    path = folder / "kiln.sock"
    server = _core.MtaServer(engine, str(path), backlog=256, max_connections=256, protocol="resp")
    try:
        yield path
    finally:
        server.stop()


def bench(path: Path, n: int, pipeline: int, *command: str, threads: int = 1) -> dict[str, float]:
    """One redis-benchmark run: requests per second and p50/p99 latency (ms)."""
    done = subprocess.run(  # noqa: S603 (Debian's redis-benchmark, our arguments)
        [
            REDIS_BENCHMARK,
            "-s",
            str(path),
            "-c",
            "50",
            "-n",
            str(n),
            "-P",
            str(pipeline),
            "-r",
            "100000",
            "--csv",
            *(["--threads", str(threads)] if threads > 1 else []),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert rows, done.stdout + done.stderr
    row = rows[-1]
    return {
        "requests_per_s": float(row["rps"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke run)")
    args = parser.parse_args()
    n1, n16 = (20_000, 100_000) if args.quick else (200_000, 1_000_000)
    throttle = ["CL.THROTTLE", "key:__rand_int__", "15", "30", "60", "1"]
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-resp-") as tmp:
        folder = Path(tmp)
        with redis_server(folder) as redis, kiln_server(folder) as kiln:
            sha = subprocess.run(  # noqa: S603
                ["/usr/bin/redis-cli", "-s", str(redis), "SCRIPT", "LOAD", GCRA_LUA],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            gcra = ["EVALSHA", sha, "1", "gcra:__rand_int__", "15", "30", "60", "1"]
            acquire = ["KILN.ACQUIRE", IP, "example.com"]
            for p, n in ((1, n1), (16, n16)):
                result[f"P{p}"] = {
                    "kiln_cl_throttle": bench(kiln, n, p, *throttle),
                    "redis_gcra_lua": bench(redis, n, p, *gcra),
                    "kiln_acquire": bench(kiln, n, p, *acquire),
                    "redis_incr": bench(redis, n, p, "INCR", "incr:__rand_int__"),
                    "redis_get": bench(redis, n, p, "GET", "incr:__rand_int__"),
                }
    rps = {p: {k: v["requests_per_s"] for k, v in r.items()} for p, r in result.items()}
    result["targets"] = [
        {
            "name": "RESP CL.THROTTLE / Redis GCRA Lua, unpipelined",
            "measured": round(rps["P1"]["kiln_cl_throttle"] / rps["P1"]["redis_gcra_lua"], 2),
            "bound": 3,
            "unit": "x",
            "at_most": False,
        },
        {
            "name": "RESP CL.THROTTLE / Redis GCRA Lua, -P 16",
            "measured": round(rps["P16"]["kiln_cl_throttle"] / rps["P16"]["redis_gcra_lua"], 2),
            "bound": 3,
            "unit": "x",
            "at_most": False,
        },
        {
            "name": "RESP KILN.ACQUIRE / Redis INCR, -P 16",
            "measured": round(rps["P16"]["kiln_acquire"] / rps["P16"]["redis_incr"], 2),
            "bound": 1,
            "unit": "x",
            "at_most": False,
        },
        {
            "name": "RESP CL.THROTTLE p50 / Redis GET p50, unpipelined",
            "measured": round(
                result["P1"]["kiln_cl_throttle"]["p50_ms"] / result["P1"]["redis_get"]["p50_ms"], 2
            ),
            "bound": 1,
            "unit": "x",
            "at_most": True,
        },
    ]
    publish(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
