"""The docs cite only names that exist: Rust items, Python modules, classes and methods, and
repository paths. A rename that forgets a page fails here instead of misleading a reader."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "schedules" / "README.md"])
#: Crates whose paths the docs may cite without kiln defining them.
EXTERNAL_CRATES = {"std", "core", "alloc", "serde", "serde_json", "pyo3", "regex"}
#: `kiln.*` words that are file names in the state folder, not Python modules.
STATE_FILES = {"kiln.db", "kiln.sock", "kiln.state"}


def _rust_source() -> str:
    """Every Rust source file of the core, joined."""
    return "\n".join(p.read_text() for p in sorted((REPO / "rust" / "src").rglob("*.rs")))


def _python_classes() -> dict[str, set[str]]:
    """Class name -> its attribute and method names, over the package and the engine stub."""
    classes: dict[str, set[str]] = {}
    files = [*(REPO / "python" / "kiln").rglob("*.py"), REPO / "python" / "kiln" / "_core.pyi"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            names = classes.setdefault(node.name, set())
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return classes


def _cited(pattern: str) -> list[tuple[str, re.Match[str]]]:
    """(page, match) for every backticked citation matching `pattern` on every page."""
    return [
        (str(page.relative_to(REPO)), m)
        for page in PAGES
        for m in re.finditer(rf"`({pattern})`", page.read_text())
    ]


def test_rust_items_the_docs_cite_exist() -> None:
    """`Type::item` and `module::Item` name a type or module of rust/src and a function,
    constant or variant in it (`Rules::classify`, renamed `Classifier::classify`, would fail)."""
    rust = _rust_source()
    missing = []
    for page, m in _cited(r"[A-Za-z_]\w*(?:::[A-Za-z_]\w*)+"):
        parts = m[1].split("::")
        if parts[0] in EXTERNAL_CRATES:
            continue
        owner, item = parts[-2], parts[-1]
        owner_ok = (
            bool(re.search(rf"\b(?:struct|enum|trait|mod|type)\s+{owner}\b", rust))
            or (REPO / "rust" / "src" / f"{owner}.rs").exists()
        )
        item_ok = bool(
            re.search(rf"\b(?:fn|struct|enum|const|static|type|trait)\s+{item}\b", rust)
            or re.search(rf"^\s*{item}\s*[,({{]", rust, re.MULTILINE)
        )
        if not (owner_ok and item_ok):
            missing.append(f"{page}: {m[1]}")
    assert missing == []


def test_python_names_the_docs_cite_exist() -> None:
    """`kiln.module.name` imports and resolves; `Class.method` names a method or attribute of
    a class of the package (or of the engine's stub)."""
    missing = []
    for page, m in _cited(r"kiln(?:\.[A-Za-z_]\w*)+"):
        if m[1] in STATE_FILES:
            continue
        parts = m[1].split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(f"{page}: {m[1]}")
            break
        else:
            missing.append(f"{page}: {m[1]}")
    classes = _python_classes()
    for page, m in _cited(r"[A-Z]\w*\.[a-z_]\w*(?:\(\))?"):
        owner, _, name = m[1].removesuffix("()").partition(".")
        if name not in classes.get(owner, set()):
            missing.append(f"{page}: {m[1]}")
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_the_docs_cite_exist(page: Path) -> None:
    """Every backticked path into the repository (`rust/src/...`, `python/kiln/...`,
    `tests/...`, `schedules/...`, `docs/...`, `benches/...`, `contrib/...`) exists."""
    roots = "rust|python|tests|schedules|docs|benches|contrib"
    cited = re.findall(rf"`((?:{roots})/[\w./-]+)`", page.read_text())
    # Folders a make target writes (`make bench`: benches/results/) are ignored by git, so a
    # fresh clone has none of them; the docs may still name them.
    generated = tuple(
        line.strip("/")
        for line in (REPO / ".gitignore").read_text().splitlines()
        if line.startswith("/")
    )
    missing = [
        p
        for p in cited
        if not (REPO / p.rstrip("/")).exists() and not p.rstrip("/").startswith(generated)
    ]
    assert missing == []
