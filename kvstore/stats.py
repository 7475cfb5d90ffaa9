"""Counters the daemon keeps; the Stats RPC and the Prometheus collector both read these.

Plain ints mutated on the event-loop thread: one source of truth, no locks, no double bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.tier_kind import TierKind


@dataclass(slots=True)
class TierCounters:
    hits: int = 0                 # blocks served from this tier (their fastest copy was here)
    evictions: int = 0            # blocks whose last copy was dropped from this tier
    evicted_bytes: int = 0
    promotions: int = 0           # blocks copied up from this tier into a faster one
    demotions: int = 0            # blocks moved down out of this tier
    integrity_failures: int = 0   # copies in this tier that failed verification
    errors: int = 0               # calls to the medium that failed (S3 unreachable, ...)
    uploads: int = 0              # blocks written to this tier in the background (S3)
    dropped_uploads: int = 0      # uploads skipped because the queue was full


@dataclass(slots=True)
class Counters:
    lookup_hit_blocks: int = 0
    lookup_miss_blocks: int = 0
    get_hit_blocks: int = 0
    get_miss_blocks: int = 0
    put_stored_blocks: int = 0
    put_present_blocks: int = 0
    put_dropped_blocks: int = 0
    deleted_blocks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    integrity_failures: int = 0
    tiers: dict[TierKind, TierCounters] = field(default_factory=dict)

    def tier(self, kind: TierKind) -> TierCounters:
        counters = self.tiers.get(kind)
        if counters is None:
            counters = self.tiers[kind] = TierCounters()
        return counters


@dataclass(frozen=True, slots=True)
class TierUsage:
    kind: TierKind
    capacity_bytes: int
    used_bytes: int
    blocks: int
