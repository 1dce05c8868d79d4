"""From plans to caps: curves, the nominal plan, compiled limits, calendars, the engine."""

from __future__ import annotations

import csv
import itertools
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from kiln import Engine
from kiln.planfile import load_plan
from kiln.ramp import (
    active_hours_mask,
    apply,
    calendar,
    caps_at,
    compile_limits,
    hours_of_day,
    nominal_plan,
    steps_for,
)
from kiln.records import RampState, StepCaps
from kiln.schedule import Plan

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ROOT / "schedules"
FIXTURES = ROOT / "tests" / "fixtures" / "warmup"


def ms(text: str) -> int:
    """An ISO instant with offset as epoch milliseconds."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.fixture(scope="module")
def example() -> Plan:
    """The shipped example plan."""
    return load_plan(SCHEDULES / "example.yaml")


def test_sendgrid_table_is_verbatim() -> None:
    """sendgrid-like.yaml reproduces SendGrid's published hourly table, day 12 included
    (SendGrid counts from day 0, kiln's warm-up days from 1: its day N is kiln's N + 1)."""
    plan = load_plan(SCHEDULES / "sendgrid-like.yaml")
    with (FIXTURES / "sendgrid_hourly.csv").open() as f:
        published = [(int(r["day"]) + 1, int(r["hourly"])) for r in csv.DictReader(f)]
    rows, _ = nominal_plan(plan, days=43, provider="default")
    warming = [(r.day, r.hourly_cap) for r in rows if r.state == "warming"]
    assert warming == published
    assert dict(warming)[13] == 1000
    assert rows[42].state == "done" and rows[42].hourly_cap is None


def test_sparkpost_stages_are_verbatim() -> None:
    """sparkpost-stages.yaml has the 29 published daily caps, stage 28 read as 7,500,000."""
    plan = load_plan(SCHEDULES / "sparkpost-stages.yaml")
    with (FIXTURES / "sparkpost_stages.csv").open() as f:
        published = [int(r["daily"]) for r in csv.DictReader(f)]
    steps = steps_for(plan.schedules["sparkpost"], "default")
    assert [s.daily_cap for s in steps] == published
    assert steps[27].daily_cap == 7_500_000
    assert plan.schedules["sparkpost"].gates.delivered_above_percent == 90


def test_geometric_curve_rounds_and_ends_at_target() -> None:
    """A geometric curve grows by its factor, rounds, never repeats a cap, ends at target."""
    plan = load_plan(SCHEDULES / "per-provider.yaml")
    google = [s.daily_cap or 0 for s in steps_for(plan.schedules["careful"], "google")]
    assert google[:5] == [200, 300, 450, 700, 1000]
    assert google[-1] == 250_000
    assert all(b > a for a, b in itertools.pairwise(google))
    assert all(c % 50 == 0 for c in google)
    yahoo = [s.daily_cap for s in steps_for(plan.schedules["careful"], "yahoo")]
    assert yahoo[:3] == [500, 3000, 5500] and yahoo[-1] == 100_000


def test_scale_override() -> None:
    """A provider scale multiplies every cap of the base curve."""
    plan = load_plan(SCHEDULES / "per-provider.yaml")
    base = steps_for(plan.schedules["careful"], "default")
    half = steps_for(plan.schedules["careful"], "microsoft-365")
    assert [h.daily_cap for h in half] == [
        round(b.daily_cap / 2) for b in base if b.daily_cap is not None
    ]


def test_hourly_cap_spreads_daily_cap_over_active_hours(example: Plan) -> None:
    """Without an hourly cap, the daily cap is spread over the active hours (07-22: 15 h)."""
    caps, state = caps_at(example, "tx-2026-12", "default", 4)
    assert (caps, state) == (StepCaps(1000, 67), "warming")
    caps, state = caps_at(example, "tx-2026-12", "google", 4)
    assert (caps.daily_cap, caps.hourly_cap) == (500, 34)
    assert caps_at(example, "tx-2026-12", "default", 13) == (StepCaps(), "done")


def test_share_curve_turns_into_daily_caps_per_ip() -> None:
    """A share of a 2M/day stream over 4 IPs: 5% is 25,000 per IP a day, for 6 days."""
    plan = load_plan(SCHEDULES / "dual-mta-cutover.yaml")
    rows, pools = nominal_plan(plan)
    shares = [r.share_percent for r in rows if r.state == "warming"]
    assert shares == [p for p in (5.0, 15.0, 25.0, 50.0, 75.0, 90.0, 100.0) for _ in range(6)]
    assert rows[0].daily_cap == 25_000 and rows[-2].daily_cap == 500_000
    assert pools[0].new_ip_daily_capacity == 100_000


def test_marketplace_batches_start_weeks_apart() -> None:
    """Three batches: the later ones are not started while the first ramps; warm-up days count
    from 1 on each batch's start date."""
    plan = load_plan(SCHEDULES / "marketplace-3x7.yaml")
    rows, pools = nominal_plan(plan, days=30, provider="default")
    day0 = {r.batch: r.state for r in rows if r.date == "2027-02-01"}
    assert day0 == {"a": "warming", "b": "not_started", "c": "not_started"}
    day20 = {r.batch: r.day for r in rows if r.date == "2027-02-21"}
    assert day20 == {"a": 21, "b": 7, "c": -7}
    capacity = {(p.date, p.pool): p.new_ip_daily_capacity for p in pools if p.provider == "default"}
    assert capacity[("2027-02-01", "transactional")] == 7 * 500
    assert ("2027-02-01", "messaging") not in capacity


