"""Plan files: every mistake caught, located by file, line, column and key, with one message."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import ScheduleError
from kiln.planfile import load_plan
from kiln.yamlfile import MAX_FILE_BYTES

GOOD = """\
name: test
timezone: Europe/Berlin
pools:
  tx:
    ips: [198.51.100.1, {ip: 198.51.100.2, weight: 2}]
    overflow: spare
  spare:
    ips: [203.0.113.1]
batches:
  b1:
    pool: tx
    ips: [192.0.2.1, 192.0.2.2]
    schedule: slow
    start_date: 2026-12-01
schedules:
  slow:
    steps:
      - {warmup_day: 1, daily_cap: 100}
      - {warmup_day: 2, daily_cap: 200}
    providers:
      google: {scale: 0.5}
    hourly: {active_hours: 08-20, max_burst: 5}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    """The errors `kiln check` reports for `text`, as printed (file name: plan.yaml)."""
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError) as info:
        load_plan(path)
    errors = [p for p in info.value.problems if p.severity == "error"]
    return [str(p).replace(str(tmp_path) + "/", "") for p in errors]


def test_good_plan_loads(tmp_path: Path) -> None:
    """The base plan of these tests is valid and has no warnings."""
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    plan = load_plan(path)
    assert plan.name == "test"
    assert plan.warnings == []
    assert plan.pools["tx"].members()[1].weight == 2
    assert plan.schedules["slow"].hourly.hours == 12


