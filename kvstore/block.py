"""Block records, their copies in the tiers, and their lifecycle.

A :class:`BlockRecord` is the daemon's knowledge of one block: its key, size, checksum and state.
Its bytes live in one or more :class:`Copy` objects, at most one per tier (a block promoted from
NVMe to DRAM keeps its persisted NVMe copy, for instance). Reads use the fastest filled copy.

A record's state moves only forward::

    WRITING --commit--> READY --delete / last copy dropped--> GONE
       \\-------------abort-------------------------------------^

Only READY records with a filled copy are visible to lookups and gets. A copy being read is
pinned; a pinned copy is never evicted or moved, and one dropped while pinned keeps its bytes
until the last pin is released. Each copy carries the links of its tier's eviction policy (an
intrusive list), so policy operations are O(1) and allocate nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import BlockTooLargeError, InvalidArgumentError
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
class Copy:
    """The bytes of one block in one tier."""

    record: BlockRecord | None
    tier: TierKind
    extent: Any
    filled: bool = False     # all bytes are in place (a copy being written or promoted is not)
    pins: int = 0            # readers copying out of it right now
    moving: bool = False     # being copied to another tier: not evictable meanwhile
    dropped: bool = False    # left its tier; its extent is freed when the last pin goes...
    forgetting: bool = False  # ...and, for a persistent tier, once its index entry is durably gone
    freed: bool = False      # its extent went back to the tier (exactly once)
    freq: int = 0            # access count, saturating (scan-resistant policies)
    queue: int = 0           # which queue of the policy holds it (policy-defined)
    prev: Copy | None = None
    next: Copy | None = None

    @property
    def evictable(self) -> bool:
        return self.pins == 0 and not self.moving and self.filled and self.record.state is BlockState.READY


@dataclass(slots=True, eq=False)
class BlockRecord:
    """One block: identity, integrity, state, and where its copies are."""

    key: bytes                    # the index key: namespace tag + block key (see kvstore.keys.scoped)
    size: int = 0
    checksum: int | None = None   # computed when first needed for blocks put in place
    namespace: bytes = b""
    state: BlockState = BlockState.WRITING
    copies: dict[TierKind, Copy] = field(default_factory=dict)

    def advance(self, state: BlockState) -> None:
        """Move to ``state``; raises on a transition the lifecycle forbids."""
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"block {self.key.hex()[:16]}: {self.state.name} -> {state.name}")
        self.state = state

    def primary(self) -> Copy | None:
        """The fastest filled copy, or None."""
        best = None
        for tier, copy in self.copies.items():
            if copy.filled and (best is None or tier < best.tier):
                best = copy
        return best


def check_sizes(sizes: Sequence[int], limit: int, why: str) -> None:
    """Raise naming the first block that is empty or larger than ``limit`` (``why`` says whose)."""
    for i, size in enumerate(sizes):
        if size <= 0:
            raise InvalidArgumentError(f"block {i} is empty")
        if size > limit:
            raise BlockTooLargeError(
                f"block {i} is {size} bytes; the largest block this daemon stores is {limit} bytes ({why})"
            )
