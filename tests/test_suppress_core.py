"""The core's live set through its binding at sizes where it works in parts: applying events
a few thousand per hold of the engine's lock, growing the table outside it, and copying the
snapshot a range of slots at a time (rust/src/bindings/engine.rs) give the same set as the
plain fold."""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path

from kiln import _core
from kiln.daemon.core import SUPPRESSION_SNAPSHOT_MS
from kiln.suppress.live import SNAPSHOT_FILE
from test_daemon import PLAN, FakeClock, make, ms

NOW_MS = 1_800_000_000_000


def keyed() -> _core.Engine:
    engine = _core.Engine()
    engine.suppress_set_key(11, 22)
    return engine


def test_a_column_hashes_as_the_pairs_do_and_names_refusals_by_row() -> None:
    """The import's column form: the same fingerprints as one pair at a time, in one scope
    or one scope per address (the domain normalised the same way), and a row the core
    refuses gives 0 and its problem."""
    engine = keyed()
    addresses = ["a@Example.ORG", "not an address", "b@x.org", "c@bücher.de", "@x.org"]
    scopes = ["", "news", "news", "", "billing"]
    for scope, per_row in [("", None), ("news", None), ("", scopes)]:
        column, refused = engine.suppress_fingerprint_column("\n".join(addresses), scope, per_row)
        got = array("q")
        got.frombytes(column)
        pairs = per_row or [scope] * len(addresses)
        want = engine.suppress_fingerprints(list(zip(addresses, pairs, strict=True)))
        assert list(got) == [fp for _, fp, _ in want]
        assert refused == [(r, p) for r, (a, _, p) in enumerate(want) if a is None]
        assert [r for r, _ in refused] == [1, 4]
        assert all(fp > 0 for r, fp in enumerate(got) if r not in (1, 4))
        assert len(set(got)) == 4  # three addresses, and 0 for both refusals
    try:
        engine.suppress_fingerprint_column("a@x.org\nb@x.org", "", ["only one"])
    except _core.CoreError as exc:
        assert "scopes" in str(exc)
    else:
        raise AssertionError("a scope list of the wrong length was taken")


def contents(engine: _core.Engine) -> tuple[bytes, list[bytes]]:
    """A set's snapshot as (header and entries, the soft bounces' expiries in order): the
    expiries come in their map's order, which the history of the map decides."""
    data = engine.suppress_snapshot()
    n = int.from_bytes(data[16:24], "little")
    start = 32 + 8 * n
    return data[:start], sorted(data[i : i + 16] for i in range(start, len(data), 16))


def test_columns_fold_as_tuples_do_and_bad_columns_change_nothing() -> None:
    """`suppress_apply_column` (an import's fold) gives the set `suppress_apply` gives for
    the same events, removes and expiries included; columns that do not line up, an
    unknown code or event, or a fingerprint out of range are refused before any change."""
    names = ["hard_bounce", "soft_bounce", "remove", "complaint"]
    rng = random.Random(5)  # noqa: S311 (fixed test data)
    fps = [rng.randrange(1, 1 << 61) for _ in range(300)] * 2
    codes = bytes(rng.randrange(4) for _ in fps)
    expires = [
        NOW_MS + 1000 * i if names[c] == "soft_bounce" else None for i, c in enumerate(codes)
    ]
    by_tuples, by_columns = keyed(), keyed()
    changed = by_tuples.suppress_apply(
        [(fp, names[c], t) for fp, c, t in zip(fps, codes, expires, strict=True)]
    )
    column = array("q", fps).tobytes()
    assert by_columns.suppress_apply_column(column, codes, names, expires) == changed
    assert contents(by_columns) == contents(by_tuples)
    for bad, message in (
        ((column[:-8], codes, names, None), "columns"),
        ((column, codes, names, expires[:-1]), "columns"),
        ((column, codes, names[:3], None), "code"),
        ((column, codes, [*names[:3], "spam"], None), "spam"),
        ((array("q", [0] * len(fps)).tobytes(), codes, names, None), "fingerprint"),
    ):
        try:
            by_columns.suppress_apply_column(*bad)
        except _core.CoreError as exc:
            assert message in str(exc), (message, exc)
        else:
            raise AssertionError(f"taken: {message}")
        assert contents(by_columns) == contents(by_tuples)


