"""Health of a remote medium (a bucket): failures open a backoff window in which callers treat it
as absent, without waiting, and are counted and logged at most every few seconds."""

from __future__ import annotations

import logging
import time

from kvstore.backoff import Backoff
from kvstore.stats import TierCounters

log = logging.getLogger("kvstore.health")

LOG_EVERY_S = 5.0


class TierHealth:
    def __init__(self, name: str, backoff: Backoff, counters: TierCounters) -> None:
        self.name = name
        self._backoff = backoff
        self._counters = counters
        self._last_log = -LOG_EVERY_S

    def available(self) -> bool:
        """False during the backoff after a failure."""
        return self._backoff.available(time.monotonic())

    def failed(self, exc: Exception) -> None:
        self._counters.errors += 1
        now = time.monotonic()
        pause = self._backoff.failed(now)
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("tier %s is unavailable; serving misses for blocks only there, retrying in %.0fs (%s)",
                        self.name, pause, exc)

    def succeeded(self) -> None:
        self._backoff.succeeded()
