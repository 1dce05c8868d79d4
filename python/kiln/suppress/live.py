"""The suppression list in the daemon: the store's append-only log, folded into the core's
live set (rust/src/suppress/), which `acquire` and `pick` check at send time.

An event is durable in the store before the live set changes and before any reply says it
was recorded. The live set is rebuilt at start from a snapshot file in the state folder (the
set's bytes and the last log id folded into it) and the log after that id, or from the whole
log when the snapshot is missing, unreadable or made with another hash key. The hash key is
kept in the store (`suppression_key`), so every node reading one store agrees on it.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import _core
from kiln.policyspec import SuppressionSpec
from kiln.records import SuppressionEvent
from kiln.store import Store
from kiln.suppress.soft import SoftBounces

__all__ = [
    "EVENTS",
    "KEY_META",
    "SNAPSHOT_FILE",
    "SuppressionList",
    "SuppressionRequest",
    "Verdict",
]

#: What may put an address on the list; `remove` takes it off (also an event of the log).
EVENTS = ("hard_bounce", "complaint", "unsubscribe", "manual", "soft_bounce")
#: The store's meta key of the hash key (hex of 16 bytes).
KEY_META = "suppression_key"
#: The live set's snapshot in the state folder: 8 bytes of last log id, then the set.
SNAPSHOT_FILE = "suppression.snapshot"
_HEADER = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class SuppressionRequest:
    """One address to put on the list (or take off: event `remove`), before it is hashed."""

    address: str
    event: str
    source: str
    scope: str = ""
    expires_ms: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a delivery result puts its recipient on the list for."""

    event: str
    expires_ms: int | None = None
    #: Why, beside the reply itself (the soft-bounce rule met and its count).
    why: dict[str, Any] = field(default_factory=dict)


class SuppressionList:
    """The log and the live set of one daemon (called on the engine's thread, except the
    store calls the caller routes to the store thread)."""

    def __init__(
        self,
        engine: _core.Engine,
        store: Store,
        state_dir: Path,
        spec: SuppressionSpec | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.spec = spec or SuppressionSpec()
        #: Temporary failures counted towards the soft-bounce rules.
        self.soft = SoftBounces(self.spec.soft_bounces)
        self.snapshot_path = state_dir / SNAPSHOT_FILE
        #: The last log id folded into the live set.
        self.last_id = 0
        #: Log events since the last snapshot.
        self.unsnapshotted = 0

    def open(self) -> int:
        """Key the live set and fold the log into it; how many addresses are listed."""
        key = self.store.get_meta(KEY_META)
        if key is None:
            key = secrets.token_hex(16)
            self.store.set_meta(KEY_META, key)
        raw = bytes.fromhex(key)
        self.engine.suppress_set_key(
            int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        )
        self.last_id = self._load_snapshot()
        for rows in self.store.suppress_fold_rows(self.last_id):
            self.engine.suppress_apply([(fp, event, expires) for _, fp, event, expires in rows])
            self.last_id = rows[-1][0]
            self.unsnapshotted += len(rows)
        return self.engine.suppress_stats()[0]

    def replan(self, spec: SuppressionSpec) -> None:
        """A reloaded plan's settings; changed soft-bounce rules start counting afresh."""
        if spec.soft_bounces != self.spec.soft_bounces:
            self.soft = SoftBounces(spec.soft_bounces, self.soft.max_tracked)
        self.spec = spec

    def verdict(
        self,
        address: str,
        scope: str,
        result: str,
        reply: tuple[int | None, str | None, str],
        at_ms: int,
    ) -> Verdict | None:
        """What this delivery result (`reply`: code, enhanced status, text) puts `address` on
        the list for, or None. Complaints and unsubscribes as they are; a bounce the reply
        rules call `hard_bounce` (with no rule matching, a 5.1.x status); a failure a
        soft-bounce rule counts, once that rule's count is met. Raises ValueError for an
        address the list cannot hold (only when it has to be counted)."""
        if result in ("complaint", "unsubscribe"):
            return Verdict(result)
        if result not in ("bounced", "deferred"):
            return None
        code, enhanced, text = reply
        if result == "bounced":
            found = self.engine.classify(None, code, enhanced, text)
            if (found is not None and found[0] == "hard_bounce") or (
                found is None and (enhanced or "").startswith("5.1.")
            ):
                return Verdict("hard_bounce")
        if not self.soft.matching(enhanced):
            return None
        try:
            _, fp = self.engine.suppress_fingerprint(address, scope)
        except _core.CoreError as e:
            raise ValueError(str(e)) from None
        listing = self.soft.failed(fp, enhanced, at_ms)
        if listing is None:
            return None
        return Verdict(
            "soft_bounce",
            listing.expires_ms,
            {"rule": listing.rule + 1, "failures": listing.failures},
        )

    def _load_snapshot(self) -> int:
        """The last id of a usable snapshot (its set restored), else 0 (an empty set)."""
        try:
            data = self.snapshot_path.read_bytes()
            (last_id,) = _HEADER.unpack_from(data)
            self.engine.suppress_restore(data[_HEADER.size :])
        except (OSError, struct.error, _core.CoreError):
            return 0
        return int(last_id)

    def save_snapshot(self) -> None:
        """Write the live set beside the log (atomically), so a restart folds only what came
        after it. The log stays the truth: a lost snapshot costs time, not data."""
        data = _HEADER.pack(self.last_id) + self.engine.suppress_snapshot()
        tmp = self.snapshot_path.with_name(self.snapshot_path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)
        self.unsnapshotted = 0

    def events(self, requests: Iterable[SuppressionRequest], now_ms: int) -> list[SuppressionEvent]:
        """Log events for `requests`, addresses normalised and hashed by the core. Raises
        ValueError naming the first malformed address or unknown event."""
        out = []
        for r in requests:
            if r.event not in EVENTS and r.event != "remove":
                raise ValueError(
                    f"event: must be one of {', '.join(EVENTS)} or remove, got {r.event!r}"
                )
            try:
                address, fp = self.engine.suppress_fingerprint(r.address, r.scope)
            except _core.CoreError as e:
                raise ValueError(str(e)) from None
            expires = r.expires_ms if r.event == "soft_bounce" else None
            out.append(
                SuppressionEvent(
                    at_ms=now_ms,
                    fingerprint=fp,
                    address=address,
                    event=r.event,
                    source=r.source,
                    scope=r.scope,
                    expires_ms=expires,
                    evidence=r.evidence,
                )
            )
        return out

    def written(self, events: Sequence[SuppressionEvent], ids: Sequence[int]) -> int:
        """Fold events the store has made durable (with their ids) into the live set."""
        self.engine.suppress_apply([(e.fingerprint, e.event, e.expires_ms) for e in events])
        if ids:
            self.last_id = max(self.last_id, max(ids))
        self.unsnapshotted += len(events)
        return len(events)

    def check(
        self, addresses: Sequence[str], now_ms: int, scope: str = ""
    ) -> dict[str, str | None]:
        """Per address as given: the event that suppresses it now, None, or "invalid"."""
        return dict(
            zip(addresses, self.engine.suppress_check(list(addresses), now_ms, scope), strict=True)
        )
