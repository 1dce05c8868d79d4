"""Limits on the YAML files kiln reads: size, nesting, node budget, regular files only.

A plan or rule file that is hostile or broken (an alias bomb, deep nesting, a FIFO, a huge or
binary file) is refused quickly, in bounded memory, with one short located `ScheduleError`,
never a traceback and never a hang (schedules/README.md, "Limits on plan files").
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import yamlfile
from kiln.cli import main
from kiln.errors import ScheduleError
from kiln.planfile import load_plan
from kiln.rules import load_rules
from kiln.yamlfile import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    MAX_NUMBER_CHARS,
    load_yaml,
    read_bounded,
)

pytestmark = pytest.mark.timeout(60)

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"

#: Six levels of ten: level k lists 10**k "lol"s once expanded, so `f` alone is a million.
LEVELS = "abcdef"


def alias_bomb() -> str:
    """The classic "billion laughs", scaled to a million: each level lists the last ten times."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in itertools.pairwise(LEVELS):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def refused(path: Path) -> ScheduleError:
    """The error `load_plan(path)` raises (the test fails if it loads)."""
    with pytest.raises(ScheduleError) as info:
        load_plan(path)
    return info.value


def only_problem(error: ScheduleError) -> str:
    """The one problem of `error`, as `kiln check` prints it."""
    (problem,) = error.problems
    return str(problem)


# ----- the node budget -----


def test_alias_bomb_is_refused_in_milliseconds_and_little_memory(tmp_path: Path) -> None:
    """A file of under 416 bytes whose aliases expand to a million values is refused at the
    first level past the node budget, in well under 0.5 s and with a peak under 5 MB (before
    the budget it was built in full: seconds and some 250 MB)."""
    text = alias_bomb()
    assert len(text.encode()) <= 416
    path = tmp_path / "plan.yaml"
    path.write_text(text)

    started = time.perf_counter()
    error = refused(path)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"took {elapsed:.3f} s"

    tracemalloc.start()
    try:
        refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"peak {peak / 1e6:.1f} MB"

    assert only_problem(error) == (
        f"{path}:5:4: e: more than {MAX_NODES:,} values once aliases are expanded "
        f"(each use of an alias counts); the limit is {MAX_NODES:,}"
    )


def test_merge_key_bomb_is_refused(tmp_path: Path) -> None:
    """Merge keys (`<<: [*m, *m]`) that double a mapping thirty times are refused as soon as the
    copied keys pass the budget, before anything is built."""
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: 1" for i in range(10)) + "}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, 30)]
    path = tmp_path / "plan.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    message = only_problem(refused(path))
    # Built, the mapping would hold 10 x 2^29 keys: no run ends. The bound only has to tell
    # that from a refusal on a shared machine that may stall (2 s failed once at 2.1 s).
    assert time.perf_counter() - started < 10
    assert message.startswith(f"{path}:")
    assert f"more than {MAX_NODES:,} values" in message


def test_merge_list_naming_one_mapping_many_times_is_cheap(tmp_path: Path) -> None:
    """`<<: [*m, *m, ...]` with 10,000 aliases of a 5,000-key mapping merges `m` once and is
    refused once the copies pass the budget (merging it again per alias took many seconds)."""
    keys = ", ".join(f"k{i}: 1" for i in range(5000))
    path = tmp_path / "plan.yaml"
    path.write_text(f"m: &m {{{keys}}}\nn: {{<<: [{', '.join(['*m'] * 10_000)}]}}\n")
    started = time.perf_counter()
    message = only_problem(refused(path))
    assert time.perf_counter() - started < 4
    assert message.startswith(f"{path}:2:4: more than {MAX_NODES:,} values")


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    """An alias to the list that contains it (a cycle) is one located problem, not a hang or
    a RecursionError."""
    path = tmp_path / "plan.yaml"
    path.write_text("name: x\nloop: &a [1, *a]\n")
    assert only_problem(refused(path)) == (
        f"{path}:2:7: loop[1]: an alias refers to the list or mapping that contains it"
    )


