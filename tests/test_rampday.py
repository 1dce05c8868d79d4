"""The day roll-over: one pure decision per (batch, provider) ramp, with its reason and numbers."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.planfile import load_plan
from kiln.ramp import caps_at, nominal_plan, plan_providers, steps_for
from kiln.rampday import FLAG_AFTER_DAYS, RampMove, day_cap, day_evidence, ramp_view, roll_day
from kiln.records import DayCounts, RampState
from kiln.schedule import Plan

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"
FILES = sorted(SCHEDULES.glob("*.yaml"))
PLANS = {f.stem: load_plan(f) for f in FILES}
EXAMPLE = PLANS["example"]  # tx-2026-12: 2 IPs, 150/300/600/1000..., google at half, 07-22
SPARKPOST = PLANS["sparkpost-stages"]  # cold: 2 IPs, 200/500/1000..., gate > 90%
SENDGRID = PLANS["sendgrid-like"]  # new-ip: 1 IP, hourly caps only, gate > 0%, every day counts
CUTOVER = PLANS["dual-mta-cutover"]  # kumo: 4 IPs, 5% of 2M a day first

TX = ("tx-2026-12", "default")
COLD = ("cold", "default")
NEW = ("new-ip", "default")
EX_DAY = date(2026, 12, 10)
SP_DAY = date(2026, 12, 20)
SG_DAY = date(2026, 12, 20)

INLINE = """\
name: inline
timezone: UTC
pools:
  p: {{ips: [198.51.100.1]}}
batches:
  b: {{pool: p, ips: [192.0.2.1, 192.0.2.2], schedule: s, start_date: 2027-01-01}}
schedules:
  s:
{curve}
    hourly: {{active_hours: 08-20}}
{gates}
"""


def inline(tmp_path: Path, curve: str, gates: str = "") -> Plan:
    """A one-batch, two-IP plan with the given curve and gates, written to a file and loaded."""
    path = tmp_path / "inline.yaml"
    path.write_text(INLINE.format(curve=curve, gates=gates))
    return load_plan(path)


def one(
    plan: Plan,
    key: tuple[str, str],
    day: date,
    state: RampState,
    seen: DayCounts,
    holds: Sequence[str] = (),
) -> tuple[RampState, list[RampMove]]:
    """Roll one day and return the new state and moves of one ramp."""
    states, moves = roll_day(plan, day, {key: state}, {key: seen}, {key: holds})
    mine = [m for m in moves if (m.batch, m.provider) == key]
    return states[key], mine


def actions(moves: list[RampMove]) -> list[str]:
    """The moves' actions, in order."""
    return [m.action for m in moves]


# ----- the gate -----


def test_exactly_ninety_percent_holds_and_more_advances() -> None:
    """SparkPost's rule: 360 of a 400 cap (exactly 90%) holds; 361 advances."""
    state = RampState(step=1)
    held, moves = one(SPARKPOST, COLD, SP_DAY, state, DayCounts(granted=400, delivered=360))
    assert actions(moves) == ["hold"] and held.step == 1
    assert moves[0].reason == "delivered 360, 90.0% of the day's cap 400 (needs more than 90%)"
    assert moves[0].evidence["delivered_percent"] == 90.0
    assert moves[0].evidence["cap"] == 400 and moves[0].evidence["threshold"] == 90.0
    up, moves = one(SPARKPOST, COLD, SP_DAY, state, DayCounts(granted=400, delivered=361))
    assert actions(moves) == ["advance"] and up.step == 2
    assert (moves[0].from_step, moves[0].to_step) == (1, 2)


def test_ninety_point_one_percent_advances() -> None:
    """At stage 3 (1,000 a day per IP, 2 IPs) 1,802 delivered is 90.1% and advances."""
    state = RampState(step=3)
    up, moves = one(SPARKPOST, COLD, SP_DAY, state, DayCounts(granted=2000, delivered=1802))
    assert actions(moves) == ["advance"] and up.step == 4
    assert moves[0].reason == "delivered 1802, 90.1% of the day's cap 2000 (needs more than 90%)"
    _, moves = one(SPARKPOST, COLD, SP_DAY, state, DayCounts(granted=2000, delivered=1800))
    assert actions(moves) == ["hold"]


