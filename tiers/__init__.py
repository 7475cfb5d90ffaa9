"""Storage tiers, loaded lazily by class path.

Importing this package imports no medium: :func:`tier_class` loads a tier's module only when a
daemon is configured to use it, so CUDA or boto are never pulled in by a DRAM-only daemon. The
built-in tiers are named in :data:`kvstore.config.BUILTIN_TIERS`; plugin tiers give their own
``module:Class``.
"""

from __future__ import annotations

import importlib

from kvstore.config import BUILTIN_TIERS
from kvstore.errors import ConfigError
from kvstore.tiers.base import ExtentTier, KeyedTier, Location, MemoryTier, ObjectRef, ProbeInfo, Tier


def tier_class(path: str) -> type[Tier]:
    """The class at ``module:Class`` (or a built-in tier's name); ConfigError if it is not a Tier."""
    module_name, _, class_name = BUILTIN_TIERS.get(path, path).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"tier class {path!r} cannot be loaded ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Tier)):
        raise ConfigError(f"tier class {path!r} is not a kvstore.tiers.Tier")
    return cls


def create_tier(path: str, config) -> Tier:
    """Build one tier from its class path (or built-in name) and config dataclass."""
    return tier_class(path).from_config(config)


__all__ = [
    "ExtentTier", "KeyedTier", "Location", "MemoryTier", "ObjectRef", "ProbeInfo", "Tier", "create_tier", "tier_class",
]