def test_many_plain_values_hit_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any alias, a list of more values than the budget is refused at the first value
    past it: the composer counts too, so a big flat file is never composed in full (the budget
    is lowered to 1,000 here to keep the test fast; the limit is read at each load)."""
    monkeypatch.setattr(yamlfile, "MAX_NODES", 1000)
    path = tmp_path / "plan.yaml"
    path.write_text("[" + ",".join(["0"] * 1010) + "]\n")
    message = only_problem(refused(path))
    assert message.startswith(f"{path}:1:2000: [999]: more than 1,000 values")


def test_merge_keys_still_work(tmp_path: Path) -> None:
    """An ordinary merge key (`<<: *base`) is still merged."""
    path = tmp_path / "data.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  z: 3\n")
    data, _ = load_yaml(path)
    assert data["c"] == {"x": 1, "y": 2, "z": 3}


# ----- nesting -----


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[" * 10_000 + "]" * 10_000 + "\n", ":1:65: "),
        ("{" * 10_000 + "}" * 10_000 + "\n", ":1:65: "),
        ("- " * 10_000 + "x\n", ":1:131: [0][0][0][0]...: "),
    ],
    ids=["flow-lists", "flow-mappings", "block-lists"],
)
def test_ten_thousand_levels_are_refused_briefly(tmp_path: Path, text: str, where: str) -> None:
    """10,000 nested lists or mappings give one short problem naming file, line and column
    where the limit was passed, not a 3,000-line RecursionError."""
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    started = time.perf_counter()
    message = only_problem(refused(path))
    assert time.perf_counter() - started < 0.5
    assert message == (
        f"{path}{where}nested more than {MAX_DEPTH} lists and mappings deep; "
        f"the limit is {MAX_DEPTH}"
    )
    assert len(message) - len(str(path)) < 120


def test_deep_mapping_names_its_keys(tmp_path: Path) -> None:
    """Deep block mappings are refused at the first key past the limit, its line given and its
    path shortened to the first keys."""
    path = tmp_path / "plan.yaml"
    path.write_text("".join(" " * i + f"k{i}:\n" for i in range(100)))
    assert only_problem(refused(path)) == (
        f"{path}:{MAX_DEPTH + 1}:{MAX_DEPTH + 1}: k0.k1.k2.k3...: nested more than "
        f"{MAX_DEPTH} lists and mappings deep; the limit is {MAX_DEPTH}"
    )


def test_nesting_up_to_the_limit_loads(tmp_path: Path) -> None:
    """A value inside exactly `MAX_DEPTH` lists is read."""
    path = tmp_path / "data.yaml"
    path.write_text("[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH + "\n")
    data, _ = load_yaml(path)
    for _ in range(MAX_DEPTH):
        (data,) = data
    assert data == 1


def test_depth_through_an_alias_is_counted(tmp_path: Path) -> None:
    """Nesting reached through an alias counts: 40 levels used inside 40 more is refused."""
    inner = "[" * 40 + "1" + "]" * 40
    path = tmp_path / "plan.yaml"
    path.write_text(f"a: &a {inner}\nb: {'[' * 40}*a{']' * 40}\n")
    message = only_problem(refused(path))
    assert message.startswith(f"{path}:2:")
    assert f"nested more than {MAX_DEPTH} lists and mappings deep" in message


# ----- what is read -----


def _release(fifo: Path) -> None:
    """Unblock a reader stuck opening `fifo` (open and close a writer end, never waiting)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader: nothing is stuck
        pass


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO at the plan path (no writer) is refused at once instead of blocking forever."""
    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_plan(fifo)
            outcome.append(None)
        except ScheduleError as e:
            outcome.append(e)

    worker = threading.Thread(target=load, daemon=True)
    started = time.perf_counter()
    worker.start()
    worker.join(timeout=5)
    try:
        assert not worker.is_alive(), "load_plan blocked on a FIFO"
    finally:
        if worker.is_alive():
            _release(fifo)
            worker.join(timeout=5)
    assert time.perf_counter() - started < 1
    (error,) = outcome
    assert isinstance(error, ScheduleError)
    assert only_problem(error) == (
        f"{fifo}:1:1: this is a FIFO (named pipe), not a regular file; "
        "kiln reads YAML from regular files"
    )


def test_two_mib_file_is_refused(tmp_path: Path) -> None:
    """A 2 MiB file is refused before it is read or parsed, with its size and the limit."""
    path = tmp_path / "plan.yaml"
    path.write_text("# padding\n" * (2 * 1024 * 1024 // 10) + "#" * (2 * 1024 * 1024 % 10))
    assert path.stat().st_size == 2 * 1024 * 1024
    assert only_problem(refused(path)) == (
        f"{path}:1:1: the file is 2.0 MiB (2,097,152 bytes); files over 1 MiB (1,048,576 "
        "bytes) are refused (a plan or rule file is a few kilobytes)"
    )


def test_read_is_bounded(tmp_path: Path) -> None:
    """`read_bounded` returns a file up to its limit and refuses one byte more."""
    path = tmp_path / "data.yaml"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, limit=100) == b"x" * 100
    with pytest.raises(ScheduleError, match=r"the file is 0\.0 MiB \(101 bytes\)"):
        path.write_bytes(b"x" * 101)
        read_bounded(path, limit=100)
    assert MAX_FILE_BYTES == 1024 * 1024


def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory at the plan path is refused by name."""
    folder = tmp_path / "plan.yaml"
    folder.mkdir()
    assert only_problem(refused(folder)) == (
        f"{folder}:1:1: this is a directory, not a regular file; kiln reads YAML from regular files"
    )


