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
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.allocator import Extent
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


class Copy:
    """The bytes of one block in one level of the tier stack.

    A copy the catalog holds lives in its columns (:mod:`kvstore.columns`); this object is a view of
    it, made when someone asks for it, and the catalog hands out one view per copy while anyone
    keeps it. Once a copy leaves its level the view keeps its own state, holds and location (a
    dropped copy someone still reads; an orphan a move wrote). A copy made directly (tests) is
    standalone from the start.
    """

    __slots__ = ("_cat", "slot", "level", "_own", "_record", "__weakref__")

    def __init__(self, record: BlockRecord | None, level: int, location: Any, state: CopyState = CopyState.FILLING,
                 holds: int = 0) -> None:
        self._cat = None
        self.slot = -1
        self.level = level
        self._own = [state, holds, location, record]
        self._record = record

    @classmethod
    def _bound(cls, catalog: Any, slot: int, level: int, record: BlockRecord) -> Copy:
        copy = cls.__new__(cls)
        copy._cat, copy.slot, copy.level, copy._own, copy._record = catalog, slot, level, None, record
        return copy

    def _detach(self, state: CopyState, holds: int, location: Any, record: BlockRecord) -> None:
        """Leave the columns: from now on this view is the copy."""
        self._own = [state, holds, location, record]
        self._record = record
        self._cat = None

    @property
    def record(self) -> BlockRecord | None:
        return self._record

    @property
    def state(self) -> CopyState:
        if self._own is not None:
            return self._own[0]
        return self._cat.copy_state(self.slot, self.level)

    @property
    def holds(self) -> int:
        if self._own is not None:
            return self._own[1]
        return self._cat.columns[self.level].holds[self.slot]

    @holds.setter
    def holds(self, value: int) -> None:
        if self._own is not None:
            self._own[1] = value
        else:
            self._cat.columns[self.level].holds[self.slot] = value

    @property
    def location(self) -> Any:
        """Where the tier keeps it: an Extent, an ObjectRef, ..."""
        if self._own is not None:
            return self._own[2]
        return self._cat.columns[self.level].location(self.slot)

    def advance(self, state: CopyState) -> None:
        current = self.state
        if state not in _COPY_NEXT[current]:
            raise TransitionError(f"copy at level {self.level}: {current.name} -> {state.name}")
        if self._own is not None:
            self._own[0] = state
        else:
            self._cat.set_copy_state(self.slot, self.level, state)

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

    def __repr__(self) -> str:
        return f"Copy(level={self.level}, state={self.state.name}, holds={self.holds})"


class BlockRecord:
    """One block: identity, integrity, state, and where its copies are.

    Like :class:`Copy`, a record the catalog indexes is a view of its columns, one per record while
    anyone keeps it; when the record is retired the view keeps a snapshot (key, size, checksum,
    namespace) and reads as GONE with no copies. A record made directly (a tier's test, a
    reservation's probe) is standalone.
    """

    __slots__ = ("_cat", "slot", "_key", "_size", "_checksum", "_namespace", "_state", "_copies", "__weakref__")

    def __init__(self, key: bytes, size: int = 0, checksum: int | None = None, namespace: bytes = b"",
                 state: BlockState = BlockState.WRITING) -> None:
        self._cat = None
        self.slot = -1
        self._key, self._size, self._checksum, self._namespace = key, size, checksum, namespace
        self._state = state
        self._copies: dict[int, Copy] = {}

    @classmethod
    def _bound(cls, catalog: Any, slot: int) -> BlockRecord:
        record = cls.__new__(cls)
        record._cat, record.slot = catalog, slot
        record._copies = None
        return record

    def _retire(self) -> None:
        """The catalog is about to forget this record: keep what it was, read as GONE."""
        cat, slot = self._cat, self.slot
        self._key, self._size, self._namespace = cat.keys.key(slot), cat.size[slot], cat.namespace_of(slot)
        self._checksum = cat.checksum_at(slot)
        self._state = BlockState.GONE
        self._copies = {}
        self._cat = None

    @property
    def key(self) -> bytes:
        """The index key: namespace tag + block key (see kvstore.keys.scoped)."""
        return self._key if self._cat is None else self._cat.keys.key(self.slot)

    @property
    def size(self) -> int:
        return self._size if self._cat is None else self._cat.size[self.slot]

    @property
    def checksum(self) -> int | None:
        """Computed when first needed for blocks put in place."""
        return self._checksum if self._cat is None else self._cat.checksum_at(self.slot)

    @checksum.setter
    def checksum(self, value: int | None) -> None:
        if self._cat is None:
            self._checksum = value
        else:
            self._cat.set_checksum(self.slot, value)

    @property
    def namespace(self) -> bytes:
        return self._namespace if self._cat is None else self._cat.namespace_of(self.slot)

    @property
    def state(self) -> BlockState:
        return self._state if self._cat is None else _STATES[self._cat.state[self.slot]]

    @property
    def copies(self) -> dict[int, Copy]:
        """Level -> copy, for the copies in the levels (not those that left)."""
        return self._copies if self._cat is None else self._cat.copies_of(self.slot)

    def has_copy(self, level: int) -> bool:
        """Whether ``level in self.copies``, without making the copies' views."""
        return level in self._copies if self._cat is None else bool(self._cat.columns[level].state[self.slot])

    def advance(self, state: BlockState) -> None:
        """Move to ``state``; raises on a transition the lifecycle forbids."""
        current = self.state
        if state not in _BLOCK_NEXT[current]:
            raise TransitionError(f"block {key_label(self.key)}: {current.name} -> {state.name}")
        if self._cat is None:
            self._state = state
        else:
            self._cat.state[self.slot] = _STATE_CODES[state]

    def primary(self) -> Copy | None:
        """The fastest readable copy, or None."""
        if self._cat is not None:
            return self._cat.primary_of(self.slot)
        best = None
        for copy in self._copies.values():
            if copy.state is _READY and (best is None or copy.level < best.level):
                best = copy
        return best

    def readable_at(self, level: int) -> Copy | None:
        """The readable copy at ``level``, or None."""
        copy = self.copies.get(level)
        return copy if copy is not None and copy.state is CopyState.READY else None

    def __repr__(self) -> str:
        return f"BlockRecord({key_label(self.key)}, size={self.size}, state={self.state.name})"


