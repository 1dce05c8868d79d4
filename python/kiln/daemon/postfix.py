"""Postfix beside kiln: held recipients in, released recipients out.

How the parts fit (docs/integrations/postfix.md):

- Postfix's queue manager asks kiln's transport table (`transport_maps` over `socketmap:`,
  answered by the core on its own thread: rust/src/socketmap) which transport carries each
  recipient: a sending IP's `smtp` transport, or `retry:` with "kiln: waiting for room at
  PROVIDER in pool POOL" when no IP of the pool has room.
- Postfix defers such a recipient and logs it. The log reader (kiln.feedback.postfix) hands
  each of those lines here as a `Held` recipient, which goes into the engine's release queue
  for (pool, provider) in arrival order (`hold`).
- `release`, on the loop every `RELEASE_EVERY_S`, takes what the queue lets go (`due`, which
  picks and charges an IP as the caps open), leaves each grant waiting for that recipient's
  next lookup (`postfix_prepay`) and hands the message back to Postfix's active queue with
  `postqueue -i QUEUE_ID` on worker threads (which never touch the engine).
- Held recipients are saved with each flush, in the same transaction as the engine snapshot
  that holds the queue, so both survive a restart together.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import _core
from kiln.postfix import transport_name
from kiln.records import Held
from kiln.schedule import Plan

if TYPE_CHECKING:
    from kiln.daemon.core import Daemon

__all__ = ["RELEASE_EVERY_S", "PostfixGate", "PostfixSettings"]

#: How often the release queue is asked for what may go (real seconds).
RELEASE_EVERY_S = 0.05
#: How long a released grant waits for its recipient's lookup (real time).
GRANT_TTL_S = 600
#: How often the release loop looks while nothing waits (a restored queue, a grant to hand
#: back again); a hold wakes it at once.
IDLE_CHECK_S = 1.0
#: Releases one `release` call takes at most (the rest go on the next call).
RELEASE_BATCH = 5_000
#: `postqueue` runs at once, at most.
RELEASE_WORKERS = 4
#: How long one `postqueue` may take before it is abandoned (Postfix retries the message
#: itself later; its grant lapses).
RELEASE_TIMEOUT_S = 30


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    """What `kiln run --postfix` is told."""

    #: Where the transport table listens (socketmap).
    socket: Path
    #: Appended to every transport answer: empty for the recipient's domain, or a relay
    #: such as `[127.0.0.1]:2525`.
    nexthop: str = ""
    #: The command that hands a deferred message back to Postfix; its queue id is appended.
    release_command: tuple[str, ...] = ("postqueue", "-i")


class PostfixGate:
    """Held recipients and their release, on the daemon's loop."""

    def __init__(self, d: Daemon, settings: PostfixSettings) -> None:
        self.daemon = d
        self.settings = settings
        self.held: dict[int, Held] = {}
        #: (queue id, recipient) -> release-queue id, so a line read twice holds once.
        self._ids: dict[tuple[str, str], int] = {}
        self._next_id = 1
        #: Changes since the last flush (None: released), taken by `take_changes`.
        self._changes: dict[int, Held | None] = {}
        #: Queue ids to hand back again (their grant waits; see `hold`).
        self._again: dict[str, None] = {}
        self._workers = ThreadPoolExecutor(RELEASE_WORKERS, thread_name_prefix="kiln-postqueue")
        self._task: asyncio.Task[None] | None = None
        #: Set by `hold`: the release loop sleeps on it while nothing waits.
        self._wake = asyncio.Event()
        self.released = 0
        self.release_failures = 0
        self.last_failure: str | None = None

    # ----- set-up -----

    def configure(self, plan: Plan) -> None:
        """Tell the transport table which transport each of the plan's IPs has."""
        self.daemon.engine.postfix_configure(
            [(ip, transport_name(ip)) for ip in plan.all_ips()], self.settings.nexthop
        )

    def restore(self, saved: dict[int, Held]) -> None:
        """Take back the held recipients saved with the snapshot; any the restored queue
        lacks (a snapshot that could not be read) are queued again, oldest first."""
        queued = {entry[0] for entry in self.daemon.engine.queue_entries()}
        for i, h in sorted(saved.items()):
            if i not in queued and not self._enqueue(i, h):
                self._changes[i] = None
                continue
            self.held[i] = h
            self._ids[(h.queue_id, h.recipient)] = i
        # New ids start past every id in use: the saved rows' and the restored queue's (a
        # queued id without its row must not be handed out again).
        self._next_id = max([*saved, *queued, 0]) + 1

    def start(self) -> None:
        """Run the release loop on the daemon's loop."""
        self._task = self.daemon.spawn(self._run())

    def close(self) -> None:
        """Stop releasing; running `postqueue` calls finish on their own."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._workers.shutdown(wait=False, cancel_futures=True)

    # ----- in -----

    def hold(self, waits: Iterable[Held]) -> int:
        """Queue recipients Postfix deferred on kiln's word; how many were new."""
        added = 0
        engine = self.daemon.engine
        for h in waits:
            if (h.queue_id, h.recipient) in self._ids:
                continue
            if engine.postfix_prepaid(h.recipient):
                # Released, but Postfix was already retrying it and asked before the grant
                # was there: the grant still waits, so hand the message back again.
                self._again[h.queue_id] = None
                continue
            i = self._next_id
            self._next_id += 1
            if not self._enqueue(i, h):
                continue
            self.held[i] = h
            self._ids[(h.queue_id, h.recipient)] = i
            self._changes[i] = h
            added += 1
        if added or self._again:
            self._wake.set()
        return added

    def _enqueue(self, i: int, h: Held) -> bool:
        """Put one recipient in the engine's queue; False (logged) for a pool or provider the
        plan no longer has: Postfix retries that recipient on its own schedule."""
        engine = self.daemon.engine
        try:
            engine.enqueue(i, engine.pool(h.pool), engine.provider(h.provider))
        except _core.CoreError as e:
            self.daemon.warn_repeated(
                "postfix_hold_refused",
                queue_id=h.queue_id,
                pool=h.pool,
                provider=h.provider,
                error=str(e),
                hint="Postfix retries this recipient itself (its own backoff)",
            )
            return False
        return True

    # ----- out -----

    def release(self, now_ms: int) -> list[str]:
        """Let go what the caps allow now: each grant waits for its recipient's lookup, and
        the queue ids to hand back to Postfix are returned (each once)."""
        d = self.daemon
        engine = d.engine
        queue_ids, self._again = self._again, {}
        due = engine.due(now_ms, RELEASE_BATCH)
        if not due:
            return list(queue_ids)
        expires_ms = now_ms + int(GRANT_TTL_S * 1000 * getattr(d.clock, "speed", 1.0))
        for i, decision in due:
            h = self.held.pop(i, None)
            self._changes[i] = None
            if h is None:
                continue  # queued by a restored snapshot without its row: nothing to release
            del self._ids[(h.queue_id, h.recipient)]
            if not engine.postfix_prepay(h.recipient, decision.ip, expires_ms):
                d.warn_repeated("postfix_grants_full", hint="too many grants wait for lookups")
            queue_ids[h.queue_id] = None
        self.released += len(due)
        return list(queue_ids)

    async def _run(self) -> None:
        """Release as the caps open (every `RELEASE_EVERY_S` while anything waits, else as
        soon as something is held); expire grants nobody looked up."""
        loop = asyncio.get_running_loop()
        d = self.daemon
        ticks = 0
        while True:
            if d.engine.queued() or self._again:
                await asyncio.sleep(RELEASE_EVERY_S)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_S)
            now_ms = d.clock.now_ms()
            for qid in self.release(now_ms):
                fut = loop.run_in_executor(self._workers, self._postqueue, qid)
                fut.add_done_callback(self._released)
            ticks += 1
            if ticks % 200 == 0:
                d.engine.postfix_expire(now_ms)

    def _postqueue(self, queue_id: str) -> str | None:
        """Hand one message back to Postfix (worker thread); the error, or None."""
        try:
            done = subprocess.run(  # noqa: S603 (the operator's own --postfix-release)
                [*self.settings.release_command, queue_id],
                capture_output=True,
                text=True,
                timeout=RELEASE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{queue_id}: {e}"
        if done.returncode != 0:
            return f"{queue_id}: {(done.stderr or done.stdout).strip()[:300]}"
        return None

    def _released(self, fut: asyncio.Future[str | None]) -> None:
        """Count and log a failed hand-back (the message stays deferred: Postfix retries it
        on its own schedule and kiln's grant for it lapses)."""
        if fut.cancelled():
            return
        error = fut.result()
        if error is not None:
            self.release_failures += 1
            self.last_failure = error
            self.daemon.warn_repeated("postfix_release_failed", error=error)

    # ----- reporting -----

    def take_changes(self) -> dict[int, Held | None]:
        """Held and released recipients since the last call, for the flush."""
        changes, self._changes = self._changes, {}
        return changes

    def queue(self, now_ms: int) -> list[dict[str, object]]:
        """What waits, per pool and provider: recipients, the oldest, and the next release
        (Unix ms; None while it waits for limits to change)."""
        oldest: dict[tuple[str, str], int] = {}
        for h in self.held.values():
            k = (h.pool, h.provider)
            oldest[k] = min(oldest.get(k, h.since_ms), h.since_ms)
        return [
            {
                "pool": pool,
                "provider": provider,
                "waiting": n,
                "oldest_ms": oldest.get((pool, provider)),
                "next_release_ms": nxt,
            }
            for pool, provider, n, nxt in self.daemon.engine.queue_summary(now_ms)
        ]

    def stats(self) -> dict[str, object]:
        """The transport table's counters and the release figures."""
        return {
            **self.daemon.engine.postfix_stats(),
            "held": len(self.held),
            "released": self.released,
            "release_failures": self.release_failures,
            "last_release_failure": self.last_failure,
        }
