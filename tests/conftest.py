"""Shared test settings: two hypothesis profiles, few examples locally and many in CI.

`KILN_HYPOTHESIS_PROFILE=dev|ci` picks one; without it, "ci" when the `CI` environment
variable is set (as CI services do), else "dev".
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("KILN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)
