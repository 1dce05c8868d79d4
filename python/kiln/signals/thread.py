"""The signal sources' own event loop, on a thread of its own.

Polling a source is network and parsing work: TLS handshakes, HTTP framing, streamed bodies,
DNS answers parsed by dnspython. Done on the daemon's loop, each step is a millisecond or more
during which no decision is answered. `SignalLoop` runs those coroutines on a second event loop
in a daemon thread; the serving loop awaits their results and alone applies them to the
policy's `SignalBook` (and, through it, the engine). Nothing that runs here touches the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["SignalLoop"]

T = TypeVar("T")


class SignalLoop:
    """A second event loop for signal polls; `run` hands it a coroutine and awaits the result
    from the calling loop. Cancelling the awaiting task cancels the coroutine there."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is up."""
        return self._loop is not None

    def start(self) -> None:
        """Start the thread and its loop (returns once the loop runs)."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Stopped: whatever is left is cancelled and run to its end, then the loop closes.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name="kiln-signals", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro` run on the signal loop (here, when it is not started), its result here."""
        if self._loop is None:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wrap_future(future)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop, cancel what runs there and wait (at most `timeout_s`) for the thread;
        a daemon thread never holds up the process's exit."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
