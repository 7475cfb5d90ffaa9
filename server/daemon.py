"""The daemon: owns the block index, the tiers and their eviction policies, and applies policy.

Every method runs on the event-loop thread, which is the only thread that touches the index, so
nothing here takes a lock; methods that wait for a disk are coroutines and re-check what they hold
after each ``await``. The servicer converts protobuf to the plain arguments these methods take.

Tiers, fastest first: DRAM (where puts land and readers copy from) and, when configured, NVMe
(persistent). Moving blocks between them is :class:`~kvstore.server.movement.Mover`'s job.

A put is two-phase: :meth:`Daemon.reserve` validates the whole batch and reserves DRAM space
(records in WRITING state, invisible to readers), the bytes are written, then
:meth:`Daemon.commit` or :meth:`Daemon.abort` finishes each block. A get pins the leading blocks'
DRAM copies with :meth:`Daemon.acquire` (bringing NVMe-only blocks up first) so eviction cannot
reuse their bytes mid-read, and :meth:`Daemon.release` unpins them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore import __version__
from kvstore.allocator import Extent
from kvstore.block import BlockRecord, BlockState, Copy, check_sizes
from kvstore.checksum import checksum
from kvstore.config import ServerConfig
from kvstore.errors import InvalidArgumentError
from kvstore.index import BlockIndex
from kvstore.keys import check_keys, scoped
from kvstore.lease import LeaseTable
from kvstore.policy import EvictionPolicy, PolicyKind, make_policy
from kvstore.stats import Counters, TierUsage
from kvstore.tier_kind import TierKind
from kvstore.server.movement import NO_ROOM, Mover

PROMOTE_AHEAD = 8
"""Blocks a get reads up from NVMe or S3 concurrently."""


def _in_dram(record: BlockRecord) -> bool:
    copy = record.copies.get(TierKind.DRAM)
    return copy is not None and copy.filled and not copy.dropped

if TYPE_CHECKING:
    from kvstore.server.objects import ObjectStore
from kvstore.tiers import MemoryTier, PersistentTier, Tier, create_tier

log = logging.getLogger("kvstore.daemon")


@dataclass(slots=True)
class PutSlot:
    """One block of a put batch: its DRAM copy being written, or None when its bytes are skipped."""

    size: int
    checksum: int | None
    copy: Copy | None
    present: bool = False
    persisted: bool = False

    @property
    def record(self) -> BlockRecord | None:
        return self.copy.record if self.copy is not None else None


class Daemon:
    def __init__(self, config: ServerConfig) -> None:
        from kvstore.server.leasing import Leasing  # it builds on this module

        self.config = config
        self.dram: MemoryTier = create_tier(TierKind.DRAM, config.dram)
        self.tiers: dict[TierKind, Tier] = {TierKind.DRAM: self.dram}
        try:
            if config.nvme.enabled:
                self.tiers[TierKind.NVME] = create_tier(TierKind.NVME, config.nvme)
        except BaseException:
            self.dram.unmap()
            raise
        kind = PolicyKind(config.policy)
        self.policies: dict[TierKind, EvictionPolicy] = {
            k: make_policy(kind, tier.capacity_bytes) for k, tier in self.tiers.items()
        }
        self.index = BlockIndex()
        self.counters = Counters()
        self.leases = LeaseTable(config.lease_ttl_s)
        self.arena_id = secrets.token_hex(8)
        self.mover = Mover(self)
        self.leasing = Leasing(self)
        self.objects: ObjectStore | None = None
        if config.s3.enabled:
            from kvstore.server.objects import ObjectStore  # imports boto only when configured
            from kvstore.tiers.s3 import S3Tier

            self.objects = ObjectStore(self, S3Tier.from_config(config.s3))
        self.started_at = time.monotonic()
        self.version = __version__
        self._recover()

    @property
    def nvme(self) -> PersistentTier | None:
        return self.tiers.get(TierKind.NVME)

    def _recover(self) -> None:
        """Index every block a persistent tier kept from an earlier run (no data is read)."""
        for kind, tier in self.tiers.items():
            if not isinstance(tier, PersistentTier):
                continue
            for entry in sorted(tier.recovered, key=lambda e: e.last_use):
                record = BlockRecord(
                    key=entry.key, size=entry.size, checksum=entry.checksum, state=BlockState.READY,
                    namespace=entry.namespace,
                )
                copy = Copy(record=record, tier=kind, extent=Extent(entry.offset, entry.length), filled=True)
                record.copies[kind] = copy
                self.index.add(record)
                self.policies[kind].insert(copy)
            if tier.recovered:
                log.info("recovered %d blocks from %s", len(tier.recovered), kind.label)
            tier.recovered = []

    async def start(self) -> None:
        """Open what needs the event loop (the S3 client). Does not wait for S3 to answer."""
        if self.objects is not None:
            await self.objects.open()

    async def close(self) -> None:
        if self.objects is not None:
            await self.objects.close()
        for tier in self.tiers.values():
            await tier.close()

    @property
    def bottom(self) -> TierKind:
        """The slowest local tier: what it evicts goes to S3 (when configured) or is lost."""
        return next(reversed(self.tiers))

    async def _extend_from_s3(self, index_keys: list[bytes], keys: Sequence[bytes], namespace: bytes) -> None:
        if self.objects is not None and len(self.index.prefix(index_keys)) < len(keys):
            await self.objects.find(index_keys, keys, namespace)

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        check_keys(keys, max_keys=self.config.max_keys_per_request, max_key_bytes=self.config.max_key_bytes)

    async def lookup(self, keys: Sequence[bytes], namespace: bytes = b"") -> list[TierKind]:
        """Tier of each leading present key (its fastest copy); stops at the first miss.

        Past the last key held locally, asks S3 (when configured).
        """
        self._check_keys(keys)
        index_keys = scoped(keys, namespace)
        await self._extend_from_s3(index_keys, keys, namespace)
        found = self.index.prefix(index_keys)
        self.counters.lookup_hit_blocks += len(found)
        self.counters.lookup_miss_blocks += len(keys) - len(found)
        return [record.primary().tier for record in found]

    async def acquire(self, keys: Sequence[bytes], namespace: bytes = b"") -> tuple[list[Copy], bool]:
        """Pin the DRAM copies of the leading present blocks, bringing NVMe-only ones up first.

        Stops at the first block that is absent or failed verification, or that DRAM has no room
        for while the earlier ones are pinned: then ``partial`` is True and the caller should
        release these and ask again for the rest. The caller must :meth:`release` what it got.
        """
        self._check_keys(keys)
        index_keys = scoped(keys, namespace)
        await self._extend_from_s3(index_keys, keys, namespace)
        found = self.index.prefix(index_keys)
        pinned: list[Copy] = []
        partial = False
        # Blocks to bring up from NVMe or S3 are read a few at a time ahead of the one being
        # pinned, so their I/O overlaps; each is still pinned in order and re-checked.
        ahead: dict[int, asyncio.Future] = {}
        try:
            for i, record in enumerate(found):
                for j in range(i, min(i + PROMOTE_AHEAD, len(found))):
                    if j not in ahead and not _in_dram(found[j]):
                        ahead[j] = asyncio.ensure_future(self.mover.promote(found[j]))
                source = record.primary()
                for held in record.copies.values():  # a read is a use of every copy the block has
                    if held.filled and held.tier in self.policies:
                        self.policies[held.tier].touch(held)
                copy = record.copies.get(TierKind.DRAM)
                if copy is None or not copy.filled or copy.dropped:
                    future = ahead.pop(i, None)
                    copy = await future if future is not None else await self.mover.promote(record)
                    if isinstance(copy, Copy) and (copy.dropped or not copy.filled):
                        copy = await self.mover.promote(record)  # evicted again before its turn
                    if copy is NO_ROOM:
                        partial = bool(pinned)
                        break
                    if copy is None:
                        break
                copy.pins += 1
                pinned.append(copy)  # a fresh promotion is not touched: under S3-FIFO it must be read again
                self.counters.tier(source.tier if source else TierKind.DRAM).hits += 1
        except BaseException:
            self.release(pinned)
            raise
        finally:
            for future in ahead.values():  # read ahead past where this get stopped
                future.cancel()
        self.counters.get_hit_blocks += len(pinned)
        if not partial:
            self.counters.get_miss_blocks += len(keys) - len(pinned)
        return pinned, partial

    def release(self, copies: Sequence[Copy]) -> None:
        for copy in copies:
            self.mover.unpin(copy)

    async def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int], checksums: Sequence[int], namespace: bytes = b""
    ) -> list[PutSlot]:
        """Validate a put batch as a whole, then reserve DRAM space for each absent key.

        Nothing is reserved when any part of the batch is invalid. A key already present (or
        being written by another put) gets a slot with no copy: its bytes are skipped. A block
        for which no space can be freed is dropped the same way and counted.
        """
        self.check_put(keys, sizes, checksums)
        slots: list[PutSlot] = []
        try:
            for i, (key, size) in enumerate(zip(scoped(keys, namespace), sizes)):
                slots.append(await self.reserve_one(key, size, checksums[i] if checksums else None, namespace))
        except BaseException:
            for slot in slots:  # a reservation cut short must not leave keys WRITING for ever
                if slot.copy is not None:
                    self.abort(slot)
            raise
        return slots

    def check_put(self, keys: Sequence[bytes], sizes: Sequence[int], checksums: Sequence[int]) -> None:
        """Raise InvalidArgumentError naming the first thing wrong with a put batch."""
        self._check_keys(keys)
        if len(sizes) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(sizes)} block sizes")
        if checksums and len(checksums) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(checksums)} checksums")
        check_sizes(sizes, *self.block_limit())

    def block_limit(self) -> tuple[int, str]:
        """The largest block accepted, and why it is that."""
        limit = min(self.config.max_block_bytes, self.dram.capacity_bytes)
        return limit, f"max_block_bytes={self.config.max_block_bytes}, dram capacity={self.dram.capacity_bytes}"

    async def reserve_one(self, key: bytes, size: int, checksum_: int | None, namespace: bytes) -> PutSlot:
        """Reserve DRAM space for one block of a checked batch (see :meth:`reserve`); ``key`` is
        the index key (:func:`~kvstore.keys.scoped`)."""
        if self._present(key):
            return PutSlot(size, checksum_, None, present=True)
        extent = await self.mover.make_room(TierKind.DRAM, size)
        if extent is not None and self._present(key):  # stored by someone else meanwhile
            self.dram.release(extent)
            return PutSlot(size, checksum_, None, present=True)
        if extent is None:
            self.counters.put_dropped_blocks += 1
            return PutSlot(size, checksum_, None)
        record = BlockRecord(key=key, size=size, namespace=namespace)
        copy = Copy(record=record, tier=TierKind.DRAM, extent=extent)
        record.copies[TierKind.DRAM] = copy
        self.index.add(record)
        return PutSlot(size, checksum_, copy)

    def _present(self, key: bytes) -> bool:
        existing = self.index.get(key)
        if existing is None:
            return False
        copy = existing.copies.get(TierKind.DRAM)
        if existing.state is BlockState.READY and copy is not None and copy.filled:
            self.policies[TierKind.DRAM].touch(copy)
        self.counters.put_present_blocks += 1
        return True

    async def commit(self, slot: PutSlot, checksum_: int | None) -> bool:
        """Make a fully written block visible (and persist it first under write-through).

        False if it was deleted while being written.
        """
        copy, record = slot.copy, slot.record
        if record.state is BlockState.GONE:
            self.dram.release(copy.extent)
            return False
        record.checksum = checksum_
        copy.filled = True
        record.advance(BlockState.READY)
        self.policies[TierKind.DRAM].insert(copy)
        self.counters.put_stored_blocks += 1
        if self.config.write_through:
            slot.persisted = await self.mover.persist(record)
        if self.objects is not None:
            if self.config.s3.write_through:
                await self.objects.upload([record])
                slot.persisted = slot.persisted or TierKind.S3 in record.copies
            elif self.bottom is TierKind.DRAM:
                self.objects.enqueue(record)
        return True

    def abort(self, slot: PutSlot) -> None:
        """Throw away a reservation whose bytes did not all arrive or did not verify."""
        record = slot.record
        if record.state is BlockState.WRITING:
            record.advance(BlockState.GONE)
            self.index.discard(record)
            record.copies.clear()
        self.dram.release(slot.copy.extent)

    async def delete(self, keys: Sequence[bytes], if_checksums: Sequence[int] = (), namespace: bytes = b"") -> int:
        """Remove ``keys``; with ``if_checksums``, only blocks whose checksum is the one given."""
        self._check_keys(keys)
        if if_checksums and len(if_checksums) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(if_checksums)} checksums")
        doomed: list[Copy] = []
        deleted = 0
        # Unconditional deletes reach S3 for every key, known here or not; a conditional one only
        # for the blocks it removed.
        s3_keys = [] if if_checksums else list(keys)
        for i, key in enumerate(scoped(keys, namespace)):
            record = self.index.get(key)
            if record is None:
                continue
            if if_checksums and (record.state is not BlockState.READY or self.checksum_of(record) != if_checksums[i]):
                continue
            if if_checksums:
                s3_keys.append(keys[i])
            if record.state is BlockState.WRITING:
                # Its put still owns the DRAM reservation; commit sees GONE and frees it.
                record.advance(BlockState.GONE)
                self.index.discard(record)
            else:
                doomed += record.copies.values()
            deleted += 1
        await self.mover.drop(doomed)
        self.counters.deleted_blocks += deleted
        if self.objects is not None and s3_keys:
            await self.objects.delete(s3_keys, namespace)
        return deleted

    def checksum_of(self, record: BlockRecord, dram_copy: Copy | None = None) -> int:
        """The block's checksum, computed from its DRAM bytes on first need (same-host puts skip
        it; every persisted copy has it)."""
        if record.checksum is None:
            copy = dram_copy or record.copies[TierKind.DRAM]
            record.checksum = checksum(self.dram.view(copy.extent, record.size))
        return record.checksum

    def usage(self) -> list[TierUsage]:
        rows = [
            TierUsage(kind=k, capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, blocks=len(self.policies[k]))
            for k, t in self.tiers.items()
        ]
        if self.objects is not None:  # what this daemon knows to be in the bucket; no capacity
            rows.append(TierUsage(TierKind.S3, 0, self.objects.known_bytes, self.objects.known_blocks))
        return rows

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at
