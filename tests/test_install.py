"""The wheel, installed outside the checkout: a fresh virtualenv, `pip install` of the wheel
(dependencies from the package index), then `kiln run` from an empty folder answers `kiln
status`, and `kiln init` writes files the installed kiln accepts.

The wheel is the release build `make dist` makes. This test builds one into dist/ with
maturin and notes beside it a digest of its inputs (the Rust sources, the Python package,
pyproject.toml, README.md): a later run whose inputs have the same digest installs that wheel
again without building. A build takes seconds when cargo already compiled the release
extension (`make test` runs `make build-prod` first), minutes from a cold cargo cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "dist"
#: What the wheel is made of: a change to any of these makes dist/'s wheel stale.
INPUTS = ["python/kiln", "rust/src", "rust/Cargo.toml", "rust/Cargo.lock", "pyproject.toml"]
INPUTS += ["README.md"]
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"

pytestmark = [pytest.mark.install, pytest.mark.timeout(1800)]


def _inputs_digest() -> str:
    """SHA-256 over the names and contents of the wheel's inputs (not the compiled extension
    `maturin develop` leaves in the package, nor byte code)."""
    digest = hashlib.sha256()
    for name in INPUTS:
        top = REPO / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if "__pycache__" in path.parts or path.suffix in (".so", ".pyc") or path.is_dir():
                continue
            digest.update(f"{path.relative_to(REPO)}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _build_wheel(inputs: str) -> Path:
    """A release wheel for this interpreter, built into dist/ (atomically: a wheel appears
    there whole or not at all)."""
    DIST.mkdir(exist_ok=True)
    out = DIST / f".build-{os.getpid()}"
    command = [sys.executable, "-m", "maturin", "build", "--release", "--quiet"]
    command += ["--interpreter", sys.executable, "--out", str(out)]
    env = {**os.environ, "PYO3_PYTHON": sys.executable}  # as the Makefile: cargo's cache holds
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False
        )
        assert done.returncode == 0, f"maturin build failed:\n{done.stdout}\n{done.stderr}"
        built = list(out.glob(f"kiln_warmup-*-{TAG}-{TAG}-*.whl"))
        assert len(built) == 1, f"maturin built {built}"
        target = DIST / built[0].name
        built[0].replace(target)
        target.with_name(target.name + ".inputs").write_text(inputs + "\n")
        return target
    finally:
        for leftover in out.glob("*"):
            leftover.unlink()
        if out.exists():
            out.rmdir()


@pytest.fixture(scope="module")
def wheel() -> Path:
    """dist/'s wheel for this interpreter if it was built from these very inputs, else a new
    one."""
    inputs = _inputs_digest()
    for found in DIST.glob(f"kiln_warmup-*-{TAG}-{TAG}-*.whl"):
        stamp = found.with_name(found.name + ".inputs")
        if stamp.is_file() and stamp.read_text().strip() == inputs:
            return found
    return _build_wheel(inputs)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing back into the checkout or its virtualenv."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "KILN_STATE_DIR", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the repository with the wheel pip-installed in it."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    assert REPO not in home.parents
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "venv", str(home)], check=True, timeout=300, env=_clean_env()
    )
    pip = [str(home / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    done = subprocess.run(  # noqa: S603
        [*pip, "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        env=_clean_env(),
        cwd=home.parent,
        check=False,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return home


def _kiln(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed `kiln` with `args`, run in `cwd`."""
    return subprocess.run(  # noqa: S603
        [str(venv / "bin" / "kiln"), *args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def daemon(venv: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`kiln run` with no arguments but the log format, in an empty folder; SIGKILLed if a
    test leaves it running."""
    folder = tmp_path / "empty"
    folder.mkdir()
    log = (tmp_path / "kiln.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [str(venv / "bin" / "kiln"), "run", "--log-format", "json"],
        cwd=folder,
        env=_clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc, folder
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _log_records(path: Path) -> list[dict[str, object]]:
    """The daemon's JSON log lines (anything else, such as a traceback, is kept as text)."""
    records: list[dict[str, object]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"text": line})
    return records


def test_the_wheel_ships_the_engine_rules_plan_unit_and_types(wheel: Path) -> None:
    """The wheel holds the compiled engine, its stub, py.typed, the shipped reply rules, the
    embedded example plan (byte for byte schedules/example.yaml) and the systemd unit."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        plan = z.read("kiln/data/plans/example.yaml")
    assert any(n.startswith("kiln/_core.") and n.endswith(".so") for n in names)
    for name in (
        "kiln/_core.pyi",
        "kiln/py.typed",
        "kiln/data/rules.yaml",
        "kiln/data/systemd/kiln.service",
        "kiln/cli.py",
        "kiln/starter.py",
    ):
        assert name in names
    assert plan == (REPO / "schedules" / "example.yaml").read_bytes()
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "rust/"))]


def test_kiln_run_from_an_empty_folder_answers_status(
    venv: Path, daemon: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    """The installed `kiln run`, with no plan and no state folder named, runs the embedded
    example plan with its state in ./.state; the installed `kiln status`, run in the same
    folder, finds the daemon there and shows the plan's ramps; SIGTERM stops it with exit 0
    and its sockets removed."""
    proc, folder = daemon
    operator = folder / ".state" / "operator.sock"
    deadline = time.monotonic() + 90
    while not operator.exists():
        assert proc.poll() is None, (tmp_path / "kiln.log").read_text(errors="replace")
        assert time.monotonic() < deadline, "no operator socket after 90 s"
        time.sleep(0.1)
    status = _kiln(venv, "status", cwd=folder)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("plan example (Europe/Berlin)")
    rows = {tuple(line.split()[:2]) for line in lines[1:]}
    assert {("tx-2026-12", "google"), ("tx-2026-12", "default")} <= rows
    reply = json.loads(_kiln(venv, "status", "--json", cwd=folder).stdout)
    assert (reply["ok"], reply["plan"]) == (True, "example")
    ramps = {(r["batch"], r["provider"]) for r in reply["ramps"]}
    assert ramps == {("tx-2026-12", "google"), ("tx-2026-12", "default")}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not operator.exists() and not (folder / ".state" / "kiln.sock").exists()
    records = _log_records(tmp_path / "kiln.log")
    plan = [r for r in records if r.get("event") == "plan"]
    assert len(plan) == 1 and plan[0]["embedded"] is True
    assert Path(str(plan[0]["path"])).is_relative_to(venv), "the plan must come from the wheel"
    assert sorted(p.name for p in folder.iterdir()) == [".state"]


def test_installed_kiln_init_writes_what_kiln_accepts(venv: Path, tmp_path: Path) -> None:
    """The installed `kiln init DIR` writes a plan that `kiln check` accepts and a unit whose
    ExecStart runs the installed kiln on that plan; a second init refuses with exit 1."""
    first = _kiln(venv, "init", "conf", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    check = _kiln(venv, "check", "conf/plan.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    unit = (tmp_path / "conf" / "kiln.service").read_text()
    plan = tmp_path / "conf" / "plan.yaml"
    assert f"ExecStart={venv / 'bin' / 'kiln'} run --config {plan} " in unit
    again = _kiln(venv, "init", "conf", cwd=tmp_path)
    assert again.returncode == 1 and "already exist" in again.stderr
