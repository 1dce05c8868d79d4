"""kiln: IP warm-up scheduler and throttle daemon for email senders.

The Rust engine (`Engine`) makes every throttling decision; the rest of kiln feeds it
plain data and the time, and acts on what it decides.
"""

from __future__ import annotations

from kiln._core import MAX_NOW_MS, BatchDecisions, Decision, Engine, __version__
from kiln.errors import CoreError, KilnError

__all__ = [
    "MAX_NOW_MS",
    "BatchDecisions",
    "CoreError",
    "Decision",
    "Engine",
    "KilnError",
    "__version__",
]