def test_percent_shows_enough_decimals_to_tell_the_side_of_the_gate() -> None:
    """90.04% is not written as 90.0% when it advances past a 90% gate."""
    plan = SPARKPOST
    state = RampState(step=20)  # 1,000,000 per IP, 2 IPs
    _, moves = one(plan, COLD, SP_DAY, state, DayCounts(granted=1, delivered=1_800_800))
    assert actions(moves) == ["advance"]
    assert "90.04% of the day's cap 2000000" in moves[0].reason


def test_grants_without_reported_deliveries_never_advance() -> None:
    """Granted is not delivered: with no MTA feedback the ramp holds."""
    state = RampState(step=2)
    after, moves = one(SPARKPOST, COLD, SP_DAY, state, DayCounts(granted=1000))
    assert actions(moves) == ["hold"] and after.step == 2
    assert after.days_without_advance == 1 and after.last_sending_day == SP_DAY


# ----- days without traffic -----


def test_no_traffic_holds_without_ageing_with_sending_days_only() -> None:
    """sending_days_only: a quiet day holds, adds an idle day and leaves the rest alone."""
    before = RampState(
        step=3, idle_days=2, last_sending_day=date(2026, 12, 7), days_without_advance=4
    )
    after, moves = one(EXAMPLE, TX, EX_DAY, before, DayCounts())
    assert actions(moves) == ["hold"]
    assert after == RampState(
        step=3, idle_days=3, last_sending_day=date(2026, 12, 7), days_without_advance=4
    )
    assert "no traffic" in moves[0].reason and "3 idle days" in moves[0].reason


def test_no_traffic_is_a_failed_day_without_sending_days_only() -> None:
    """sending_days_only false (sendgrid-like): a quiet day holds at 0% and counts."""
    before = RampState(step=5, days_without_advance=2)
    after, moves = one(SENDGRID, NEW, SG_DAY, before, DayCounts())
    assert actions(moves) == ["hold"]
    assert after == RampState(step=5, idle_days=1, days_without_advance=3)
    assert "no traffic" in moves[0].reason and "0.0% of the day's cap" in moves[0].reason


def test_sendgrid_gate_of_zero_advances_on_any_delivery() -> None:
    """delivered_above_percent 0: one delivered message moves the hourly-only table on."""
    after, moves = one(SENDGRID, NEW, SG_DAY, RampState(step=5), DayCounts(1, 1))
    assert actions(moves) == ["advance"] and after.step == 6


def test_idle_restart_at_thirty_days() -> None:
    """The 30th day in a row without traffic sends a ramp above step 1 back to step 1."""
    before = RampState(step=7, idle_days=29, days_without_advance=3)
    after, moves = one(EXAMPLE, TX, EX_DAY, before, DayCounts())
    assert actions(moves) == ["restart"]
    assert (moves[0].from_step, moves[0].to_step) == (7, 1)
    assert after == RampState(step=1, idle_days=30, days_without_advance=0)
    assert "30 days" in moves[0].reason and moves[0].evidence["idle_days"] == 30
    _, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=7, idle_days=28), DayCounts())
    assert actions(moves) == ["hold"]
    still, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=1, idle_days=29), DayCounts())
    assert actions(moves) == ["hold"] and still == RampState(step=1, idle_days=30)


def test_no_idle_restart_when_rewarm_is_null(tmp_path: Path) -> None:
    """rewarm_after_idle_days: null keeps a quiet ramp where it is, however long."""
    plan = inline(
        tmp_path,
        "    steps: [{daily_cap: 10}, {daily_cap: 20}, {daily_cap: 40}]",
        "    gates: {rewarm_after_idle_days: null}",
    )
    after, moves = one(
        plan, ("b", "default"), date(2027, 6, 1), RampState(3, idle_days=400), DayCounts()
    )
    assert actions(moves) == ["hold"] and after.step == 3 and after.idle_days == 401


def test_a_sending_day_resets_idle_days() -> None:
    """Traffic on any day clears the idle count and records the day."""
    before = RampState(step=2, idle_days=12)
    after, _ = one(EXAMPLE, TX, EX_DAY, before, DayCounts(granted=5, delivered=5))
    assert after.idle_days == 0 and after.last_sending_day == EX_DAY


