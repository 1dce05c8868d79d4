"""The `kiln` command as a function."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kiln
from kiln.cli import main
from kiln.planfile import load_plan
from kiln.starter import example_plan_path, unit_path

REPO = Path(__file__).resolve().parents[1]


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


KNOWN = (
    "name, description, timezone, providers, pools, batches, schedules, policy, signals, "
    "suppression"
)


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


# ----- kiln run's defaults, where the client verbs look, kiln init -----


@pytest.fixture
def captured_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[list[Any], io.StringIO]]:
    """`kiln run` up to the daemon: `kiln.daemon.run` records its config instead of serving,
    the logs go to a buffer; the working folder is an empty one and $KILN_STATE_DIR unset."""
    import logging

    import structlog

    from kiln import daemon, log

    configs: list[Any] = []
    buf = io.StringIO()
    real_configure = log.configure

    def fake_run(config: Any, clock: object = None) -> int:
        """Record the config; serve nothing."""
        configs.append(config)
        return 0

    monkeypatch.setattr(daemon, "run", fake_run)
    monkeypatch.setattr(log, "configure", lambda fmt="auto": real_configure(fmt, stream=buf))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_STATE_DIR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield configs, buf
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


def test_run_without_config_runs_the_embedded_plan_in_dot_state(
    captured_run: tuple[list[Any], io.StringIO],
) -> None:
    """`kiln run` alone runs the example plan shipped in the package, state in ./.state, and
    logs which plan it runs and that it is the embedded one."""
    configs, buf = captured_run
    assert main(["run", "--log-format", "json"]) == 0
    (config,) = configs
    assert config.plan_path == example_plan_path()
    assert config.plan_path.is_relative_to(Path(kiln.__file__).parent)
    assert config.state_dir == Path(".state")
    (record,) = [r for r in map(json.loads, buf.getvalue().splitlines()) if r["event"] == "plan"]
    assert record["plan"] == "example" and record["embedded"] is True
    assert record["path"] == str(example_plan_path()) and "kiln init" in record["note"]


def test_run_state_dir_comes_from_flag_then_environment_then_default(
    captured_run: tuple[list[Any], io.StringIO], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--state-dir wins over $KILN_STATE_DIR, which wins over ./.state; an empty variable
    counts as unset; --config names the plan, logged as not embedded."""
    configs, buf = captured_run
    monkeypatch.setenv("KILN_STATE_DIR", str(tmp_path / "env"))
    assert main(["run"]) == 0
    assert main(["run", "--state-dir", "flag"]) == 0
    monkeypatch.setenv("KILN_STATE_DIR", "")
    assert main(["run"]) == 0
    assert [c.state_dir for c in configs] == [tmp_path / "env", Path("flag"), Path(".state")]
    plan = tmp_path / "mine.yaml"
    plan.write_bytes(example_plan_path().read_bytes())
    assert main(["run", "--config", str(plan), "--log-format", "json"]) == 0
    assert configs[-1].plan_path == plan
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    last = [r for r in records if r["event"] == "plan"][-1]
    assert last["embedded"] is False and last["path"] == str(plan) and "note" not in last


def test_client_verbs_say_where_they_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a daemon, the error names the socket path it tried (absolute) and where that
    path came from: the default ./.state, $KILN_STATE_DIR, --state-dir or --socket."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_STATE_DIR", raising=False)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the kiln daemon at .state/operator.sock" in err
    assert f"looked for the operator socket at {tmp_path}/.state/operator.sock" in err
    assert "neither --state-dir nor $KILN_STATE_DIR is set" in err
    monkeypatch.setenv("KILN_STATE_DIR", str(tmp_path / "env"))
    assert main(["automations"]) == 1
    err = capsys.readouterr().err
    assert f"looked for the operator socket at {tmp_path}/env/operator.sock" in err
    assert "($KILN_STATE_DIR)" in err
    assert main(["explain", "--state-dir", "flag", "192.0.2.10", "google"]) == 1
    assert f"at {tmp_path}/flag/operator.sock, from the state folder flag (--state-dir)" in (
        capsys.readouterr().err
    )
    assert main(["reload", "--socket", "x.sock"]) == 1
    assert f"at {tmp_path}/x.sock, from --socket;" in capsys.readouterr().err