def test_non_utf8_bytes_are_located(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is reported at its line and column, with the byte."""
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"name: test\ntimezone: caf\xe9\n")
    assert only_problem(refused(path)) == (
        f"{path}:2:14: not UTF-8 text: byte(s) e9 (invalid continuation byte); "
        "save the file as UTF-8"
    )


def test_control_characters_are_located(tmp_path: Path) -> None:
    """A character YAML does not allow (NUL) is reported at its line and column."""
    path = tmp_path / "plan.yaml"
    path.write_text("name: test\ntimezone: a\x00b\n")
    assert only_problem(refused(path)) == (
        f"{path}:2:12: the character U+0000 is not allowed in YAML "
        "(special characters are not allowed)"
    )


def test_very_long_numbers_are_refused_quickly(tmp_path: Path) -> None:
    """A number of 300,000 characters (a YAML 1.1 base-60 integer, whose value costs time
    quadratic in its length) is refused unread, and the problem quotes only its start."""
    path = tmp_path / "plan.yaml"
    path.write_text("name: test\nx: 1" + ":59" * 100_000 + "\n")
    started = time.perf_counter()
    error = refused(path)
    assert time.perf_counter() - started < 1
    (message,) = [str(p) for p in error.problems if p.path == "x"]
    assert message.startswith(f"{path}:2:1: x: cannot read '1:59:59")
    assert message.endswith(f"characters): a number over {MAX_NUMBER_CHARS} characters")
    assert len(message) - len(str(path)) < 160


def test_long_values_are_quoted_short(tmp_path: Path) -> None:
    """A problem about a huge value quotes its start and its length, not all of it."""
    path = tmp_path / "plan.yaml"
    path.write_text("name: test\ntimezone: UTC\npools: [" + "1, " * 5000 + "1]\n")
    messages = [str(p) for p in refused(path).problems if p.path == "pools"]
    assert messages == [
        f"{path}:3:1: pools: expected a mapping of keys, got a list "
        "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,... (15,003 characters)"
    ]


def test_rule_files_share_the_limits(tmp_path: Path) -> None:
    """Operator rule files are read by the same bounded reader: a bomb there is refused too."""
    path = tmp_path / "rules.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(ScheduleError, match=f"more than {MAX_NODES:,} values"):
        load_rules([path], defaults=False)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ScheduleError, match="this is a FIFO"):
        load_rules([fifo], defaults=False)


# ----- kiln check -----


def _bomb(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    return path


def _deep(tmp_path: Path) -> Path:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 10_000 + "]" * 10_000)
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


def _big(tmp_path: Path) -> Path:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 * 1024 * 1024))
    return path


def _folder(tmp_path: Path) -> Path:
    path = tmp_path / "folder.yaml"
    path.mkdir()
    return path


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bomb, ":5:4: e: more than 100,000 values once aliases are expanded"),
        (_deep, ":1:65: nested more than 64 lists and mappings deep"),
        (_fifo, ":1:1: this is a FIFO (named pipe), not a regular file"),
        (_big, ":1:1: the file is 2.0 MiB (2,097,152 bytes); files over 1 MiB"),
        (_folder, ":1:1: this is a directory, not a regular file"),
        (_binary, ":1:7: not UTF-8 text: byte(s) ff (invalid start byte)"),
    ],
    ids=["alias-bomb", "deep", "fifo", "2mib", "directory", "not-utf8"],
)
def test_kiln_check_reports_each(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Path],
    message: str,
) -> None:
    """`kiln check` on each refused file exits 1 and prints one located line, no traceback."""
    path = make(tmp_path)
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    (line,) = out.err.splitlines()
    assert line.startswith(f"{path}{message}")


# ----- what still loads -----


@pytest.mark.parametrize("path", sorted(SCHEDULES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_plans_still_load(path: Path) -> None:
    """Every plan in schedules/ is well inside the limits and loads."""
    assert load_plan(path).batches


def test_shipped_rules_still_load() -> None:
    """The shipped rule file, the largest YAML kiln reads, is well inside the limits."""
    assert len(load_rules().rules) > 50


def test_loading_in_threads_is_independent(tmp_path: Path) -> None:
    """Loads running at once in worker threads (as a reload does) do not disturb each other:
    good plans load and bombs are refused in every thread."""
    bomb = _bomb(tmp_path)
    good = SCHEDULES / "example.yaml"
    results: list[str] = []
    lock = threading.Lock()

    def load(path: Path) -> None:
        try:
            plan = load_plan(path)
            outcome = f"ok {plan.name}"
        except ScheduleError as e:
            outcome = "refused" if "values once aliases" in str(e) else str(e)
        with lock:
            results.append(outcome)

    workers = [threading.Thread(target=load, args=(p,)) for p in [good, bomb] * 4]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    name = load_plan(good).name
    assert sorted(results) == sorted([f"ok {name}"] * 4 + ["refused"] * 4)