# ----- paused, not started, done -----


def test_paused_ramp_holds_and_does_not_age() -> None:
    """A paused ramp stays put; a quiet day changes nothing, a sending day is recorded."""
    before = RampState(step=4, paused=True, idle_days=29, days_without_advance=9)
    quiet, moves = one(EXAMPLE, TX, EX_DAY, before, DayCounts())
    assert actions(moves) == ["paused"] and quiet == before
    busy, moves = one(EXAMPLE, TX, EX_DAY, before, DayCounts(granted=2000, delivered=2000))
    assert actions(moves) == ["paused"]
    assert busy == RampState(
        step=4, paused=True, idle_days=0, last_sending_day=EX_DAY, days_without_advance=9
    )


def test_not_started_before_the_start_date() -> None:
    """The day before the batch starts nothing moves, whatever the evidence says."""
    before = RampState()
    after, moves = one(EXAMPLE, TX, date(2026, 11, 30), before, DayCounts(300, 300))
    assert actions(moves) == ["not_started"] and after == before
    assert "2026-12-01" in moves[0].reason
    _, moves = one(EXAMPLE, TX, date(2026, 12, 1), before, DayCounts(300, 300))
    assert actions(moves) == ["advance"]  # the start date itself is warm-up day 0


def test_done_after_the_last_step() -> None:
    """Past the 12th step the example's ramp is done and stays so."""
    before = RampState(step=13, idle_days=100)
    after, moves = one(EXAMPLE, TX, EX_DAY, before, DayCounts())
    assert actions(moves) == ["done"] and after == before
    assert moves[0].evidence["cap"] is None


def test_advancing_off_the_last_step_finishes_the_ramp() -> None:
    """Passing the gate on the last step moves past it and says the ramp is done."""
    after, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=12), DayCounts(50_000, 50_000))
    assert actions(moves) == ["advance"] and after.step == 13
    assert "the ramp is done" in moves[0].reason


# ----- holds and flags -----


def test_hold_conditions_block_the_advance_and_are_listed() -> None:
    """Recorded hold conditions hold a ramp that passed the gate, and the reason quotes them."""
    seen = DayCounts(granted=2000, delivered=2000, bounced=50)
    holds = ["hard bounces 2.5% (>= 2%)", "rate_limit_rep at 14:00"]
    after, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=4), seen, holds)
    assert actions(moves) == ["hold"] and after.step == 4 and after.days_without_advance == 1
    assert moves[0].reason.startswith("held by: hard bounces 2.5% (>= 2%); rate_limit_rep at 14:00")
    assert moves[0].evidence["holds"] == holds and moves[0].evidence["bounced"] == 50
    _, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=4), seen, "block_rep")
    assert moves[0].evidence["holds"] == ["block_rep"]  # a lone string is one condition


def test_flag_after_ten_days_without_advance() -> None:
    """The 10th held day above step 1 brings a second move, flag, which changes nothing."""
    seen = DayCounts(granted=1000, delivered=100)
    after, moves = one(EXAMPLE, TX, EX_DAY, RampState(step=3, days_without_advance=8), seen)
    assert actions(moves) == ["hold"] and after.days_without_advance == 9
    after, moves = one(EXAMPLE, TX, EX_DAY, after, seen)
    assert actions(moves) == ["hold", "flag"] and after.days_without_advance == FLAG_AFTER_DAYS
    assert (moves[1].from_step, moves[1].to_step) == (3, 3) and after.step == 3
    assert "10 days" in moves[1].reason
    after, moves = one(EXAMPLE, TX, EX_DAY, after, seen)
    assert actions(moves) == ["hold", "flag"]  # repeats until the ramp moves
    after, moves = one(EXAMPLE, TX, EX_DAY, after, DayCounts(1200, 1200))
    assert actions(moves) == ["advance"] and after.days_without_advance == 0


