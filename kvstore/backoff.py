"""Backoff after failures: one policy object instead of retry loops hand-rolled per caller.

A medium that failed (a bucket that did not answer) is left alone for a while, so callers see a
miss at once instead of each waiting for a timeout; the pause doubles with each failure up to a
bound and resets on the first success. Pure: the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    base_s: float
    growth: float = 30.0          # the pause doubles up to this multiple of base_s
    down_until: float = 0.0
    _pause_s: float = field(default=0.0, repr=False)

    def available(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns how long the medium is left alone."""
        pause = self._pause_s or self.base_s
        self.down_until = now + pause
        self._pause_s = min(pause * 2, self.base_s * self.growth)
        return pause

    def succeeded(self) -> None:
        self._pause_s = 0.0
