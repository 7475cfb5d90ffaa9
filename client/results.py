"""What the client's calls return: plain dataclasses, no protobuf.

The counter fields of :class:`Stats` and :class:`TierStats` come from :data:`kvstore.stats.SCHEMA`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.stats import DAEMON_FIELDS, TIER_FIELDS, Scope, schema_dataclass
from kvstore.tier_kind import TierKind


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``count`` leading keys are present; ``tiers[i]`` holds key ``i``."""

    count: int
    tiers: Sequence[TierKind]   # a list, or a TierList over the wire's bytes


_TIER_OF = (None, *(TierKind(code) for code in range(1, max(TierKind) + 1)))   # by wire value
_KNOWN_CODES = bytes(range(1, len(_TIER_OF)))


class TierList(Sequence):
    """The tiers of a lookup as the wire sent them, one byte each, read as :class:`TierKind` when
    asked (8,192 of them are not turned into 8,192 objects unless someone reads them all)."""

    __slots__ = ("_codes",)

    def __init__(self, codes: bytes) -> None:
        if codes.translate(None, _KNOWN_CODES):   # a byte that is no tier this client knows
            raise ValueError("the daemon answered a lookup with a tier this client does not know")
        self._codes = codes

    def __len__(self) -> int:
        return len(self._codes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TierList(self._codes[index])
        return _TIER_OF[self._codes[index]]

    def __iter__(self):
        return map(_TIER_OF.__getitem__, self._codes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TierList):
            return self._codes == other._codes
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"TierList({[kind.label for kind in self]})"


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
