"""Shared test settings: two hypothesis profiles, few examples locally and many in CI.

`KILN_HYPOTHESIS_PROFILE=dev|ci` picks one; without it, "ci" when the `CI` environment
variable is set (as CI services do), else "dev".

Tests marked `soak` (the 10 minute soak) are deselected unless `-m` names that marker, so a
normal run reports them as deselected, never as skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from pgserver import PostgresUnavailableError, create_database, running_postgres

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("KILN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the 10 minute soak unless the marker expression selects it (`-m soak`)."""
    words = set(re.findall(r"\w+", config.getoption("markexpr") or ""))
    if "soak" in words and "not" not in words:
        return
    keep = [item for item in items if item.get_closest_marker("soak") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of an empty database on a private PostgreSQL server started for this test session.

    The URL names a superuser, so tests may create more databases (`pgserver.create_database`).
    Without PostgreSQL the tests that need it fail (they never skip).
    """
    try:
        with running_postgres() as server:
            yield create_database(server.url("postgres"), "kiln_test")
    except PostgresUnavailableError as exc:
        pytest.fail(f"PostgreSQL is needed for these tests: {exc}", pytrace=False)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder an MTA's own users (Exim's, Postfix's) can reach: pytest's tmp_path is
    private to root. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="kiln-mta-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
