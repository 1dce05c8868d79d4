"""Policy and automations, without a daemon: evidence in, automations and verdicts out."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.automation import AutomationBook
from kiln.planfile import load_plan
from kiln.policy import Policy, RuleInfo
from kiln.policyspec import RealtimeAction
from kiln.rampday import RampMove
from kiln.records import DayCounts, DayPushback, Pushback, SignalBook
from kiln.schedule import Plan

PLAN = """\
name: policy-test
timezone: Europe/Berlin
pools:
  tx:
    ips: [198.51.100.10]
batches:
  b1:
    pool: tx
    ips: [192.0.2.10, 192.0.2.11]
    schedule: s
    start_date: 2026-11-01
  b2:
    pool: tx
    ips: [203.0.113.5]
    schedule: s
    start_date: 2026-11-01
providers:
  google: {}
  microsoft-consumer: {}
schedules:
  s:
    steps:
      - {daily_cap: 1000}
      - {daily_cap: 2000}
      - {daily_cap: 4000}
signals:
  snds: {key_file: snds.key}
  dnsbl: {zones: [zen.spamhaus.org]}
  postmaster: {credentials: google.json, domains: [mail.example.com]}
policy:
  day: {min_volume: 100}
"""
HOUR = 3_600_000


def ms(text: str) -> int:
    """Epoch ms of an ISO time in UTC."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(PLAN)
    return load_plan(path)


def reply(
    at_ms: int,
    cls: str = "rate_limit_rep",
    scope: str = "ip",
    rule: str = "r1",
    ip: str = "192.0.2.10",
    provider: str = "google",
    text: str = "",
) -> Pushback:
    return Pushback(at_ms, ip, provider, cls, scope, rule, text)


T0 = ms("2026-11-10T09:00:00")


# ----- real time -----


def test_threshold_counts_matches_within_its_own_period(plan: Plan) -> None:
    """2 per hour: one reply does nothing; a second within the hour suspends; one 61 min
    later does not (pitfall 7: the window is the period, not the action's duration)."""
    p = Policy(plan, {"r1": RuleInfo(2, HOUR)})
    book = AutomationBook()
    p.on_pushback(reply(T0), book)
    assert not [a for a in book if a.kind == "suspend"]
    p.on_pushback(reply(T0 + 61 * 60_000), book)
    assert not [a for a in book if a.kind == "suspend"]
    p.on_pushback(reply(T0 + 90 * 60_000), book)
    (s,) = [a for a in book if a.kind == "suspend"]
    assert s.ip == "192.0.2.10" and s.provider == "google"
    assert s.expires_ms == T0 + 90 * 60_000 + HOUR  # shipped rate_limit_rep default: 1h


def test_a_new_match_re_arms_the_live_action(plan: Plan) -> None:
    p = Policy(plan, {"r1": RuleInfo(1, HOUR)})
    book = AutomationBook()
    p.on_pushback(reply(T0), book)
    p.on_pushback(reply(T0 + 20 * 60_000), book)
    (s,) = [a for a in book if a.kind == "suspend"]
    assert s.matches == 2 and s.expires_ms == T0 + 20 * 60_000 + HOUR
    effects = book.effects(T0 + 21 * 60_000, p.batch_ips(), ["google"])
    assert effects[("192.0.2.10", "google")].suspended_until_ms == s.expires_ms
    assert [a.id for a in book.expire(s.expires_ms)] == [s.id]
    assert [a.kind for a in book.live(s.expires_ms)] == ["hold"]


def test_rule_action_overrides_the_class_default_and_none_does_nothing(plan: Plan) -> None:
    slow = RealtimeAction.model_validate({"slow": 0.25, "for": "30m"})
    p = Policy(plan, {"slow": RuleInfo(action=slow), "quiet": RuleInfo(action="none")})
    book = AutomationBook()
    p.on_pushback(reply(T0, cls="busy", rule="slow"), book)
    p.on_pushback(reply(T0, cls="block_rep", rule="quiet", ip="192.0.2.11"), book)
    (a,) = [a for a in book if a.kind in ("slow", "suspend")]
    assert a.kind == "slow" and a.factor == 0.25 and a.expires_ms == T0 + 30 * 60_000
    effects = book.effects(T0 + 1, p.batch_ips(), ["google"])
    assert effects[("192.0.2.10", "google")].multiplier == 0.25
    assert ("192.0.2.11", "google") not in effects


