"""kiln's exceptions. `KilnError` is the root; the engine's `CoreError` is a `ValueError`."""

from __future__ import annotations

from kiln._core import CoreError

__all__ = ["CoreError", "KilnError"]


class KilnError(Exception):
    """Base of every error kiln raises on purpose (besides the engine's `CoreError`)."""
