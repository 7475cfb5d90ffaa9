"""Moving block bytes between a chunked stream and the tiers.

:class:`PutReceiver` lays the data messages of a Put stream into the extents that
:meth:`Daemon.reserve` handed out, hashing as it goes, and commits each block the moment its last
byte arrived and matched its checksum. :func:`block_views` gives the pinned blocks of a Get as
views for :func:`kvstore.framing.pack`. Both see tiers only through the
:class:`~kvstore.tiers.Tier` interface, so the same framing serves every medium and transport.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.block import Copy
from kvstore.checksum import hasher
from kvstore.errors import IntegrityError
from kvstore.framing import Unpacker
from kvstore.keys import scoped
from kvstore.server.daemon import Daemon, PutSlot


class PutReceiver:
    """Receives the data of one put stream whose header was checked with :meth:`Daemon.check_put`.

    Space for a block is reserved when its first byte arrives, not when the header does: blocks
    earlier in the stream are committed by then and can be demoted or evicted to make room, so a
    batch larger than the landing tier still goes through, and a stalled stream holds at most one block.
    """

    def __init__(
        self, daemon: Daemon, keys: Sequence[bytes], sizes: Sequence[int], checksums: Sequence[int], namespace: bytes,
        fit: int | None = None,
    ) -> None:
        self._daemon = daemon
        self._fit = len(keys) if fit is None else fit   # blocks past this are over the owner's quota
        self._keys = scoped(keys, namespace)
        self._namespace = namespace
        self._checksums = checksums
        self._unpacker = Unpacker(sizes)
        self.slots: list[PutSlot] = []
        self._open: PutSlot | None = None   # the block being received, reserved but not finished
        self._hasher = hasher()
        self._room_until = 0   # blocks before this index had their room freed together
        self.stored = 0
        self.corrupt: list[int] = []

    async def feed(self, data: bytes) -> None:
        """Consume one data message."""
        tier = self._daemon.arena
        for i, offset, piece in self._unpacker.feed(data):
            if offset == 0:
                checksum_ = self._checksums[i] if self._checksums else None
                if i < self._fit:
                    await self._make_room(i)
                    self._open = await self._daemon.reserve_one(
                        self._keys[i], self._unpacker.sizes[i], checksum_, self._namespace
                    )
                else:
                    self._open = self._daemon.over_quota(self._keys[i], self._unpacker.sizes[i], checksum_)
                self.slots.append(self._open)
            slot = self._open
            if slot.copy is not None:
                await tier.write(slot.copy.location, offset, piece)
                self._hasher.update(piece)
            if offset + piece.nbytes == slot.size:
                self._open = None
                await self._finish(i, slot)

    async def _make_room(self, i: int) -> None:
        """Where block ``i`` is absent and does not fit the landing level, free room for it and
        the absent blocks after it (up to a put round) with one eviction, not one per block."""
        daemon = self._daemon
        sizes, arena = self._unpacker.sizes, daemon.arena
        if i < self._room_until or arena.free_bytes >= arena.footprint(sizes[i]):
            return
        limit, total, end = daemon.put_round_bytes(), 0, i
        while end < self._fit and total + sizes[end] <= limit:
            total += sizes[end]
            end += 1
        end = max(end, i + 1)
        absent = daemon.catalog.keys.find_many(self._keys[i:end]) < 0   # present ones need no room
        if not absent[0]:
            return
        self._room_until = end
        need = sum(arena.footprint(size) for size, free in zip(sizes[i:end], absent.tolist()) if free)
        await daemon.mover.free_room(daemon.layout.landing, need)

    async def close(self) -> None:
        """End of stream: every byte must have arrived and every checksum matched; blocks are
        written through (as the write policy says) before this returns."""
        self._unpacker.check_complete()
        await self._daemon.settle(self.slots)
        if self.corrupt:
            self._daemon.counters.integrity_failures += len(self.corrupt)
            raise IntegrityError(
                f"blocks {self.corrupt} did not match their checksums and were not stored "
                "(the other blocks of the batch were)"
            )

    def abort(self) -> None:
        """Throw away the block being received, if any (stream broken or rejected)."""
        slot, self._open = self._open, None
        if slot is not None and slot.copy is not None:
            self._daemon.abort(slot)

    async def _finish(self, i: int, slot: PutSlot) -> None:
        if slot.copy is not None:
            actual = self._hasher.intdigest()
            self._hasher.reset()
            if slot.checksum is None or slot.checksum == actual:
                self.stored += await self._daemon.commit(slot, actual, settle=False)
            else:
                self.corrupt.append(i)
                self._daemon.abort(slot)
        self._daemon.counters.bytes_in += slot.size


def block_views(daemon: Daemon, copies: Sequence[Copy]) -> list[memoryview]:
    """The bytes of held landing copies, in order (zero-copy views)."""
    return [daemon.arena.view(copy.location, copy.record.size) for copy in copies]
