"""What the client's calls return: plain dataclasses, no protobuf."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvstore.tier_kind import TierKind


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``count`` leading keys are present; ``tiers[i]`` holds key ``i``."""

    count: int
    tiers: list[TierKind]


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: int    # newly stored
    present: int   # were already there (no-op)
    dropped: int   # not stored: the daemon could not free room (everything evictable in use)
    persisted: int = 0  # stored and durable on NVMe before the answer (write-through)

    @classmethod
    def from_proto(cls, msg) -> PutResult:
        return cls(stored=msg.stored, present=msg.present, dropped=msg.dropped, persisted=msg.persisted)

    def __add__(self, other: PutResult) -> PutResult:
        """The counts of two parts of one put, added up."""
        return PutResult(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: TierKind
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    evictions: int
    evicted_bytes: int
    promotions: int
    demotions: int
    integrity_failures: int
    errors: int
    uploads: int


@dataclass(frozen=True, slots=True)
class Stats:
    version: str
    uptime_s: float
    tiers: list[TierStats]
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    get_hit_blocks: int
    get_miss_blocks: int
    put_stored_blocks: int
    put_present_blocks: int
    put_dropped_blocks: int
    deleted_blocks: int
    bytes_in: int
    bytes_out: int
    integrity_failures: int

    def tier(self, kind: TierKind) -> TierStats | None:
        return next((t for t in self.tiers if t.tier is kind), None)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for t in out["tiers"]:
            t["tier"] = t["tier"].label
        return out

    @classmethod
    def from_proto(cls, msg) -> Stats:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "tiers"]
        tiers = [
            TierStats(tier=TierKind(t.tier), **{f.name: getattr(t, f.name) for f in dataclasses.fields(TierStats)[1:]})
            for t in msg.tiers
        ]
        return cls(tiers=tiers, **{name: getattr(msg, name) for name in names})