def test_scopes_name_the_right_ips(plan: Plan) -> None:
    p = Policy(plan)
    net = reply(T0, scope="netblock", text="from your IP Netblock 192.0.2.0/24. To protect")
    assert p.implicated(net) == ["192.0.2.10", "192.0.2.11"]
    assert p.implicated(reply(T0, scope="netblock", ip="203.0.113.5")) == ["203.0.113.5"]
    assert p.implicated(reply(T0, scope="domain")) == [
        "192.0.2.10",
        "192.0.2.11",
        "203.0.113.5",
        "198.51.100.10",
    ]
    for scope in ("recipient", "message", "url"):
        assert p.implicated(reply(T0, scope=scope)) == []


def test_recipient_scoped_replies_change_nothing(plan: Plan) -> None:
    p = Policy(plan)
    book = AutomationBook()
    p.on_pushback(reply(T0, cls="rcpt_rate", scope="recipient"), book)
    p.on_pushback(reply(T0, cls="hard_bounce", scope="recipient"), book)
    assert list(book) == []


def test_rate_limit_reply_holds_that_days_roll_and_cancel_lifts_it(plan: Plan) -> None:
    p = Policy(plan, {"r1": RuleInfo(1, HOUR)})
    book = AutomationBook()
    p.on_pushback(reply(T0), book)
    (hold,) = [a for a in book if a.kind == "hold"]
    day = date(2026, 11, 10)
    assert hold.batch == "b1" and hold.expires_ms == plan.day_bounds_ms(day)[1]
    roll_ms = plan.day_bounds_ms(day)[1] + 1000
    ok = SignalBook()
    for s in ("snds", "dnsbl", "postmaster"):
        ok.good(s, roll_ms)
    v = p.day_verdicts(day, {}, {}, ok, book, roll_ms)
    assert hold.id in v[("b1", "google")].automations
    assert ("b1", "microsoft-consumer") not in v and ("b2", "google") not in v
    book.end(hold.id, T0 + 1, "ops", "cancelled")
    assert ("b1", "google") not in p.day_verdicts(day, {}, {}, ok, book, roll_ms)


# ----- the day roll -----


def _fresh(now_ms: int) -> SignalBook:
    s = SignalBook()
    for name in ("snds", "dnsbl", "postmaster"):
        s.good(name, now_ms)
    return s


@pytest.mark.parametrize(
    ("delivered", "bounced", "complaints", "expect"),
    [
        (1000, 0, 0, None),
        (1000, 19, 0, None),  # 1.9%
        (1000, 21, 0, "hold"),  # 2.06%
        (1000, 60, 0, "step_down"),
        (1000, 120, 0, "pause"),
        (1000, 0, 1, "hold"),  # 0.1%
        (1000, 0, 3, "step_down"),
        (1000, 0, 5, "pause"),
        (50, 40, 0, "hold"),  # under min_volume: can only hold
    ],
)
def test_bounce_and_complaint_rates(
    plan: Plan, delivered: int, bounced: int, complaints: int, expect: str | None
) -> None:
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    ev = {("b1", "google"): DayCounts(delivered + bounced, delivered, 0, bounced, complaints)}
    v = (
        Policy(plan)
        .day_verdicts(day, ev, {}, _fresh(now), AutomationBook(), now)
        .get(("b1", "google"))
    )
    got = None if v is None else ("pause" if v.pause else "step_down" if v.step_down else "hold")
    assert got == expect


def test_rate_limit_in_two_hours_steps_down_and_blocks_step_down(plan: Plan) -> None:
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    one = DayPushback()
    one.add("rate_limit_rep", 9)
    v = Policy(plan).day_verdicts(
        day, {}, {("192.0.2.10", "google"): one}, _fresh(now), AutomationBook(), now
    )
    assert v[("b1", "google")].hold and not v[("b1", "google")].step_down
    one.add("rate_limit_rep", 14)
    other = DayPushback()
    other.add("block_rep", 3)
    v = Policy(plan).day_verdicts(
        day,
        {},
        {("192.0.2.11", "google"): one, ("203.0.113.5", "google"): other},
        _fresh(now),
        AutomationBook(),
        now,
    )
    assert "2 distinct hours" in v[("b1", "google")].step_down[0]
    assert v[("b2", "google")].step_down


