"""The suppression list in the daemon: the store's append-only log, folded into the core's
live set (rust/src/suppress/), which `acquire` and `pick` check at send time.

An event is durable in the store before the live set changes and before any reply says it
was recorded. The live set is rebuilt at start from a snapshot file in the state folder (the
set's bytes and the last log id folded into it) and the log after that id, or from the whole
log when the snapshot is missing, unreadable or made with another hash key. The hash key is
kept in the store (`suppression_key`), so every node reading one store agrees on it, or in the
plan's `suppression.key_file`, never written to the store; a key check in the store
(`suppression_key_check`, the fingerprint of a fixed address) refuses a start with another key.

In hashed-only mode (`suppression.hashed_only`) the log's new events keep no address: only the
keyed hash, and evidence with every address replaced (`SuppressionList.at_rest`, which every
writer goes through).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import _core
from kiln.errors import ConfigError
from kiln.log import get_logger
from kiln.policyspec import SuppressionSpec
from kiln.records import SuppressionEvent
from kiln.store import Store
from kiln.suppress.soft import SoftBounces

if TYPE_CHECKING:
    from kiln.suppress.files import FoldColumns

__all__ = [
    "ADDRESS_MARK",
    "EVENTS",
    "KEY_CHECK_META",
    "KEY_META",
    "SNAPSHOT_FILE",
    "SuppressionList",
    "SuppressionRequest",
    "Verdict",
    "read_key_file",
    "without_addresses",
]

#: What may put an address on the list; `remove` takes it off (also an event of the log).
EVENTS = ("hard_bounce", "complaint", "unsubscribe", "manual", "soft_bounce")
#: The store's meta key of the hash key (hex of 16 bytes; "" once moved to a key file).
KEY_META = "suppression_key"
#: The store's meta key of the key check: the hex fingerprint of `_KEY_PROBE` under the key
#: the log is hashed with (tells a wrong key without holding the key).
KEY_CHECK_META = "suppression_key_check"
_KEY_PROBE = "key-check@kiln.invalid"
#: What an address in evidence text becomes in hashed-only mode.
ADDRESS_MARK = "<address>"
#: An address inside text (a reply, a reason): a local part, quoted or without white space
#: and the characters that delimit addresses in replies and headers, then @ and a domain or
#: an address literal. Generous on purpose: anything address-shaped goes.
_ADDRESS_IN_TEXT = re.compile(
    r"""(?:"[^"\r\n]{0,256}"|[^\s<>()\[\]{},;:"'@]+)@(?:\[[^\]\s]{0,256}\]|[^\s<>()\[\]{},;:"'@]+)"""
)
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

    def request(
        self,
        address: str,
        scope: str,
        source: str,
        ip: str | None,
        reply: tuple[int | None, str | None, str],
    ) -> SuppressionRequest:
        """The list's event for this verdict, with the reply (code, enhanced status, text,
        cut to 500 characters) and the IP as its evidence (empty fields left out)."""
        code, enhanced, text = reply
        evidence = {"ip": ip, "code": code, "enhanced": enhanced, "text": text[:500], **self.why}
        return SuppressionRequest(
            address=address,
            event=self.event,
            source=source,
            scope=scope,
            expires_ms=self.expires_ms,
            evidence={k: v for k, v in evidence.items() if v},
        )


def without_addresses(evidence: dict[str, Any], known: Sequence[str] = ()) -> dict[str, Any]:
    """`evidence` keeping no address: a field (or list item) that is an address is dropped,
    and every address inside text becomes `ADDRESS_MARK`: anything address-shaped, and the
    `known` addresses (the recipient as given and as normalised) wherever they appear, in
    any case, even where they hold spaces or brackets."""
    kept = _scrubbed(evidence, tuple(a for a in known if "@" in a))
    return kept if isinstance(kept, dict) else {}


def _scrubbed(value: Any, known: tuple[str, ...]) -> Any:
    """`value` without addresses, or `_DROP` when it is one address and nothing else."""
    if isinstance(value, str):
        return _scrubbed_text(value, known)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            kept = _scrubbed(v, known)
            if kept is not _DROP:
                out[_scrubbed_text(k, known) if isinstance(k, str) else k] = kept
        return out
    if isinstance(value, list | tuple):
        return [kept for v in value if (kept := _scrubbed(v, known)) is not _DROP]
    return value


_DROP = object()


def _scrubbed_text(text: str, known: tuple[str, ...]) -> Any:
    """`text` with its addresses replaced, or `_DROP` when it was an address alone."""
    if "@" not in text:
        return text
    out = text
    for address in known:
        if address.lower() in out.lower():
            out = re.sub(re.escape(address), ADDRESS_MARK, out, flags=re.IGNORECASE)
    out = _ADDRESS_IN_TEXT.sub(ADDRESS_MARK, out).replace(f"<{ADDRESS_MARK}>", ADDRESS_MARK)
    if ADDRESS_MARK in out and not out.replace(ADDRESS_MARK, "").strip(" \t\r\n<>"):
        return _DROP
    return out


def read_key_file(text: str, base: Path | None) -> str:
    """The hash key (32 lower-case hexadecimal characters) held in the plan's
    `suppression.key_file` (`~` expanded, a relative path from the plan's folder `base`).
    ConfigError when it cannot be read, holds anything else, or may be read by others than
    its owner (a file owned by root may be read by its group, for a daemon running in it)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base is None:
            raise ConfigError(
                f"suppression.key_file: {text} is relative, and the plan's folder is not known"
            )
        path = base / path
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno())
            data = f.read(1024)
    except OSError as e:
        raise ConfigError(f"suppression.key_file: cannot read {path}: {e.strerror}") from None
    allowed = stat.S_IRGRP if mode.st_uid == 0 else 0
    if stat.S_IMODE(mode.st_mode) & 0o077 & ~allowed:
        raise ConfigError(
            f"suppression.key_file: {path} may be read or changed by others than its owner "
            f"(mode {stat.S_IMODE(mode.st_mode):04o}); make it 0600 (or 0640 owned by root)"
        )
    key = data.decode("ascii", "replace").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise ConfigError(
            f"suppression.key_file: {path} must hold the key as 32 hexadecimal characters "
            "(16 bytes, such as `openssl rand -hex 16` prints) and nothing else"
        )
    return key