def test_no_flag_at_step_one_nor_for_quiet_days() -> None:
    """Step 1 is never flagged, and quiet days under sending_days_only do not count."""
    seen = DayCounts(granted=300, delivered=10)
    after, moves = one(EXAMPLE, TX, EX_DAY, RampState(days_without_advance=30), seen)
    assert actions(moves) == ["hold"] and after.days_without_advance == 31
    quiet = RampState(step=3, days_without_advance=9)
    after, moves = one(EXAMPLE, TX, EX_DAY, quiet, DayCounts())
    assert actions(moves) == ["hold"] and after.days_without_advance == 9


# ----- the whole plan -----


def test_every_ramp_gets_a_move_in_plan_order() -> None:
    """Batches in plan order, providers in plan_providers order; missing inputs are defaults."""
    plan = PLANS["marketplace-3x7"]
    states, moves = roll_day(plan, date(2027, 2, 20), {}, {})
    expected = [(b, p) for b in plan.batches for p in plan_providers(plan)]
    assert [(m.batch, m.provider) for m in moves] == expected
    assert list(states) == expected
    by_batch = {m.batch: m.action for m in moves}
    assert by_batch == {"a": "hold", "b": "hold", "c": "not_started"}


def test_unknown_ramps_are_left_out() -> None:
    """States of ramps the plan no longer has are not carried over."""
    states, _ = roll_day(EXAMPLE, EX_DAY, {("gone", "default"): RampState(step=3)}, {})
    assert ("gone", "default") not in states and TX in states


def test_bad_input_is_refused() -> None:
    """Steps start at 1 and counts are never negative."""
    with pytest.raises(ValueError, match="1-based"):
        RampState(step=0)
    with pytest.raises(ValueError, match="never negative"):
        RampState(idle_days=-1)
    with pytest.raises(ValueError, match="delivered"):
        DayCounts(delivered=-1)
    with pytest.raises(ValueError, match="1-based"):
        day_cap(EXAMPLE, *TX, 0)


# ----- day_cap -----


def test_day_cap_of_daily_hourly_only_and_share_steps() -> None:
    """Daily caps, hourly-only caps over active hours, and share caps, times the IPs."""
    assert day_cap(EXAMPLE, *TX, 4) == 1000 * 2
    assert day_cap(EXAMPLE, "tx-2026-12", "google", 4) == 500 * 2
    assert day_cap(EXAMPLE, *TX, 13) is None  # done
    assert day_cap(SENDGRID, *NEW, 1) == 20 * 24  # hourly only, 00-24
    assert day_cap(SENDGRID, *NEW, 13) == 1000 * 24
    assert day_cap(CUTOVER, "kumo", "default", 1) == 25_000 * 4  # 5% of 2,000,000
    assert day_cap(CUTOVER, "kumo", "default", 42) == 500_000 * 4


def test_day_cap_takes_the_smaller_of_daily_and_hourly(tmp_path: Path) -> None:
    """An explicit hourly cap below daily / active hours is what the day can really carry."""
    plan = inline(tmp_path, "    steps: [{daily_cap: 1000, hourly_cap: 10}, {daily_cap: 2000}]")
    assert day_cap(plan, "b", "default", 1) == 10 * 12 * 2
    assert day_cap(plan, "b", "default", 2) == 2000 * 2


def test_uncapped_share_step_advances_on_a_sending_day(tmp_path: Path) -> None:
    """A share curve without stream_daily_volume has no cap: any sending day advances."""
    plan = inline(tmp_path, "    share: {percents: [10, 50, 100]}")
    assert day_cap(plan, "b", "default", 1) is None
    after, moves = one(plan, ("b", "default"), date(2027, 1, 2), RampState(), DayCounts(5))
    assert actions(moves) == ["advance"] and after.step == 2
    assert moves[0].evidence["cap"] is None and moves[0].evidence["delivered_percent"] is None


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_day_cap_matches_the_nominal_plan(path: Path) -> None:
    """For every shipped plan, day_cap is nominal_plan's daily volume per IP times the IPs."""
    plan = PLANS[path.stem]
    rows, _ = nominal_plan(plan)
    for row in rows:
        if row.state != "warming":
            continue
        assert row.step is not None
        hours = plan.schedules[plan.batches[row.batch].schedule].hourly.hours
        per_ip = row.daily_cap
        if per_ip is None and row.hourly_cap is not None:
            per_ip = row.hourly_cap * hours
        expected = None if per_ip is None else per_ip * row.ips
        assert day_cap(plan, row.batch, row.provider, row.step) == expected, row


