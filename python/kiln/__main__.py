"""`python -m kiln`: the same as the `kiln` command."""

from __future__ import annotations

from kiln.cli import console

console()
