"""README.md's command blocks, replayed: every `kiln` line runs and prints what it says.

The ```sh blocks of README.md are read line by line (a line ending in `\\` goes on in the
next). Lines that start a program the tests cannot or must not run here are listed in
`NOT_RUN` with the reason; lines that name places outside a test are run with those places
swapped for temporary ones (`adapted`). Every other `kiln` line runs as written:

- the plan lines (`check`, `plan`, `schema`, `init`, `classify`) as real processes of the
  `.venv/bin/kiln` script, from the repository folder;
- the daemon lines (`status`, `query`, `reload`, `automations`, `explain`, `cancel`) against a
  daemon that `tests/daemonproc.py` starts on the example plan with a drill clock
  (`--clock-start`, speed 1): at half past each of the 24 hours of an ordinary day, a moment
  before the plan's active hours begin and end, and the nights DST starts and ends, so that
  the README is true at any hour. They run through `kiln.cli.main` (what the `kiln` script
  calls) to keep the sweep fast; `test_daemon_lines_run_as_written` runs them once more as
  real processes, exactly as written.

`# {...}` lines right after a `kiln query` line are the replies the README promises: the
first while the warming IP is inside the plan's active hours, the second (reason
`outside_active_hours`) outside them, where `retry_after_ms` must be the true time to the next
07:00 in the plan's zone (the README's figure is for 00:00).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemonproc import EXAMPLE, REPO, DaemonProc
from kiln.cli import main
from kiln.planfile import load_plan
from kiln.starter import example_plan_path

README = REPO / "README.md"
KILN = REPO / ".venv" / "bin" / "kiln"
PLAN = load_plan(EXAMPLE)
ZONE = PLAN.zone
OPEN_FROM, OPEN_UNTIL = PLAN.schedules[PLAN.batches["tx-2026-12"].schedule].hourly.window
NOT_RUN = {
    "make run": "starts a daemon in the foreground on ./.state of the checkout; the daemon tests "
    "below start one on the same embedded example plan instead",
    "make test": "runs every test, this one included",
    "make dist": "builds the wheel and sdist (minutes); tests/test_packaging.py covers packaging",
    "pip install": "installs into the environment the tests run in",
    "kiln run": "starts the daemon; the daemon tests start it with tests/daemonproc.py (the "
    "example plan, a temporary state folder, a drill clock) and run every line after it",
}
"""Lines the test does not run (by their first words), and why."""
DAEMON_VERBS = {"status", "query", "reload", "automations", "explain", "cancel"}
PLAN_VERBS = {"check", "plan", "schema", "init", "classify"}


@dataclass
class Line:
    """One command line of a ```sh block, with the `# {...}` replies promised after it."""

    text: str
    words: list[str]
    comment: str
    replies: list[dict[str, object]] = field(default_factory=list)

    @property
    def verb(self) -> str:
        """The `kiln` verb, or the program's name."""
        program = Path(self.words[0]).name
        return self.words[1] if program == "kiln" and len(self.words) > 1 else program


def readme_lines() -> list[Line]:
    """Every command line of README.md's ```sh blocks, in order."""
    lines: list[Line] = []
    for block in re.findall(r"^```sh\n(.*?)^```$", README.read_text(), re.S | re.M):
        for raw in block.replace("\\\n", "").splitlines():
            if raw.startswith("# {"):
                lines[-1].replies.append(json.loads(raw[2:]))
            elif raw.strip() and not raw.startswith("#"):
                words = shlex.split(raw, comments=True)
                comment = raw.split(" # ", 1)[1] if " # " in raw else ""
                lines.append(Line(raw, words, comment.strip()))
    return lines


LINES = readme_lines()


def not_run(line: Line) -> str | None:
    """Why `line` is not run, or None."""
    program = Path(line.words[0]).name
    for start, why in NOT_RUN.items():
        first = start.split()
        if [program, *line.words[1:]][: len(first)] == first:
            return why
    return None


