"""The catalog: every block the daemon knows, its copies, and the only writer of their states.

It owns the index (key -> record), one eviction policy per bounded level, and the lifecycles of
records and copies (:mod:`kvstore.block`). Nothing else assigns a state: the daemon and the mover
ask the catalog to begin, fill, commit, hold, drop or retire, and it enforces the transitions.
A record is retired (GONE, out of the index) in one place, :meth:`Catalog._retire`.

The catalog does no I/O. When the last hold on a dropped copy goes, it hands the location back
through the ``release`` function it was built with (the tiers' ``release``), exactly once.
Mutated from the event-loop thread only, so it takes no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kvstore.block import BlockRecord, BlockState, Copy, CopyState, StoredBlock
from kvstore.keys import key_label
from kvstore.layout import Layout
from kvstore.policy import EvictionPolicy
from kvstore.stats import Counters


class Catalog:
    def __init__(
        self,
        layout: Layout,
        policies: Sequence[EvictionPolicy | None],
        release: Callable[[int, Any], None],
        counters: Counters,
    ) -> None:
        self.layout = layout
        self.policies = list(policies)   # None for unbounded (shared) levels
        self._release = release
        self.counters = counters
        self._records: dict[bytes, BlockRecord] = {}
        self._ready = [0] * len(layout.levels)    # readable copies per level
        # Records whose only readable copies are in shared levels, oldest first (see trim_remote).
        self._remote_only: OrderedDict[bytes, BlockRecord] = OrderedDict()

    # -- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[BlockRecord]:
        return iter(self._records.values())

    def get(self, key: bytes) -> BlockRecord | None:
        """The record of ``key`` in any state (WRITING included), or None."""
        return self._records.get(key)

    def prefix(self, keys: Sequence[bytes]) -> list[BlockRecord]:
        """Records of the leading readable keys: stops at the first that is absent, not READY, or
        has no readable copy."""
        found: list[BlockRecord] = []
        records = self._records
        ready = BlockState.READY
        for key in keys:
            record = records.get(key)
            if record is None or record.state is not ready or not record.copies:
                break
            found.append(record)
        return found

    def blocks_at(self, level: int) -> int:
        """Readable copies held at ``level``."""
        return self._ready[level]

    def victims(self, level: int, nbytes: int, fits: Callable[[list[Copy]], bool] | None = None) -> list[Copy]:
        """The copies of ``level`` its policy would evict to free ``nbytes`` (all or nothing)."""
        policy = self.policies[level]
        return policy.victims(nbytes, fits) if policy is not None else []

    # -- writing ---------------------------------------------------------------------------------

    def begin(self, key: bytes, size: int, namespace: bytes, level: int, location: Any) -> Copy:
        """A new WRITING record with one FILLING copy: invisible until :meth:`commit`."""
        record = BlockRecord(key=key, size=size, namespace=namespace)
        if key in self._records:
            raise RuntimeError(f"block {key_label(key)} is already indexed")
        self._records[key] = record
        return self.attach(record, level, location)

    def commit(self, copy: Copy, checksum: int | None) -> None:
        """The put of ``copy``'s block is complete: the block becomes readable."""
        record = copy.record
        record.checksum = checksum
        record.advance(BlockState.READY)
        self.fill(copy)

    def known(self, key: bytes, size: int, checksum: int, namespace: bytes) -> BlockRecord:
        """A READY record for a block found in a shared or persistent level (copies attached next)."""
        record = BlockRecord(key=key, size=size, checksum=checksum, namespace=namespace, state=BlockState.READY)
        if key in self._records:
            raise RuntimeError(f"block {key_label(key)} is already indexed")
        self._records[key] = record
        return record

    def recover(self, level: int, blocks: Sequence[StoredBlock]) -> None:
        """Index what a persistent level kept from an earlier run, least recently used first."""
        for block in sorted(blocks, key=lambda b: b.last_use):
            record = self.known(block.key, block.size, block.checksum, block.namespace)
            self.fill(self.attach(record, level, block.location))

    def attach(self, record: BlockRecord, level: int, location: Any) -> Copy:
        """A FILLING copy of ``record`` at ``level``: its bytes are on their way."""
        if level in record.copies:
            raise RuntimeError(f"block {key_label(record.key)} already has a copy at level {level}")
        copy = Copy(record=record, level=level, location=location)
        record.copies[level] = copy
        return copy

    def orphan(self, record: BlockRecord, level: int, location: Any) -> Copy:
        """A readable copy written for ``record`` that the record will not take (it went away, or
        another copy got there first): for the caller to :meth:`drop`, which un-indexes it."""
        return Copy(record=record, level=level, location=location, state=CopyState.READY)

    def fill(self, copy: Copy) -> None:
        """All of ``copy``'s bytes are in place: it becomes readable and evictable."""
        copy.advance(CopyState.READY)
        self._ready[copy.level] += 1
        policy = self.policies[copy.level]
        if policy is not None:
            policy.insert(copy)
        if self.layout.levels[copy.level].shared:
            self._note(copy.record)
        else:
            self._remote_only.pop(copy.record.key, None)

    def touch(self, record: BlockRecord) -> None:
        """A read is a use of every copy the block has."""
        for copy in record.copies.values():
            policy = self.policies[copy.level]
            if policy is not None and copy.state is CopyState.READY:
                policy.touch(copy)

    def hold(self, copy: Copy) -> None:
        copy.holds += 1

    def unhold(self, copy: Copy) -> None:
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
        forget: list[Copy] = []
        for copy in copies:
            if copy.state in (CopyState.DROPPED, CopyState.FREED):
                continue
            was_ready = copy.state is CopyState.READY
            self._leave(copy, evicted=evicted)
            if was_ready and self.layout.levels[copy.level].forget_before_reuse:
                copy.holds += 1
                forget.append(copy)
            else:
                self._free_if_done(copy)
        return forget

    def discard(self, copy: Copy) -> None:
        """Drop a copy that never became readable (a move that failed or came too late)."""
        self._leave(copy, evicted=False)
        self._free_if_done(copy)

    def trim_remote(self, limit: int) -> int:
        """Forget the oldest records whose only copies are shared, beyond ``limit`` (a later lookup
        finds them again). Returns how many were forgotten."""
        forgotten = 0
        busy: list[BlockRecord] = []
        while len(self._remote_only) > limit:
            _, record = self._remote_only.popitem(last=False)
            if record.state is not BlockState.READY or not self._only_shared(record):
                continue
            if any(copy.holds for copy in record.copies.values()):
                busy.append(record)  # a get is promoting it: kept, tried again next time
                limit -= 1
                continue
            self.drop(list(record.copies.values()))
            forgotten += 1
        for record in busy:
            self._remote_only[record.key] = record
        return forgotten

    # -- internals -------------------------------------------------------------------------------

    def _leave(self, copy: Copy, *, evicted: bool) -> None:
        record = copy.record
        if record.copies.get(copy.level) is copy:
            del record.copies[copy.level]
            if copy.state is CopyState.READY:
                self._ready[copy.level] -= 1
        copy.advance(CopyState.DROPPED)
        policy = self.policies[copy.level]
        if policy is not None:
            policy.remove(copy, evicted=evicted)
        if evicted and not record.copies:
            counters = self.counters.tier(self.layout.levels[copy.level].name)
            counters.evictions += 1
            counters.evicted_bytes += record.size
        if record.state is BlockState.READY:
            if record.primary() is None:
                self._retire(record)
            else:
                self._note(record)

    def _note(self, record: BlockRecord) -> None:
        if self._only_shared(record):
            self._remote_only[record.key] = record
            self._remote_only.move_to_end(record.key)

    def _only_shared(self, record: BlockRecord) -> bool:
        levels = self.layout.levels
        return bool(record.copies) and all(levels[level].shared for level in record.copies)

    def _retire(self, record: BlockRecord) -> None:
        """The one place a record leaves: GONE, out of the index (its copies are dropped by the
        caller or were already)."""
        record.advance(BlockState.GONE)
        if self._records.get(record.key) is record:
            del self._records[record.key]
        self._remote_only.pop(record.key, None)

    def _free_if_done(self, copy: Copy) -> None:
        if copy.state is CopyState.DROPPED and copy.holds == 0:
            copy.advance(CopyState.FREED)
            self._release(copy.level, copy.location)
