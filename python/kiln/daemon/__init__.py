"""`kiln run`: the daemon beside the MTAs.

Python acts, Rust decides. The daemon loads the plan, restores the engine's counters from the
store, listens on the MTA and operator sockets, moves bytes between clients and
`Engine.serve`, and runs the jobs (1 Hz flush, hour and day roll-over, MX lookups, signal
polling). How it cannot hang: docs/daemon.md. Where each decision is made:

| decision | where |
|---|---|
| may this request go, which IP carries it | `Engine.serve` (rust/src/protocol/) |
| caps in force this hour | `ramp.compile_limits`, pushed by `Daemon.apply_plan` |
| does a ramp advance at the day roll | `rampday.roll_day`, run by `kiln.daemon.roll` |
| domain -> provider | plan domain table, then `mx.MxLookups`, pushed as engine routes |
| what a push-back reply is | `Engine.classify` against the reply rules (rust/src/classify/) |
| what evidence does (suspend, slow, hold, step down, pause) | `kiln.policy`, run by `kiln.guard` |
| which operator operations exist, and on which socket | the `OPS` registry in `kiln.daemon.ops` |
"""

from __future__ import annotations

from kiln.daemon.config import DaemonConfig
from kiln.daemon.core import Daemon, run
from kiln.daemon.listener import NativeProtocol
from kiln.daemon.ops import MTA_UPCALL_OPS, UPCALL_OPS

__all__ = ["MTA_UPCALL_OPS", "UPCALL_OPS", "Daemon", "DaemonConfig", "NativeProtocol", "run"]
