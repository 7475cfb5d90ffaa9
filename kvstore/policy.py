"""The eviction policy contract, and the policies by name.

A policy orders the copies held by one level by how much they are worth keeping. A copy is a slot
of the catalog's columns; the policy keeps its links and marks in the level's columns, handed to
it once by :meth:`EvictionPolicy.bind`, so it costs no object per block. It decides and does not
act: :meth:`EvictionPolicy.victims` returns exactly the slots to evict, or nothing, and the caller
then moves bytes and reports back through :meth:`remove`. (A policy may reorder its own queues
while choosing, as S3-FIFO does; it never removes anything itself.)
:func:`kvstore.policies.make_policy` builds one by kind.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass


class PolicyKind(enum.Enum):
    """The eviction policies by name (``policy = "lru"`` in config, ``--policy s3fifo``)."""

    LRU = "lru"
    S3FIFO = "s3fifo"


@dataclass(frozen=True, slots=True)
class LevelView:
    """What a policy may use of one level's columns: per-slot links, marks and footprint, and
    two questions it asks the catalog."""

    prev: MutableSequence[int]
    next: MutableSequence[int]
    freq: MutableSequence[int]
    queue: MutableSequence[int]     # 0: in no queue of the policy; otherwise policy-defined
    length: MutableSequence[int]    # bytes the copy occupies in its tier
    evictable: Callable[[int], bool]   # not held, readable, its block readable
    ghost_key: Callable[[int], int]    # a stable number for the block (S3-FIFO's ghost set)


class EvictionPolicy(ABC):
    view: LevelView

    def bind(self, view: LevelView) -> None:
        """Take the level's columns (once, before any other call)."""
        self.view = view

    @abstractmethod
    def insert(self, slot: int) -> None:
        """A copy became readable in this level."""

    def insert_many(self, slots: Sequence[int]) -> None:
        """:meth:`insert` each of ``slots``, oldest first (a restart's bulk index)."""
        for slot in list(slots):
            self.insert(int(slot))

    @abstractmethod
    def touch(self, slot: int) -> None:
        """A copy was read."""

    @abstractmethod
    def remove(self, slot: int, *, evicted: bool = False) -> None:
        """A copy left this level (``evicted``: chosen by :meth:`victims`, not deleted)."""

    @abstractmethod
    def victims(self, nbytes: int, fits: Callable[[list[int]], bool] | None = None) -> list[int]:
        """The slots to evict so that at least ``nbytes`` are freed.

        With ``fits``, keeps adding copies until ``fits(chosen)`` is also true (for example:
        freeing them leaves one contiguous hole large enough). Returns ``[]`` when no such set
        exists, so a caller never evicts for a reservation that would still fail. Copies that are
        held or moving are never chosen.
        """

    @abstractmethod
    def oldest_first(self) -> Iterator[int]:
        """Every copy in the policy, the first to go first (roughly, for policies with queues)."""

    @abstractmethod
    def __len__(self) -> int: ...
