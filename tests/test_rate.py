"""Rate strings: parse what mail engineers write, print one canonical form, round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.rate import PERIOD_MS, RateError, RateSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500/h", RateSpec(500, 3_600_000)),
        ("2_000/day,max_burst=10", RateSpec(2000, 86_400_000, 10)),
        ("10,000/d", RateSpec(10_000, 86_400_000)),
        ("1,000/hr,max_burst=5", RateSpec(1000, 3_600_000, 5)),
        (" 50/minute , max_burst = 2 ", RateSpec(50, 60_000, 2)),
        ("10/SEC", RateSpec(10, 1_000)),
        ("7/m", RateSpec(7, 60_000)),
    ],
)
def test_parses_the_usual_spellings(text: str, expected: RateSpec) -> None:
    """KumoMTA-style spellings parse to the same spec."""
    assert RateSpec.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("500/h", "500/h"),
        ("2000/day,max_burst=10", "2_000/day,max_burst=10"),
        ("10,000/d", "10_000/day"),
        ("60/minute", "60/min"),
        ("1/sec,max_burst=1", "1/s"),
    ],
)
def test_prints_one_canonical_form(text: str, canonical: str) -> None:
    """str() groups digits with `_`, uses s/min/h/day, and omits the default burst."""
    assert str(RateSpec.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("500", "expected <count>/<period>, such as 500/h"),
        ("500/week", "unknown period 'week'; use one of s, sec, second, m, min, minute"),
        ("0/h", "count must be at least 1, got 0"),
        ("-5/h", "count must be a whole number such as 500 or 2_000, got '-5'"),
        ("1.5/h", "count must be a whole number"),
        ("500/h,max_burst", "expected max_burst=<n> after the comma"),
        ("500/h,max_burst=0", "max_burst must be at least 1, got 0"),
        ("99_999_999_999/h", "count must be at most 4_294_967_294"),
        ("/h", "count must be a whole number"),
    ],
)
def test_bad_rates_say_what_was_expected(text: str, message: str) -> None:
    """Every malformed rate is a RateError (a ValueError) that quotes the text and the problem."""
    with pytest.raises(RateError) as info:
        RateSpec.parse(text)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def test_specs_that_no_string_can_express_are_rejected() -> None:
    """Direct construction checks the same bounds as parsing."""
    with pytest.raises(RateError, match="period_ms"):
        RateSpec(5, 7_000)
    with pytest.raises(RateError, match="max_burst"):
        RateSpec(5, 1_000, 0)


specs = st.builds(
    RateSpec,
    count=st.integers(1, 2**32 - 2),
    period_ms=st.sampled_from(sorted(set(PERIOD_MS.values()))),
    max_burst=st.integers(1, 2**32 - 2),
)


@given(specs)
def test_round_trip(spec: RateSpec) -> None:
    """parse(str(spec)) == spec for every spec."""
    assert RateSpec.parse(str(spec)) == spec


def test_per_hour() -> None:
    """The long-run hourly rate of a daily spec."""
    assert RateSpec.parse("2_400/day").per_hour == 100