def test_postmaster_spam_rate_steps_down_once_per_reading(plan: Plan) -> None:
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    signals = _fresh(now)
    SignalBook.put(signals.spam_rate, "mail.example.com", date(2026, 11, 9), 0.0035)
    p = Policy(plan)
    book = AutomationBook()
    v = p.day_verdicts(day, {}, {}, signals, book, now)
    assert v[("b1", "google")].step_down and v[("b2", "google")].step_down
    assert ("b1", "microsoft-consumer") not in v
    # The roll recorded it; the same reading the next day only holds.

    move = RampMove("b1", "google", "step_down", 2, 1, "stepped down", {})
    p.record_moves(v, [move], book, now)
    later = p.day_verdicts(date(2026, 11, 11), {}, {}, signals, book, now + 86_400_000)
    assert not later[("b1", "google")].step_down and later[("b1", "google")].hold
    assert later[("b2", "google")].step_down  # b2 did not record a move


def test_postmaster_good_spam_rate_lets_the_gates_decide(plan: Plan) -> None:
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    signals = _fresh(now)
    SignalBook.put(signals.spam_rate, "mail.example.com", date(2026, 11, 9), 0.0008)
    assert Policy(plan).day_verdicts(day, {}, {}, signals, AutomationBook(), now) == {}


def test_stale_and_never_read_sources_hold_the_ramps_they_cover(plan: Plan) -> None:
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    signals = _fresh(now)
    signals.health["postmaster"].last_good_ms = now - 86_400_000 - 1
    v = Policy(plan).day_verdicts(day, {}, {}, signals, AutomationBook(), now)
    assert set(v) == {("b1", "google"), ("b2", "google")}
    assert "postmaster is stale" in v[("b1", "google")].hold[0]
    del signals.health["snds"]
    v = Policy(plan).day_verdicts(day, {}, {}, signals, AutomationBook(), now)
    assert ("b1", "microsoft-consumer") in v
    assert "never" in v[("b1", "microsoft-consumer")].hold[0]


# ----- signals -----


def test_snds_red_pauses_and_green_days_resume(plan: Plan) -> None:
    p = Policy(plan)
    book = AutomationBook()
    s = SignalBook()
    SignalBook.put(s.snds, "192.0.2.11", date(2026, 11, 9), "RED")
    (a,) = p.on_signals(s, book, T0)
    assert a.kind == "pause" and a.ip == "192.0.2.11" and a.provider == "microsoft-consumer"
    effects = book.effects(T0, p.batch_ips(), ["google", "microsoft-consumer"])
    assert effects == {
        ("192.0.2.11", "microsoft-consumer"): effects[("192.0.2.11", "microsoft-consumer")]
    }
    assert effects[("192.0.2.11", "microsoft-consumer")].paused
    # Two GREEN days, a gap, then three in a row: resumes only after the run of three.
    for d, c in [(10, "GREEN"), (11, "GREEN"), (13, "GREEN"), (14, "GREEN")]:
        SignalBook.put(s.snds, "192.0.2.11", date(2026, 11, d), c)
        assert p.on_signals(s, book, T0) == []
    SignalBook.put(s.snds, "192.0.2.11", date(2026, 11, 15), "GREEN")
    (ended,) = p.on_signals(s, book, T0 + 1)
    assert ended.id == a.id and ended.state == "ended"
    assert book.effects(T0 + 2, p.batch_ips(), ["microsoft-consumer"]) == {}


def test_snds_blocked_pauses_until_unblocked(plan: Plan) -> None:
    p = Policy(plan)
    book = AutomationBook()
    s = SignalBook(snds_blocked={"203.0.113.5": "Blocked due to user complaints"})
    (a,) = p.on_signals(s, book, T0)
    assert a.rule == "snds.blocked"
    assert p.on_signals(s, book, T0 + 1) == []
    s.snds_blocked = {}
    (ended,) = p.on_signals(s, book, T0 + 2)
    assert ended.state == "ended"


