"""The catalog: every block the daemon knows, its copies, and the only writer of their states.

It owns the index (key -> slot, :class:`~kvstore.keytable.KeyTable`), the blocks' fields as
columns indexed by slot (:mod:`kvstore.columns`), one eviction policy per bounded level, and the
lifecycles of records and copies (:mod:`kvstore.block`). Nothing else assigns a state: the daemon
and the mover ask the catalog to begin, fill, commit, hold, drop or retire, and it enforces the
transitions. A record is retired (GONE, out of the index) in one place, :meth:`Catalog._retire`.

Callers see blocks as :class:`~kvstore.block.BlockRecord` and :class:`~kvstore.block.Copy`
views, made on demand; the catalog hands out one view per record and per copy while anyone keeps
it (weakly cached), so identity holds, and converts a view to standalone when what it shows leaves
the columns (a retired record keeps a snapshot, a dropped copy its own state, holds and location).
A block at rest costs its columns only: no Python object.

The catalog does no I/O. When the last hold on a dropped copy goes, it hands the location back
through the ``release`` function it was built with (the tiers' ``release``), exactly once.
Mutated from the event-loop thread only, so it takes no locks.
"""

from __future__ import annotations

import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from kvstore import columns as col
from kvstore.allocator import Extent
from kvstore.block import (
    _STATE_CODES, BlockRecord, BlockState, Copy, CopyState, StoredBlock, StoredBlocks, TransitionError,
)
from kvstore.columns import LevelColumns, as_numpy
from kvstore.keys import key_label
from kvstore.keytable import KeyTable
from kvstore.layout import Layout
from kvstore.policy import EvictionPolicy, LevelView
from kvstore.stats import Counters

_WRITING, _READY_RECORD = _STATE_CODES[BlockState.WRITING], _STATE_CODES[BlockState.READY]
_COPY_STATES = {col.FILLING: CopyState.FILLING, col.READY: CopyState.READY}
_LEVEL_BITS = 3   # a copy view's cache key is slot << 3 | level (at most 8 levels)
_LOWEST_BIT = np.array([(v & -v).bit_length() - 1 if v else 8 for v in range(256)], dtype=np.int64)


class _Views:
    """The one live view of each slot (or copy), kept only while something else holds it: a
    WeakValueDictionary without its Python-level callback object per entry (puts into a full DRAM
    level: about 5% faster). Entries of views that died are swept once the table has doubled."""

    __slots__ = ("_refs", "_sweep_at")

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}
        self._sweep_at = 4096

    def get(self, key: int):
        ref = self._refs.get(key)
        return None if ref is None else ref()

    def __setitem__(self, key: int, view) -> None:
        refs = self._refs
        refs[key] = weakref.ref(view)
        if len(refs) >= self._sweep_at:
            self._refs = {k: r for k, r in refs.items() if r() is not None}
            self._sweep_at = max(2 * len(self._refs), 4096)

    def pop(self, key: int, default=None):
        ref = self._refs.pop(key, None)
        view = None if ref is None else ref()
        return default if view is None else view

    def __len__(self) -> int:   # live views (O(n): tests and stats)
        return sum(r() is not None for r in self._refs.values())


