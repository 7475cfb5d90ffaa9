"""Moving block bytes between a chunked stream and the tiers.

:class:`PutReceiver` lays the data messages of a Put stream into the extents that
:meth:`Daemon.reserve` handed out, hashing as it goes, and commits each block the moment its last
byte arrived and matched its checksum. :func:`block_views` gives the pinned blocks of a Get as
views for :func:`kvstore.framing.pack`. Both see tiers only through the
:class:`~kvstore.tiers.Tier` interface, so the same framing serves every medium and transport.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.block import BlockRecord
from kvstore.checksum import hasher
from kvstore.errors import IntegrityError
from kvstore.framing import Unpacker
from kvstore.server.daemon import Daemon, PutSlot


class PutReceiver:
    def __init__(self, daemon: Daemon, slots: Sequence[PutSlot]) -> None:
        self._daemon = daemon
        self._slots = slots
        self._unpacker = Unpacker([slot.size for slot in slots])
        self._finished = 0
        self._hasher = hasher()
        self.stored = 0
        self.corrupt: list[int] = []

    async def feed(self, data: bytes) -> None:
        """Consume one data message."""
        tier = self._daemon.tier
        for i, offset, piece in self._unpacker.feed(data):
            slot = self._slots[i]
            if slot.record is not None:
                await tier.write(slot.record.extent, offset, piece)
                self._hasher.update(piece)
            if offset + piece.nbytes == slot.size:
                self._finish(i, slot)

    def close(self) -> None:
        """End of stream: every byte must have arrived and every checksum matched."""
        self._unpacker.check_complete()
        if self.corrupt:
            self._daemon.counters.integrity_failures += len(self.corrupt)
            raise IntegrityError(
                f"blocks {self.corrupt} did not match their checksums and were not stored "
                "(the other blocks of the batch were)"
            )

    def abort(self) -> None:
        """Throw away every reservation not yet committed (stream broken or rejected)."""
        for slot in self._slots[self._finished :]:
            if slot.record is not None:
                self._daemon.abort(slot)
        self._finished = len(self._slots)

    def _finish(self, i: int, slot: PutSlot) -> None:
        if slot.record is not None:
            actual = self._hasher.intdigest()
            self._hasher.reset()
            if slot.checksum is None or slot.checksum == actual:
                self.stored += self._daemon.commit(slot, actual)
            else:
                self.corrupt.append(i)
                self._daemon.abort(slot)
        self._finished = i + 1
        self._daemon.counters.bytes_in += slot.size


async def block_views(daemon: Daemon, records: Sequence[BlockRecord]) -> list[memoryview]:
    """The bytes of pinned blocks, in order (zero-copy views for memory tiers)."""
    tier = daemon.tier
    return [await tier.read(record.extent, 0, record.size) for record in records]
