"""Block records, their copies in the tiers, and their lifecycles.

A :class:`BlockRecord` is the daemon's knowledge of one block: its key, size, checksum and state.
Its bytes live in one or more :class:`Copy` objects, at most one per level of the tier stack (a
block promoted from NVMe to DRAM keeps its persisted NVMe copy, for instance). Reads use the
fastest readable copy. Only the :class:`~kvstore.catalog.Catalog` changes these states.

A record's state moves only forward::

    WRITING --commit--> READY --delete / last copy dropped--> GONE
       \\-------------abort-------------------------------------^

A copy's state moves only forward too::

    FILLING --filled--> READY --dropped--> DROPPED --nothing holds it--> FREED
       \\-----------------------------------^

A copy is *held* (``holds > 0``) while anything reads it, copies it elsewhere or un-indexes it:
a held copy is never chosen for eviction, and one dropped while held keeps its location until the
last hold goes; then its location goes back to its tier, exactly once. Each copy carries the links
of its tier's eviction policy (an intrusive list), so policy operations are O(1).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import BlockTooLargeError, InvalidArgumentError
from kvstore.keys import key_label


class BlockState(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    GONE = "gone"


class CopyState(enum.Enum):
    FILLING = "filling"   # reserved; its bytes are being written (a put or a move): not readable
    READY = "ready"       # readable, and known to its tier's policy
    DROPPED = "dropped"   # left its tier; its location is still held by someone
    FREED = "freed"       # its location went back to the tier


_READY = CopyState.READY  # hot paths compare against a module constant

_BLOCK_NEXT = {
    BlockState.WRITING: {BlockState.READY, BlockState.GONE},
    BlockState.READY: {BlockState.GONE},
    BlockState.GONE: set(),
}
_COPY_NEXT = {
    CopyState.FILLING: {CopyState.READY, CopyState.DROPPED},
    CopyState.READY: {CopyState.DROPPED},
    CopyState.DROPPED: {CopyState.FREED},
    CopyState.FREED: set(),
}


class TransitionError(RuntimeError):
    """A lifecycle transition the state machine forbids (a bug in the caller)."""


@dataclass(slots=True, eq=False)
class Copy:
    """The bytes of one block in one level of the tier stack."""

    record: BlockRecord | None
    level: int
    location: Any            # where the tier keeps it: an Extent, an ObjectRef, ...
    state: CopyState = CopyState.FILLING
    holds: int = 0           # readers, moves and un-indexings in progress
    freq: int = 0            # access count, saturating (scan-resistant policies)
    queue: int = 0           # which queue of the policy holds it (policy-defined)
    prev: Copy | None = None
    next: Copy | None = None

    def advance(self, state: CopyState) -> None:
        if state not in _COPY_NEXT[self.state]:
            raise TransitionError(f"copy at level {self.level}: {self.state.name} -> {state.name}")
        self.state = state

    @property
    def readable(self) -> bool:
        return self.state is CopyState.READY

    @property
    def nbytes(self) -> int:
        """Bytes this copy occupies in its tier."""
        return self.location.length

    @property
    def evictable(self) -> bool:
        return self.holds == 0 and self.state is CopyState.READY and self.record.state is BlockState.READY


@dataclass(slots=True, eq=False)
class BlockRecord:
    """One block: identity, integrity, state, and where its copies are."""

    key: bytes                    # the index key: namespace tag + block key (see kvstore.keys.scoped)
    size: int = 0
    checksum: int | None = None   # computed when first needed for blocks put in place
    namespace: bytes = b""
    state: BlockState = BlockState.WRITING
    copies: dict[int, Copy] = field(default_factory=dict)  # level -> copy

    def advance(self, state: BlockState) -> None:
        """Move to ``state``; raises on a transition the lifecycle forbids."""
        if state not in _BLOCK_NEXT[self.state]:
            raise TransitionError(f"block {key_label(self.key)}: {self.state.name} -> {state.name}")
        self.state = state

    def primary(self) -> Copy | None:
        """The fastest readable copy, or None."""
        best = None
        for copy in self.copies.values():
            if copy.state is _READY and (best is None or copy.level < best.level):
                best = copy
        return best

    def readable_at(self, level: int) -> Copy | None:
        """The readable copy at ``level``, or None."""
        copy = self.copies.get(level)
        return copy if copy is not None and copy.state is CopyState.READY else None


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """A block a persistent tier found at start-up (read from its index, not from the data)."""

    key: bytes
    size: int
    checksum: int
    namespace: bytes
    location: Any
    last_use: float


def check_sizes(sizes: Sequence[int], limit: int, why: str) -> None:
    """Raise naming the first block that is empty or larger than ``limit`` (``why`` says whose)."""
    for i, size in enumerate(sizes):
        if size <= 0:
            raise InvalidArgumentError(f"block {i} is empty")
        if size > limit:
            raise BlockTooLargeError(
                f"block {i} is {size} bytes; the largest block this daemon stores is {limit} bytes ({why})"
            )