def test_client_verbs_find_the_daemon_through_kiln_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With $KILN_STATE_DIR set, `kiln query` talks to STATE_DIR/operator.sock (a stand-in
    server here that answers every line with ok)."""
    import socket
    import threading

    folder = tmp_path / "st"
    folder.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(folder / "operator.sock"))
    server.listen(1)
    server.settimeout(10)

    def answer() -> None:
        """Reply to one request line."""
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(4096)
            conn.sendall(b'{"ok":true,"pong":1}\n')

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    monkeypatch.setenv("KILN_STATE_DIR", str(folder))
    try:
        assert main(["query", '{"op":"ping"}']) == 0
    finally:
        thread.join(10)
        server.close()
    assert capsys.readouterr().out.strip() == '{"ok":true,"pong":1}'


def test_the_embedded_plan_is_schedules_example(tmp_path: Path) -> None:
    """schedules/example.yaml is a link to the package's example plan: one file, two names."""
    link = REPO / "schedules" / "example.yaml"
    assert link.is_symlink()
    assert link.resolve() == (REPO / "python" / "kiln" / "data" / "plans" / "example.yaml")
    assert link.read_bytes() == example_plan_path().read_bytes()
    unit = REPO / "contrib" / "systemd" / "kiln.service"
    assert unit.is_symlink()
    assert unit.resolve() == REPO / "python" / "kiln" / "data" / "systemd" / "kiln.service"


def test_init_writes_a_commented_plan_and_a_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kiln init DIR` makes DIR, writes plan.yaml (the example plan with notes on what to
    change first: same plan once loaded) and kiln.service (the shipped unit running this kiln
    on DIR/plan.yaml, flags kiln knows), and says what to do next."""
    import shlex
    import sysconfig

    from kiln.cli import build_parser

    folder = tmp_path / "new" / "conf"
    assert main(["init", str(folder)]) == 0
    out = capsys.readouterr().out
    plan, unit = folder / "plan.yaml", folder / "kiln.service"
    assert f"wrote {plan}" in out and f"wrote {unit}" in out and f"kiln check {plan}" in out
    text = plan.read_text()
    assert text.startswith("# A starter warm-up plan, written by `kiln init`")
    for note in ("# 1. Name the plan", "# 2. Pools:", "# 3. Batches:", "# 4. Schedules:"):
        assert text.count(note) == 1
    assert "Do not edit it in place" not in text
    written = load_plan(plan)
    assert written.warnings == []
    assert written.model_dump() == load_plan(example_plan_path()).model_dump()
    exec_start = [
        line.removeprefix("ExecStart=")
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    argv = shlex.split(exec_start[0])
    assert argv[0] == str(Path(sysconfig.get_path("scripts")) / "kiln")
    args = build_parser().parse_args(argv[1:])
    assert (args.verb, args.config) == ("run", str(plan.absolute()))
    assert "/opt/kiln" not in unit.read_text() and "/etc/kiln/plan.yaml" not in unit.read_text()
    shipped = unit_path().read_text().splitlines()
    assert len(unit.read_text().splitlines()) == len(shipped)


def test_init_names_the_kiln_command_as_it_was_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unit runs the `kiln` that was invoked, by the path it was invoked with (a link to
    the current virtualenv stays a link, so switching it upgrades the service)."""
    command = tmp_path / "current" / "bin" / "kiln"
    command.parent.mkdir(parents=True)
    command.write_text("")
    monkeypatch.setattr("sys.argv", [str(command), "init"])
    assert main(["init", str(tmp_path / "conf")]) == 0
    assert f"ExecStart={command} run --config " in (tmp_path / "conf" / "kiln.service").read_text()
    assert f"running {command} run --config" in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing plan.yaml or kiln.service: exit 1, nothing written, the message names what
    exists and --force; with --force both are written again."""
    (tmp_path / "plan.yaml").write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"kiln init: {tmp_path}/plan.yaml already exists; nothing written" in err
    assert "--force overwrites" in err
    assert (tmp_path / "plan.yaml").read_text() == "mine\n"
    assert not (tmp_path / "kiln.service").exists()
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert load_plan(tmp_path / "plan.yaml").name == "example"
    assert (tmp_path / "kiln.service").is_file()
    assert main(["init", str(tmp_path)]) == 1
    assert "plan.yaml and " in capsys.readouterr().err


def test_init_reports_a_folder_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DIR that is a file: exit 1 with the reason; no DIR at all: a usage error (exit 2)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["init", str(blocker)]) == 1
    assert f"kiln init: cannot write to {blocker}:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["init"])
    assert info.value.code == 2


def test_every_flag_and_argument_has_help_text() -> None:
    """`kiln VERB --help` explains every flag and positional argument of every verb."""
    import argparse

    from kiln.cli import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{verb} {action.dest}"
        for verb, sub in verbs.choices.items()
        for action in sub._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
    assert all(a.help for a in parser._actions if not isinstance(a, argparse._SubParsersAction))


def test_check_counts_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln check` says "1 batch", never "1 batches"."""
    assert main(["check", "schedules/example.yaml", "schedules/marketplace-3x7.yaml"]) == 0
    out = capsys.readouterr().out
    assert "example.yaml: ok (1 batch, 2 pools)" in out
    assert "marketplace-3x7.yaml: ok (3 batches, " in out


def test_plan_refuses_an_unknown_provider_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln plan --provider gmail` exits 1 and suggests `google`, as `kiln check` would."""
    assert main(["plan", "schedules/example.yaml", "--provider", "gmail"]) == 1
    err = capsys.readouterr().err
    assert "kiln plan: unknown provider 'gmail'; did you mean 'google'? (known: " in err
    assert main(["plan", "schedules/example.yaml", "--provider", "yahoo", "--days", "1"]) == 0