class SuppressionList:
    """The log and the live set of one daemon (called on the engine's thread, except the
    store calls the caller routes to the store thread)."""

    def __init__(
        self,
        engine: _core.Engine,
        store: Store,
        state_dir: Path,
        spec: SuppressionSpec | None = None,
        base: Path | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.spec = spec or SuppressionSpec()
        #: The plan's folder, which a relative `key_file` is read from.
        self.base = base
        self.log = get_logger(component="suppression")
        #: Temporary failures counted towards the soft-bounce rules.
        self.soft = SoftBounces(self.spec.soft_bounces)
        self.snapshot_path = state_dir / SNAPSHOT_FILE
        #: The last log id folded into the live set.
        self.last_id = 0
        #: Log events since the last snapshot.
        self.unsnapshotted = 0
        #: While an import is written and folded (`begin_import`): each fingerprint folded
        #: meanwhile from other events, with its highest log id.
        self._touched: dict[int, int] | None = None
        #: A snapshot claims no later log id than these (None: no bound): `last_id` when an
        #: import began, while it is folded; the same for good once an import's fold did not
        #: finish. A restart then folds the log again from there, which gives the same set
        #: (the last event of each address wins), only later.
        self._import_floor: int | None = None
        self._unfolded_floor: int | None = None

    def open(self) -> int:
        """Key the live set and fold the log into it; how many addresses are listed.
        ConfigError when the key at hand is not the one the log was hashed with."""
        self._set_key()
        self.last_id = self._load_snapshot()
        for chunk in self.store.suppress_fold_chunks(self.last_id):
            self.engine.suppress_apply_column(
                chunk.fingerprints, chunk.codes, list(chunk.names), chunk.expires_ms
            )
            self.last_id = chunk.last_id
            self.unsnapshotted += len(chunk)
        if self.spec.hashed_only and self._log_keeps_addresses():
            self.log.warning(
                "suppression_addresses_kept",
                message="suppression.hashed_only is on, but the log holds events written "
                "before it with their addresses; the log is never rewritten, so they stay "
                "(docs/suppression.md, Hashed-only mode)",
            )
        return self.engine.suppress_stats()[0]

    def _set_key(self) -> None:
        """Key the live set: with the plan's key file (never written to the store; a key
        left in the store's meta is erased once it is the same), else the store's key (made
        on first use). The store's key check must agree; it is written when missing."""
        from_file = read_key_file(self.spec.key_file, self.base) if self.spec.key_file else None
        stored = self.store.get_meta(KEY_META) or None
        check = self.store.get_meta(KEY_CHECK_META) or None
        if from_file is not None:
            if stored is not None and stored != from_file:
                raise ConfigError(
                    "suppression.key_file holds another key than the store's "
                    "suppression_key, which hashed every fingerprint of the suppression log; "
                    "put the store's key in the file, or leave suppression.key_file out"
                )
            key = from_file
        elif stored is not None:
            key = stored
        elif check is not None:
            raise ConfigError(
                "the suppression log was hashed with a key kept outside the store "
                "(suppression.key_file), and the plan names no key file; name it again "
                "(the store holds no suppression_key)"
            )
        else:
            key = secrets.token_hex(16)
            self._refuse_unkeyed_log()
            self.store.set_meta(KEY_META, key)
        raw = bytes.fromhex(key)
        self.engine.suppress_set_key(
            int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        )
        mine = f"{self.engine.suppress_fingerprint(_KEY_PROBE)[1]:016x}"
        if check is None:
            if from_file is not None and stored is None:
                self._refuse_unkeyed_log()
            self.store.set_meta(KEY_CHECK_META, mine)
        elif check != mine:
            where = (
                "suppression.key_file" if from_file is not None else "the store's suppression_key"
            )
            raise ConfigError(
                f"the key in {where} is not the one the suppression log was hashed with (its "
                "key check differs): every fingerprint of the log would be wrong; give "
                "suppression.key_file the key the log was written with (the store's "
                "suppression_key, if it was kept there)"
            )
        if from_file is not None and stored is not None:
            self.store.set_meta(KEY_META, "")
            self.log.warning(
                "suppression_key_moved",
                message="the store's suppression_key is the key of suppression.key_file; it "
                "was erased from the store (docs/suppression.md, Hashed-only mode)",
            )

    def _refuse_unkeyed_log(self) -> None:
        """A log with events, but neither a key nor a key check in the store: which key
        hashed it cannot be told, so a new one is not made (ConfigError)."""
        if self.store.suppress_last_id():
            raise ConfigError(
                "the suppression log holds events, but the store has neither its "
                "suppression_key nor a key check: the key that hashed them is unknown; "
                "restore suppression_key in the store or name it in suppression.key_file"
            )

    def _log_keeps_addresses(self) -> bool:
        """Whether the log holds an event with its address: the store's record of one ever
        written, or for a log written before that record was kept, its first or last event
        keeping its address (the events between are not read)."""
        if self.store.suppress_kept_addresses():
            return True
        first = self.store.suppress_events(limit=1)
        if first and first[0].address:
            return True
        last_id = self.store.suppress_last_id()
        last = self.store.suppress_events(after_id=last_id - 1, limit=1) if last_id else []
        return bool(last and last[0].address)

    def replan(self, spec: SuppressionSpec) -> None:
        """A reloaded plan's settings; changed soft-bounce rules start counting afresh. A
        change of `hashed_only` holds for the next events; the key stays until a restart."""
        if spec.soft_bounces != self.spec.soft_bounces:
            self.soft = SoftBounces(spec.soft_bounces, self.soft.max_tracked)
        if spec.key_file != self.spec.key_file:
            self.log.warning(
                "suppression_key_file_changed",
                message="suppression.key_file changed: the key in use stays until the next "
                "start, which checks the new one against the log",
            )
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
        self.write_snapshot(*self.take_snapshot())
        self.unsnapshotted = 0

    def take_snapshot(self) -> tuple[int, bytes]:
        """(last log id in it, the set's bytes), on the engine's thread (the core copies the
        set a range at a time, never holding the MTA sockets for the whole copy)."""
        floors = (f for f in (self._import_floor, self._unfolded_floor) if f is not None)
        return min((self.last_id, *floors)), self.engine.suppress_snapshot()

    def write_snapshot(self, last_id: int, data: bytes) -> None:
        """Write a `take_snapshot` to the state folder, atomically (any thread)."""
        # Its own temporary file: the stop's snapshot may overlap a periodic one.
        tmp = self.snapshot_path.with_name(
            f"{self.snapshot_path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        )
        with tmp.open("wb") as f:
            f.write(_HEADER.pack(last_id))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)

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
            event = SuppressionEvent(
                at_ms=now_ms,
                fingerprint=fp,
                address=address,
                event=r.event,
                source=r.source,
                scope=r.scope,
                expires_ms=expires,
                evidence=r.evidence,
            )
            out.append(self._kept(event, self.spec.hashed_only, r.address))
        return out

    def at_rest(self, events: list[SuppressionEvent]) -> list[SuppressionEvent]:
        """`events` as the log may keep them (any thread; the engine is not touched): as
        they are, or in hashed-only mode without their addresses (`_kept`). `events` calls
        it for each event it makes; other writers (imports) call it before writing."""
        hashed_only = self.spec.hashed_only  # once: a reload may swap the spec meanwhile
        if not hashed_only:
            return events
        return [self._kept(e, hashed_only) for e in events]

    @staticmethod
    def _kept(event: SuppressionEvent, hashed_only: bool, given: str = "") -> SuppressionEvent:
        """The one place the log's events lose their addresses in hashed-only mode: the
        address column empty, evidence `without_addresses` (`given`: the address as the
        caller wrote it, besides the normalised one)."""
        if not hashed_only:
            return event
        return dataclasses.replace(
            event,
            address="",
            evidence=without_addresses(event.evidence, (event.address, given.strip())),
        )

    def written(self, events: Sequence[SuppressionEvent], ids: Sequence[int]) -> int:
        """Fold events the store has made durable (with their ids, one each) into the live
        set."""
        items = [(e.fingerprint, e.event, e.expires_ms) for e in events]
        touched = self._touched
        if touched is not None:
            for (fp, _, _), log_id in zip(items, ids, strict=False):
                touched[fp] = max(touched.get(fp, 0), log_id)
        self.engine.suppress_apply(items)
        self.last_id = max(self.last_id, max(ids, default=0))
        self.unsnapshotted += len(items)
        return len(items)

    def begin_import(self) -> None:
        """An import is about to write its events, and to fold them a batch at a time while
        other events go on being folded as they come (`imported_columns`). One import at a
        time: ValueError while another is under way."""
        if self._touched is not None:
            raise ValueError("another import is being written; try again once it has ended")
        self._touched = {}
        self._import_floor = self.last_id

    def imported_columns(self, columns: FoldColumns, last_id: int) -> int:
        """Fold a batch of the import's events (the log holds them up to id `last_id`),
        but not over an address that a later event (a higher log id) was folded for since
        `begin_import`: an operator's `remove` or a new complaint written while the import
        was being folded stays the address's last word, as in the log."""
        touched = self._touched
        if touched:
            columns = columns.without([touched.get(fp, 0) > last_id for fp in columns.fingerprints])
        columns.apply(self.engine)
        self.last_id = max(self.last_id, last_id)
        self.unsnapshotted += len(columns)
        return len(columns)

    def end_import(self, *, folded: bool) -> None:
        """The import ended: `folded` when all its written events were folded (or none was
        written). Otherwise snapshots go on claiming no later log id than before it, so a
        restart folds its events from the log."""
        if not folded and self._unfolded_floor is None:
            self._unfolded_floor = self._import_floor
        self._touched = None
        self._import_floor = None

    def check(
        self, addresses: Sequence[str], now_ms: int, scope: str = ""
    ) -> dict[str, str | None]:
        """Per address as given: the event that suppresses it now, None, or "invalid"."""
        return dict(
            zip(addresses, self.engine.suppress_check(list(addresses), now_ms, scope), strict=True)
        )
