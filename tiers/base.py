"""The tier contract: one medium, one class, one constructor shape.

A tier owns bytes and nothing else. It reserves a *location* for a block (an :class:`Extent` of
its address space, or an :class:`ObjectRef` in a bucket), moves bytes in and out of it, and gives
it back. What to keep, where, and for how long is decided in :mod:`kvstore` (catalog and
placement) and carried out by the mover. Every tier:

- declares ``name`` (its config section), ``kind`` (what the wire reports) and
  ``capabilities`` (persistent, shared, addressed by extent or key, mappable, bounded);
- is built with ``Tier.from_config(config)`` from its ``config_class`` and opened and closed with
  ``await tier.open()`` / ``await tier.close()``;
- raises :class:`~kvstore.errors.UnavailableError` when its medium cannot be reached right now,
  and :class:`~kvstore.errors.IntegrityError` or :class:`OSError` when the bytes it holds for a
  location are bad or gone (the block is then dropped from this tier, and read as a miss).

Persistent tiers that keep an index (NVMe) also implement :meth:`Tier.persist`,
:meth:`Tier.forget` and :meth:`Tier.recover`; key-addressed shared tiers (S3) implement
:class:`KeyedTier`'s :meth:`~KeyedTier.probe` and :meth:`~KeyedTier.remove`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.block import BlockRecord, StoredBlock
from kvstore.layout import Capabilities
from kvstore.tier_kind import TierKind


def address_of(view: memoryview) -> int:
    """The address of a (writable or read-only) memoryview's first byte in this process."""
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Where a key-addressed tier keeps one block: the block key (unscoped) and its namespace."""

    key: bytes
    namespace: bytes
    length: int


@dataclass(frozen=True, slots=True)
class ProbeInfo:
    """What a key-addressed tier says it holds for a key."""

    size: int
    checksum: int
    namespace: bytes


Location = Extent | ObjectRef


class Tier(ABC):
    name: ClassVar[str]
    kind: ClassVar[TierKind]
    capabilities: ClassVar[Capabilities]
    config_class: ClassVar[type]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> Tier:
        """Build the tier from its config dataclass (an instance of ``config_class``)."""

    @classmethod
    def unavailable(cls, config: Any) -> str | None:
        """Why this tier cannot run on this machine (no GPU, say), or None when it can."""
        return None

    @property
    def description(self) -> str:
        """One line for the start-up log."""
        return self.name

    def bind(self, counters: Any, landing: MemoryTier) -> None:
        """Given the daemon's :class:`~kvstore.stats.Counters` and its landing tier, for tiers that
        count more than the per-tier fields the mover keeps, or move bytes straight into the
        landing tier's memory (the peers)."""

    def serving_at(self, host: str, port: int) -> None:
        """The daemon listens on ``host:port`` now (called once, after :meth:`open`)."""

    async def open(self) -> None:
        """Connect to what needs the event loop. Must not wait for a remote medium to answer."""

    def warm(self) -> None:
        """Blocking preparation the daemon runs in a thread once it serves (populating memory, say),
        so that first writes run at full speed. Must be safe while the tier is in use."""

    @abstractmethod
    async def close(self) -> None:
        """Release the medium. The tier is unusable afterwards."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes it can hold (0 for an unbounded tier)."""

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def footprint(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies once reserved (alignment included)."""
        return nbytes

    @abstractmethod
    def reserve(self, record: BlockRecord) -> Location | None:
        """Reserve room for ``record``'s bytes; None when there is no room right now."""

    @abstractmethod
    def release(self, location: Location) -> None:
        """Give a reserved location back."""

    def largest_free_after(self, locations: list[Location]) -> int:
        """The largest block that would fit if ``locations`` were released (changes nothing)."""
        return self.free_bytes

    @abstractmethod
    async def write(self, location: Location, offset: int, data: memoryview) -> None:
        """Copy ``data`` into the location at ``offset`` (bytes from its start)."""

    @abstractmethod
    async def read_into(self, location: Location, offset: int, out: memoryview) -> None:
        """Fill ``out`` from the location, starting ``offset`` bytes in."""

    async def write_many(self, items: Sequence[tuple[Location, memoryview]]) -> list[BaseException | None]:
        """Write each ``data`` at the start of its location; the outcome of each (None, or what
        went wrong). Tiers that can batch (one pool job for many blocks) override it."""
        return list(await asyncio.gather(*(self.write(loc, 0, data) for loc, data in items), return_exceptions=True))

    async def read(self, location: Location, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` from the location at ``offset``, valid while the location stays reserved."""
        out = memoryview(bytearray(nbytes))
        await self.read_into(location, offset, out)
        return out

    async def persist(self, written: Sequence[tuple[BlockRecord, Location]]) -> None:
        """Make written blocks durable and findable after a restart; done when this returns.
        (Tiers without an index of their own have nothing to do.)"""

    async def write_persisted(
        self, items: Sequence[tuple[BlockRecord, Location, memoryview]]
    ) -> list[BaseException | None]:
        """:meth:`write_many` of each block's ``data`` into its location, then :meth:`persist` of
        those written: the outcome of each (None: written and durable). A persistent tier may do
        both at once (the NVMe tier commits its index while the data is written)."""
        outcomes = await self.write_many([(location, data) for _, location, data in items])
        written = [(record, location) for (record, location, _), outcome in zip(items, outcomes) if outcome is None]
        try:
            await self.persist(written)
        except Exception as exc:  # nothing of the batch is indexed: all of it failed
            return [outcome if outcome is not None else exc for outcome in outcomes]
        return outcomes

    async def forget(self, dropped: Sequence[tuple[bytes, Location]]) -> None:
        """Durably drop the index entries of ``(key, location)`` before the locations are reused.
        An entry is dropped only if it still names that location."""

    def recover(self) -> Sequence[StoredBlock]:
        """The blocks an earlier run left (from the tier's index; no data is read). Called once.
        A tier with many may return them as :class:`~kvstore.block.StoredBlocks` (columns)."""
        return []

    @staticmethod
    def _check_range(location: Location, offset: int, nbytes: int) -> None:
        if offset < 0 or offset + nbytes > location.length:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside a location of {location.length} bytes")


class KeyedTier(Tier):
    """A tier that stores objects by key, so it can be asked about blocks this daemon never saw.
    Unbounded (its owner decides how much it holds); its use is the bytes of the blocks this
    daemon's catalog names there: counted when located, given back when released (the object
    itself stays for other daemons)."""

    _used = 0

    @property
    def capacity_bytes(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @abstractmethod
    async def probe(self, keys: Sequence[bytes], namespace: bytes) -> list[ProbeInfo | None]:
        """What the tier holds for each of ``keys`` (block keys, not index keys)."""

    @abstractmethod
    async def remove(self, keys: Sequence[bytes], namespace: bytes) -> None:
        """Delete the objects of ``keys`` (held or not). Raises UnavailableError."""

    def locate(self, key: bytes, namespace: bytes, size: int) -> ObjectRef:
        """The location of a block found by :meth:`probe` or reserved; counted in :attr:`used_bytes`."""
        self._used += size
        return ObjectRef(key, namespace, size)

    def release(self, location: ObjectRef) -> None:
        self._used -= location.length


class ExtentTier(Tier):
    """A tier that is one linear address space under an ExtentAllocator."""

    _allocator: ExtentAllocator

    @property
    def capacity_bytes(self) -> int:
        return self._allocator.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._allocator.used_bytes

    def footprint(self, nbytes: int) -> int:
        return self._allocator.round_up(nbytes)

    def reserve(self, record: BlockRecord) -> Extent | None:
        return self._allocator.allocate(record.size)

    def reserve_many(self, sizes: Sequence[int]) -> list[Extent]:
        """Extents for the leading ``sizes`` that fit now, in order (a put batch's fast path; a
        tier that reserves otherwise than by size overrides both)."""
        return self._allocator.allocate_many(sizes)

    def release(self, location: Extent) -> None:
        self._allocator.free(location)

    def largest_free_after(self, locations: list[Extent]) -> int:
        return self._allocator.largest_free_after(locations)


class MemoryTier(ExtentTier):
    """A tier whose bytes are addressable host memory: reads and writes are slices of one view.

    A mappable one (``capabilities.mappable``) also hands same-host clients ``fd``, a file
    descriptor of the whole arena to map, and says whether its pages are already ``prefaulted``.
    """

    fd: int = -1
    prefaulted: bool = False
    base_address: int = 0   # where its bytes start in this process; 0 where that is not known

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
