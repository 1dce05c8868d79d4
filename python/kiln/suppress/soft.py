"""Soft bounces onto the suppression list by rule: a recipient whose mailbox keeps failing
for a while (full, disabled) is listed with an expiry, as a bounce list kept "like a cache
with an expire field".

The plan's `suppression.soft_bounces` rules (kiln.policyspec.SoftBounceRule) say which
enhanced statuses count, how many failures within what period list an address, and for how
long. Failures are counted here, in memory, per keyed hash of (scope, address): a restart
forgets the failures counted so far (never an address already listed, which is in the log).
At most `max_tracked` recipients are followed; past that the one heard of least recently is
forgotten, so a flood of distinct failing addresses costs bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.policyspec import SoftBounceRule

__all__ = ["MAX_TRACKED", "SoftBounces", "SoftListing"]

#: Recipients followed at most (about 200 bytes each).
MAX_TRACKED = 200_000


@dataclass(frozen=True, slots=True)
class SoftListing:
    """A rule met: list the address as a soft bounce until `expires_ms`."""

    rule: int
    failures: int
    expires_ms: int


class SoftBounces:
    """Failure counts per recipient fingerprint (the engine's thread only)."""

    def __init__(self, rules: Sequence[SoftBounceRule], max_tracked: int = MAX_TRACKED) -> None:
        if max_tracked < 1:
            raise ValueError("max_tracked: at least 1")
        self.rules = list(rules)
        self.max_tracked = max_tracked
        #: How far back any rule looks: older failures are dropped.
        self._longest_ms = max((rule.within for rule in self.rules), default=0)
        self._seen: OrderedDict[int, deque[tuple[int, int]]] = OrderedDict()
        #: Recipients forgotten to keep the bound.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def matching(self, enhanced: str | None) -> list[int]:
        """The rules (by index) a reply with this enhanced status counts for."""
        if not enhanced:
            return []
        return [
            i
            for i, rule in enumerate(self.rules)
            if any(enhanced.startswith(prefix) for prefix in rule.statuses)
        ]

    def failed(self, fingerprint: int, enhanced: str | None, at_ms: int) -> SoftListing | None:
        """Count one failure of the recipient `fingerprint` at `at_ms`; the listing when a
        rule is met (its count then starts again), else None."""
        rules = self.matching(enhanced)
        if not rules:
            return None
        times = self._seen.pop(fingerprint, None)
        if times is None:
            times = deque()
            if len(self._seen) >= self.max_tracked:
                self._seen.popitem(last=False)
                self.evicted += 1
        while times and times[0][0] <= at_ms - self._longest_ms:
            times.popleft()
        for i in rules:
            times.append((at_ms, i))
        self._seen[fingerprint] = times
        for i in rules:
            rule = self.rules[i]
            count = sum(1 for t, r in times if r == i and t > at_ms - rule.within)
            if count >= rule.failures:
                del self._seen[fingerprint]
                return SoftListing(rule=i, failures=count, expires_ms=at_ms + rule.hold)
        return None