# ----- simulation against the nominal plan -----


def perfect(plan: Plan, states: Mapping[tuple[str, str], RampState]) -> dict[Any, DayCounts]:
    """Evidence of a perfect day for every ramp: the whole cap granted and delivered."""
    out: dict[Any, DayCounts] = {}
    for batch in plan.batches:
        for provider in plan_providers(plan):
            step = states.get((batch, provider), RampState()).step
            cap = day_cap(plan, batch, provider, step)
            out[(batch, provider)] = DayCounts(granted=cap or 1, delivered=cap or 1)
    return out


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_perfect_days_reproduce_the_nominal_plan(path: Path) -> None:
    """Sending every day and delivering the whole cap walks each ramp exactly as planned."""
    plan = PLANS[path.stem]
    rows, _ = nominal_plan(plan)
    by_date: dict[str, list[Any]] = {}
    for row in rows:
        by_date.setdefault(row.date, []).append(row)
    states: dict[tuple[str, str], RampState] = {}
    for text, today in by_date.items():
        for row in today:
            step = states.get((row.batch, row.provider), RampState()).step
            if row.state == "warming":
                assert step == row.step, row
            elif row.state == "not_started":
                assert step == 1, row
        day = date.fromisoformat(text)
        states, moves = roll_day(plan, day, states, perfect(plan, states))
        assert "hold" not in actions(moves) and "flag" not in actions(moves)


# ----- properties -----

PROPERTY_PLANS = [EXAMPLE, SPARKPOST, SENDGRID, CUTOVER, PLANS["per-provider"]]


Day = tuple[Plan, date, dict[Any, RampState], dict[Any, DayCounts], dict[Any, list[str]]]
"""A case for the properties: plan, the day that ended, states, evidence, holds."""