def lines_of(verbs: set[str]) -> list[Line]:
    """The README's `kiln` lines of these verbs, in order."""
    return [ln for ln in LINES if Path(ln.words[0]).name == "kiln" and ln.verb in verbs]


def test_every_line_is_run_or_says_why_not() -> None:
    """Each README command line is a plan line, a daemon line, the `export` of the state
    folder, or one of the lines not run (each with its reason); nothing is left out silently,
    and the lines not run name the same plan the daemon tests run."""
    seen = {"plan": 0, "daemon": 0, "export": 0, "not run": 0}
    for line in LINES:
        if not_run(line):
            seen["not run"] += 1
        elif line.words[0] == "export":
            assert line.words[1].startswith("KILN_STATE_DIR="), line.text
            seen["export"] += 1
        else:
            assert line.words[0] in ("kiln", ".venv/bin/kiln"), f"not a kiln line: {line.text}"
            assert line.verb in PLAN_VERBS | DAEMON_VERBS, f"unknown verb: {line.text}"
            seen["plan" if line.verb in PLAN_VERBS else "daemon"] += 1
    assert seen == {"plan": 6, "daemon": 6, "export": 1, "not run": 6}, seen
    # `kiln run` and `make run` run the embedded example plan, which the daemon tests start.
    assert EXAMPLE.read_bytes() == example_plan_path().read_bytes()


# ----- the plan lines -----


