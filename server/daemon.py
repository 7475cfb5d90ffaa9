"""The daemon: the tier stack, the catalog, and the calls the servicer makes.

Every method runs on the event-loop thread, which is the only thread that touches the catalog, so
nothing here takes a lock; methods that wait for a disk are coroutines and re-check what they hold
after each ``await``. The servicer converts protobuf to the plain arguments these methods take.

The daemon wires components that only call downward: the :class:`~kvstore.tiers.stack.TierStack`
(built from config), the :class:`~kvstore.catalog.Catalog` (the only writer of block state), the
:class:`~kvstore.server.mover.Mover` (carries out :mod:`kvstore.placement`'s plans), and, when the
stack has shared levels (peers, a bucket), :class:`~kvstore.server.shared.SharedLevels`: their
lookups, health, misses and write-behind queues. No code here names a medium: levels have roles
(the landing level where puts land and same-host clients map, the bottom local level, the shared
levels) given by :class:`~kvstore.layout.Layout`.

A put is two-phase: :meth:`Daemon.reserve` validates the whole batch and reserves landing space
(records WRITING, invisible to readers), the bytes are written, then :meth:`Daemon.commit` or
:meth:`Daemon.abort` finishes each block. A get holds the leading blocks' landing copies with
:meth:`Daemon.acquire` (promoting them from slower levels first) so eviction cannot reuse their
bytes mid-read, and :meth:`Daemon.release` lets them go.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore import __version__, placement
from kvstore.block import BlockRecord, BlockState, Copy, check_sizes
from kvstore.catalog import Catalog
from kvstore.checksum import checksum
from kvstore.config import ServerConfig
from kvstore.errors import InvalidArgumentError, UnavailableError
from kvstore.keys import check_keys, check_packed_keys, namespace_tag, scoped
from kvstore.policies import make_policy
from kvstore.tenants import TenantTable
from kvstore.stats import Counters, TierUsage
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import MemoryTier
from kvstore.tiers.stack import build_stack
from kvstore.server.quotas import Quotas
from kvstore.server.mover import NO_ROOM, Mover
from kvstore.server.shared import SharedLevels

log = logging.getLogger("kvstore.daemon")

SETTLE_BATCH = 256
"""Blocks of one put written through at once (one group commit each, at most)."""
NO_ROOM_TRIES, NO_ROOM_WAIT_S = 5, 0.05
"""A get that holds nothing yet and finds no room waits this often, this long, before a miss."""
PROMOTE_TRIES = 3
"""A block evicted again between its promotion and its turn is promoted again, this many times."""


@dataclass(slots=True)
class PutSlot:
    """One block of a put batch: its landing copy being written, or None when its bytes are skipped."""

    size: int
    checksum: int | None
    copy: Copy | None
    present: bool = False
    persisted: bool = False

    @property
    def record(self) -> BlockRecord | None:
        return self.copy.record if self.copy is not None else None


def _leading_ready(records: list[BlockRecord]) -> list[BlockRecord]:
    """The records up to the first that went away during an await."""
    return list(itertools.takewhile(lambda r: r.state is BlockState.READY and r.copies, records))


class Daemon:
    def __init__(self, config: ServerConfig, tenants: TenantTable | None = None) -> None:
        self.config = config
        self.stack = build_stack(config)
        layout = self.layout = self.stack.layout
        self.arena: MemoryTier = self.stack.landing
        self.counters = Counters()
        policy = config.policy
        self.catalog = Catalog(
            layout,
            [make_policy(policy, tier.capacity_bytes) if level.capabilities.bounded else None
             for level, tier in zip(layout.levels, self.stack.tiers)],
            release=self.stack.release,
            counters=self.counters,
        )
        self.shared = SharedLevels.build(layout, self.stack.tiers, self.catalog, self.counters, self.block_limit()[0])
        self.health = self.shared.health if self.shared is not None else {}
        # Same-host puts are checksummed on first need, unless their bytes may leave the host (a
        # non-loopback port, peers, a shared bucket): then at commit, so what a same-host client
        # writes into the arena afterwards is caught as corruption instead of being served with a
        # checksum made of it, and a peer's question never waits for a checksum.
        self.checksum_at_commit = self.shared is not None or not config.loopback_only
        for tier in self.stack.tiers:
            tier.bind(self.counters, self.arena)
        write_policy = placement.WritePolicy(
            persist=config.write_through, share=config.share_write_through
        )
        self.after_put = placement.after_put(layout, write_policy)
        quotas = Quotas(tenants, layout) if tenants is not None and any(t.quota for t in tenants.tenants) else None
        self.mover = Mover(self.stack, self.catalog, self.counters, self.health, self.shared, quotas)
        self._kinds = [level.kind for level in layout.levels]
        self._kind_codes = np.array([int(kind) for kind in self._kinds], dtype=np.int64)
        self._names = [level.name for level in layout.levels]
        self.arena_id = secrets.token_hex(8)
        self.started_at = time.monotonic()
        self.version = __version__
        self._recover()

    def _recover(self) -> None:
        """Index what persistent tiers kept. Millions of small objects are made here: the cyclic
        collector is paused meanwhile (it would rescan them again and again), and what exists
        afterwards is frozen out of its scans (blocks are freed by reference counting: a dropped
        copy leaves its record's dict, so no cycle keeps them)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            for level, tier in zip(self.layout.levels, self.stack.tiers):
                blocks = tier.recover()
                if blocks:
                    self.catalog.recover(level.index, blocks)
                    log.info("recovered %d blocks from %s", len(blocks), level.name)
        finally:
            if collecting:
                gc.enable()
        gc.freeze()

    async def start(self) -> None:
        """Open what needs the event loop (a bucket's client). Does not wait for remote media."""
        await self.stack.open()

    def serving_at(self, port: int) -> None:
        """The gRPC port is bound: tell the tiers that advertise this daemon (the peers)."""
        for tier in self.stack.tiers:
            tier.serving_at(self.config.host, port)

    async def warm(self) -> None:
        """Let every tier prepare its medium (in a thread each); the server runs this once it serves."""
        for tier in self.stack.tiers:
            await asyncio.to_thread(tier.warm)

    async def close(self) -> None:
        await self.mover.settle()
        await self.stack.close()

    # -- background steps (run by the server's Background group) -----------------------------------

    async def rebalance(self) -> None:
        await self.mover.rebalance()
        if self.shared is not None:
            self.catalog.trim_remote(self.shared.remembered_limit)

    async def write_behind(self, level: int) -> None:
        """Copy one batch of blocks queued for the shared ``level`` there (waits for one)."""
        uploads = next(s.uploads for s in self.shared.levels if s.level == level)
        batch = await uploads.batch()
        await self.mover.replicate_many(batch, level)

    # -- reads -----------------------------------------------------------------------------------

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        check_keys(keys, max_keys=self.config.max_keys_per_request, max_key_bytes=self.config.max_key_bytes)

    async def _prefix(self, keys: Sequence[bytes], namespace: bytes, local_only: bool = False) -> list[BlockRecord]:
        """One walk of the catalog, continued in the shared level past the local prefix."""
        self._check_keys(keys)
        index_keys = scoped(keys, namespace)
        found = self.catalog.prefix(index_keys, namespace=namespace)
        if len(found) < len(keys) and self.shared is not None and not local_only:
            found += await self.shared.extend(index_keys, keys, namespace, len(found))
            found = _leading_ready(found)
        return found

    async def lookup(self, keys: Sequence[bytes], namespace: bytes = b"") -> list[int]:
        """Tier (a :class:`TierKind` value) of each leading present key (its fastest copy); stops
        at the first miss. The local part is one vectorised pass over the catalog's columns; only
        a lookup that continues into the shared level makes records."""
        self._check_keys(keys)
        slots = self.catalog.prefix_slots(keys, namespace_tag(namespace), namespace)
        if len(slots) == len(keys) or self.shared is None:
            return self._local_kinds(slots, len(keys)).tolist()
        found = await self._prefix(keys, namespace)
        self.counters.lookup_hit_blocks += len(found)
        self.counters.lookup_miss_blocks += len(keys) - len(found)
        return [self._kinds[record.primary().level] for record in found]

    async def lookup_packed(self, packed: bytes, key_bytes: int, namespace: bytes = b"") -> bytes:
        """:meth:`lookup` of keys of ``key_bytes`` each laid end to end in ``packed``; the tiers
        come back as one byte each."""
        n = check_packed_keys(len(packed), key_bytes, max_keys=self.config.max_keys_per_request,
                              max_key_bytes=self.config.max_key_bytes)
        slots = self.catalog.prefix_slots_packed(packed, key_bytes, namespace_tag(namespace), namespace)
        if len(slots) < n and self.shared is not None:
            keys = [packed[i : i + key_bytes] for i in range(0, len(packed), key_bytes)]
            return bytes(await self.lookup(keys, namespace))
        return self._local_kinds(slots, n).astype(np.uint8).tobytes()

    def _local_kinds(self, slots: np.ndarray, asked: int) -> np.ndarray:
        """The tier kinds of a lookup answered from the catalog alone, counted."""
        self.counters.lookup_hit_blocks += len(slots)
        self.counters.lookup_miss_blocks += asked - len(slots)
        return np.take(self._kind_codes, self.catalog.primary_levels(slots))

    async def acquire(
        self, keys: Sequence[bytes], namespace: bytes = b"", *, local_only: bool = False, max_bytes: int | None = None
    ) -> tuple[list[Copy], bool]:
        """Hold the landing copies of the leading present blocks, promoting the others first.

        Stops at the first block that is absent or failed verification, or that the landing level
        has no room for while the earlier ones are held: then ``partial`` is True and the caller
        should release these and ask again for the rest. The caller must :meth:`release` them.
        At most ``max_get_bytes`` (or ``max_bytes``, if less) are held at once, at least one block.
        """
        if len(set(keys)) != len(keys):
            # A chain never repeats a key; one key 65,536 times would announce 65,536 copies.
            raise InvalidArgumentError("a get names each block once: the keys repeat")
        found = await self._prefix(keys, namespace, local_only)
        fit = _within_bytes(found, min(self.config.max_get_bytes, max_bytes or self.config.max_get_bytes))
        capped = fit < len(found)
        if capped:   # the rest is asked for again (partial) once these are read
            found = found[:fit]
        if local_only:   # a peer asks: blocks this daemon holds only in a shared tier are not its to give
            found = list(itertools.takewhile(lambda r: any(not self.layout.levels[c].shared for c in r.copies), found))
        landing, catalog, names = self.layout.landing, self.catalog, self._names
        held: list[Copy] = []
        partial = False
        # Blocks to bring up are read a few at a time ahead of the one being held, so their I/O
        # overlaps; each is still held in order and re-checked.
        ahead: dict[int, asyncio.Future] = {}
        try:
            for i, record in enumerate(found):
                source = record.primary()
                pooled = source is not None and self.layout.levels[source.level].capabilities.pooled
                window = placement.read_window(self.arena.capacity_bytes, record.size,
                                               placement.PROMOTE_AHEAD_POOLED if pooled else placement.PROMOTE_AHEAD)
                for j in placement.read_ahead(found, i, landing, window):
                    if j not in ahead:
                        ahead[j] = asyncio.ensure_future(self.mover.promote(found[j]))
                source = record.primary()
                catalog.touch(record)
                copy = record.readable_at(landing)
                if copy is None:
                    future = ahead.pop(i, None)
                    copy = await future if future is not None else await self.mover.promote(record)
                    for _ in range(PROMOTE_TRIES):  # evicted again before its turn: once more
                        if not (isinstance(copy, Copy) and not copy.readable):
                            break
                        copy = await self.mover.promote(record)
                    if isinstance(copy, Copy) and not copy.readable:
                        copy = None
                    for _ in range(NO_ROOM_TRIES if not held else 0):
                        if copy is not NO_ROOM:
                            break
                        # Nothing of this get is held, so the room is held by moves in flight
                        # (uploads, demotions) or other readers: they let go in a moment.
                        await asyncio.sleep(NO_ROOM_WAIT_S)
                        copy = await self.mover.promote(record)
                    if copy is NO_ROOM:
                        partial = bool(held)
                        break
                    if copy is None:
                        break
                catalog.hold(copy)
                held.append(copy)  # a fresh promotion is not touched: under S3-FIFO it must be read again
                self.counters.tier(names[source.level if source else landing]).hits += 1
        except BaseException:
            self.release(held)
            raise
        finally:
            for future in ahead.values():  # read ahead past where this get stopped
                future.cancel()
        partial = partial or (capped and len(held) == len(found))
        self.counters.get_hit_blocks += len(held)
        if not partial:
            self.counters.get_miss_blocks += len(keys) - len(held)
        return held, partial

    def release(self, copies: Sequence[Copy]) -> None:
        for copy in copies:
            self.catalog.unhold(copy)

    # -- puts ------------------------------------------------------------------------------------

    async def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int], checksums: Sequence[int], namespace: bytes = b""
    ) -> list[PutSlot]:
        """Validate a put batch as a whole, then reserve landing space for each absent key.

        Nothing is reserved when any part of the batch is invalid. A key already present (or
        being written by another put) gets a slot with no copy: its bytes are skipped. A block
        for which no space can be freed is dropped the same way and counted.
        """
        self.check_put(keys, sizes, checksums)
        index_keys = scoped(keys, namespace)
        self.catalog.keys.prime(index_keys)
        fit = await self.quota_fit(sizes, namespace)
        slots = self._reserve_at_once(index_keys[:fit], sizes[:fit], checksums, namespace)
        try:
            if len(slots) < fit:
                slots += await self._reserve_evicting(
                    index_keys[len(slots):fit], sizes[len(slots):fit], checksums[len(slots):fit] if checksums else (), namespace
                )
            for i in range(len(slots), fit):
                checksum_ = checksums[i] if checksums else None
                slots.append(await self.reserve_one(index_keys[i], sizes[i], checksum_, namespace))
            for i in range(fit, len(index_keys)):
                slots.append(self.over_quota(index_keys[i], sizes[i], checksums[i] if checksums else None))
        except BaseException:
            for slot in slots:  # a reservation cut short must not leave keys WRITING for ever
                if slot.copy is not None:
                    self.abort(slot)
            raise
        return slots

    async def quota_fit(self, sizes: Sequence[int], namespace: bytes) -> int:
        """How many leading blocks of a put the owner's landing quota admits, once its own coldest
        blocks made room (all of them where no quota applies). A prefix is worth more than its tail."""
        if self.mover.quotas is None:   # no coroutine per put where no tenant has a quota
            return len(sizes)
        room = await self.mover.fit_quota(self.layout.landing, namespace, sum(sizes))
        if room is None:
            return len(sizes)
        return int(np.searchsorted(np.cumsum(sizes), room, side="right"))

    def over_quota(self, key: bytes, size: int, checksum_: int | None) -> PutSlot:
        """The slot of a block past its owner's quota: present if it is, else dropped (counted)."""
        present = self._present(key)
        self.counters.put_dropped_blocks += not present
        return PutSlot(size, checksum_, None, present=present)

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
        return placement.block_limit(self.layout, self.config.max_block_bytes, self.arena.capacity_bytes)

    def put_round_bytes(self) -> int:
        return placement.put_round_bytes(self.arena.capacity_bytes)

    def _reserve_at_once(
        self, index_keys: list[bytes], sizes: Sequence[int], checksums: Sequence[int], namespace: bytes
    ) -> list[PutSlot]:
        """The leading blocks of a batch that are absent and fit the landing level as it is,
        reserved and indexed in one pass. Nothing is awaited, so nothing changes meanwhile; the
        rest (a present key, a key twice, no room without evicting) go through :meth:`reserve_one`."""
        if len(set(index_keys)) != len(index_keys):
            return []
        locations = self.arena.reserve_many(sizes[: self._leading_absent(index_keys)])
        return self._begin(index_keys, sizes, checksums, namespace, locations)

    def _leading_absent(self, index_keys: Sequence[bytes]) -> int:
        """How many leading keys the index does not know (a key being written counts as known)."""
        present = np.flatnonzero(self.catalog.keys.find_many(index_keys) >= 0)
        return int(present[0]) if len(present) else len(index_keys)

    def _begin(self, index_keys, sizes, checksums, namespace: bytes, locations) -> list[PutSlot]:
        """Slots for the leading blocks, absent and distinct, in the landing ``locations`` reserved
        for them, indexed WRITING in one pass (:meth:`Catalog.begin_many`)."""
        n = len(locations)
        if not n:
            return []
        copies = self.catalog.begin_many(index_keys[:n], sizes[:n], namespace, self.layout.landing, locations)
        return [PutSlot(sizes[i], checksums[i] if checksums else None, copy) for i, copy in enumerate(copies)]

    async def _reserve_evicting(
        self, index_keys: list[bytes], sizes: Sequence[int], checksums: Sequence[int], namespace: bytes
    ) -> list[PutSlot]:
        """The leading absent blocks of a batch that did not fit the landing level as it was, with
        the room for all of them made by one eviction (:meth:`Mover.make_room_many`), in one pass;
        the rest go through :meth:`reserve_one`, as do keys stored by another put meanwhile."""
        if self.mover.quotas is not None or len(set(index_keys)) != len(index_keys):
            return []
        lead = self._leading_absent(index_keys)
        if lead < 2:
            return []
        probes = [BlockRecord(key=key, size=size, namespace=namespace) for key, size in zip(index_keys[:lead], sizes[:lead])]
        locations = await self.mover.make_room_many(self.layout.landing, probes, leading=True)
        n = self._leading_absent(index_keys[: len(locations)])   # others may have stored some meanwhile
        for location in locations[n:]:
            self.arena.release(location)
        return self._begin(index_keys, sizes, checksums, namespace, locations[:n])

    async def reserve_one(self, key: bytes, size: int, checksum_: int | None, namespace: bytes) -> PutSlot:
        """Reserve landing space for one block of a checked batch (see :meth:`reserve`); ``key`` is
        the index key (:func:`~kvstore.keys.scoped`)."""
        if self._present(key):
            return PutSlot(size, checksum_, None, present=True)
        room = await self.mover.fit_quota(self.layout.landing, namespace, size) if self.mover.quotas else None
        if room is not None and room < size:   # over its owner's quota, even after its own made room
            self.counters.put_dropped_blocks += 1
            return PutSlot(size, checksum_, None)
        probe = BlockRecord(key=key, size=size, namespace=namespace)
        location = self.arena.reserve(probe)   # room now: nothing awaited, nothing changed meanwhile
        if location is None:
            location = await self.mover.make_room(self.layout.landing, probe)
            if location is not None and self._present(key):  # stored by someone else meanwhile
                self.arena.release(location)
                return PutSlot(size, checksum_, None, present=True)
        if location is None:
            self.counters.put_dropped_blocks += 1
            return PutSlot(size, checksum_, None)
        return PutSlot(size, checksum_, self.catalog.begin(key, size, namespace, self.layout.landing, location))

    def _present(self, key: bytes) -> bool:
        existing = self.catalog.get(key)
        if existing is None or self.catalog.forget_remote(existing):
            return False   # absent, or known only in a shared level: stored here now (a block sent home)
        if existing.state is BlockState.READY:
            self.catalog.touch(existing)
        self.counters.put_present_blocks += 1
        return True

    async def commit(self, slot: PutSlot, checksum_: int | None, *, settle: bool = True) -> bool:
        """Make a fully written block visible, and (with ``settle``) copy it on as the write policy
        says before returning. Puts of many blocks pass ``settle=False`` and call :meth:`settle`
        once for all of them, so their flushes and index commits are shared.

        False if it was deleted while being written.
        """
        copy, record = slot.copy, slot.record   # one block: no arrays (the remote path commits so)
        if record.state is BlockState.GONE:
            self.catalog.discard(copy)
            return False
        self.catalog.commit(copy, checksum_)
        self._stored([slot])
        if settle:
            await self.settle([slot])
        return True

    def commit_many(self, slots: Sequence[PutSlot], checksums: Sequence[int | None]) -> int:
        """:meth:`commit` (without settling) of many fully written blocks at once; returns how
        many were stored (those deleted while being written are not). Call :meth:`settle` next."""
        live, sums = [], []
        for slot, checksum_ in zip(slots, checksums):
            if slot.record.state is BlockState.GONE:
                self.catalog.discard(slot.copy)
            else:
                live.append(slot)
                sums.append(checksum_)
        self.catalog.commit_many([s.copy for s in live], sums)
        self._stored(live)
        return len(live)

    def _stored(self, slots: Sequence[PutSlot]) -> None:
        """Count committed blocks and queue them for write-behind, as the write policy says."""
        self.counters.put_stored_blocks += len(slots)
        if self.shared is not None:
            self.shared.queue_put((slot.record for slot in slots), bottom=self.after_put.queue)

    async def settle(self, slots: Sequence[PutSlot]) -> None:
        """Write committed blocks through, as the write policy says (``slot.persisted`` when durable
        there), all at once: the persistent tier groups their flushes and index commits."""
        targets = [t for t in (self.after_put.persist_to, self.after_put.share_to) if t is not None]
        if not targets:
            return
        live = [s for s in slots if s.copy is not None and s.record.state is BlockState.READY]
        for start in range(0, len(live), SETTLE_BATCH):
            batch = live[start : start + SETTLE_BATCH]
            for target in targets:
                done = await self.mover.replicate_many([s.record for s in batch], target)
                for slot, ok in zip(batch, done):
                    slot.persisted = ok or slot.persisted

    def abort(self, slot: PutSlot) -> None:
        """Throw away a reservation whose bytes did not all arrive or did not verify."""
        self.catalog.abort(slot.copy)

    # -- deletes ---------------------------------------------------------------------------------

    async def delete(
        self, keys: Sequence[bytes], if_checksums: Sequence[int] = (), namespace: bytes = b"", *, local_only: bool = False
    ) -> int:
        """Remove ``keys``; with ``if_checksums``, only blocks whose checksum is the one given."""
        self._check_keys(keys)
        if if_checksums and len(if_checksums) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(if_checksums)} checksums")
        doomed: list[Copy] = []
        deleted = 0
        # Unconditional deletes reach the shared level for every key, known here or not; a
        # conditional one only for the blocks it removed.
        shared_keys = [] if if_checksums else list(keys)
        index_keys = scoped(keys, namespace)
        for i, key in enumerate(index_keys):
            record = self.catalog.get(key)
            if record is None:
                continue
            if if_checksums and (record.state is not BlockState.READY or self.checksum_of(record) != if_checksums[i]):
                continue
            if if_checksums:
                shared_keys.append(keys[i])
            doomed += self.catalog.delete(record)
            deleted += 1
        await self.mover.drop(doomed)
        self.counters.deleted_blocks += deleted
        if self.shared is not None and shared_keys and not local_only:
            await self.shared.delete(shared_keys, scoped(shared_keys, namespace), namespace)
        return deleted

    async def peer_hello(self, agent: str, metadata: bytes) -> tuple[str, bytes, int, int] | None:
        """A peer daemon's NIXL hello, answered by the tier that moves bytes between daemons."""
        for level in self.shared.levels if self.shared is not None else ():
            hello = getattr(level.tier, "hello", None)
            if hello is not None:
                if not agent or not metadata:
                    raise InvalidArgumentError("a peer hello names its agent and sends its metadata")
                try:
                    return await hello(agent, metadata)
                except Exception as exc:   # metadata NIXL cannot read: that peer uses the gRPC stream
                    log.warning("a peer's NIXL hello was refused (%s)", exc)
                    return None
        return None

    def probe(self, packed: bytes, key_bytes: int, namespace: bytes = b"") -> tuple[bytes, list[int], list[int]]:
        """What a peer asks: for each key, the tier of this daemon's own fastest readable copy (0:
        none here; copies in shared tiers do not count), and the sizes and checksums of those held."""
        check_packed_keys(len(packed), key_bytes, max_keys=self.config.max_keys_per_request,
                          max_key_bytes=self.config.max_key_bytes)
        slots = self.catalog.keys.find_packed(packed, key_bytes, namespace_tag(namespace))
        levels, sizes, sums = self.catalog.held_here(slots)
        held = np.flatnonzero(levels >= 0)
        for j in np.flatnonzero(sums == 0).tolist():   # not checksummed yet
            sums[j] = self.checksum_of(self.catalog.record_at(int(slots[held[j]])))
        present = np.zeros(len(slots), dtype=np.uint8)
        present[held] = np.take(self._kind_codes, levels[held])
        self.counters.peer_probed_blocks += len(held)
        return present.tobytes(), sizes.tolist(), sums.tolist()

    # -- facts -----------------------------------------------------------------------------------

    def checksum_of(self, record: BlockRecord, copy: Copy | None = None) -> int:
        """The block's checksum, computed from its landing bytes on first need (same-host puts skip
        it; every copy below the landing level has it)."""
        if record.checksum is None:
            copy = copy or record.copies[self.layout.landing]
            record.checksum = checksum(self.arena.view(copy.location, record.size))
        return record.checksum

    def usage(self) -> list[TierUsage]:
        return [
            TierUsage(
                name=level.name, kind=level.kind, capacity_bytes=tier.capacity_bytes, used_bytes=tier.used_bytes,
                blocks=self.catalog.blocks_at(level.index),
            )
            for level, tier in zip(self.layout.levels, self.stack.tiers)
        ]

    def describe(self) -> str:
        """The stack, one clause per tier, for the start-up log."""
        return "; ".join(tier.description for tier in self.stack.tiers)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


def _within_bytes(found: Sequence[BlockRecord], limit: int) -> int:
    """How many leading blocks fit in ``limit`` bytes (at least one)."""
    total = 0
    for i, record in enumerate(found):
        total += record.size
        if total > limit and i > 0:
            return i
    return len(found)