def test_compile_limits_carry_active_hours(example: Plan) -> None:
    """A warming key carries its schedule's active hours (07-22) and the same caps at any
    hour; the engine, not the hourly push, closes it at night."""
    positions = {("tx-2026-12", "default"): RampState(step=4)}
    day = compile_limits(example, positions, ms("2026-12-04T12:00:00+01:00"))
    night = compile_limits(example, positions, ms("2026-12-04T23:30:00+01:00"))
    assert day == night
    by_key = {(lim.ip, lim.provider): lim for lim in day}
    lim = by_key[("192.0.2.10", "default")]
    assert (lim.daily_cap, lim.hourly_cap) == (1000, 67)
    assert lim.rate is not None and str(lim.rate) == "67/h,max_burst=5"
    assert lim.active_hours == sum(1 << h for h in range(7, 22))
    assert by_key[("192.0.2.10", "google")].daily_cap == 75  # google still at step 1


def test_active_hours_mask_and_hours_of_day() -> None:
    """A window is a mask of local hours (the whole day: None); hours of day follow local
    wall time through DST: Berlin's 2026-03-29 has no 02:00, its 2026-10-25 two."""
    assert active_hours_mask((7, 22)) == 0b0000_0011_1111_1111_1111_1000_0000
    assert active_hours_mask((0, 24)) is None
    assert active_hours_mask((0, 1)) == 1
    berlin = ZoneInfo("Europe/Berlin")
    spring, _ = calendar(berlin, ms("2026-03-29T00:30:00+01:00"), hours=4)
    assert hours_of_day(berlin, spring) == [0, 1, 3, 4, 5]
    autumn, _ = calendar(berlin, ms("2026-10-25T00:30:00+02:00"), hours=4)
    assert hours_of_day(berlin, autumn) == [0, 1, 2, 2, 3]


def set_local_calendar(engine: Engine, plan: Plan, now_ms: int) -> None:
    """What the daemon pushes each hour: hour and day starts with their hours of day."""
    hours, days = calendar(plan.zone, now_ms)
    engine.set_calendar(hours, days, hours_of_day(plan.zone, hours))