def test_big_folds_and_snapshots_in_parts_equal_the_model() -> None:
    """300,000 events (adds, re-adds, removes, soft bounces) across several table doublings,
    applied in one call and in many; the set and its snapshot equal a dict fold."""
    rng = random.Random(5)  # noqa: S311 (a fixed stream, not a secret)
    engine = keyed()
    addresses = [f"u{i}@example{i % 97}.org" for i in range(120_000)]
    hashed = engine.suppress_fingerprints([(a, "") for a in addresses])
    fps = [fp for _, fp, _ in hashed]
    events: list[tuple[int, str, int | None]] = []
    model: dict[int, tuple[str, int | None]] = {}
    for _ in range(300_000):
        i = rng.randrange(len(fps))
        kind = rng.choice(["manual", "hard_bounce", "remove", "soft_bounce", "unsubscribe"])
        expires = NOW_MS + rng.choice([-1, 1]) * 60_000 if kind == "soft_bounce" else None
        events.append((fps[i], kind, expires))
        if kind == "remove":
            model.pop(fps[i], None)
        else:
            model[fps[i]] = (kind, expires)
    engine.suppress_apply(events[:150_000])  # one call: many holds of the lock
    for start in range(150_000, 300_000, 9_999):
        engine.suppress_apply(events[start : start + 9_999])
    listed, _ = engine.suppress_stats()
    assert listed == len(model)
    by_fp = dict(zip(fps, addresses, strict=True))

    def live(fp: int) -> str | None:
        if fp not in model:
            return None
        event, expires = model[fp]
        return None if expires is not None and expires <= NOW_MS else event

    want = {a: live(fp) for fp, a in by_fp.items()}
    assert dict(zip(addresses, engine.suppress_check(addresses, NOW_MS), strict=True)) == want
    data = engine.suppress_snapshot()
    again = keyed()
    assert again.suppress_restore(data) == listed
    assert again.suppress_stats()[0] == listed
    assert dict(zip(addresses, again.suppress_check(addresses, NOW_MS), strict=True)) == want
    for a in rng.sample(addresses, 500):
        assert again.suppressed(a, NOW_MS) == want[a]


def test_the_daemon_snapshots_while_serving_so_a_sigkill_folds_only_the_tail(
    tmp_path: Path,
) -> None:
    """Events since the last snapshot are written out by the 1 Hz tick at most every
    SUPPRESSION_SNAPSHOT_MS; a restart without a clean stop (as after SIGKILL) restores that
    snapshot and folds only the log after its id."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    state = tmp_path / "state"
    clock = FakeClock(ms("2026-11-02T10:00:00"))
    d = make(plan, state, clock)
    snapshot = state / SNAPSHOT_FILE

    def add(address: str) -> None:
        reply = d.upcall(
            json.dumps({"op": "suppress", "action": "add", "address": address}).encode(), clock.t
        )
        assert reply["ok"], reply

    add("a@example.org")
    d.tick(clock.t)
    assert snapshot.exists() and d.suppression.unsnapshotted == 0
    first_id = int.from_bytes(snapshot.read_bytes()[:8], "little")
    add("b@example.org")
    clock.t += 60_000
    d.tick(clock.t)  # too soon for another
    assert int.from_bytes(snapshot.read_bytes()[:8], "little") == first_id
    clock.t += SUPPRESSION_SNAPSHOT_MS
    d.tick(clock.t)
    second_id = int.from_bytes(snapshot.read_bytes()[:8], "little")
    assert second_id > first_id and d.suppression.unsnapshotted == 0
    add("c@example.org")  # after the snapshot: only in the log
    d.store.close()  # no clean stop
    again = make(plan, state, clock)
    assert again.suppression.unsnapshotted == 1  # the tail folded: c only
    checked = again.suppression.check(["a@example.org", "b@example.org", "c@example.org"], clock.t)
    assert checked == dict.fromkeys(["a@example.org", "b@example.org", "c@example.org"], "manual")
    again.store.close()
