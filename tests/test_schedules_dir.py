"""Every shipped plan in schedules/ is a test case: it loads, compiles and is tidy."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
import yaml

from kiln import Engine
from kiln.planfile import load_plan
from kiln.ramp import apply, compile_limits, nominal_plan, plan_providers
from kiln.rate import RateSpec
from kiln.records import RampState
from kiln.schedule import Plan

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"
FILES = sorted(SCHEDULES.glob("*.yaml"))


def test_the_shipped_set_is_there() -> None:
    """The six documented examples ship."""
    assert {f.name for f in FILES} >= {
        "example.yaml",
        "sendgrid-like.yaml",
        "sparkpost-stages.yaml",
        "per-provider.yaml",
        "marketplace-3x7.yaml",
        "dual-mta-cutover.yaml",
    }


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_shipped_plan_loads_without_warnings(path: Path) -> None:
    """Each file is valid, warns about nothing, and opens with a comment saying what it is."""
    plan = load_plan(path)
    assert plan.warnings == []
    assert path.read_text().startswith("# ")
    assert plan.name == path.stem


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_shipped_plan_compiles_into_an_engine(path: Path) -> None:
    """Each file compiles at every step of every ramp and the engine accepts the limits."""
    plan = load_plan(path)
    rows, _ = nominal_plan(plan)
    assert rows
    start = min(b.start_date for b in plan.batches.values())
    now_ms = int(datetime(start.year, start.month, start.day, 12, tzinfo=UTC).timestamp() * 1000)
    longest = max(r.step or 0 for r in rows)
    for step in (1, longest, longest + 1):
        positions = {
            (b, p): RampState(step=step) for b in plan.batches for p in plan_providers(plan)
        }
        engine = Engine()
        limits = compile_limits(plan, positions, now_ms)
        apply(engine, plan, limits)
        assert engine.key_count() == len(limits)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_rate_strings_are_canonical(path: Path) -> None:
    """Rate strings in shipped files are already in the form kiln prints."""
    for rate in re.findall(r"max_message_rate:\s*([^\s#]+)", path.read_text()):
        assert str(RateSpec.parse(rate)) == rate


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_shipped_plan_validates_against_the_json_schema(path: Path) -> None:
    """What editors check as you type (`kiln schema`) accepts every shipped plan."""
    schema = Plan.model_json_schema()
    data = yaml.safe_load(path.read_text())
    for batch in data.get("batches", {}).values():
        batch["start_date"] = str(batch["start_date"])  # YAML reads dates; JSON has strings
    jsonschema.validate(data, schema)
    data["schedules"][next(iter(data["schedules"]))]["max_message_rate"] = "lots"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