@pytest.mark.parametrize(
    ("now", "opens"),
    [
        ("2026-12-04T23:30:00+01:00", "2026-12-05T07:00:00+01:00"),
        ("2026-12-05T03:00:00+01:00", "2026-12-05T07:00:00+01:00"),
        ("2026-12-05T06:59:59.999+01:00", "2026-12-05T07:00:00+01:00"),
        ("2026-12-05T22:00:00+01:00", "2026-12-06T07:00:00+01:00"),
        # The nights DST starts and ends: the opening is 07:00 local all the same.
        ("2026-03-29T01:30:00+01:00", "2026-03-29T07:00:00+02:00"),
        ("2026-10-25T02:30:00+01:00", "2026-10-25T07:00:00+01:00"),
    ],
)
def test_a_warming_ip_rests_outside_active_hours_until_the_true_opening(
    example: Plan, now: str, opens: str
) -> None:
    """Outside active hours a warming IP is denied `outside_active_hours` with the time to
    the next 07:00 in the plan's zone (DST-correct), is granted exactly then, and `pick`
    overflows to the warm IPs meanwhile; a done ramp sends at any hour."""
    engine = Engine()
    t = ms(now)
    apply(engine, example, compile_limits(example, {}, t))
    set_local_calendar(engine, example, t)
    key = engine.key("192.0.2.10", "google")
    d = engine.acquire(key, 1, t)
    assert (d.granted, d.reason, d.retry_after_ms) == (0, "outside_active_hours", ms(opens) - t)
    pick = engine.pick(engine.pool("transactional"), engine.provider("google"), 1, t)
    assert (pick.granted, pick.tier) == (1, "warm")
    assert not engine.acquire(key, 1, ms(opens) - 1)
    assert engine.acquire(key, 1, ms(opens))
    done = {("tx-2026-12", "google"): RampState(step=99)}
    apply(engine, example, compile_limits(example, done, t))
    assert engine.acquire(key, 1, ms(opens) + 1)
    assert engine.usage(key)["active_hours"] is None


def test_apply_pushes_limits_and_pools_into_the_engine(example: Plan) -> None:
    """Compiled limits and pools drive real engine decisions: warming first, then warm IPs."""
    engine = Engine()
    now = ms("2026-12-01T09:00:00+01:00")
    apply(engine, example, compile_limits(example, {}, now))
    set_local_calendar(engine, example, now)
    pool = engine.pool("transactional")
    google = engine.provider("google")
    tiers = [engine.pick(pool, google, 1, now + i * 60_000).tier for i in range(12)]
    # Google at step 1: 75/day, 5/hour per warming IP, 2 warming IPs -> 10 this hour.
    assert tiers.count("warming") == 10
    assert tiers[10:] == ["warm", "warm"]


@pytest.mark.parametrize(
    ("zone", "now", "hour_count", "first_day", "second_day"),
    [
        # Berlin, the night DST ends: 25 local hours that day.
        (
            "Europe/Berlin",
            "2026-10-25T00:30:00+02:00",
            25,
            "2026-10-25T00:00:00+02:00",
            "2026-10-26T00:00:00+01:00",
        ),
        # Berlin, the night DST starts: 23 local hours.
        (
            "Europe/Berlin",
            "2026-03-29T00:30:00+01:00",
            23,
            "2026-03-29T00:00:00+01:00",
            "2026-03-30T00:00:00+02:00",
        ),
        # India: half-hour offset, hours begin at :30 UTC.
        (
            "Asia/Kolkata",
            "2026-06-01T00:10:00+05:30",
            24,
            "2026-06-01T00:00:00+05:30",
            "2026-06-02T00:00:00+05:30",
        ),
    ],
)
def test_calendar_is_dst_correct(
    zone: str, now: str, hour_count: int, first_day: str, second_day: str
) -> None:
    """Hour and day starts follow local wall time through DST changes and odd offsets."""
    hours, days = calendar(ZoneInfo(zone), ms(now), hours=30)
    assert days[:2] == [ms(first_day), ms(second_day)]
    in_first_day = [h for h in hours if ms(first_day) <= h < ms(second_day)]
    assert len(in_first_day) == hour_count
    assert all(b > a for a, b in itertools.pairwise(hours))
    local = [datetime.fromtimestamp(h / 1000, tz=UTC).astimezone(ZoneInfo(zone)) for h in hours]
    assert all(t.minute == 0 for t in local)