CASES = [
    # (what is wrong, replace this, with this, the exact message)
    (
        "unknown top-level key",
        "timezone: Europe/Berlin\n",
        "timezone: Europe/Berlin\ntimezon: UTC\n",
        "plan.yaml:3:1: timezon: unknown key 'timezon'; did you mean 'timezone'?",
    ),
    (
        "unknown nested key",
        "    overflow: spare\n",
        "    overflw: spare\n",
        "plan.yaml:6:5: pools.tx.overflw: unknown key 'overflw'; did you mean 'overflow'?",
    ),
    (
        "unknown key without a close match",
        "    hourly: {active_hours: 08-20, max_burst: 5}\n",
        "    hourly: {active_hours: 08-20, colour: red}\n",
        "plan.yaml:22:35: schedules.slow.hourly.colour: unknown key 'colour' "
        "(known keys: active_hours, max_burst)",
    ),
    (
        "missing required key",
        "    schedule: slow\n",
        "",
        "plan.yaml:10:3: batches.b1.schedule: required key is missing",
    ),
    (
        "wrong type",
        "{warmup_day: 1, daily_cap: 100}",
        "{warmup_day: 1, daily_cap: lots}",
        "plan.yaml:18:25: schedules.slow.steps[0].daily_cap: "
        "expected a whole number, got text 'lots'",
    ),
    (
        "number as text",
        "{warmup_day: 1, daily_cap: 100}",
        '{warmup_day: 1, daily_cap: "100"}',
        "plan.yaml:18:25: schedules.slow.steps[0].daily_cap: "
        "expected a whole number, got text '100'",
    ),
    (
        "negative cap",
        "daily_cap: 200}",
        "daily_cap: -200}",
        "plan.yaml:19:25: schedules.slow.steps[1].daily_cap: must be at least 1, got -200",
    ),
    (
        "zero cap",
        "daily_cap: 200}",
        "daily_cap: 0}",
        "plan.yaml:19:25: schedules.slow.steps[1].daily_cap: must be at least 1, got 0",
    ),
    (
        "cap too large for the engine",
        "daily_cap: 200}",
        "daily_cap: 5_000_000_000}",
        "plan.yaml:19:25: schedules.slow.steps[1].daily_cap: "
        "must be at most 4294967294, got 5000000000",
    ),
    (
        "date that does not exist",
        "start_date: 2026-12-01",
        "start_date: 2026-02-30",
        "plan.yaml:14:5: batches.b1.start_date: "
        "cannot read '2026-02-30': day is out of range for month",
    ),
    (
        "date in an impossible format",
        "start_date: 2026-12-01",
        "start_date: 12/01/2026",
        "plan.yaml:14:5: batches.b1.start_date: "
        "expected a date written YYYY-MM-DD, got '12/01/2026'",
    ),
    (
        "time zone that does not exist",
        "timezone: Europe/Berlin",
        "timezone: Europe/Berln",
        "plan.yaml:2:1: timezone: unknown time zone 'Europe/Berln'; did you mean "
        "'Europe/Berlin'? (use an IANA name such as Europe/Berlin)",
    ),
    (
        "duplicate key",
        "    schedule: slow\n",
        "    schedule: slow\n    schedule: fast\n",
        "plan.yaml:14:5: batches.b1.schedule: duplicate key (first given at line 13)",
    ),
    (
        "bad IP address",
        "ips: [192.0.2.1, 192.0.2.2]",
        "ips: [192.0.2.1, 192.0.2.256]",
        "plan.yaml:12:22: batches.b1.ips[1]: expected an IPv4 or IPv6 address, got '192.0.2.256'",
    ),
    (
        "unknown pool",
        "    pool: tx\n",
        "    pool: txx\n",
        "plan.yaml:11:5: batches.b1.pool: unknown pool 'txx'; did you mean 'tx'?",
    ),
    (
        "unknown schedule",
        "    schedule: slow\n",
        "    schedule: slwo\n",
        "plan.yaml:13:5: batches.b1.schedule: unknown schedule 'slwo'; did you mean 'slow'?",
    ),
    (
        "unknown provider in an override",
        "      google: {scale: 0.5}",
        "      gogle: {scale: 0.5}",
        "plan.yaml:21:7: schedules.slow.providers.gogle: unknown provider 'gogle'; "
        "did you mean 'google'?",
    ),
    (
        "share curve as a provider override",
        "      google: {scale: 0.5}",
        "      google: {share: {percents: [10, 50]}}",
        "plan.yaml:21:7: schedules.slow.providers.google: share is a curve for the whole "
        "stream; a provider gives scale, steps, geometric or linear",
    ),
    (
        "IP in two batches of one pool",
        "schedules:\n",
        "  b2:\n    pool: tx\n    ips: [192.0.2.2]\n    schedule: slow\n"
        "    start_date: 2026-12-08\nschedules:\n",
        "plan.yaml:17:11: batches.b2.ips[0]: IP 192.0.2.2 is also in batch 'b1' of the same pool",
    ),
    (
        "overlapping pools",
        "    ips: [203.0.113.1]",
        "    ips: [203.0.113.1, 198.51.100.1]",
        "plan.yaml:8:24: pools.spare.ips[1]: IP 198.51.100.1 is also in pool 'tx'; "
        "pools must not overlap",
    ),
    (
        "overflow pool that does not exist",
        "    overflow: spare\n",
        "    overflow: sparee\n",
        "plan.yaml:6:5: pools.tx.overflow: unknown pool 'sparee'; did you mean 'spare'?",
    ),
    (
        "rate with an unknown unit",
        "    hourly: {active_hours: 08-20, max_burst: 5}\n",
        "    hourly: {active_hours: 08-20, max_burst: 5}\n    max_message_rate: 500/week\n",
        "plan.yaml:23:5: schedules.slow.max_message_rate: unknown period 'week'; "
        "use one of s, sec, second, m, min, minute, h, hour, hr, d, day",
    ),
    (
        "active hours backwards",
        "active_hours: 08-20",
        "active_hours: 20-08",
        "plan.yaml:22:14: schedules.slow.hourly.active_hours: expected hours of the day as "
        "START-END with 0 <= START < END <= 24, such as 08-20, got '20-08'",
    ),
    (
        "two curves at once",
        "    providers:\n",
        "    linear: {start_daily_cap: 1, increment_daily_cap: 1, target_daily_cap: 9}\n"
        "    providers:\n",
        "plan.yaml:16:3: schedules.slow: give exactly one of steps, geometric, linear, share; "
        "got steps, linear",
    ),
    (
        "warm-up days out of order",
        "{warmup_day: 2, daily_cap: 200}",
        "{warmup_day: 3, daily_cap: 200}",
        "plan.yaml:19:10: schedules.slow.steps[1].warmup_day: "
        "expected warmup_day 2 (step 2 of the table; warm-up day 1 is the start date), got 3",
    ),
    (
        "warm-up days counted from 0",
        "{warmup_day: 1, daily_cap: 100}",
        "{warmup_day: 0, daily_cap: 100}",
        "plan.yaml:18:10: schedules.slow.steps[0].warmup_day: "
        "must be at least 1 (warm-up day 1 is the start date), got 0",
    ),
    (
        "provider named by its mail domain",
        "      google: {scale: 0.5}",
        "      gmail: {scale: 0.5}",
        "plan.yaml:21:7: schedules.slow.providers.gmail: unknown provider 'gmail'; "
        "did you mean 'google'?",
    ),
    (
        "step without caps",
        "{warmup_day: 2, daily_cap: 200}",
        "{warmup_day: 2}",
        "plan.yaml:19:9: schedules.slow.steps[1]: a step needs daily_cap, hourly_cap or both",
    ),
    (
        "YAML syntax error",
        "    ips: [203.0.113.1]\n",
        "    ips: [203.0.113.1\n",
        "plan.yaml:9:8: YAML syntax error: expected ',' or ']', but got ':'",
    ),
    (
        "bad name",
        "name: test",
        "name: My Plan",
        "plan.yaml:1:1: name: names use lower-case letters, digits and - _ . "
        "(starting with a letter or digit), got 'My Plan'",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_each_mistake_has_its_exact_message(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    """Each kind of mistake is reported once, located, with the exact message operators see."""
    assert old in GOOD
    assert problems(tmp_path, GOOD.replace(old, new, 1)) == [message]


def test_overflow_loop_is_reported_on_every_pool_in_it(tmp_path: Path) -> None:
    """Two pools overflowing into each other: both overflow keys are reported."""
    text = GOOD.replace("    ips: [203.0.113.1]\n", "    ips: [203.0.113.1]\n    overflow: tx\n")
    assert problems(tmp_path, text) == [
        "plan.yaml:6:5: pools.tx.overflow: overflow from 'tx' leads back to 'tx'",
        "plan.yaml:9:5: pools.spare.overflow: overflow from 'spare' leads back to 'spare'",
    ]


def test_every_error_at_once(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, in file order."""
    text = (
        GOOD.replace("    overflow: spare\n", "    overflw: spare\n")
        .replace("daily_cap: 100}", "daily_cap: -1}")
        .replace("start_date: 2026-12-01", "start_date: 2026-13-01")
    )
    got = problems(tmp_path, text)
    assert [p.split(": ")[1] for p in got] == [
        "pools.tx.overflw",
        "batches.b1.start_date",
        "schedules.slow.steps[0].daily_cap",
    ]


def test_falling_caps_and_unused_schedules_are_warnings(tmp_path: Path) -> None:
    """A cap below the step before, or a schedule no batch uses, warns but loads."""
    text = GOOD.replace("daily_cap: 200}", "daily_cap: 50}") + (
        "  spare-curve:\n    geometric: {start_daily_cap: 10, factor: 2, target_daily_cap: 99}\n"
    )
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    plan = load_plan(path)
    assert [str(w).replace(str(tmp_path) + "/", "") for w in plan.warnings] == [
        "plan.yaml:19:25: warning: schedules.slow.steps[1].daily_cap: "
        "falls below the step before (100), got 50",
        "plan.yaml:23:3: warning: schedules.spare-curve: schedule is not used by any batch",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "plan.yaml:1:1: the file is empty; a plan is a YAML mapping"),
        ("# only a comment\n", "plan.yaml:1:1: the file is empty; a plan is a YAML mapping"),
        ("- a\n- b\n", "plan.yaml:1:1: a plan is a YAML mapping of keys, got a list"),
        ("just text\n", "plan.yaml:1:1: a plan is a YAML mapping of keys, got text"),
    ],
)
def test_empty_and_wrong_shaped_files(tmp_path: Path, text: str, message: str) -> None:
    """Empty files and files that are not a mapping get a clear message, not a traceback."""
    assert problems(tmp_path, text) == [message]


def test_huge_file_is_refused(tmp_path: Path) -> None:
    """A 5 MiB file is refused before parsing, with its size in the message."""
    path = tmp_path / "plan.yaml"
    path.write_text("# padding\n" * (MAX_FILE_BYTES // 10) * 5)
    with pytest.raises(ScheduleError) as info:
        load_plan(path)
    (problem,) = info.value.problems
    assert "files over 1 MiB (1,048,576 bytes) are refused" in str(problem)
    assert str(problem).startswith(f"{path}:1:1: the file is 5.0 MiB")


def test_binary_and_missing_files(tmp_path: Path) -> None:
    """Non-UTF-8 bytes and missing files are ScheduleErrors too."""
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ScheduleError, match="not UTF-8 text"):
        load_plan(path)
    with pytest.raises(ScheduleError, match="cannot read the file: No such file"):
        load_plan(tmp_path / "nope.yaml")


def test_one_bad_value_hides_no_other_mistake(tmp_path: Path) -> None:
    """A bad IP (and a bad cap) no longer stop the checks that span keys: the bad time zone,
    the unknown overflow pool, the IP in two pools, the warmup_day gap and the unknown
    provider are all reported in the same run, in file order."""
    text = (
        GOOD.replace("timezone: Europe/Berlin", "timezone: Europe/Berln")
        .replace("[198.51.100.1, {ip: 198.51.100.2", "[198.51.100.300, {ip: 198.51.100.2")
        .replace("    overflow: spare\n", "    overflow: sparee\n")
        .replace("    ips: [203.0.113.1]", "    ips: [203.0.113.1, 198.51.100.2]")
        .replace("{warmup_day: 2, daily_cap: 200}", "{warmup_day: 3, daily_cap: 200}")
        .replace("{warmup_day: 1, daily_cap: 100}", "{warmup_day: 1, daily_cap: lots}")
        .replace("      google: {scale: 0.5}", "      gmail: {scale: 0.5}")
    )
    assert problems(tmp_path, text) == [
        "plan.yaml:2:1: timezone: unknown time zone 'Europe/Berln'; did you mean "
        "'Europe/Berlin'? (use an IANA name such as Europe/Berlin)",
        "plan.yaml:5:11: pools.tx.ips[0]: expected an IPv4 or IPv6 address, got '198.51.100.300'",
        "plan.yaml:6:5: pools.tx.overflow: unknown pool 'sparee'; did you mean 'spare'?",
        "plan.yaml:8:24: pools.spare.ips[1]: IP 198.51.100.2 is also in pool 'tx'; "
        "pools must not overlap",
        "plan.yaml:18:25: schedules.slow.steps[0].daily_cap: "
        "expected a whole number, got text 'lots'",
        "plan.yaml:19:10: schedules.slow.steps[1].warmup_day: "
        "expected warmup_day 2 (step 2 of the table; warm-up day 1 is the start date), got 3",
        "plan.yaml:21:7: schedules.slow.providers.gmail: unknown provider 'gmail'; "
        "did you mean 'google'?",
    ]


def test_names_of_entries_with_mistakes_still_count(tmp_path: Path) -> None:
    """A pool, schedule or batch with a mistake of its own is still a name others may use:
    the batch naming them gets no "unknown" error, the schedule no "unused" warning, and the
    batch's own IPs and names are still checked although its start date is bad."""
    text = (
        GOOD.replace("    ips: [203.0.113.1]", "    ips: 203.0.113.1")
        .replace("    pool: tx\n", "    pool: spare\n")
        .replace("start_date: 2026-12-01", "start_date: someday")
        .replace("[192.0.2.1, 192.0.2.2]", "[192.0.2.1, 198.51.100.1]")
        .replace("    hourly: {active_hours: 08-20", "    hourly: {active_hours: 20-08")
    )
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError) as info:
        load_plan(path)
    got = [str(p).replace(str(tmp_path) + "/", "") for p in info.value.problems]
    assert got == [
        "plan.yaml:8:5: pools.spare.ips: expected a list, got text '203.0.113.1'",
        "plan.yaml:12:22: batches.b1.ips[1]: IP 198.51.100.1 is also a warm IP of pool 'tx'; "
        "a new IP is in one batch",
        "plan.yaml:14:5: batches.b1.start_date: expected a date written YYYY-MM-DD, got 'someday'",
        "plan.yaml:22:14: schedules.slow.hourly.active_hours: expected hours of the day as "
        "START-END with 0 <= START < END <= 24, such as 08-20, got '20-08'",
    ]


def test_a_missing_warmup_day_among_given_ones_is_named(tmp_path: Path) -> None:
    """A table that gives warmup_day on some rows must give it on all: the first row without
    one is reported (a lost or pasted row), not every row after it."""
    text = GOOD.replace(
        "      - {warmup_day: 2, daily_cap: 200}\n",
        "      - {daily_cap: 200}\n      - {warmup_day: 4, daily_cap: 300}\n",
    )
    assert problems(tmp_path, text) == [
        "plan.yaml:19:9: schedules.slow.steps[1]: warmup_day is missing: expected 2 "
        "(step 2 of the table), as other steps give theirs",
    ]


def test_provider_hints_follow_domains_then_spelling() -> None:
    """Unknown provider names are matched to a provider by its mail domains first (gmail,
    hotmail.com, aol), then by spelling (gogle); nothing close gives no hint."""
    from kiln.provider import DEFAULT_PROVIDER, DEFAULT_PROVIDERS
    from kiln.schedule import provider_hint

    known = {*DEFAULT_PROVIDERS, DEFAULT_PROVIDER}
    assert provider_hint("gmail", known) == "; did you mean 'google'?"
    assert provider_hint("Hotmail.com", known) == "; did you mean 'microsoft-consumer'?"
    assert provider_hint("aol", known) == "; did you mean 'yahoo'?"
    assert provider_hint("gogle", known) == "; did you mean 'google'?"
    assert provider_hint("zzz", known) == ""
    assert provider_hint("gmail", {"default"}) == ""


def test_signal_sections_are_checked_beside_a_bad_one(tmp_path: Path) -> None:
    """A mistake in one signal source does not hide an unknown provider in another."""
    text = GOOD + ("signals:\n  snds: {key_file: k, providers: [hotmail]}\n  dnsbl: {zones: []}\n")
    assert problems(tmp_path, text) == [
        "plan.yaml:24:35: signals.snds.providers[0]: unknown provider 'hotmail'; "
        "did you mean 'microsoft-consumer'?",
        "plan.yaml:25:11: signals.dnsbl.zones: must not be empty (at least 1 item)",
    ]


def test_suppression_rules_are_checked_where_they_are_written(tmp_path: Path) -> None:
    """The `suppression` section: shipped default when left out; each mistake of a rule
    named by file, line and key."""
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    (rule,) = load_plan(path).suppression.soft_bounces
    assert (rule.failures, rule.within, rule.hold) == (3, 3 * 86_400_000, 7 * 86_400_000)
    text = GOOD + (
        "suppression:\n"
        "  soft_bounces:\n"
        "    - {statuses: ['4.2.'], failures: 2, within: 1d, hold: 2d}\n"
        "    - statuses: [mailbox-full]\n"
        "      failures: 0\n"
        "      within: soon\n"
        "      hold: 2d\n"
    )
    found = problems(tmp_path, text)
    line = GOOD.count("\n") + 4
    assert any(
        p.startswith(f"plan.yaml:{line}") and "suppression.soft_bounces[1].statuses[0]" in p
        for p in found
    ), found
    assert any("suppression.soft_bounces[1].failures" in p for p in found), found
    assert any("suppression.soft_bounces[1].within" in p for p in found), found
    assert not any("soft_bounces[0]" in p for p in found), found


def test_suppression_hashed_only_and_key_file(tmp_path: Path) -> None:
    """`suppression.hashed_only` (off by default) and `suppression.key_file` (none by
    default) load as written; a wrong type or an empty path is named where it is."""
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    spec = load_plan(path).suppression
    assert (spec.hashed_only, spec.key_file) == (False, None)
    path.write_text(GOOD + "suppression:\n  hashed_only: true\n  key_file: keys/suppression\n")
    spec = load_plan(path).suppression
    assert (spec.hashed_only, spec.key_file) == (True, "keys/suppression")
    assert len(spec.soft_bounces) == 1  # the shipped rule stays
    found = problems(tmp_path, GOOD + "suppression:\n  hashed_only: 'yes'\n  key_file: ''\n")
    line = GOOD.count("\n") + 2
    assert any(p.startswith(f"plan.yaml:{line}") and "suppression.hashed_only" in p for p in found)
    assert any(
        p.startswith(f"plan.yaml:{line + 1}") and "suppression.key_file" in p for p in found
    ), found
