"""Where a job's blocking parts run: in the calling thread, or off the event loop.

Every job that touches the store or reads files is written once, as a coroutine that takes a
`Runner` and a clock (`now`): the serving daemon runs it with `OFF_LOOP` (store calls on the
store thread, file reads on a worker, the loop answering meanwhile); start-up, shutdown and
the tests run it with `HERE`, whose calls never suspend, so `complete` drives the coroutine
to its end without an event loop. The engine is only ever called between the awaits, on the
thread that runs the coroutine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from kiln.daemon.persist import Persister

__all__ = ["HERE", "OFF_LOOP", "Now", "Runner", "complete"]

T = TypeVar("T")

Now = Callable[[], int]
"""The clock a job reads: `Clock.now_ms`, or a fixed time in the calling thread."""


class Runner(Protocol):
    """How a job runs its store calls, its file reads and its writes."""

    async def store(self, persist: Persister, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, a store call."""
        ...

    async def worker(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, blocking work that touches no engine (reading and parsing files)."""
        ...

    async def write(self, persist: Persister) -> None:
        """Write what `persist` holds unsaved."""
        ...


class _Here:
    """Everything in the calling thread; a failed write raises its `StoreError` (the batches
    stay unsaved for the next try)."""

    async def store(self, persist: Persister, fn: Callable[..., T], *args: Any) -> T:
        del persist
        return fn(*args)

    async def worker(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    async def write(self, persist: Persister) -> None:
        error = persist.write_now()
        if error is not None:
            raise error


class _OffLoop:
    """Store calls on the store thread, file reads on a worker thread; a failed write is
    logged and its batches wait for the next try."""

    async def store(self, persist: Persister, fn: Callable[..., T], *args: Any) -> T:
        return await persist.run(fn, *args)

    async def worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def write(self, persist: Persister) -> None:
        await persist.write_async()


HERE: Runner = _Here()
OFF_LOOP: Runner = _OffLoop()


def complete(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine run with `HERE` (it never suspends)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast("T", done.value)
    coro.close()
    raise RuntimeError("a job suspended where it must run in the calling thread")
