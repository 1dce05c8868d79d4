"""The `kiln` command as a function."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import kiln
from kiln.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln --version` prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiln {kiln.__version__}"


def test_run_refuses_a_bad_plan_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kiln run` checks the plan first: exit 1 with located errors, nothing created."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    state = tmp_path / "state"
    assert main(["run", "--config", str(bad), "--state-dir", str(state)]) == 1
    assert "required key is missing" in capsys.readouterr().err
    assert not state.exists()


def test_client_verbs_say_when_no_daemon_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kiln status/reload/query` without a daemon: exit 1 and a sentence, no traceback."""
    for verb in (["status"], ["reload"], ["query", '{"op":"ping"}']):
        assert main([verb[0], "--state-dir", str(tmp_path), *verb[1:]]) == 1
        err = capsys.readouterr().err
        assert f"kiln {verb[0]}: cannot reach the kiln daemon at {tmp_path}/operator.sock" in err


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a verb, kiln prints its help and exits 2 (a usage error)."""
    assert main([]) == 2
    assert "usage: kiln" in capsys.readouterr().out


def test_check_ok_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln check` exits 0 for valid files, 1 with every located error for a bad one: an
    unknown key does not hide a bad time zone."""
    assert main(["check", "schedules/example.yaml", "schedules/sendgrid-like.yaml"]) == 0
    assert capsys.readouterr().out.count(": ok (") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntimezone: Mars/Olympus\npools: {p: {ips: [192.0.2.1]}}\nfoo: 1\n")
    assert main(["check", "schedules/example.yaml", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{bad}:2:1: timezone: unknown time zone 'Mars/Olympus' "
        "(use an IANA name such as Europe/Berlin)",
        f"{bad}:4:1: foo: unknown key 'foo' (known keys: {KNOWN})",
    ]


KNOWN = "name, description, timezone, providers, pools, batches, schedules, policy, signals"


def test_check_never_tracebacks_on_junk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Binary junk, bad YAML and empty files: exit 1 and one clear line each."""
    files = {
        "junk.yaml": bytes(range(256)),
        "syntax.yaml": b"a: [1, 2\nb: }\n",
        "empty.yaml": b"",
        "tabs.yaml": b"name:\tx\n\tpools: 1\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert main(["check", *(str(tmp_path / n) for n in files)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == len(files)


def test_plan_json_is_stable(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln plan --format json` has the documented shape (version 2: `day` 1 is the start
    date, as `warmup_day` and `step` count)."""
    assert main(["plan", "schedules/example.yaml", "--days", "2", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 2 and doc["plan"] == "example" and doc["timezone"] == "Europe/Berlin"
    assert doc["rows"][0] == {
        "date": "2026-12-01",
        "day": 1,
        "batch": "tx-2026-12",
        "pool": "transactional",
        "provider": "google",
        "state": "warming",
        "step": 1,
        "ips": 2,
        "daily_cap": 75,
        "hourly_cap": 5,
        "share_percent": None,
    }
    assert doc["pools"][0] == {
        "date": "2026-12-01",
        "pool": "transactional",
        "provider": "default",
        "new_ip_daily_capacity": 300,
    }


def test_plan_sendgrid_json_is_the_published_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The SendGrid example's JSON plan gives exactly the published hourly table (SendGrid's
    day 0 is kiln's warm-up day 1)."""
    assert main(["plan", "schedules/sendgrid-like.yaml", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    fixture = Path(__file__).resolve().parent / "fixtures" / "warmup"
    with (fixture / "sendgrid_hourly.csv").open() as f:
        published = [(int(r["day"]) + 1, int(r["hourly"])) for r in csv.DictReader(f)]
    assert [(r["day"], r["hourly_cap"]) for r in rows if r["state"] == "warming"] == published


def test_plan_csv_table_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    """CSV has a header and one line per row; --batch/--provider filter; the table is aligned."""
    args = ["plan", "schedules/marketplace-3x7.yaml", "--days", "3", "--provider", "google"]
    assert main([*args, "--batch", "a", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("date,day,batch,pool,provider,state,step")
    assert len(lines) == 4 and all(",a,transactional,google," in ln for ln in lines[1:])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "new-IP daily capacity per pool and provider" in out
    assert main(["plan", "schedules/example.yaml", "--batch", "nope"]) == 1
    assert "unknown batch 'nope'" in capsys.readouterr().err


def test_plan_png_draws_a_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--png writes a PNG image of the ramp curves."""
    png = tmp_path / "ramp.png"
    assert main(["plan", "schedules/per-provider.yaml", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    capsys.readouterr()


def test_schema_describes_the_file_format(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln schema` prints a JSON Schema that names the plan's keys."""
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "kiln warm-up plan"
    assert set(schema["required"]) == {"name", "timezone", "pools"}
    assert schema["additionalProperties"] is False
    assert "Schedule" in schema["$defs"]


def test_plan_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln plan` on an invalid file or with an impossible --days exits 1 with a message."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert main(["plan", str(bad)]) == 1
    assert "timezone: required key is missing" in capsys.readouterr().err
    assert main(["plan", "schedules/example.yaml", "--days", "0"]) == 1
    assert "--days must be in 1..3660, got 0" in capsys.readouterr().err


def test_the_sample_systemd_unit_runs_kiln_with_flags_it_knows() -> None:
    import configparser
    import shlex

    from kiln.cli import build_parser

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(Path(__file__).parents[1] / "contrib" / "systemd" / "kiln.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/kiln")
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert (args.verb, args.socket_mode, args.log_format) == ("run", 0o660, "json")
    assert unit["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
