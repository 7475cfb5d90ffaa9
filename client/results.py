"""What the client's calls return: plain dataclasses, no protobuf.

The counter fields of :class:`Stats` and :class:`TierStats` come from :data:`kvstore.stats.SCHEMA`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvstore.stats import DAEMON_FIELDS, TIER_FIELDS, Scope, schema_dataclass
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
class TierStats(schema_dataclass(Scope.TIER, frozen=True)):
    """One tier's usage, plus its counters: the per-tier fields of :data:`kvstore.stats.SCHEMA`."""

    tier: TierKind
    name: str              # the tier's name in the daemon's stack ("dram", "nvme", "s3", or a plugin's)
    capacity_bytes: int    # 0: unbounded (S3)
    used_bytes: int
    blocks: int


@dataclass(frozen=True, slots=True)
class Stats(schema_dataclass(Scope.DAEMON, frozen=True)):
    """A daemon's counters (the per-daemon fields of :data:`kvstore.stats.SCHEMA`) and one row per tier."""

    version: str
    uptime_s: float
    tiers: list[TierStats]

    def tier(self, kind: TierKind) -> TierStats | None:
        """The first tier of ``kind`` in the stack, or None."""
        return next((t for t in self.tiers if t.tier is kind), None)

    def tier_named(self, name: str) -> TierStats | None:
        """The tier called ``name``, or None."""
        return next((t for t in self.tiers if t.name == name), None)

    def as_dict(self) -> dict:
        """Plain JSON-ready values; a tier row's ``tier`` is its kind's label, ``name`` its name."""
        out = dataclasses.asdict(self)
        for t in out["tiers"]:
            t["tier"] = t["tier"].label
        return out

    @classmethod
    def from_proto(cls, msg) -> Stats:
        tiers = [
            TierStats(
                tier=TierKind(t.tier), name=t.name,
                capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, blocks=t.blocks,
                **{f.name: getattr(t, f.name) for f in TIER_FIELDS},
            )
            for t in msg.tiers
        ]
        return cls(
            version=msg.version, uptime_s=msg.uptime_s, tiers=tiers,
            **{f.name: getattr(msg, f.name) for f in DAEMON_FIELDS},
        )