def test_dnsbl_listing_pauses_every_provider_and_unknown_keeps_it(plan: Plan) -> None:
    p = Policy(plan)
    book = AutomationBook()
    s = SignalBook(dnsbl={"192.0.2.10": {"zen.spamhaus.org": "listed 127.0.0.2 (SBL)"}})
    (a,) = p.on_signals(s, book, T0)
    assert a.provider is None
    effects = book.effects(T0, p.batch_ips(), ["google", "microsoft-consumer"])
    assert {k for k, e in effects.items() if e.paused} == {
        ("192.0.2.10", "google"),
        ("192.0.2.10", "microsoft-consumer"),
    }
    s.dnsbl["192.0.2.10"] = {"zen.spamhaus.org": "unknown"}
    assert p.on_signals(s, book, T0 + 1) == []
    assert book.live(T0 + 1)
    s.dnsbl["192.0.2.10"] = {"zen.spamhaus.org": "clean"}
    (ended,) = p.on_signals(s, book, T0 + 2)
    assert ended.state == "ended"


def test_signal_book_round_trips_through_json(plan: Plan) -> None:
    s = SignalBook()
    SignalBook.put(s.snds, "192.0.2.10", date(2026, 11, 9), "YELLOW")
    s.failed("postmaster", T0, "unavailable: 500")
    again = SignalBook.from_json(s.to_json())
    assert again.to_json() == s.to_json()
    assert again.health["postmaster"].failures == 1


# ----- invariants -----


@given(
    st.lists(
        st.tuples(st.integers(0, 10 * HOUR), st.integers(1, 4 * HOUR)), min_size=1, max_size=30
    )
)
def test_re_arming_never_shortens_an_action(arms: list[tuple[int, int]]) -> None:
    """However matches arrive, a live action ends at the latest (match + duration) seen."""
    book = AutomationBook()
    arms = sorted(arms)
    latest = 0
    for at, duration in arms:
        a, _ = book.arm(
            at,
            "k",
            at + duration,
            kind="suspend",
            rule="r",
            reason="",
            evidence={},
            provider="google",
            ip="192.0.2.10",
            batch=None,
            ends_when="",
        )
        latest = max(latest, at + duration) if a.matches > 1 else at + duration
        assert a.expires_ms == latest
        assert a.expires_ms >= at + duration


@given(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=8))
def test_effects_take_the_smallest_slow_factor(factors: list[float]) -> None:
    book = AutomationBook()
    for i, f in enumerate(factors):
        book.add(
            0,
            kind="slow",
            rule=f"r{i}",
            reason="",
            evidence={},
            provider="google",
            ip="192.0.2.10",
            batch=None,
            expires_ms=HOUR,
            ends_when="",
            factor=f,
        )
    e = book.effects(1, {}, ["google"])[("192.0.2.10", "google")]
    assert e.multiplier == min(factors) and len(e.because) == len(factors)
    assert book.effects(HOUR, {}, ["google"]) == {}


def test_automations_survive_a_json_round_trip(tmp_path: Path, plan: Plan) -> None:
    from kiln.automation import Automation
    from kiln.store import Store

    p = Policy(plan, {"r1": RuleInfo(1, HOUR)})
    book = AutomationBook()
    p.on_pushback(reply(T0), book)
    with Store.sqlite(tmp_path / "k.db") as store:
        store.save_automations(plan.name, [a.to_json() for a in book], T0)
        again = AutomationBook()
        again.load(Automation.from_json(a) for a in store.load_automations(plan.name))
    assert [a.to_json() for a in again] == [a.to_json() for a in book]
    assert again.next_id == book.next_id


def test_a_netblock_reply_suspends_each_ip_and_re_arms_them_all(plan: Plan) -> None:
    """Threshold 2: the second netblock reply suspends both IPs of the /24; a third, after the
    window, is below the threshold again but still re-arms both live suspensions."""
    p = Policy(plan, {"r1": RuleInfo(2, 10 * 60_000)})
    book = AutomationBook()
    text = "from your IP Netblock 192.0.2.0/24. To protect"
    p.on_pushback(reply(T0, scope="netblock", text=text), book)
    p.on_pushback(reply(T0 + 60_000, scope="netblock", text=text), book)
    first = sorted((a.ip, a.expires_ms) for a in book if a.kind == "suspend")
    assert first == [("192.0.2.10", T0 + 60_000 + HOUR), ("192.0.2.11", T0 + 60_000 + HOUR)]
    p.on_pushback(reply(T0 + 30 * 60_000, scope="netblock", text=text), book)
    again = sorted((a.ip, a.expires_ms, a.matches) for a in book if a.kind == "suspend")
    assert again == [
        ("192.0.2.10", T0 + 30 * 60_000 + HOUR, 2),
        ("192.0.2.11", T0 + 30 * 60_000 + HOUR, 2),
    ]


