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

REBALANCE_BATCH_BYTES = 32 << 20
BUSY_WAIT_S = 2.0
NO_ROOM = object()
"""What :meth:`Mover.promote` returns when DRAM has no room (everything in it is in use)."""


class Mover:
    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self._order = list(daemon.tiers)  # fastest first
        self._promoting: dict[bytes, asyncio.Future] = {}
        self.busy = 0  # moves in flight that hold copies (pinned or moving) they will let go of

    def below(self, kind: TierKind) -> TierKind | None:
        i = self._order.index(kind)
        return self._order[i + 1] if i + 1 < len(self._order) else None

    async def make_room(self, kind: TierKind, size: int) -> Extent | None:
        """Reserve ``size`` bytes in tier ``kind``, evicting its coldest copies as needed."""
        d = self.daemon
        tier, policy = d.tiers[kind], d.policies[kind]
        waited = 0.0
        for _ in range(3):  # others may take freed room while evictions wait for a disk
            extent = tier.reserve(size)
            if extent is not None:
                return extent
            length = tier.footprint(size)

            def choose() -> list[Copy]:
                return policy.victims(
                    max(length - tier.free_bytes, 1),
                    fits=lambda chosen: tier.largest_free_after([c.extent for c in chosen]) >= length,
                )

            victims = choose()
            # Copies held by moves in flight (uploads, demotions) come free in a moment: a put
            # waits for them (briefly) rather than being dropped.
            while not victims and self.busy and waited < BUSY_WAIT_S:
                await asyncio.sleep(0.01)
                waited += 0.01
                extent = tier.reserve(size)
                if extent is not None:
                    return extent
                victims = choose()
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
        elif self.daemon.objects is not None and self.daemon.objects.reachable:
            pending = [c for c in victims if TierKind.S3 not in c.record.copies]
            for copy in pending:
                copy.moving = True
            self.busy += 1
            try:
                await self.daemon.objects.upload([c.record for c in pending])
            finally:
                self.busy -= 1
                for copy in pending:
                    self._unmark(copy)
        await self.drop(victims, evicted=True)

    async def _demote(self, copies: Sequence[Copy], below: TierKind) -> None:
        d = self.daemon
        lower = d.tiers[below]
        for copy in copies:
            copy.moving = True
        self.busy += 1
        try:
            targets: list[tuple[Copy, Extent]] = []
            for copy in copies:
                if copy.record.state is BlockState.READY and not copy.dropped:
                    extent = await self.make_room(below, copy.record.size)
                    if extent is not None:
                        targets.append((copy, extent))
            live = []
            for copy, extent in targets:
                if copy.record.state is BlockState.READY:
                    d.checksum_of(copy.record, copy)  # persisted copies carry it
                    live.append((copy, extent))
                else:
                    lower.release(extent)  # deleted while room was being made
            await asyncio.gather(*(self._copy_bytes(copy, extent, below) for copy, extent in live))
            await self._index(below, [(copy.record, extent) for copy, extent in live])
            for copy, extent in live:
                if await self._adopt(copy.record, below, extent):
                    d.counters.tier(copy.tier).demotions += 1
        finally:
            self.busy -= 1
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

    async def _promote(self, record: BlockRecord) -> Copy | object | None:
        d = self.daemon
        source = record.primary()
        if source is None or source.tier is TierKind.DRAM:
            return source
        source.pins += 1
        try:
            extent = await self.make_room(TierKind.DRAM, record.size)
            if extent is None:
                return NO_ROOM
            if record.state is not BlockState.READY:
                d.dram.release(extent)
                return None
            copy = Copy(record=record, tier=TierKind.DRAM, extent=extent, moving=True)
            record.copies[TierKind.DRAM] = copy
            read = asyncio.ensure_future(self._fetch(source, copy))
            try:
                fetched = await asyncio.shield(read)
            except asyncio.CancelledError:
                # The read may still be filling the extent: free it only once the read stopped.
                self._detach(copy)
                read.add_done_callback(lambda _: self._unmark(copy))
                raise
            copy.moving = False
            if fetched is None or copy.dropped or record.state is not BlockState.READY:
                self._detach(copy)  # unreachable (S3 down: a miss this time), or deleted meanwhile
                return None
            if not fetched or checksum(d.dram.view(extent, record.size)) != record.checksum:
                log.warning("block %s failed verification on %s: dropped", record.key.hex()[:16], source.tier.label)
                d.counters.integrity_failures += 1
                d.counters.tier(source.tier).integrity_failures += 1
                self._detach(copy)
                await self.drop([source])
                return None
            copy.filled = True
            d.policies[TierKind.DRAM].insert(copy)
            d.counters.tier(source.tier).promotions += 1
            return copy
        finally:
            self.unpin(source)

    async def _fetch(self, source: Copy, copy: Copy) -> bool | None:
        """Read ``source``'s bytes into the new DRAM copy: True, False (they are bad: a read error
        or no such object), None (the medium is unreachable right now)."""
        d = self.daemon
        view = d.dram.view(copy.extent, copy.extent.length)
        if source.tier is TierKind.S3:
            return await d.objects.fetch_into(copy.record, view)
        n = min(source.extent.length, copy.extent.length)
        try:
            await d.tiers[source.tier].read_into(source.extent, 0, view[:n])
        except OSError as exc:
            log.warning("reading block %s from %s failed: %s", copy.record.key.hex()[:16], source.tier.label, exc)
            d.counters.tier(source.tier).errors += 1
            return False
        return True

    def _detach(self, copy: Copy) -> None:
        """Take a copy that never became readable off its record, and free it when nothing holds it."""
        record = copy.record
        if record.copies.get(copy.tier) is copy:
            del record.copies[copy.tier]
        copy.dropped = True
        self.free_if_done(copy)

    async def persist(self, record: BlockRecord) -> bool:
        """Write-through: give a DRAM block a durable NVMe copy now; False if there was no room."""
        d = self.daemon
        if TierKind.NVME in record.copies:
            return True
        source = record.copies.get(TierKind.DRAM)
        if d.nvme is None or source is None:
            return False
        source.pins += 1
        self.busy += 1
        try:
            extent = await self.make_room(TierKind.NVME, record.size)
            if extent is None:
                return False
            d.checksum_of(record, source)
            await self._copy_bytes(source, extent, TierKind.NVME)
            await self._index(TierKind.NVME, [(record, extent)])
            return await self._adopt(record, TierKind.NVME, extent)
        finally:
            self.busy -= 1
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

        A persistent copy's index entry is deleted (durably) before its extent can be reused;
        every extent is freed exactly once, by whoever lets go of the copy last.
        """
        d = self.daemon
        forget: dict[TierKind, list[Copy]] = {}
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
            elif record.state is BlockState.READY and list(record.copies) == [TierKind.S3]:
                d.objects.remote_only(record)
            if copy.tier is TierKind.S3:
                continue
            if isinstance(d.tiers[copy.tier], PersistentTier) and copy.filled:
                copy.forgetting = True
                forget.setdefault(copy.tier, []).append(copy)
            else:
                self.free_if_done(copy)
        for kind, persisted in forget.items():
            try:
                await d.tiers[kind].forget([(c.record.key, c.extent.offset) for c in persisted])
            finally:
                for copy in persisted:
                    copy.forgetting = False
                    self.free_if_done(copy)

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

    async def _adopt(self, record: BlockRecord, kind: TierKind, extent: Extent) -> bool:
        """Attach a freshly written (and indexed) copy, unless the block went away meanwhile."""
        d = self.daemon
        if record.state is not BlockState.READY or kind in record.copies:
            orphan = Copy(record=record, tier=kind, extent=extent, filled=True)
            await self.drop([orphan])  # un-index exactly this copy, then free it
            return False
        copy = Copy(record=record, tier=kind, extent=extent, filled=True)
        record.copies[kind] = copy
        d.policies[kind].insert(copy)
        if d.objects is not None and kind is d.bottom:
            d.objects.enqueue(record)  # write-behind to the bucket
        return True

    def unpin(self, copy: Copy) -> None:
        copy.pins -= 1
        self.free_if_done(copy)

    def _unmark(self, copy: Copy) -> None:
        copy.moving = False
        self.free_if_done(copy)

    def free_if_done(self, copy: Copy) -> None:
        """Give a dropped copy's extent back once nothing reads, moves or un-indexes it (once)."""
        if copy.dropped and not copy.freed and copy.pins == 0 and not copy.moving and not copy.forgetting:
            if copy.extent is not None:
                copy.freed = True
                self.daemon.tiers[copy.tier].release(copy.extent)