_STATES = (BlockState.GONE, BlockState.WRITING, BlockState.READY)   # by column code
_STATE_CODES = {state: code for code, state in enumerate(_STATES)}


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """A block a persistent tier found at start-up (read from its index, not from the data)."""

    key: bytes
    size: int
    checksum: int
    namespace: bytes
    location: Any
    last_use: float


class StoredBlocks(Sequence):
    """Blocks a persistent tier found at start-up, as columns: a million of them are a few arrays,
    not a million objects, and the catalog indexes them in bulk. Reads as a sequence of
    :class:`StoredBlock` (each made when asked) for everything else. Locations are extents."""

    def __init__(self, keys: Sequence[bytes], *, offsets: np.ndarray, lengths: np.ndarray, sizes: np.ndarray,
                 checksums: np.ndarray, last_use: np.ndarray, namespaces: Sequence[bytes],
                 namespace_ids: np.ndarray) -> None:
        self.keys = keys
        self.offsets, self.lengths, self.sizes = offsets, lengths, sizes
        self.checksums, self.last_use = checksums, last_use
        self.namespaces = namespaces          # the distinct namespaces
        self.namespace_ids = namespace_ids    # per block: an index into ``namespaces``

    @classmethod
    def empty(cls) -> StoredBlocks:
        nothing = np.zeros(0, dtype=np.int64)
        return cls([], offsets=nothing, lengths=nothing, sizes=nothing, checksums=nothing.astype(np.uint64),
                   last_use=nothing.astype(np.float64), namespaces=[], namespace_ids=nothing)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices: np.ndarray) -> StoredBlocks:
        """The blocks at ``indices``, in that order."""
        return StoredBlocks(
            [self.keys[i] for i in indices.tolist()], offsets=self.offsets[indices], lengths=self.lengths[indices],
            sizes=self.sizes[indices], checksums=self.checksums[indices], last_use=self.last_use[indices],
            namespaces=self.namespaces, namespace_ids=self.namespace_ids[indices],
        )

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return StoredBlock(
            self.keys[i], int(self.sizes[i]), int(self.checksums[i]), self.namespaces[int(self.namespace_ids[i])],
            Extent(int(self.offsets[i]), int(self.lengths[i])), float(self.last_use[i]),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


def check_sizes(sizes: Sequence[int], limit: int, why: str) -> None:
    """Raise naming the first block that is empty or larger than ``limit`` (``why`` says whose)."""
    for i, size in enumerate(sizes):
        if size <= 0:
            raise InvalidArgumentError(f"block {i} is empty")
        if size > limit:
            raise BlockTooLargeError(
                f"block {i} is {size} bytes; the largest block this daemon stores is {limit} bytes ({why})"
            )
