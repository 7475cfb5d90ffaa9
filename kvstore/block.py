"""Block records and their lifecycle.

A record is the daemon's whole knowledge of one stored block. Its state moves only forward::

    WRITING --commit--> READY --evict/delete--> GONE
       \\-------------abort---------------------^

Only READY blocks are visible to lookups and gets. A block leaves READY the moment it is evicted
or deleted, but its bytes stay reserved while readers hold pins on it; the tier frees them when the
last pin is released. The LRU links live on the record itself (an intrusive list), so moving a
block to the hot end or unlinking it from the middle is O(1) with no allocation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from kvstore.tier_kind import TierKind


class BlockState(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    GONE = "gone"


_ALLOWED = {
    BlockState.WRITING: {BlockState.READY, BlockState.GONE},
    BlockState.READY: {BlockState.GONE},
    BlockState.GONE: set(),
}


@dataclass(slots=True, eq=False)
class BlockRecord:
    """One block in one tier: where its bytes are, how to verify them, who is reading them."""

    key: bytes
    size: int = 0
    checksum: int | None = None   # computed when first needed for blocks put in place
    tier: TierKind = TierKind.DRAM
    extent: Any = None
    state: BlockState = BlockState.WRITING
    pins: int = 0
    prev: BlockRecord | None = None
    next: BlockRecord | None = None

    def advance(self, state: BlockState) -> None:
        """Move to ``state``; raises on a transition the lifecycle forbids."""
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"block {self.key.hex()[:16]}: {self.state.name} -> {state.name}")
        self.state = state

    @property
    def evictable(self) -> bool:
        return self.state is BlockState.READY and self.pins == 0
