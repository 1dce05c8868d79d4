"""The `kiln` command as a function."""

from __future__ import annotations

import pytest

import kiln
from kiln.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln --version` prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiln {kiln.__version__}"


def test_run_says_the_daemon_is_not_there_yet(capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln run` succeeds and says plainly that the daemon is not available yet."""
    assert main(["run", "--config", "schedules/example.yaml"]) == 0
    assert "daemon not yet available" in capsys.readouterr().out


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a verb, kiln prints its help and exits 2 (a usage error)."""
    assert main([]) == 2
    assert "usage: kiln" in capsys.readouterr().out
