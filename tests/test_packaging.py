"""The installed package: version in one place, the type marker, the console script."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import sysconfig
from pathlib import Path

import kiln
from kiln import _core


def test_versions_agree() -> None:
    """Distribution metadata, kiln.__version__ and the extension's version are one number."""
    assert importlib.metadata.version("kiln-warmup") == kiln.__version__ == _core.__version__


def test_py_typed_is_installed() -> None:
    """The py.typed marker ships, so users' type checkers read kiln's annotations."""
    assert importlib.resources.files("kiln").joinpath("py.typed").is_file()


def test_stub_ships_beside_the_extension() -> None:
    """_core.pyi is installed next to the compiled module."""
    assert importlib.resources.files("kiln").joinpath("_core.pyi").is_file()


def test_console_script_is_installed() -> None:
    """The `kiln` command is installed in the environment's scripts folder."""
    entry = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "kiln"
    ]
    assert [e.value for e in entry] == ["kiln.cli:console"]
    assert (Path(sysconfig.get_path("scripts")) / "kiln").is_file()
