"""The eviction policy contract.

A policy orders the READY blocks of one tier by how much they are worth keeping. It decides and
never acts: :meth:`EvictionPolicy.victims` returns exactly the blocks to remove, or nothing, and
changes no state; the caller then moves bytes and reports back through :meth:`remove`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from kvstore.block import BlockRecord


class EvictionPolicy(ABC):
    @abstractmethod
    def insert(self, record: BlockRecord) -> None:
        """A block became READY in this tier."""

    @abstractmethod
    def touch(self, record: BlockRecord) -> None:
        """A block was read."""

    @abstractmethod
    def remove(self, record: BlockRecord) -> None:
        """A block left this tier (evicted, deleted, moved)."""

    @abstractmethod
    def victims(
        self, nbytes: int, fits: Callable[[list[BlockRecord]], bool] | None = None
    ) -> list[BlockRecord]:
        """The coldest unpinned blocks whose bytes add up to at least ``nbytes``.

        With ``fits``, keeps adding blocks until ``fits(chosen)`` is also true (for example:
        freeing them leaves one contiguous hole large enough). Returns ``[]`` when no such set
        exists, so a caller never evicts for a reservation that would still fail.
        """

    @abstractmethod
    def __len__(self) -> int: ...
