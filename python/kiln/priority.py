"""Background threads yield the CPU to the MTA sockets.

kiln answers MTAs from the core's serving threads (rust/src/server), which never wait for
Python. Everything else the daemon does on other threads (the store's writes, signal polls and
their parsing, reading MTA logs and plan files, releasing held Postfix mail) can wait a few
milliseconds without harm, but shares the CPU with those answers. On Linux each such thread
lowers its own scheduling priority (`nice` BACKGROUND_NICE, allowed without privileges), so a
serving thread woken by an MTA's request takes the CPU from it at once instead of waiting for
its time slice: under load the depth-1 answer time stays near the idle one (docs/daemon.md).

The event loop's thread keeps the normal priority: it holds the engine's lock for its short
calls, and a low-priority lock holder would make the serving threads wait behind whatever
else runs on the machine.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["BACKGROUND_NICE", "background_thread"]

#: The nice value of background threads (0 is normal, 19 the lowest priority).
BACKGROUND_NICE = 10


def background_thread() -> None:
    """Run the calling thread at `BACKGROUND_NICE` (Linux, where nice is per thread; a
    thread already at a lower priority keeps it); elsewhere, or when refused, nothing."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    except OSError:
        pass
