"""Storage tiers, registered lazily by kind.

Importing this package imports no medium: :func:`create_tier` loads a tier's module only when a
daemon is configured to use it, so CUDA or boto are never pulled in by a DRAM-only daemon.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore.tier_kind import TierKind
from kvstore.tiers.base import MemoryTier, PersistentTier, Tier

_REGISTRY: dict[TierKind, str] = {
    TierKind.DRAM: "kvstore.tiers.dram:DramTier",
    TierKind.NVME: "kvstore.tiers.nvme:NvmeTier",
    TierKind.HBM: "kvstore.tiers.hbm:HbmTier",
}


def tier_class(kind: TierKind) -> type[Tier]:
    """The class implementing ``kind``; raises KeyError for a tier this build does not have."""
    module, _, name = _REGISTRY[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def create_tier(kind: TierKind, config: Any) -> Tier:
    return tier_class(kind).from_config(config)


__all__ = ["MemoryTier", "PersistentTier", "Tier", "create_tier", "tier_class"]
