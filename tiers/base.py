"""The tier contract: one medium, one class, one constructor shape.

A tier owns bytes and nothing else: it reserves extents, moves bytes in and out of them and frees
them. What to keep, where, and for how long is decided in :mod:`kvstore` (index and policy) and
carried out by the daemon. Every tier is built with ``Tier.from_config(config)`` and closed with
``await tier.close()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.tier_kind import TierKind


class Tier(ABC):
    kind: ClassVar[TierKind]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> Tier:
        """Build the tier from its config dataclass."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @abstractmethod
    def footprint(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies once reserved (alignment included)."""

    @abstractmethod
    def reserve(self, nbytes: int) -> Extent | None:
        """Reserve room for a block of ``nbytes``; None when there is no room right now."""

    @abstractmethod
    def release(self, extent: Extent) -> None:
        """Give a reserved extent back."""

    @abstractmethod
    def largest_free_after(self, extents: list[Extent]) -> int:
        """The largest block that would fit if ``extents`` were released (changes nothing)."""

    @abstractmethod
    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        """Copy ``data`` into the extent at ``offset`` (bytes from the extent's start)."""

    @abstractmethod
    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        """Fill ``out`` from the extent, starting ``offset`` bytes in."""

    async def read(self, extent: Extent, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` from the extent at ``offset``, valid while the block stays reserved."""
        out = memoryview(bytearray(nbytes))
        await self.read_into(extent, offset, out)
        return out

    @abstractmethod
    async def close(self) -> None:
        """Release the medium. The tier is unusable afterwards."""

    @staticmethod
    def _check_range(extent: Extent, offset: int, nbytes: int) -> None:
        if offset < 0 or offset + nbytes > extent.length:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside an extent of {extent.length} bytes")


class ExtentTier:
    """Space accounting of a tier that is one linear address space under an ExtentAllocator."""

    _allocator: ExtentAllocator

    @property
    def capacity_bytes(self) -> int:
        return self._allocator.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._allocator.used_bytes

    def footprint(self, nbytes: int) -> int:
        return self._allocator.round_up(nbytes)

    def reserve(self, nbytes: int) -> Extent | None:
        return self._allocator.allocate(nbytes)

    def release(self, extent: Extent) -> None:
        self._allocator.free(extent)

    def largest_free_after(self, extents: list[Extent]) -> int:
        return self._allocator.largest_free_after(extents)


class PersistentTier(Tier):
    """A tier whose blocks survive a restart: it keeps an index of what it holds."""

    recovered: list
    """Index entries found at start-up (``key``, ``offset``, ``length``, ``size``, ``checksum``)."""

    @abstractmethod
    async def persist(self, entries: Sequence[Any]) -> None:
        """Make written blocks durable and indexed; done when this returns."""

    @abstractmethod
    async def forget(self, entries: Sequence[tuple[bytes, int]]) -> None:
        """Durably drop ``(key, offset)`` entries from the index, before their extents are reused.

        An entry is dropped only if it still names that offset: a newer copy of the same key
        written elsewhere keeps its entry."""


class MemoryTier(Tier):
    """A tier whose bytes are addressable memory: reads and writes are slices of one view."""

    @abstractmethod
    def view(self, extent: Extent, nbytes: int) -> memoryview:
        """A writable view of the first ``nbytes`` of ``extent`` (no copy)."""

    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        self._check_range(extent, offset, data.nbytes)
        self.view(extent, extent.length)[offset : offset + data.nbytes] = data

    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        self._check_range(extent, offset, out.nbytes)
        out[:] = self.view(extent, extent.length)[offset : offset + out.nbytes]

    async def read(self, extent: Extent, offset: int, nbytes: int) -> memoryview:
        self._check_range(extent, offset, nbytes)
        return self.view(extent, extent.length)[offset : offset + nbytes]
