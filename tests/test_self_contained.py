"""The repository stands alone: nothing in it names a folder beside it, and the fixtures exist.

A clone with nothing next to it must pass the tests, so no tracked file may point at the
reading desk that once sat beside the repository (its reference pages and sample files), and
every fixture a test or bench opens must be inside `tests/fixtures/`.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
#: Folders never searched when git cannot list the tracked files.
_UNTRACKED_DIRS = {".git", ".venv", "target", "__pycache__", ".mypy_cache", ".ruff_cache"}
_UNTRACKED_DIRS |= {".hypothesis", ".pytest_cache", "results"}

# Built from parts so that this file does not match its own patterns.
_DESK = "sha" + "red"
#: What a reference to the outside folder looks like, in prose, paths or code.
OUTSIDE = [
    re.compile(re.escape("../" + _DESK)),
    re.compile(re.escape(_DESK + "/reference")),
    re.compile(re.escape(_DESK + "/fixtures")),
    re.compile(rf"""["']{_DESK}["']\s*/\s*["'](?:fixtures|reference)["']"""),
    re.compile(r"(?:warm-?up|signals)\.md`?\s*" + "\u00a7"),
]
#: File names a test might open: the fixture formats.
_FIXTURE_NAME = re.compile(r"^[\w.-]+\.(?:csv|json|jsonl|eml|txt)$")


def tracked_files() -> list[Path]:
    """Every file git tracks (or, outside a git work tree, every file but caches and builds)."""
    git = shutil.which("git")
    try:
        if git is None:
            raise FileNotFoundError("git")
        out = subprocess.run(  # noqa: S603 - git found on PATH, fixed arguments
            [git, "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [
            p
            for p in REPO.rglob("*")
            if p.is_file() and not _UNTRACKED_DIRS.intersection(p.relative_to(REPO).parts)
        ]
    return [REPO / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_the_outside_folder() -> None:
    """No tracked file (code, tests, docs, plans, rules) points outside the repository: no path
    into the sibling reading-desk folder or its `reference` and `fixtures` subfolders (see
    `OUTSIDE`), no section citation of the old reference pages."""
    files = tracked_files()
    assert len(files) > 50, "git ls-files found almost nothing"
    found: list[str] = []
    for path in files:
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def _chain(node: ast.expr) -> list[ast.expr]:
    """The operands of `a / b / c`, left to right."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [*_chain(node.left), node.right]
    return [node]


def _source_files() -> list[Path]:
    """The Python files of the tests and the benches."""
    return sorted([*(REPO / "tests").glob("*.py"), *(REPO / "benches").glob("*.py")])


def fixture_references() -> Iterator[tuple[str, Path]]:
    """(where, path) for every fixture path the tests and benches spell out.

    Three spellings are recognised: a path chain through `"fixtures"` (`... / "fixtures" /
    "warmup" / "rollup.csv"`: checked exactly), a file name divided onto a fixtures variable
    (`FIXTURES / "snds_data.csv"`, `fixture / "sendgrid_hourly.csv"`), and a file name passed
    to a helper whose name starts with `fixture` (`fixture("....json")`); the last two are
    looked up anywhere under tests/fixtures.
    """
    for source in _source_files():
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            where = f"{source.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                parts = _chain(node)
                texts = [p.value if isinstance(p, ast.Constant) else None for p in parts]
                if "fixtures" in texts:
                    tail = texts[texts.index("fixtures") + 1 :]
                    if all(isinstance(t, str) for t in tail):
                        yield where, FIXTURES.joinpath(*[str(t) for t in tail])
                    continue
                head = ast.unparse(parts[0])
                name = texts[-1]
                if "fixture" in head.lower() and isinstance(name, str):
                    if _FIXTURE_NAME.match(name):
                        yield where, _anywhere(name)
            elif isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func)
                arg = node.args[0]
                if (
                    func.lower().startswith("fixture")
                    and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and _FIXTURE_NAME.match(arg.value)
                ):
                    yield where, _anywhere(arg.value)


def _anywhere(name: str) -> Path:
    """The fixture called `name` in any folder under tests/fixtures (a missing path if none)."""
    hits = sorted(FIXTURES.rglob(name))
    return hits[0] if hits else FIXTURES / "<missing>" / name


def test_every_fixture_a_test_opens_exists() -> None:
    """Every fixture path spelled out in tests/ and benches/ exists under tests/fixtures."""
    refs = list(fixture_references())
    assert len(refs) >= 20, f"the scan found only {len(refs)} fixture references"
    missing = [f"{where}: {path}" for where, path in refs if not path.exists()]
    assert not missing, "\n".join(missing)
    assert all(path.resolve().is_relative_to(FIXTURES) for _, path in refs)


def test_every_fixture_file_is_read_by_something() -> None:
    """Each file under tests/fixtures (but its README and .gitattributes) is named by a test or
    bench: the folder holds only what is used."""
    sources = "\n".join(p.read_text() for p in _source_files())
    unused = [
        str(p.relative_to(FIXTURES))
        for p in sorted(FIXTURES.rglob("*"))
        if p.is_file() and p.name not in {"README.md", ".gitattributes"} and p.name not in sources
    ]
    assert not unused, unused