@st.composite
def days(draw: st.DrawFn) -> Day:
    """A plan, a day near its batches' starts, and random states, evidence and holds."""
    plan = draw(st.sampled_from(PROPERTY_PLANS))
    first = min(b.start_date for b in plan.batches.values())
    day = first + timedelta(days=draw(st.integers(-3, 60)))
    states: dict[Any, RampState] = {}
    evidence: dict[Any, DayCounts] = {}
    holds: dict[Any, list[str]] = {}
    for batch in plan.batches:
        for provider in plan_providers(plan):
            key = (batch, provider)
            last = len(steps_for(plan.schedules[plan.batches[batch].schedule], provider))
            if draw(st.booleans()):
                states[key] = RampState(
                    step=draw(st.integers(1, last + 2)),
                    paused=draw(st.sampled_from([False, False, False, True])),
                    idle_days=draw(st.integers(0, 40)),
                    last_sending_day=draw(st.none() | st.just(day - timedelta(days=1))),
                    days_without_advance=draw(st.integers(0, 15)),
                )
            cap = day_cap(plan, batch, provider, states.get(key, RampState()).step) or 1000
            if draw(st.booleans()):
                evidence[key] = DayCounts(
                    granted=draw(st.integers(0, 2 * cap)),
                    delivered=draw(
                        st.sampled_from([0, cap * 9 // 10, cap * 9 // 10 + 1, cap])
                        | st.integers(0, 2 * cap)
                    ),
                    bounced=draw(st.integers(0, 10)),
                )
            if draw(st.integers(0, 4)) == 0:
                holds[key] = draw(
                    st.lists(st.sampled_from(["rate_limit_rep", "bounces"]), max_size=2)
                )
    return plan, day, states, evidence, holds


@given(days())
def test_steps_move_by_at_most_one_except_a_restart(case: Day) -> None:
    """In one day a ramp goes up one step, stays, or restarts at step 1; nothing else."""
    plan, day, states, evidence, holds = case
    after, moves = roll_day(plan, day, states, evidence, holds)
    for key, new in after.items():
        old = states.get(key, RampState()).step
        assert new.step in {old, old + 1} or new.step == 1
    for move in moves:
        if move.action == "advance":
            assert move.to_step == move.from_step + 1
        elif move.action == "restart":
            assert move.to_step == 1 < move.from_step
        else:
            assert move.to_step == move.from_step
    assert len(moves) >= len(after)


@given(days())
def test_never_advances_at_or_below_the_threshold(case: Day) -> None:
    """An advance always had strictly more than the threshold delivered, on a sending day."""
    plan, day, states, evidence, holds = case
    _, moves = roll_day(plan, day, states, evidence, holds)
    for move in moves:
        if move.action != "advance":
            continue
        key = (move.batch, move.provider)
        seen = evidence.get(key, DayCounts())
        gates = plan.schedules[plan.batches[move.batch].schedule].gates
        cap = day_cap(plan, move.batch, move.provider, move.from_step)
        assert seen.granted > 0 and not holds.get(key)
        if cap is not None:
            assert seen.delivered * 100 > gates.delivered_above_percent * cap


@given(days())
def test_roll_day_is_pure(case: Day) -> None:
    """Same inputs give the same outputs, and the inputs are left as they were."""
    plan, day, states, evidence, holds = case
    before = copy.deepcopy((states, evidence, holds))
    dumped = plan.model_dump()
    first = roll_day(plan, day, states, evidence, holds)
    second = roll_day(plan, day, states, evidence, holds)
    assert first == second
    assert (states, evidence, holds) == before and plan.model_dump() == dumped


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_quiet_days_only_delay_the_ramp(sending: list[bool]) -> None:
    """With sending_days_only and gaps under 30 days, the step is 1 + perfect sending days."""
    state = RampState()
    day = EXAMPLE.batches["tx-2026-12"].start_date
    for sends in sending:
        cap = day_cap(EXAMPLE, *TX, state.step) or 1
        seen = DayCounts(cap, cap) if sends else DayCounts()
        states, _ = roll_day(EXAMPLE, day, {TX: state}, {TX: seen})
        state = states[TX]
        day += timedelta(days=1)
    assert state.step == min(1 + sum(sending), 13)
    assert state.days_without_advance == 0


def test_day_evidence_sums_each_batchs_ips_per_provider() -> None:
    """The roll's evidence of a (batch, provider) is the sum of its IPs' day counts; IPs of
    other batches and providers without counts add nothing, and every row exists."""
    batch = EXAMPLE.batches[TX[0]]
    a, b = batch.ips[:2]
    counts = {
        (a, "google"): DayCounts(granted=10, delivered=9, deferred=1),
        (b, "google"): DayCounts(granted=5, delivered=4, bounced=1, complaints=1),
        ("203.0.113.99", "google"): DayCounts(granted=1000),  # in no batch
    }
    evidence = day_evidence(EXAMPLE, counts)
    assert evidence[(TX[0], "google")] == DayCounts(
        granted=15, delivered=13, deferred=1, bounced=1, complaints=1
    )
    assert evidence[(TX[0], "default")] == DayCounts()
    assert set(evidence) == {(name, p) for name in EXAMPLE.batches for p in plan_providers(EXAMPLE)}


def test_ramp_view_is_the_one_operator_view() -> None:
    """Before the start date a ramp is not started with no warm-up day; on day 10 it stands
    at its step with that step's caps; a pause shows over the state; past the last step it
    is done with no batch day cap."""
    batch, provider = TX
    before = ramp_view(EXAMPLE, {}, batch, provider, date(2026, 11, 30))
    assert (before.state, before.warmup_day, before.shown_state) == (
        "not_started",
        None,
        "not_started",
    )
    states = {TX: RampState(step=3, paused=True)}
    v = ramp_view(EXAMPLE, states, batch, provider, EX_DAY)
    assert (v.state, v.shown_state, v.step, v.warmup_day) == ("warming", "paused", 3, 10)
    assert v.caps == caps_at(EXAMPLE, batch, provider, 3)[0]
    assert v.day_cap_total == day_cap(EXAMPLE, batch, provider, 3)
    assert v.steps == len(steps_for(EXAMPLE.schedules[EXAMPLE.batches[batch].schedule], provider))
    done = ramp_view(EXAMPLE, {TX: RampState(step=v.steps + 1)}, batch, provider, EX_DAY)
    assert (done.state, done.day_cap_total) == ("done", None)