class Catalog:
    def __init__(
        self,
        layout: Layout,
        policies: Sequence[EvictionPolicy | None],
        release: Callable[[int, Any], None],
        counters: Counters,
    ) -> None:
        if len(layout.levels) > 1 << _LEVEL_BITS:
            raise ValueError(f"at most {1 << _LEVEL_BITS} levels")
        self.layout = layout
        self.policies = list(policies)   # None for unbounded (shared) levels
        self._release = release
        self.counters = counters
        self.state = array("B")      # record state code (0: free slot)
        self.size = array("Q")
        self._checksum = array("Q")
        self._has_checksum = array("B")
        self._ns = array("I")        # index into self._namespaces
        self._readable = array("B")  # bit L set: the copy at level L is READY (a lookup reads one byte)
        self._namespaces: list[bytes] = []
        self._ns_ids: dict[bytes, int] = {}
        self.columns = [LevelColumns() for _ in layout.levels]
        self._shared = [level.shared for level in layout.levels]
        self._ready = [0] * len(layout.levels)    # readable copies per level
        # Bytes of the copies (filling or ready) at each level, by namespace id: a tenant's quota.
        self._ns_bytes: list[dict[int, int]] = [{} for _ in layout.levels]
        # Records whose only readable copies are in shared levels, oldest first (see trim_remote).
        self._remote_only: OrderedDict[int, None] = OrderedDict()
        self._record_views = _Views()   # slot -> BlockRecord
        self._copy_views = _Views()     # slot << _LEVEL_BITS | level -> Copy
        self.keys = KeyTable(on_grow=self._grow)
        for level, policy in enumerate(self.policies):
            if policy is not None:
                c = self.columns[level]
                policy.bind(LevelView(prev=c.prev, next=c.next, freq=c.freq, queue=c.queue, length=c.length,
                                      evictable=self._evictable_at(level), ghost_key=self._ghost_key))

    def _grow(self, capacity: int) -> None:
        for column in (self.state, self.size, self._checksum, self._has_checksum, self._ns, self._readable):
            col.grow(column, capacity)
        for columns in self.columns:
            columns.grow(capacity)

    # -- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[BlockRecord]:
        slots = np.flatnonzero(as_numpy(self.state)).tolist()
        return iter([self.record_at(slot) for slot in slots])

    def get(self, key: bytes) -> BlockRecord | None:
        """The record of ``key`` in any state (WRITING included), or None (no view made then)."""
        slot = self.keys.find(key)
        return None if slot < 0 else self.record_at(slot)

    def prefix_slots(self, keys: Sequence[bytes], prefix: bytes = b"", namespace: bytes | None = None) -> np.ndarray:
        """Slots of the leading readable keys (``prefix + key``): stops at the first that is absent,
        not READY, has no readable copy, or (given ``namespace``) belongs to another namespace
        whose tag is the same. One vectorised pass, whatever the index size."""
        return self._leading(self.keys.find_many(keys, prefix), namespace)

    def prefix_slots_packed(
        self, packed: bytes, key_bytes: int, prefix: bytes = b"", namespace: bytes | None = None
    ) -> np.ndarray:
        """:meth:`prefix_slots` of keys laid end to end (:meth:`KeyTable.find_packed`)."""
        return self._leading(self.keys.find_packed(packed, key_bytes, prefix), namespace)

    def _leading(self, slots: np.ndarray, namespace: bytes | None = None) -> np.ndarray:
        found = slots >= 0
        safe = np.where(found, slots, 0)
        ok = found & (np.take(as_numpy(self.state), safe) == _READY_RECORD)
        ok &= np.take(as_numpy(self._readable), safe) != 0
        if namespace is not None:   # the index is keyed by an 8-byte tag: the namespace itself decides
            ok &= np.take(as_numpy(self._ns), safe) == self._ns_ids.get(namespace, -1)
        bad = np.flatnonzero(~ok)
        return slots[: bad[0] if len(bad) else len(slots)]

    def held_here(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each of ``slots`` (-1: absent): the level of its fastest readable copy in a local
        (not shared) level, or -1; and the sizes and checksums of the blocks held (0 where none is
        known yet: same-host puts are checksummed on first need)."""
        found = slots >= 0
        safe = np.where(found, slots, 0)
        local = sum(1 << i for i, shared in enumerate(self._shared) if not shared)
        bits = np.take(as_numpy(self._readable), safe) & local
        ok = found & (np.take(as_numpy(self.state), safe) == _READY_RECORD) & (bits != 0)
        levels = np.where(ok, np.take(_LOWEST_BIT, bits), -1)
        held = safe[ok]
        return levels, np.take(as_numpy(self.size), held), np.where(
            np.take(as_numpy(self._has_checksum), held) != 0, np.take(as_numpy(self._checksum), held), 0
        ).astype(np.uint64)

    def primary_levels(self, slots: np.ndarray) -> np.ndarray:
        """The level of each slot's fastest readable copy (the slots must have one)."""
        return np.take(_LOWEST_BIT, np.take(as_numpy(self._readable), slots))

    def prefix(self, keys: Sequence[bytes], prefix: bytes = b"", namespace: bytes | None = None) -> list[BlockRecord]:
        """Records of the leading readable keys (see :meth:`prefix_slots`)."""
        return [self.record_at(slot) for slot in self.prefix_slots(keys, prefix, namespace).tolist()]

    def blocks_at(self, level: int) -> int:
        """Readable copies held at ``level``."""
        return self._ready[level]

    def namespace_bytes(self, level: int, namespaces: Iterable[bytes]) -> int:
        """Bytes of the copies at ``level`` (filling or ready) of blocks in ``namespaces``."""
        counts, ids = self._ns_bytes[level], self._ns_ids
        return sum(counts.get(ids[ns], 0) for ns in namespaces if ns in ids)

    def victims_of(self, level: int, namespaces: Iterable[bytes], nbytes: int) -> list[Copy]:
        """The coldest evictable copies at ``level`` of blocks in ``namespaces``, up to ``nbytes``
        (fewer when there are not that many): what a tenant over its quota gives up first."""
        policy = self.policies[level]
        wanted = {self._ns_ids[ns] for ns in namespaces if ns in self._ns_ids}
        if policy is None or not wanted or nbytes <= 0:
            return []
        evictable, length, ns = self._evictable_at(level), self.columns[level].length, self._ns
        chosen, total = [], 0
        for slot in policy.oldest_first():
            if ns[slot] in wanted and evictable(slot):
                chosen.append(slot)
                total += length[slot]
                if total >= nbytes:
                    break
        return [self._copy_view(slot, level) for slot in chosen]

    def victims(self, level: int, nbytes: int, fits: Callable[[list[Any]], bool] | None = None) -> list[Copy]:
        """The copies of ``level`` its policy would evict to free ``nbytes`` (all or nothing);
        ``fits`` is asked about the locations the chosen copies would free."""
        return self.views_at(level, self.victim_slots(level, nbytes, fits))

    def victim_slots(self, level: int, nbytes: int, fits: Callable[[list[Any]], bool] | None = None) -> list[int]:
        """:meth:`victims` as slots, no view made."""
        policy = self.policies[level]
        if policy is None:
            return []
        columns = self.columns[level]
        test = None if fits is None else (lambda slots: fits([columns.location(s) for s in slots]))
        return policy.victims(nbytes, test)

    def views_at(self, level: int, slots: Iterable[int]) -> list[Copy]:
        return [self._copy_view(slot, level) for slot in slots]

    def has_copies(self, level: int, slots: np.ndarray) -> np.ndarray:
        """:meth:`BlockRecord.has_copy` of the records at ``slots``, as one bool array."""
        return np.take(as_numpy(self.columns[level].state), slots) != col.NONE

    # -- views (for BlockRecord and Copy) --------------------------------------------------------

    def record_at(self, slot: int) -> BlockRecord:
        view = self._record_views.get(slot)
        if view is None:
            view = self._record_views[slot] = BlockRecord._bound(self, slot)
        return view

    def _copy_view(self, slot: int, level: int) -> Copy:
        key = slot << _LEVEL_BITS | level
        view = self._copy_views.get(key)
        if view is None:   # it keeps its record's view alive with it
            view = self._copy_views[key] = Copy._bound(self, slot, level, self.record_at(slot))
        return view

    def copy_state(self, slot: int, level: int) -> CopyState:
        return _COPY_STATES[self.columns[level].state[slot]]

    def set_copy_state(self, slot: int, level: int, state: CopyState) -> None:
        if state is CopyState.READY:
            self.fill(self._copy_view(slot, level))
        else:
            raise TransitionError(f"copy at level {level}: leaves only through the catalog")

    def copies_of(self, slot: int) -> dict[int, Copy]:
        return {level: self._copy_view(slot, level)
                for level, columns in enumerate(self.columns) if columns.state[slot]}

    def primary_of(self, slot: int) -> Copy | None:
        for level, columns in enumerate(self.columns):
            if columns.state[slot] == col.READY:
                return self._copy_view(slot, level)
        return None

    def checksum_at(self, slot: int) -> int | None:
        return self._checksum[slot] if self._has_checksum[slot] else None

    def set_checksum(self, slot: int, value: int | None) -> None:
        self._has_checksum[slot] = value is not None
        self._checksum[slot] = value or 0

    def namespace_of(self, slot: int) -> bytes:
        return self._namespaces[self._ns[slot]]

    def _evictable_at(self, level: int) -> Callable[[int], bool]:
        columns, state = self.columns[level], self.state

        def evictable(slot: int) -> bool:
            return columns.holds[slot] == 0 and columns.state[slot] == col.READY and state[slot] == _READY_RECORD
        return evictable

    def _ghost_key(self, slot: int) -> int:
        return self.keys.hash_of(slot)

    # -- writing ---------------------------------------------------------------------------------

    def begin(self, key: bytes, size: int, namespace: bytes, level: int, location: Any) -> Copy:
        """A new WRITING record with one FILLING copy: invisible until :meth:`commit`."""
        record = self._new(key, size, None, namespace, _WRITING)
        return self.attach(record, level, location)

    def begin_many(self, keys: Sequence[bytes], sizes: Sequence[int], namespace: bytes, level: int,
                   locations: Sequence[Extent]) -> list[Copy]:
        """:meth:`begin` for blocks known to be absent (and distinct), their fields written as
        columns in one pass."""
        slots = []
        try:
            for key in keys:
                slots.append(self.keys.add(key))
        except KeyError:
            for slot in slots:
                self.keys.remove(slot)
            raise RuntimeError("a block of the batch is already indexed") from None
        self._write_columns(
            np.array(slots, dtype=np.int64), level, state=_WRITING, sizes=sizes, checksums=None,
            ns=self._namespace_id(namespace), copy_state=col.FILLING, offsets=[e.offset for e in locations], lengths=[e.length for e in locations],
        )
        return [self._copy_view(slot, level) for slot in slots]

    def _write_columns(self, at: np.ndarray, level: int, *, state: int, sizes, checksums, ns, copy_state: int,
                       offsets, lengths) -> None:
        """Fields of new records at slots ``at``, each with one extent copy at ``level`` (scalars or
        one value per slot; ``checksums`` None: none yet)."""
        known = checksums is not None
        for column, values in ((self.state, state), (self.size, sizes), (self._checksum, checksums if known else 0),
                               (self._has_checksum, int(known)), (self._ns, ns),
                               (self._readable, (1 << level) if copy_state == col.READY else 0)):
            as_numpy(column)[at] = values
        columns = self.columns[level]
        for column, values in ((columns.state, copy_state), (columns.holds, 0), (columns.offset, offsets),
                               (columns.length, lengths)):
            as_numpy(column)[at] = values
        self._count_ns_bytes(level, ns, sizes, 1)

    def _count_ns_bytes(self, level: int, ns, sizes, sign: int) -> None:
        """Add (``sign`` 1) or take away (-1) ``sizes`` from the bytes each namespace holds at
        ``level`` (``ns``: one id for all, or one per size)."""
        counts = self._ns_bytes[level]
        if np.ndim(ns) == 0:
            counts[int(ns)] = counts.get(int(ns), 0) + sign * int(np.sum(sizes, dtype=np.int64))
            return
        ids, inverse = np.unique(np.asarray(ns, dtype=np.int64), return_inverse=True)
        for ns_id, total in zip(ids.tolist(), np.bincount(inverse, weights=np.asarray(sizes, dtype=np.float64)).tolist()):
            counts[ns_id] = counts.get(ns_id, 0) + sign * int(total)

    def commit_many(self, copies: Sequence[Copy], checksums: Sequence[int | None]) -> None:
        """:meth:`commit` for many puts' copies at once (all WRITING records of one level, their
        copies in the columns): columns written and the policy linked in one pass each."""
        if not copies:
            return
        level = copies[0].level
        at = np.array([c.slot for c in copies], dtype=np.int64)
        if (any(c._own is not None or c.level != level for c in copies)
                or (np.take(as_numpy(self.state), at) != _WRITING).any()):
            for copy, checksum in zip(copies, checksums):   # let commit name what is wrong
                self.commit(copy, checksum)
            return
        given = np.array([c is not None for c in checksums], dtype=bool)
        as_numpy(self._checksum)[at] = [c or 0 for c in checksums]
        as_numpy(self._has_checksum)[at] = given
        as_numpy(self.state)[at] = _READY_RECORD
        as_numpy(self.columns[level].state)[at] = col.READY
        readable = as_numpy(self._readable)
        readable[at] |= 1 << level
        del readable
        self._ready[level] += len(at)
        policy = self.policies[level]
        if policy is not None:
            policy.insert_many(at)
        if self._shared[level]:
            for slot in at.tolist():
                self._note(slot)
        # a record just begun was never remembered as remote-only (retiring forgets a slot)

    def commit(self, copy: Copy, checksum: int | None) -> None:
        """The put of ``copy``'s block is complete: the block becomes readable."""
        slot = copy.slot
        if copy._own is not None or self.state[slot] != _WRITING:
            raise TransitionError(f"block {key_label(copy.record.key)}: {copy.record.state.name} -> READY")
        self.set_checksum(slot, checksum)
        self.state[slot] = _READY_RECORD
        self.fill(copy)

    def known(self, key: bytes, size: int, checksum: int, namespace: bytes) -> BlockRecord:
        """A READY record for a block found in a shared or persistent level (copies attached next)."""
        return self._new(key, size, checksum, namespace, _READY_RECORD)

    def _new(self, key: bytes, size: int, checksum: int | None, namespace: bytes, state: int) -> BlockRecord:
        try:
            slot = self.keys.add(key)
        except KeyError:
            raise RuntimeError(f"block {key_label(key)} is already indexed") from None
        self.state[slot] = state
        self.size[slot] = size
        self.set_checksum(slot, checksum)
        self._ns[slot] = self._namespace_id(namespace)
        return self.record_at(slot)

    def _namespace_id(self, namespace: bytes) -> int:
        ns = self._ns_ids.get(namespace)
        if ns is None:
            ns = self._ns_ids[namespace] = len(self._namespaces)
            self._namespaces.append(namespace)
        return ns

    def recover(self, level: int, blocks: Sequence[StoredBlock]) -> None:
        """Index what a persistent level kept from an earlier run, least recently used first. The
        first level recovered into an empty catalog is indexed in bulk (columns in, no object per
        block); anything else block by block, checked."""
        if not len(blocks):
            return
        columnar = isinstance(blocks, StoredBlocks)
        if len(self.keys) or not (columnar or all(type(b.location) is Extent for b in blocks)):
            for block in sorted(blocks, key=lambda b: b.last_use):
                record = self.known(block.key, block.size, block.checksum, block.namespace)
                self.fill(self.attach(record, level, block.location))
            return
        if not columnar:
            blocks = _as_columns(blocks)
        try:
            slots = self.keys.add_many(blocks.keys)
        except KeyError:
            raise RuntimeError(f"level {self.layout.levels[level].name} recovered a block twice") from None
        ns_ids = np.array([self._namespace_id(ns) for ns in blocks.namespaces], dtype=np.int64)
        self._write_columns(
            slots, level, state=_READY_RECORD, sizes=blocks.sizes, checksums=blocks.checksums,
            ns=np.take(ns_ids, blocks.namespace_ids), copy_state=col.READY, offsets=blocks.offsets,
            lengths=blocks.lengths,
        )
        policy = self.policies[level]
        if policy is not None:
            policy.insert_many(slots[np.argsort(blocks.last_use, kind="stable")])
        self._ready[level] += len(slots)
        if self._shared[level]:
            for slot in slots.tolist():
                self._remote_only[slot] = None

    def attach(self, record: BlockRecord, level: int, location: Any) -> Copy:
        """A FILLING copy of ``record`` at ``level``: its bytes are on their way."""
        if record.state is BlockState.GONE or record._cat is not self:
            raise RuntimeError(f"block {key_label(record.key)} is not indexed")
        columns = self.columns[level]
        if columns.state[record.slot]:
            raise RuntimeError(f"block {key_label(record.key)} already has a copy at level {level}")
        columns.place(record.slot, location, col.FILLING)
        counts, ns = self._ns_bytes[level], self._ns[record.slot]
        counts[ns] = counts.get(ns, 0) + self.size[record.slot]
        return self._copy_view(record.slot, level)

    def attach_filled(self, records: Sequence[BlockRecord], level: int, locations: Sequence[Any]) -> None:
        """:meth:`attach` then :meth:`fill` of a readable copy of each record at ``level`` (a batch
        written there already: no copy objects made). Each record must be READY, indexed here and
        without a copy at ``level`` (callers check)."""
        columns, counts, policy = self.columns[level], self._ns_bytes[level], self.policies[level]
        shared, bit = self._shared[level], 1 << level
        slots = []
        for record, location in zip(records, locations):
            slot = record.slot
            if record._cat is not self or columns.state[slot]:
                raise RuntimeError(f"block {key_label(record.key)} cannot take a copy at level {level}")
            columns.place(slot, location, col.READY)
            ns = self._ns[slot]
            counts[ns] = counts.get(ns, 0) + self.size[slot]
            self._readable[slot] |= bit
            slots.append(slot)
        self._ready[level] += len(slots)
        if policy is not None:
            policy.insert_many(slots)
        for slot in slots:
            if shared:
                self._note(slot)
            else:
                self._remote_only.pop(slot, None)

    def orphan(self, record: BlockRecord, level: int, location: Any) -> Copy:
        """A readable copy written for ``record`` that the record will not take (it went away, or
        another copy got there first): for the caller to :meth:`drop`, which un-indexes it."""
        return Copy(record=record, level=level, location=location, state=CopyState.READY)

    def fill(self, copy: Copy) -> None:
        """All of ``copy``'s bytes are in place: it becomes readable and evictable."""
        if copy._own is not None:
            raise TransitionError(f"copy at level {copy.level}: {copy.state.name} -> READY (it left its level)")
        slot, level = copy.slot, copy.level
        columns = self.columns[level]
        if columns.state[slot] != col.FILLING:
            raise TransitionError(f"copy at level {level}: {copy.state.name} -> READY")
        columns.state[slot] = col.READY
        self._readable[slot] |= 1 << level
        self._ready[level] += 1
        policy = self.policies[level]
        if policy is not None:
            policy.insert(slot)
        if self._shared[level]:
            self._note(slot)
        else:
            self._remote_only.pop(slot, None)

    def touch(self, record: BlockRecord) -> None:
        """A read is a use of every copy the block has."""
        slot = record.slot
        if record._cat is not self:
            return
        for level, policy in enumerate(self.policies):
            if policy is not None and self.columns[level].state[slot] == col.READY:
                policy.touch(slot)

    def hold(self, copy: Copy) -> None:
        copy.holds += 1

    def unhold(self, copy: Copy) -> None:
        if copy.holds <= 0:
            raise TransitionError(f"copy at level {copy.level}: let go of more often than held")
        copy.holds -= 1
        self._free_if_done(copy)

    def abort(self, copy: Copy) -> None:
        """Throw away a put's reservation (bytes missing or wrong); the block never existed."""
        record = copy.record
        if record.state is BlockState.WRITING:
            self._retire(record)
        self._leave(copy, evicted=False)
        self._free_if_done(copy)

    def delete(self, record: BlockRecord) -> list[Copy]:
        """Forget a block: WRITING ones at once (their put frees the reservation when it sees
        GONE); READY ones lose every copy. Returns the copies the caller must :meth:`drop`."""
        if record.state is BlockState.WRITING:
            self._retire(record)
            return []
        return list(record.copies.values())

    def drop(self, copies: Sequence[Copy], *, evicted: bool = False) -> list[Copy]:
        """Take copies out of their levels; a record left with no readable copy is gone.

        Returns the dropped copies whose index entries must be durably forgotten before their
        locations are reused (:attr:`Level.forget_before_reuse`); each of those is held for the
        caller, who calls :meth:`unhold` once the entry is gone. Every other location goes back to
        its tier as soon as nothing holds it.
        """
        if evicted and len(copies) > 1:   # the usual eviction batch: one pass where it qualifies
            level = copies[0].level
            if (not self.layout.levels[level].forget_before_reuse and all(c._own is None and c.level == level for c in copies)
                    and self.evict_slots(level, [c.slot for c in copies]) is not None):
                return []
        forget: list[Copy] = []
        for copy in copies:
            state = copy.state
            if state in (CopyState.DROPPED, CopyState.FREED):
                continue
            self._leave(copy, evicted=evicted)
            if state is CopyState.READY and self.layout.levels[copy.level].forget_before_reuse:
                copy.holds += 1
                forget.append(copy)
            else:
                self._free_if_done(copy)
        return forget

    def evict_slots(self, level: int, slots: Sequence[int]) -> list[tuple[bytes, Extent]] | None:
        """:meth:`drop` (``evicted``) of the copies at ``level`` of ``slots`` (from
        :meth:`victim_slots`) in one pass per column, without a view per copy: the usual eviction.
        Those copies must be READY and unheld, of READY records, distinct; if any is not, nothing
        changes and None says to drop their views instead. A view of one that someone keeps is
        detached FREED: its location is given back exactly once, here or by
        :meth:`release_forgotten`, never through the view.

        Their locations go back at once, except at a level that forgets before reuse: there the
        ``(index key, extent)`` of each is returned, for the caller to forget durably and then give
        back with :meth:`release_forgotten` (or keep, where forgetting failed)."""
        at = np.asarray(slots, dtype=np.int64)
        columns = self.columns[level]
        offsets = np.take(as_numpy(columns.offset), at)
        if (len(np.unique(at)) != len(at) or (offsets == col.NIL).any()
                or (np.take(as_numpy(columns.state), at) != col.READY).any() or np.take(as_numpy(columns.holds), at).any()
                or (np.take(as_numpy(self.state), at) != _READY_RECORD).any()):
            return None
        forget_first = self.layout.levels[level].forget_before_reuse
        lengths, sizes = np.take(as_numpy(columns.length), at), np.take(as_numpy(self.size), at).astype(np.int64)
        policy, views, offs, lens = self.policies[level], self._copy_views, offsets.tolist(), lengths.tolist()
        extents = [Extent(offset, length) for offset, length in zip(offs, lens)]
        keys = [self.keys.key(slot) for slot in at.tolist()] if forget_first else []
        for i, slot in enumerate(at.tolist()):
            if policy is not None:
                policy.remove(slot, evicted=True)
            view = views.pop(slot << _LEVEL_BITS | level)
            if view is not None:   # nothing holds it: FREED (its extent goes back here or in release_forgotten)
                view._detach(CopyState.FREED, 0, extents[i], self.record_at(slot))
        self._ready[level] -= len(at)
        readable = as_numpy(self._readable)
        readable[at] &= ~(1 << level) & 0xFF
        del readable
        as_numpy(columns.state)[at] = col.NONE
        self._count_ns_bytes(level, np.take(as_numpy(self._ns), at), sizes, -1)
        left_any = np.zeros(len(at), dtype=bool)
        left_ready = np.zeros(len(at), dtype=bool)
        for other in self.columns:
            state = np.take(as_numpy(other.state), at)
            left_any |= state != col.NONE
            left_ready |= state == col.READY
        counters = self.counters.tier(self.layout.levels[level].name)
        counters.evictions += int(np.count_nonzero(~left_any))
        counters.evicted_bytes += int(sizes[~left_any].sum())
        for slot in at[~left_any].tolist():   # its last copy: the record goes (see _retire)
            self._remote_only.pop(slot, None)
            record = self._record_views.pop(slot)
            if record is not None:
                record._retire()
            self.state[slot] = 0
            self.keys.remove(slot)
        for slot in at[left_any & ~left_ready].tolist():
            self._retire(self.record_at(slot))
        if any(self._shared):
            for slot in at[left_ready].tolist():
                self._note(slot)
        if forget_first:
            return list(zip(keys, extents))
        self.release_forgotten(level, extents)
        return []

    def release_forgotten(self, level: int, extents: Iterable[Extent]) -> None:
        """Give back the locations of copies :meth:`evict_slots` took out (their entries forgotten)."""
        for extent in extents:
            self._release(level, extent)

    def discard(self, copy: Copy) -> None:
        """Drop a copy that never became readable (a move that failed or came too late)."""
        self._leave(copy, evicted=False)
        self._free_if_done(copy)

    def forget_remote(self, record: BlockRecord) -> bool:
        """Forget ``record`` if all it has are copies in shared levels that nothing holds (a put of
        its bytes is about to give it a local copy: the block is then stored as a new one). Returns
        whether it was forgotten."""
        slot = record.slot
        if self.state[slot] != _READY_RECORD or not self._only_shared(slot):
            return False
        if any(c.holds[slot] for c in self.columns if c.state[slot]):
            return False
        self.drop(list(self.copies_of(slot).values()))
        return True

    def trim_remote(self, limit: int) -> int:
        """Forget the oldest records whose only copies are shared, beyond ``limit`` (a later lookup
        finds them again). Returns how many were forgotten."""
        forgotten = 0
        busy: list[int] = []
        while self._remote_only and len(self._remote_only) > limit:
            slot, _ = self._remote_only.popitem(last=False)
            if self.state[slot] != _READY_RECORD or not self._only_shared(slot):
                continue
            if any(c.holds[slot] for c in self.columns if c.state[slot]):
                busy.append(slot)  # a get is promoting it: kept, tried again next time
                limit -= 1
                continue
            self.drop(list(self.copies_of(slot).values()))
            forgotten += 1
        for slot in busy:
            self._remote_only[slot] = None
        return forgotten

    # -- internals -------------------------------------------------------------------------------

    def _leave(self, copy: Copy, *, evicted: bool) -> None:
        """``copy`` leaves its level: out of the columns (its view keeps its holds and location)."""
        level = copy.level
        if copy._own is not None:   # already out of the columns (an orphan, a copy that left)
            if copy._own[0] in (CopyState.FILLING, CopyState.READY):
                copy._own[0] = CopyState.DROPPED
            return
        slot = copy.slot
        record = self.record_at(slot)
        self._take_out(copy, CopyState.DROPPED, evicted=evicted)
        remaining = [c.state[slot] for c in self.columns]
        if evicted and not any(remaining):
            counters = self.counters.tier(self.layout.levels[level].name)
            counters.evictions += 1
            counters.evicted_bytes += self.size[slot]
        if self.state[slot] == _READY_RECORD:
            if col.READY not in remaining:
                self._retire(record)
            else:
                self._note(slot)

    def _note(self, slot: int) -> None:
        if self._only_shared(slot):
            self._remote_only[slot] = None
            self._remote_only.move_to_end(slot)

    def _only_shared(self, slot: int) -> bool:
        held = [level for level, c in enumerate(self.columns) if c.state[slot]]
        return bool(held) and all(self._shared[level] for level in held)

    def _retire(self, record: BlockRecord) -> None:
        """The one place a record leaves: GONE, out of the index. Copies still in its columns (a
        put or a move filling them) leave with it, each kept by its view for the one filling it."""
        if record._cat is not self:
            record.advance(BlockState.GONE)
            return
        slot = record.slot
        for level, columns in enumerate(self.columns):
            if columns.state[slot]:
                self._take_out(self._copy_view(slot, level), None)   # keeps FILLING or READY
        self._remote_only.pop(slot, None)
        record._retire()
        self._record_views.pop(slot, None)
        self.state[slot] = 0
        self.keys.remove(slot)

    def _take_out(self, copy: Copy, state: CopyState | None, *, evicted: bool = False) -> None:
        """Move a copy from the columns into its view, as ``state`` (None: as it is), with its holds
        and location; its level and policy forget it."""
        slot, level, columns = copy.slot, copy.level, self.columns[copy.level]
        if columns.state[slot] == col.READY:
            self._ready[level] -= 1
            self._readable[slot] &= ~(1 << level) & 0xFF
        policy = self.policies[level]
        if policy is not None:
            policy.remove(slot, evicted=evicted)
        self._copy_views.pop(slot << _LEVEL_BITS | level, None)
        copy._detach(state or _COPY_STATES[columns.state[slot]], columns.holds[slot], columns.location(slot),
                     self.record_at(slot))
        columns.clear(slot)
        self._ns_bytes[level][self._ns[slot]] -= self.size[slot]

    def _free_if_done(self, copy: Copy) -> None:
        own = copy._own
        if own is not None and own[0] is CopyState.DROPPED and own[1] == 0:
            own[0] = CopyState.FREED
            self._release(copy.level, own[2])


def _as_columns(blocks: Sequence[StoredBlock]) -> StoredBlocks:
    """Stored blocks with extent locations, as columns."""
    ids: dict[bytes, int] = {}
    return StoredBlocks(
        [b.key for b in blocks],
        offsets=np.array([b.location.offset for b in blocks], dtype=np.int64),
        lengths=np.array([b.location.length for b in blocks], dtype=np.int64),
        sizes=np.array([b.size for b in blocks], dtype=np.int64),
        checksums=np.array([b.checksum for b in blocks], dtype=np.uint64),
        last_use=np.array([b.last_use for b in blocks], dtype=np.float64),
        namespace_ids=np.array([ids.setdefault(b.namespace, len(ids)) for b in blocks], dtype=np.int64),
        namespaces=list(ids),
    )