# ----- explain -----


def test_explain_speaks_plainly_in_the_plans_time_zone(plan: Plan) -> None:
    """`explain` (the guard's answer): a missing cap reads "no hourly cap", not "no an hour";
    times are in the plan's zone with their offset (Europe/Berlin, +01:00 in November); the
    warm-up day counts from 1 on the start date; automations list local times too."""
    from kiln import _core
    from kiln.guard import Guard

    engine = _core.Engine()
    guard = Guard(plan, {"r1": RuleInfo(1, HOUR)})
    guard.policy.on_pushback(reply(T0), guard.book)
    engine.suspend(engine.key("192.0.2.10", "google"), T0 + HOUR)
    out = guard.explain(engine, {}, "192.0.2.10", "google", T0, date(2026, 11, 10), [])
    assert out["ok"] and out["step"] == 1 and out["warmup_day"] == 10
    assert out["suspended_until"] == "2026-11-10T11:00:00+01:00"
    assert out["why"][0] == (
        "batch 'b1' is at step 1 of 3 for google on warm-up day 10 (schedule 's'): "
        "per IP 1,000 a day and no hourly cap"
    )
    assert any("until 2026-11-10T11:00:00+01:00" in w for w in out["why"])
    assert not any(" no a" in w or "+00:00" in w for w in out["why"])
    (listed,) = [a for a in guard.listing(T0) if a["kind"] == "suspend"]
    assert (listed["start"], listed["expires"]) == (
        "2026-11-10T10:00:00+01:00",
        "2026-11-10T11:00:00+01:00",
    )
    warm = guard.explain(engine, {}, "198.51.100.10", "google", T0, date(2026, 11, 10), [])
    assert warm["why"][0] == "198.51.100.10 is a warm IP of pool 'tx': no warm-up caps"


def test_explain_of_an_ip_outside_the_plan_is_an_error(plan: Plan) -> None:
    """An IP in no pool or batch gets the error `acquire` gives, not an explanation; IPv6
    text is normalised before it is looked up."""
    from kiln import _core
    from kiln.guard import Guard

    engine = _core.Engine()
    guard = Guard(plan)
    day = date(2026, 11, 10)
    assert guard.explain(engine, {}, "192.0.2.99", "google", T0, day, []) == {
        "ok": False,
        "error": "ip: 192.0.2.99 is not a sending IP of this daemon's plan",
    }
    assert guard.explain(engine, {}, "2001:DB8::1", "google", T0, day, [])["error"] == (
        "ip: 2001:db8::1 is not a sending IP of this daemon's plan"
    )
    assert guard.explain(engine, {}, "203.0.113.5", "google", T0, day, [])["batch"] == "b2"


def test_reasons_count_in_words(plan: Plan) -> None:
    """Verdict reasons agree in number: "1 rate_limit_rep reply", "1 block_rep reply",
    "3 block_rep replies", never "1 ... replies"."""
    day = date(2026, 11, 10)
    now = plan.day_bounds_ms(day)[1]
    one = DayPushback()
    one.add("rate_limit_rep", 9)
    blocked = DayPushback()
    blocked.add("block_rep", 3)
    v = Policy(plan).day_verdicts(
        day,
        {},
        {("192.0.2.10", "google"): one, ("203.0.113.5", "google"): blocked},
        _fresh(now),
        AutomationBook(),
        now,
    )
    assert "day.rate_limit_rep: 1 rate_limit_rep reply" in v[("b1", "google")].hold
    assert v[("b2", "google")].step_down == ["day.block_rep: 1 block_rep reply"]
    blocked.add("block_rep", 4, 2)
    v = Policy(plan).day_verdicts(
        day, {}, {("203.0.113.5", "google"): blocked}, _fresh(now), AutomationBook(), now
    )
    assert v[("b2", "google")].step_down == ["day.block_rep: 3 block_rep replies"]
