"""The eviction policy contract, and the policies by name.

A policy orders the copies held by one tier by how much they are worth keeping. It decides and
does not act: :meth:`EvictionPolicy.victims` returns exactly the copies to remove, or nothing,
and the caller then moves bytes and reports back through :meth:`remove`. (A policy may reorder
its own queues while choosing, as S3-FIFO does; it never removes anything itself.)
:func:`kvstore.policies.make_policy` builds one by kind.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable

from kvstore.block import Copy


class PolicyKind(enum.Enum):
    """The eviction policies by name (``policy = "lru"`` in config, ``--policy s3fifo``)."""

    LRU = "lru"
    S3FIFO = "s3fifo"


class EvictionPolicy(ABC):
    @abstractmethod
    def insert(self, copy: Copy) -> None:
        """A copy became readable in this tier."""

    @abstractmethod
    def touch(self, copy: Copy) -> None:
        """A copy was read."""

    @abstractmethod
    def remove(self, copy: Copy, *, evicted: bool = False) -> None:
        """A copy left this tier (``evicted``: chosen by :meth:`victims`, not deleted)."""

    @abstractmethod
    def victims(self, nbytes: int, fits: Callable[[list[Copy]], bool] | None = None) -> list[Copy]:
        """The copies to evict so that at least ``nbytes`` are freed.

        With ``fits``, keeps adding copies until ``fits(chosen)`` is also true (for example:
        freeing them leaves one contiguous hole large enough). Returns ``[]`` when no such set
        exists, so a caller never evicts for a reservation that would still fail. Copies that are
        pinned or moving are never chosen.
        """

    @abstractmethod
    def __len__(self) -> int: ...