def test_plan_lines_run_as_written(tmp_path: Path) -> None:
    """`kiln check`, `plan` (a table, and JSON with a chart), `schema`, `init` and `classify`
    exit 0 as real processes and print what the README says: a plan that checks ok, the
    caps of 7 days, JSON and a PNG, a JSON schema, a starter plan that checks ok, and the
    class the README names for the Gmail reply."""
    for line in lines_of(PLAN_VERBS):
        words = [str(KILN), *line.words[1:]]
        out_file = None
        if line.verb == "plan" and "--png" in words:
            i = words.index("--png") + 1
            words[i] = str(tmp_path / words[i])  # adapted: the chart goes to a temporary folder
        if line.verb == "schema":
            out_file = tmp_path / "kiln-plan.schema.json"  # adapted: the `>` of the README
            assert line.text.split("#")[0].rstrip().endswith("> kiln-plan.schema.json")
            words = words[: words.index(">")] if ">" in words else words[:2]
        if line.verb == "init":
            words[-1] = str(tmp_path / words[-1])  # adapted: DIR in a temporary folder
        done = subprocess.run(  # noqa: S603 (the repository's own kiln script)
            words, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{line.text}\n{done.stdout}\n{done.stderr}"
        out = done.stdout
        if line.verb == "check":
            assert out.startswith("schedules/example.yaml: ok ("), out
        elif line.verb == "plan" and "--format" in words:
            rows = json.loads(out)
            assert rows and (tmp_path / "ramp.png").read_bytes().startswith(b"\x89PNG")
        elif line.verb == "plan":
            days = set(re.findall(r"\b2026-\d\d-\d\d\b", out))
            assert len(days) == 7, out
        elif line.verb == "schema":
            assert out_file is not None
            out_file.write_text(out)
            assert json.loads(out_file.read_text())["title"], out[:200]
        elif line.verb == "init":
            made = tmp_path / line.words[-1]
            assert (made / "kiln.service").exists()
            assert main(["check", str(made / "plan.yaml")]) == 0
        elif line.verb == "classify":
            said = re.match(r"(\w+), scope (\w+)", line.comment)
            assert said is not None, line.comment
            cls, scope = said.groups()
            assert re.search(rf"^class +{cls}$", out, re.M), out
            assert re.search(rf"^scope +{scope}$", out, re.M), out


# ----- the daemon lines -----


def local(text: str) -> int:
    """A local wall time of the plan's zone (`YYYY-MM-DD HH:MM:SS`, `fold=1` for the second
    of a repeated hour) as epoch ms."""
    fold = text.endswith("+fold")
    wall = datetime.fromisoformat(text.removesuffix("+fold")).replace(tzinfo=ZONE, fold=fold)
    return int(wall.timestamp() * 1000)


ORDINARY_DAY = [f"2026-12-04 {h:02d}:30:00" for h in range(24)]
EDGES = ["2026-12-04 06:59:59.500", "2026-12-04 21:59:59.500", "2026-12-04 22:00:00"]
DST_NIGHTS = [
    # DST starts: 02:00 never comes, and 07:00 is 5 hours after midnight.
    "2026-03-29 00:30:00",
    "2026-03-29 01:59:59",
    "2026-03-29 03:30:00",
    "2026-03-29 06:30:00",
    "2026-03-29 21:30:00",
    # DST ends: 02:00-03:00 comes twice, and 07:00 is 8 hours after midnight.
    "2026-10-25 00:30:00",
    "2026-10-25 02:30:00",
    "2026-10-25 02:30:00+fold",
    "2026-10-25 06:30:00",
    "2026-10-25 22:30:00",
]
MOMENTS = ORDINARY_DAY + EDGES + DST_NIGHTS


def iso(t_ms: int) -> str:
    """Epoch ms as ISO 8601 with the zone's offset (for --clock-start)."""
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(ZONE).isoformat()


def active(t_ms: int) -> bool:
    """Is `t_ms` inside the example plan's active hours (local time)?"""
    hour = datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(ZONE).hour
    return OPEN_FROM <= hour < OPEN_UNTIL


def next_opening(t_ms: int) -> int:
    """The first instant after `t_ms` at which a local hour of the active hours begins."""
    local_t = datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(ZONE)
    day = local_t.date()
    while True:
        wall = datetime(day.year, day.month, day.day, OPEN_FROM, tzinfo=ZONE)
        opening = int(wall.timestamp() * 1000)
        if opening > t_ms:
            return opening
        day += timedelta(days=1)


@contextlib.contextmanager
def drill_daemon(start_ms: int) -> Iterator[tuple[DaemonProc, int, int]]:
    """A daemon on the example plan whose clock starts at `start_ms` and runs at speed 1;
    yields it, `start_ms` and the monotonic clock just before it started (see `now_bounds`)."""
    # A flush every 200 ms (not 1 s) only makes policy see the report sooner.
    clock = ["--clock-start", iso(start_ms), "--clock-speed", "1"]
    d = DaemonProc(EXAMPLE, args=[*clock, "--snapshot-interval-ms", "200"])
    before = time.monotonic_ns()
    try:
        yield d.start(), start_ms, before
    finally:
        d.cleanup()


def now_bounds(start_ms: int, before_ns: int) -> tuple[int, int]:
    """The earliest and latest the daemon's clock can read now: it read `start_ms` when its
    process began, after `before_ns`."""
    return start_ms, start_ms + (time.monotonic_ns() - before_ns) // 1_000_000 + 1


def run_cli(words: list[str]) -> tuple[int, str]:
    """`kiln.cli.main(words)` (what the `kiln` script runs); its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(words)
    return code, out.getvalue() + err.getvalue()


def check_acquire(line: Line, reply: dict[str, object], lo: int, hi: int) -> None:
    """The reply is the README's first promised reply if the daemon's clock was inside the
    active hours, else its second, with the true wait to the next opening: the clock read
    some `now` in [lo, hi], and `now + retry_after_ms` is the opening after it."""
    day, night = line.replies
    if reply["granted"]:
        assert reply == day, reply
        assert active(lo) or active(hi), f"granted outside active hours: {iso(lo)}"
        return
    wait = reply["retry_after_ms"]
    assert {k: v for k, v in reply.items() if k != "retry_after_ms"} == {
        k: v for k, v in night.items() if k != "retry_after_ms"
    }, reply
    assert isinstance(wait, int), reply
    now = next_opening(lo) - wait
    assert lo <= now <= hi and not active(now), f"{reply} at {iso(lo)}..{iso(hi)}"
    # The README's figure is the wait at 00:00 of an ordinary day.
    assert night["retry_after_ms"] == next_opening(local("2026-12-04 00:00:00")) - local(
        "2026-12-04 00:00:00"
    )


def report_the_classified_reply(state_dir: Path) -> None:
    """Report the reply the README classifies, for 192.0.2.10 at gmail.com, as an MTA would
    (`kiln query` with a `report`), and wait until policy made its automations (A1, A2):
    the README's `kiln cancel A1` then has one to cancel."""
    classify = lines_of({"classify"})[0].words[-1]
    first, text = classify.split(" ", 1)
    code, enhanced = first.split("-")
    report = {
        "op": "report",
        "ip": "192.0.2.10",
        "domain": "gmail.com",
        "result": "deferred",
        "code": int(code),
        "enhanced": enhanced,
        "text": text,
    }
    code_, out = run_cli(["query", "--state-dir", str(state_dir), json.dumps(report)])
    assert code_ == 0, out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        code_, out = run_cli(["automations", "--state-dir", str(state_dir)])
        if code_ == 0 and re.search(r"^A1 ", out, re.M):
            return
        time.sleep(0.1)
    pytest.fail(f"no automation A1 after the report: {out}")


def replay_daemon_lines(
    d: DaemonProc, start_ms: int, before_ns: int, *, as_processes: bool
) -> None:
    """Run the README's daemon lines in order against `d` (the state folder from
    KILN_STATE_DIR, as the README's `export` line sets it) and check each one's output."""
    env = {**os.environ, "KILN_STATE_DIR": str(d.state_dir)}
    for line in lines_of(DAEMON_VERBS):
        if line.verb == "cancel":
            report_the_classified_reply(d.state_dir)
        if as_processes:
            done = subprocess.run(  # noqa: S603 (the repository's own kiln script)
                [str(KILN), *line.words[1:]],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            code, out = done.returncode, done.stdout + done.stderr
        else:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KILN_STATE_DIR", str(d.state_dir))
                code, out = run_cli(line.words[1:])
        lo, hi = now_bounds(start_ms, before_ns)
        assert code == 0, f"{line.text} at {iso(lo)}: exit {code}\n{out}"
        if line.verb == "status":
            assert out.startswith("plan example (Europe/Berlin)"), out
            assert re.search(r"^tx-2026-12 +google ", out, re.M), out
            assert re.search(r"^tx-2026-12 +default ", out, re.M), out
        elif line.verb == "query":
            check_acquire(line, json.loads(out), lo, hi)
        elif line.verb == "reload":
            assert out.strip() == "plan 'example' is in force", out
        elif line.verb == "automations":
            assert out.startswith("no automation is in force"), out
        elif line.verb == "explain":
            assert out.startswith("192.0.2.10 -> google  (batch tx-2026-12, step 1 of 12"), out
        elif line.verb == "cancel":
            assert out.strip() == "A1 (suspend of 192.0.2.10 x google) cancelled", out


@pytest.mark.parametrize("moment", MOMENTS)
def test_daemon_lines_hold_at_any_hour(moment: str) -> None:
    """With the daemon's clock at `moment` (local time of the example plan), every README
    daemon line exits 0 and prints what the README says: the acquire is granted inside the
    active hours, and outside them is refused `outside_active_hours` with the true wait to
    the next 07:00 (across DST changes too)."""
    with drill_daemon(local(moment)) as (d, start_ms, before_ns):
        replay_daemon_lines(d, start_ms, before_ns, as_processes=False)


@pytest.mark.parametrize("moment", ["2026-12-04 03:30:00", "2026-12-04 12:30:00"])
def test_daemon_lines_run_as_written(moment: str) -> None:
    """The README's daemon lines as real `.venv/bin/kiln` processes, word for word, with
    KILN_STATE_DIR naming the daemon's state folder: at night and in the day."""
    with drill_daemon(local(moment)) as (d, start_ms, before_ns):
        replay_daemon_lines(d, start_ms, before_ns, as_processes=True)
