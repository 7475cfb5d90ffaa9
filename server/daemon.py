"""The daemon: owns the block index, the eviction policy and the tiers, and applies policy.

Every method runs on the event-loop thread, which is the only thread that touches the index, so
nothing here takes a lock. The servicer converts protobuf to the plain arguments these methods
take; the transfer classes move bytes through the reservations and pins handed out here.

A put is two-phase: :meth:`Daemon.reserve` validates the whole batch and reserves space (records
in WRITING state, invisible to readers), the bytes are written, then :meth:`Daemon.commit` or
:meth:`Daemon.abort` finishes each block. A get pins the leading READY blocks with
:meth:`Daemon.acquire` so eviction cannot reuse their bytes mid-read, and :meth:`Daemon.release`
unpins them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore import __version__
from kvstore.allocator import Extent
from kvstore.block import BlockRecord, BlockState
from kvstore.config import ServerConfig, format_bytes
from kvstore.errors import BlockTooLargeError, IntegrityError, InvalidArgumentError, StaleSessionError
from kvstore.index import BlockIndex
from kvstore.keys import check_keys
from kvstore.lease import Lease, LeaseTable
from kvstore.checksum import checksum
from kvstore.lru import LRUPolicy
from kvstore.stats import Counters, TierUsage
from kvstore.tier_kind import TierKind
from kvstore.tiers import MemoryTier, create_tier

log = logging.getLogger("kvstore.daemon")


@dataclass(slots=True)
class PutSlot:
    """One block of a put batch: where its bytes go, or None when they are to be skipped."""

    size: int
    checksum: int | None
    record: BlockRecord | None
    present: bool = False


class Daemon:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tier: MemoryTier = create_tier(TierKind.DRAM, config.dram)
        self.index = BlockIndex()
        self.policy = LRUPolicy()
        self.counters = Counters()
        self.leases = LeaseTable(config.lease_ttl_s)
        self.arena_id = secrets.token_hex(8)
        # Extents of expired write leases whose session is still alive: the client may still be
        # copying into them, so they are reused only once that session ends.
        self._quarantine: dict[str, list[Extent]] = {}
        self.started_at = time.monotonic()
        self.version = __version__

    async def close(self) -> None:
        await self.tier.close()

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        check_keys(keys, max_keys=self.config.max_keys_per_request, max_key_bytes=self.config.max_key_bytes)


    def lookup(self, keys: Sequence[bytes]) -> list[TierKind]:
        """Tier of each leading present key; stops at the first miss."""
        self._check_keys(keys)
        found = self.index.prefix(keys)
        self.counters.lookup_hit_blocks += len(found)
        self.counters.lookup_miss_blocks += len(keys) - len(found)
        return [record.tier for record in found]

    def acquire(self, keys: Sequence[bytes]) -> list[BlockRecord]:
        """Pin and touch the leading present blocks; the caller must :meth:`release` them."""
        self._check_keys(keys)
        found = self.index.prefix(keys)
        for record in found:
            record.pins += 1
            self.policy.touch(record)
            self.counters.tier(record.tier).hits += 1
        self.counters.get_hit_blocks += len(found)
        self.counters.get_miss_blocks += len(keys) - len(found)
        return found

    def release(self, records: Sequence[BlockRecord]) -> None:
        for record in records:
            record.pins -= 1
            if record.pins == 0 and record.state is BlockState.GONE:
                self.tier.release(record.extent)


    def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int], checksums: Sequence[int]
    ) -> list[PutSlot]:
        """Validate a put batch as a whole, then reserve space for each absent key.

        Nothing is reserved when any part of the batch is invalid. A key already present (or
        being written by another put) gets a slot with no record: its bytes are skipped. A block
        for which no space can be freed is dropped the same way and counted.
        """
        self._check_keys(keys)
        if len(sizes) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(sizes)} block sizes")
        if checksums and len(checksums) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(checksums)} checksums")
        limit = min(self.config.max_block_bytes, self.tier.capacity_bytes)
        for i, size in enumerate(sizes):
            if size <= 0:
                raise InvalidArgumentError(f"block {i} is empty")
            if size > limit:
                raise BlockTooLargeError(
                    f"block {i} is {format_bytes(size)} ({size} bytes); the largest block this "
                    f"daemon stores is {format_bytes(limit)} ({limit} bytes: "
                    f"max_block_bytes={self.config.max_block_bytes}, "
                    f"dram capacity={self.tier.capacity_bytes})"
                )

        slots: list[PutSlot] = []
        for i, (key, size) in enumerate(zip(keys, sizes)):
            checksum = checksums[i] if checksums else None
            existing = self.index.get(key)
            if existing is not None:
                if existing.state is BlockState.READY:
                    self.policy.touch(existing)
                self.counters.put_present_blocks += 1
                slots.append(PutSlot(size, checksum, None, present=True))
                continue
            extent = self._make_room(size)
            if extent is None:
                self.counters.put_dropped_blocks += 1
                slots.append(PutSlot(size, checksum, None))
                continue
            record = BlockRecord(key=key, size=size, tier=self.tier.kind, extent=extent)
            self.index.add(record)
            slots.append(PutSlot(size, checksum, record))
        return slots

    def commit(self, slot: PutSlot, checksum: int | None) -> bool:
        """Make a fully written block visible; False if it was deleted while being written."""
        record = slot.record
        if record.state is BlockState.GONE:
            self.tier.release(record.extent)
            return False
        record.checksum = checksum
        record.advance(BlockState.READY)
        self.policy.insert(record)
        self.counters.put_stored_blocks += 1
        return True

    def abort(self, slot: PutSlot) -> None:
        """Throw away a reservation whose bytes did not all arrive or did not verify."""
        record = slot.record
        if record.state is BlockState.WRITING:
            record.advance(BlockState.GONE)
            self.index.discard(record)
        self.tier.release(record.extent)

    def delete(self, keys: Sequence[bytes], if_checksums: Sequence[int] = ()) -> int:
        """Remove ``keys``; with ``if_checksums``, only blocks whose checksum is the one given."""
        self._check_keys(keys)
        if if_checksums and len(if_checksums) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(if_checksums)} checksums")
        deleted = 0
        for i, key in enumerate(keys):
            record = self.index.get(key)
            if record is None:
                continue
            if if_checksums and (
                record.state is not BlockState.READY or self.checksum_of(record) != if_checksums[i]
            ):
                continue
            self._drop(record)
            deleted += 1
        self.counters.deleted_blocks += deleted
        return deleted


    def checksum_of(self, record: BlockRecord) -> int:
        """The block's checksum, computed from its bytes on first need (same-host puts skip it)."""
        if record.checksum is None:
            record.checksum = checksum(self.tier.view(record.extent, record.size))
        return record.checksum

    def acquire_lease(self, session: str, keys: Sequence[bytes], now: float) -> Lease | None:
        """Pin the leading present blocks for a same-host reader; None when there are none."""
        self.leases.check(session)
        records = self.acquire(keys)
        return self.leases.grant(session, now, records=records) if records else None

    def release_leases(self, session: str, lease_ids: Sequence[int]) -> int:
        """End read leases; returns how many were still held."""
        released = 0
        for lease_id in lease_ids:
            lease = self.leases.take(session, lease_id)
            if lease is not None and not lease.writing:
                self.release(lease.records)
                released += 1
        return released

    def reserve_lease(self, session: str, keys: Sequence[bytes], sizes: Sequence[int], now: float) -> tuple[Lease, list[PutSlot]]:
        """Put phase 1 for a same-host writer: reserve, and hold the reservations under a lease."""
        self.leases.check(session)
        slots = self.reserve(keys, sizes, ())
        return self.leases.grant(session, now, slots=slots), slots

    def commit_lease(self, session: str, lease_id: int, checksums: Sequence[int], abort: bool) -> tuple[int, list[PutSlot]]:
        """Put phase 2: commit (or abort) every reservation of a write lease; returns blocks stored."""
        lease = self.leases.take(session, lease_id)
        if lease is None or not lease.writing:
            raise StaleSessionError(f"write lease {lease_id} expired or is unknown; nothing of it was stored")
        slots = lease.slots
        if checksums and len(checksums) != len(slots):
            for slot in slots:
                if slot.record is not None:
                    self.abort(slot)
            raise InvalidArgumentError(f"{len(slots)} reserved keys but {len(checksums)} checksums")
        stored, corrupt = 0, []
        for i, slot in enumerate(slots):
            if slot.record is None:
                continue
            if abort:
                self.abort(slot)
                continue
            actual = None
            if checksums:
                actual = checksum(self.tier.view(slot.record.extent, slot.size))
                if actual != checksums[i]:
                    corrupt.append(i)
                    self.abort(slot)
                    continue
            stored += self.commit(slot, actual)
        if corrupt:
            self.counters.integrity_failures += len(corrupt)
            raise IntegrityError(f"blocks {corrupt} did not match their checksums and were not stored")
        return stored, list(slots)

    def expire_leases(self, now: float) -> int:
        """Take back every lease past its TTL; returns how many."""
        expired = self.leases.expired(now)
        for lease in expired:
            log.warning("lease %d of a same-host client expired after %gs", lease.id, self.leases.ttl_s)
            self._end_lease(lease, session_alive=True)
        return len(expired)

    def close_session(self, session: str) -> None:
        """A same-host client went away: end all of its leases and free what it held."""
        for lease in self.leases.close_session(session):
            self._end_lease(lease, session_alive=False)
        for extent in self._quarantine.pop(session, ()):
            self.tier.release(extent)

    def _end_lease(self, lease: Lease, *, session_alive: bool) -> None:
        if not lease.writing:
            self.release(lease.records)
            return
        for slot in lease.slots:
            record = slot.record
            if record is None:
                continue
            if not session_alive:
                self.abort(slot)
                continue
            # The writer may still be copying: hide the block now, reuse its bytes later.
            if record.state is BlockState.WRITING:
                record.advance(BlockState.GONE)
                self.index.discard(record)
            self._quarantine.setdefault(lease.session, []).append(record.extent)

    def _make_room(self, size: int) -> Extent | None:
        """Reserve ``size`` bytes, evicting the coldest unpinned blocks as needed."""
        extent = self.tier.reserve(size)
        if extent is not None:
            return extent
        length = self.tier.footprint(size)
        victims = self.policy.victims(
            max(length - self.tier.free_bytes, 1),
            fits=lambda chosen: self.tier.largest_free_after([r.extent for r in chosen]) >= length,
        )
        if not victims:
            return None
        for victim in victims:
            counters = self.counters.tier(victim.tier)
            counters.evictions += 1
            counters.evicted_bytes += victim.size
            self._drop(victim)
        return self.tier.reserve(size)

    def _drop(self, record: BlockRecord) -> None:
        """Remove a block from the index and the policy; free its bytes once nobody reads them.

        A block still being written keeps its extent until its put finishes (commit sees GONE and
        the put's abort path frees it).
        """
        was_writing = record.state is BlockState.WRITING
        self.index.discard(record)
        self.policy.remove(record)
        record.advance(BlockState.GONE)
        if not was_writing and record.pins == 0:
            self.tier.release(record.extent)


    def usage(self) -> list[TierUsage]:
        return [
            TierUsage(
                kind=self.tier.kind,
                capacity_bytes=self.tier.capacity_bytes,
                used_bytes=self.tier.used_bytes,
                blocks=len(self.policy),
            )
        ]

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at
