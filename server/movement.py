"""Moving blocks between tiers: room-making, demotion, promotion, write-through.

- :meth:`Mover.make_room` reserves space in a tier, evicting that tier's coldest copies first:
  a copy is *demoted* (its bytes written to the tier below, durably where that tier is
  persistent) unless the block already has a copy lower down or this is the bottom tier, where it
  is dropped.
- :meth:`Mover.rebalance` is the background step: every tier with a tier below it that is filled
  past its high watermark demotes its coldest copies until it is under the low one, so puts rarely
  wait for a disk. The bottom tier is never emptied ahead of need (that would only lose blocks);
  it evicts when a reservation needs the room.
- :meth:`Mover.promote` brings a block whose fastest copy is on NVMe into DRAM for a reader,
  verifying its checksum on the way: a block that fails is dropped and is a miss. The new DRAM copy
  then competes in DRAM's policy like any other (under S3-FIFO it must be read again to stay).
- :meth:`Mover.persist` writes a DRAM block to NVMe as soon as it is put (write-through).

Copies being read are pinned and copies being moved are marked ``moving``: neither is chosen as a
victim, and a copy dropped meanwhile keeps its bytes until both marks are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from kvstore.allocator import Extent
from kvstore.block import BlockRecord, BlockState, Copy
from kvstore.checksum import checksum
from kvstore.tier_kind import TierKind
from kvstore.tiers import PersistentTier
from kvstore.tiers.nvme_index import IndexEntry

log = logging.getLogger("kvstore.movement")

REBALANCE_BATCH_BYTES = 256 << 20
NO_ROOM = object()
"""What :meth:`Mover.promote` returns when DRAM has no room (everything in it is in use)."""


class Mover:
    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self._order = list(daemon.tiers)  # fastest first
        self._promoting: dict[bytes, asyncio.Future] = {}

    def below(self, kind: TierKind) -> TierKind | None:
        i = self._order.index(kind)
        return self._order[i + 1] if i + 1 < len(self._order) else None

    async def make_room(self, kind: TierKind, size: int) -> Extent | None:
        """Reserve ``size`` bytes in tier ``kind``, evicting its coldest copies as needed."""
        d = self.daemon
        tier, policy = d.tiers[kind], d.policies[kind]
        for _ in range(3):  # others may take freed room while evictions wait for a disk
            extent = tier.reserve(size)
            if extent is not None:
                return extent
            length = tier.footprint(size)
            victims = policy.victims(
                max(length - tier.free_bytes, 1),
                fits=lambda chosen: tier.largest_free_after([c.extent for c in chosen]) >= length,
            )
            if not victims:
                return None
            await self.evict(victims)
        return tier.reserve(size)

    async def evict(self, victims: Sequence[Copy]) -> None:
        """Take copies (all of one tier) out of it: demote them one tier down, or drop them (to
        S3 first, from the bottom tier, when a bucket is configured)."""
        if not victims:
            return
        kind = victims[0].tier
        below = self.below(kind)
        if below is not None:
            pending = [c for c in victims if below not in c.record.copies]
            await self._demote(pending, below)
        elif self.daemon.objects is not None:
            pending = [c for c in victims if TierKind.S3 not in c.record.copies]
            for copy in pending:
                copy.moving = True
            try:
                await self.daemon.objects.upload([c.record for c in pending])
            finally:
                for copy in pending:
                    self._unmark(copy)
        await self.drop(victims, evicted=True)

    async def _demote(self, copies: Sequence[Copy], below: TierKind) -> None:
        d = self.daemon
        lower = d.tiers[below]
        for copy in copies:
            copy.moving = True
        try:
            targets: list[tuple[Copy, Extent]] = []
            for copy in copies:
                if copy.record.state is BlockState.READY and not copy.dropped:
                    extent = await self.make_room(below, copy.record.size)
                    if extent is not None:
                        targets.append((copy, extent))
            for copy, _ in targets:
                d.checksum_of(copy.record)  # persisted copies carry it
            await asyncio.gather(*(self._copy_bytes(copy, extent, below) for copy, extent in targets))
            await self._index(below, [(copy.record, extent) for copy, extent in targets])
            for copy, extent in targets:
                if self._adopt(copy.record, below, extent):
                    d.counters.tier(copy.tier).demotions += 1
        finally:
            for copy in copies:
                self._unmark(copy)

    async def promote(self, record: BlockRecord) -> Copy | object | None:
        """A filled DRAM copy of ``record`` read up from its fastest copy; None if the block is gone
        or failed verification, :data:`NO_ROOM` if DRAM has no room for it now."""
        waiting = self._promoting.get(record.key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        self._promoting[record.key] = future
        copy = None
        try:
            copy = await self._promote(record)
            return copy
        finally:
            del self._promoting[record.key]
            future.set_result(copy)

    async def _promote(self, record: BlockRecord) -> Copy | None:
        d = self.daemon
        source = record.primary()
        if source is None or source.tier is TierKind.DRAM:
            return source
        source.pins += 1
        try:
            extent = await self.make_room(TierKind.DRAM, record.size)
            if extent is None:
                return NO_ROOM
            copy = Copy(record=record, tier=TierKind.DRAM, extent=extent, moving=True)
            if record.state is not BlockState.READY:
                d.dram.release(extent)
                return None
            record.copies[TierKind.DRAM] = copy
            fetched = True
            try:
                if source.tier is TierKind.S3:
                    fetched = await d.objects.fetch_into(record, d.dram.view(extent, extent.length))
                else:
                    n = min(source.extent.length, extent.length)
                    await d.tiers[source.tier].read_into(source.extent, 0, d.dram.view(extent, n))
            except BaseException:
                copy.dropped = True
                record.copies.pop(TierKind.DRAM, None)
                raise
            finally:
                copy.moving = False
            if fetched is None:  # S3 unavailable: a miss this time, the block stays known
                record.copies.pop(TierKind.DRAM, None)
                d.dram.release(extent)
                return None
            if copy.dropped or record.state is not BlockState.READY:
                if not copy.dropped:
                    record.copies.pop(TierKind.DRAM, None)
                d.dram.release(extent)
                return None
            if not fetched or checksum(d.dram.view(extent, record.size)) != record.checksum:
                log.warning("block %s failed verification on %s: dropped", record.key.hex()[:16], source.tier.label)
                d.counters.integrity_failures += 1
                d.counters.tier(source.tier).integrity_failures += 1
                record.copies.pop(TierKind.DRAM, None)
                d.dram.release(extent)
                await self.drop([source])
                return None
            copy.filled = True
            d.policies[TierKind.DRAM].insert(copy)
            d.counters.tier(source.tier).promotions += 1
            return copy
        finally:
            self.unpin(source)

    async def persist(self, record: BlockRecord) -> bool:
        """Write-through: give a DRAM block a durable NVMe copy now; False if there was no room."""
        d = self.daemon
        if TierKind.NVME in record.copies:
            return True
        source = record.copies.get(TierKind.DRAM)
        if d.nvme is None or source is None:
            return False
        source.pins += 1
        try:
            extent = await self.make_room(TierKind.NVME, record.size)
            if extent is None:
                return False
            d.checksum_of(record)
            await self._copy_bytes(source, extent, TierKind.NVME)
            await self._index(TierKind.NVME, [(record, extent)])
            return self._adopt(record, TierKind.NVME, extent)
        finally:
            self.unpin(source)

    async def rebalance(self) -> int:
        """One background step: demote from every over-full tier that has a tier below it."""
        d = self.daemon
        moved = 0
        for kind in self._order[:-1]:
            tier, config = d.tiers[kind], getattr(d.config, kind.label)
            if tier.used_bytes <= config.high_watermark * tier.capacity_bytes:
                continue
            excess = tier.used_bytes - int(config.low_watermark * tier.capacity_bytes)
            victims = d.policies[kind].victims(min(excess, REBALANCE_BATCH_BYTES))
            if not victims:
                victims = d.policies[kind].victims(min(excess, REBALANCE_BATCH_BYTES) // 2 or 1)
            await self.evict(victims)
            moved += len(victims)
        return moved

    async def drop(self, copies: Sequence[Copy], *, evicted: bool = False) -> None:
        """Remove copies from their tiers; a record left with no copy is gone.

        Index entries of persistent copies are deleted (durably) before their extents are freed.
        """
        d = self.daemon
        forget: dict[TierKind, list[Copy]] = {}
        gone: list[Copy] = []
        for copy in copies:
            if copy.dropped:
                continue
            record = copy.record
            copy.dropped = True
            if record.copies.get(copy.tier) is copy:
                del record.copies[copy.tier]
            if copy.tier is TierKind.S3:
                d.objects.detached(record)  # nothing local to free
            else:
                d.policies[copy.tier].remove(copy, evicted=evicted)
            if evicted and not record.copies:
                counters = d.counters.tier(copy.tier)
                counters.evictions += 1
                counters.evicted_bytes += record.size
            if record.state is BlockState.READY and record.primary() is None:
                record.advance(BlockState.GONE)
                d.index.discard(record)
            if copy.tier is TierKind.S3:
                continue
            if isinstance(d.tiers[copy.tier], PersistentTier) and copy.filled:
                forget.setdefault(copy.tier, []).append(copy)
            else:
                gone.append(copy)
        for kind, persisted in forget.items():
            await d.tiers[kind].forget([c.record.key for c in persisted])
            gone += persisted
        for copy in gone:
            if copy.pins == 0 and not copy.moving:
                d.tiers[copy.tier].release(copy.extent)

    async def _copy_bytes(self, source: Copy, extent: Extent, kind: TierKind) -> None:
        d = self.daemon
        n = min(source.extent.length, extent.length)
        data = await d.tiers[source.tier].read(source.extent, 0, n)
        await d.tiers[kind].write(extent, 0, data)

    async def _index(self, kind: TierKind, written: Sequence[tuple[BlockRecord, Extent]]) -> None:
        tier = self.daemon.tiers[kind]
        if isinstance(tier, PersistentTier) and written:
            now = time.time()
            await tier.persist([
                IndexEntry(r.key, e.offset, e.length, r.size, r.checksum, now, r.namespace) for r, e in written
            ])

    def _adopt(self, record: BlockRecord, kind: TierKind, extent: Extent) -> bool:
        """Attach a freshly written (and indexed) copy, unless the block went away meanwhile."""
        d = self.daemon
        if record.state is not BlockState.READY or kind in record.copies:
            orphan = Copy(record=record, tier=kind, extent=extent, filled=True)
            asyncio.ensure_future(self.drop([orphan]))  # un-index and free it
            return False
        copy = Copy(record=record, tier=kind, extent=extent, filled=True)
        record.copies[kind] = copy
        d.policies[kind].insert(copy)
        if d.objects is not None and kind is d.bottom:
            d.objects.enqueue(record)  # write-behind to the bucket
        return True

    def unpin(self, copy: Copy) -> None:
        copy.pins -= 1
        self._free_if_dropped(copy)

    def _unmark(self, copy: Copy) -> None:
        copy.moving = False
        self._free_if_dropped(copy)

    def _free_if_dropped(self, copy: Copy) -> None:
        if copy.dropped and copy.pins == 0 and not copy.moving:
            self.daemon.tiers[copy.tier].release(copy.extent)
