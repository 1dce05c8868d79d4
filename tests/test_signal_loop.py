"""The signal sources' own loop (kiln.signals.thread): polls fetch and parse there, the book is
written by the caller's loop, a cancelled wait cancels the fetch, and stop ends the thread."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import date
from pathlib import Path

from fakeapis import FakeSnds
from kiln.records import SignalBook
from kiln.signals.poller import Poller
from kiln.signals.thread import SignalLoop
from test_signal_limits import T0_MS, plan_with


def test_a_poll_fetches_on_the_signal_thread_and_writes_the_book_on_the_caller(
    tmp_path: Path,
) -> None:
    """The fetch runs on the `kiln-signals` thread (its HTTP exchange and parsing), the
    reading lands in the book on the calling loop's thread, and the client closes there."""
    threads: dict[str, str] = {}

    class Book(SignalBook):
        def good(self, source: str, now_ms: int) -> None:
            threads["book"] = threading.current_thread().name
            super().good(source, now_ms)

    with FakeSnds(fixtures=False) as snds:
        when = "3/9/2026"  # the day before T0
        snds.set_data(
            date(2026, 3, 9),
            f"192.0.2.10,{when} 6:02 AM,{when} 11:58 PM,1000,1000,1000,GREEN,< 0.1%,,,0,"
            "mail.example.com,bounce@example.com,\r\n",
        )
        (tmp_path / "snds.key").write_text(snds.key + "\n")
        plan = plan_with(
            tmp_path, f"  snds: {{key_file: snds.key, base_url: '{snds.base_url}', days_back: 1}}\n"
        )
        now_ms = T0_MS + 10 * 3_600_000
        book = Book()
        signals = SignalLoop()
        signals.start()
        poller = Poller(plan, now_ms=lambda: now_ms)
        fetch = poller._fetch

        async def spy(name: str, at_ms: int) -> object:
            threads["fetch"] = threading.current_thread().name
            return await fetch(name, at_ms)

        poller._fetch = spy  # type: ignore[method-assign,assignment]

        async def main() -> bool:
            try:
                return await poller.poll("snds", book, now_ms, on=signals)
            finally:
                await signals.run(poller.aclose())

        try:
            good = asyncio.run(main())
        finally:
            signals.stop()
    assert good is True, book.health
    assert threads == {"fetch": "kiln-signals", "book": threading.current_thread().name}
    assert book.health["snds"].last_good_ms == now_ms
    assert book.snds == {"192.0.2.10": {"2026-03-09": "GREEN"}}


def test_a_cancelled_wait_cancels_the_fetch_and_stop_ends_the_thread() -> None:
    """Cancelling the awaiting task cancels the coroutine on the signal loop; `stop` cancels
    what is left and the thread ends."""
    signals = SignalLoop()
    signals.start()
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> float:
        task = asyncio.create_task(signals.run(forever()))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return time.monotonic() - started

    waited = asyncio.run(main())
    assert waited < 1.0
    assert cancelled.wait(5)
    left = asyncio.run_coroutine_threadsafe(asyncio.sleep(3600), signals._loop)  # type: ignore[arg-type]
    thread = signals._thread
    signals.stop()
    assert thread is not None and not thread.is_alive()
    assert left.cancelled()
    assert not signals.running
