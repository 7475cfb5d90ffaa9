"""The closed set of storage tiers, fastest first."""

from __future__ import annotations

import enum


class TierKind(enum.IntEnum):
    """Where a block lives. Values match ``kvstore.v1.Tier`` on the wire (0 is "unspecified")."""

    HBM = 1
    DRAM = 2
    NVME = 3
    S3 = 4
    PEER = 5

    @property
    def label(self) -> str:
        """Lower-case name used in config, metrics labels and tables."""
        return self.name.lower()