def test_steady_state_after_the_last_step() -> None:
    """Past its last step a ramp is done: per-provider.yaml keeps a steady-state rate."""
    plan = load_plan(SCHEDULES / "per-provider.yaml")
    positions = {("wave-1", "default"): RampState(step=10_000)}
    limits = compile_limits(plan, positions, ms("2027-03-01T12:00:00+00:00"))
    done = next(lim for lim in limits if lim.provider == "default")
    assert (done.daily_cap, done.hourly_cap, done.warming) == (None, None, False)
    assert done.rate is not None and str(done.rate) == "20_000/h,max_burst=50"
    warming = next(lim for lim in limits if lim.provider == "google")
    assert warming.warming and warming.daily_cap == 200


def test_plan_providers_extend_and_override_the_shipped_table(tmp_path: Path) -> None:
    """A plan adds providers and replaces shipped ones; suffixes are normalised."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\ntimezone: UTC\npools: {a: {ips: [192.0.2.1]}}\n"
        "providers:\n"
        "  google: {domains: [Gmail.com.], mx_suffixes: [google.com.]}\n"
        "  example-isp: {mx_suffixes: [.MX.Example-ISP.test]}\n"
    )
    table = load_plan(path).provider_table()
    assert table["google"].domains == ["gmail.com"]
    assert table["google"].mx_suffixes == [".google.com"]
    assert table["example-isp"].mx_suffixes == [".mx.example-isp.test"]
    assert table["yahoo"].mx_suffixes == [".yahoodns.net"]


def test_a_reload_that_drops_ips_answers_them_like_a_fresh_daemon(tmp_path: Path) -> None:
    """After apply() of a plan without a batch IP and a warm pool IP, the native protocol
    refuses both exactly as an engine that only ever had the new plan, Python-side decisions
    never grant them, and a plan listing them again brings them back with its limits."""
    text = (SCHEDULES / "example.yaml").read_text()
    old_text = text.replace("start_date: 2026-12-01", "start_date: 2026-11-01")
    new_text = old_text.replace("ips: [192.0.2.10, 192.0.2.11]", "ips: [192.0.2.10]")
    new_text = new_text.replace("ips: [198.51.100.20]", "ips: [198.51.100.21]")
    assert new_text.count("192.0.2.11") == 0 and new_text.count("198.51.100.20") == 0
    (tmp_path / "old.yaml").write_text(old_text)
    (tmp_path / "new.yaml").write_text(new_text)
    old, new = load_plan(tmp_path / "old.yaml"), load_plan(tmp_path / "new.yaml")
    now = ms("2026-12-01T09:00:00+01:00")
    reloaded, fresh = Engine(), Engine()
    apply(reloaded, old, compile_limits(old, {}, now))
    set_local_calendar(reloaded, old, now)
    requests = b"".join(
        b'{"op":"%s","ip":"%s","provider":"google","id":%d%s}\n' % (op, ip.encode(), i, extra)
        for i, ip in enumerate(["192.0.2.11", "198.51.100.20", "192.0.2.10", "203.0.113.5"])
        for op, extra in [(b"acquire", b""), (b"report", b',"result":"deferred"')]
    )
    before = reloaded.serve(requests, now).reply
    assert before.count(b'"granted":1') == 3  # both old IPs sent; 203.0.113.5 is unknown
    apply(reloaded, new, compile_limits(new, {}, now))
    apply(fresh, new, compile_limits(new, {}, now))
    for e in (reloaded, fresh):
        set_local_calendar(e, new, now)
    after = reloaded.serve(requests, now).reply
    assert after == fresh.serve(requests, now).reply
    assert after.count(b"is not a sending IP of this daemon's plan") == 6
    for ip in ("192.0.2.11", "198.51.100.20"):
        d = reloaded.acquire(reloaded.key(ip, "google"), 1, now)
        assert (d.granted, d.reason) == (0, "retired")
    pool = reloaded.pool("transactional")
    google = reloaded.provider("google")
    assert all(reloaded.pick(pool, google, 1, now).ip != "192.0.2.11" for _ in range(20))
    # The old plan again: 192.0.2.11 is back, warming, with the plan's limits.
    apply(reloaded, old, compile_limits(old, {}, now))
    back = reloaded.key("192.0.2.11", "google")
    assert reloaded.usage(back)["daily_cap"] == 75 and not reloaded.usage(back)["retired"]
    assert reloaded.acquire(back, 1, now)
