"""Process memory per key: RSS growth of a Python process that gives kiln 1M keys with limits.

    python benches/memory.py --json benches/results/memory.json [--ips 62500]

Keys are spread as a daemon's are: 62,500 IPs x 16 providers, each key with a schedule
step's limits (rate, burst, hourly and daily caps), and a daily cap per IP. The figure is
`VmRSS` after minus before (from /proc/self/status), divided by the number of keys: the
engine's tables, allocator slack and page rounding all count. The IP strings Python passes
in are made before the first reading, so they do not count.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from kiln import Engine

HOUR_MS = 3_600_000
PROVIDERS = (
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "icloud.com",
    "aol.com",
    "gmx.net",
    "web.de",
    "comcast.net",
    "orange.fr",
    "mail.ru",
    "yandex.ru",
    "qq.com",
    "naver.com",
    "t-online.de",
    "libero.it",
    "proton.me",
)


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def ip_text(i: int) -> str:
    """The i-th sending IP, in 10.0.0.0/8."""
    return f"10.{i >> 16}.{(i >> 8) & 0xFF}.{i & 0xFF}"


def fill(engine: Engine, ips: list[str]) -> int:
    """Give `engine` one key per (IP, provider) with limits; return how many keys."""
    set_limits = engine.set_limits
    for i, ip in enumerate(ips):
        step = i % 4 + 1
        for p, provider in enumerate(PROVIDERS):
            per_hour = 250 * step + 10 * p
            set_limits(
                engine.key(ip, provider),
                rate_count=per_hour,
                rate_period_ms=HOUR_MS,
                max_burst=10,
                hourly_cap=per_hour,
                daily_cap=per_hour * 10,
            )
        engine.set_ip_caps(ip, daily_cap=100_000)
    return engine.key_count()


def measure(n_ips: int) -> dict[str, object]:
    """Build the engine and report RSS growth per key, after checking it holds what it should."""
    ips = [ip_text(i) for i in range(n_ips)]
    engine = Engine()
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    keys = fill(engine, ips)
    seconds = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    assert keys == n_ips * len(PROVIDERS), keys
    per_hour = 250 * ((n_ips - 1) % 4 + 1) + 10 * (len(PROVIDERS) - 1)
    last = engine.usage(keys - 1)
    assert (last["rate_count"], last["max_burst"]) == (per_hour, 10), last
    assert (last["hourly_cap"], last["daily_cap"]) == (per_hour, per_hour * 10), last
    assert engine.key_info(keys - 1) == (ip_text(n_ips - 1), PROVIDERS[-1])
    growth = after - before
    return {
        "keys": keys,
        "ips": n_ips,
        "providers": len(PROVIDERS),
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_growth_bytes": growth,
        "bytes_per_key": growth / keys,
        "build_seconds": seconds,
        "build_ns_per_key": seconds * 1e9 / keys,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print one line, and write the JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--ips", type=int, default=62_500, help="sending IPs (x16 providers)")
    args = parser.parse_args(argv)
    result = measure(args.ips)
    print(
        f"memory: {result['keys']:,} keys with limits: "
        f"{result['bytes_per_key']:.1f} bytes/key RSS growth "
        f"(built in {result['build_seconds']:.2f} s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