def test_explain_status_and_automations_of_a_live_daemon_speak_plainly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Against a live daemon (its clock set to 3 December 2026, 10:00 in Berlin): `explain`
    says "no hourly cap (50 used)" for a warm IP and the step and warm-up day (both from 1)
    for a warming one, refuses an IP outside the plan with exit 1 as `acquire` does; `status`
    and `automations` show times in the plan's zone with their offset."""
    from daemonproc import running_daemon
    from kiln.client import Client

    start = ["--clock-start", "2026-12-03T10:00:00+01:00"]
    with running_daemon(args=start) as proc:
        sock = ["--socket", str(proc.operator_socket)]
        with Client(proc.socket) as c:
            assert c.request("acquire", ip="198.51.100.10", provider="google", n=50)["granted"]
            c.request(
                "report",
                ip="192.0.2.10",
                domain="gmail.com",
                result="deferred",
                code=421,
                enhanced="4.7.28",
                text="Gmail has detected an unusual rate of email originating from your IP "
                "address 192.0.2.10.",
            )
        capsys.readouterr()
        assert main(["explain", "198.51.100.10", "google", *sock]) == 0
        out = capsys.readouterr().out
        assert "198.51.100.10 -> google  (pool transactional, warm)" in out
        assert "now: no hourly cap (50 used), no daily cap (50 used)" in out
        assert main(["explain", "192.0.2.10", "google", *sock]) == 0
        out = capsys.readouterr().out
        assert "(batch tx-2026-12, step 1 of 12, warming, warm-up day 3)" in out
        assert "no an hour" not in out and "no a day" not in out
        assert main(["explain", "203.0.113.5", "google", *sock]) == 1
        err = capsys.readouterr().err
        assert err == "kiln explain: ip: 203.0.113.5 is not a sending IP of this daemon's plan\n"
        assert main(["status", *sock]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("plan example (Europe/Berlin), now 2026-12-03T10:")
        assert first.endswith("+01:00")
        out = ""
        for _ in range(50):  # the daemon's 1 Hz flush turns the report into a suspension
            assert main(["automations", *sock]) == 0
            out = capsys.readouterr().out
            if " suspend " in out:
                break
            time.sleep(0.2)
        row = next(line for line in out.splitlines() if " suspend " in line)
        assert row.rstrip().endswith("+01:00") and "T11:" in row
        assert main(["explain", "192.0.2.10", "google", *sock]) == 0
        assert "SUSPENDED until 2026-12-03T11:" in capsys.readouterr().out
