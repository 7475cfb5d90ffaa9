"""The shape of a tier stack, as data: levels fastest first, what each one is, and their roles.

The daemon builds a :class:`Layout` once from its configuration (``kvstore.tiers.stack``) and
everything that decides where blocks go (:mod:`kvstore.placement`, :mod:`kvstore.catalog`)
reads it instead of naming media. A level is a position in the stack; its tier says what it is
through :class:`Capabilities`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.errors import ConfigError
from kvstore.tier_kind import TierKind


class Addressing(enum.Enum):
    EXTENT = "extent"   # the tier hands out extents of one address space (memory, a file)
    KEY = "key"         # the tier stores objects by name (a bucket)


@dataclass(frozen=True, kw_only=True, slots=True)
class Capabilities:
    """What a medium is. Declared by each tier class."""

    persistent: bool = False   # its blocks survive a restart of the daemon
    shared: bool = False       # other daemons read and write the same blocks
    addressing: Addressing = Addressing.EXTENT
    mappable: bool = False     # byte-addressable host memory same-host clients can map
    bounded: bool = True       # has a capacity that evictions must respect
    pooled: bool = False       # other daemons' capacity, pooled: every put travels to its home there
    verifies_arrivals: bool = False   # the receiving end checks each block against the checksum sent with it


@dataclass(frozen=True, kw_only=True, slots=True)
class Watermarks:
    high: float
    low: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high <= 1:
            raise ConfigError(f"watermarks low={self.low} high={self.high} must satisfy 0 < low < high <= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class Level:
    index: int
    name: str                  # "dram", "nvme", "s3", or a plugin tier's name: labels, stats
    kind: TierKind             # what the wire reports for blocks held here
    capabilities: Capabilities
    watermarks: Watermarks | None = None

    @property
    def shared(self) -> bool:
        return self.capabilities.shared

    @property
    def forget_before_reuse(self) -> bool:
        """A dropped copy's index entry must be durably gone before its extent is reused (else a
        restart could find another block's bytes under this key)."""
        return self.capabilities.persistent and self.capabilities.addressing is Addressing.EXTENT


@dataclass(frozen=True, slots=True)
class Layout:
    """The levels of one stack, and the roles the daemon gives them."""

    levels: tuple[Level, ...]
    landing: int              # where puts land, reads are served from, and same-host clients map
    bottom: int               # the slowest local (not shared) level
    shared: tuple[int, ...]   # levels other daemons share, below the local ones

    @classmethod
    def of(cls, levels: tuple[Level, ...]) -> Layout:
        """Give roles to an ordered stack; raises ConfigError for a stack that cannot work."""
        names = [level.name for level in levels]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}")
        mappable = [level.index for level in levels if level.capabilities.mappable]
        if not mappable:
            raise ConfigError(f"the tier stack {names} has no host-memory tier for puts to land in")
        local = [level.index for level in levels if not level.shared]
        shared = tuple(level.index for level in levels if level.shared)
        if shared and local and min(shared) < max(local):
            raise ConfigError(f"shared tiers must come below every local tier, got {names}")
        for level in levels:
            if not level.shared and not level.capabilities.bounded:
                raise ConfigError(f"tier {level.name}: a local tier must have a capacity")
        return cls(levels=levels, landing=mappable[0], bottom=max(local), shared=shared)

    def below(self, level: int) -> int | None:
        """The next local level down (where ``level`` demotes to), or None at the bottom."""
        return level + 1 if level < self.bottom else None

    def first_persistent(self) -> int | None:
        """The fastest local level whose blocks survive a restart (write-through goes there)."""
        return next(
            (lv.index for lv in self.levels if lv.capabilities.persistent and not lv.shared and lv.index > self.landing),
            None,
        )
