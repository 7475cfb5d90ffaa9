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
            if slot.copy is not None:
                await tier.write(slot.copy.extent, offset, piece)
                self._hasher.update(piece)
            if offset + piece.nbytes == slot.size:
                await self._finish(i, slot)

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
            if slot.copy is not None:
                self._daemon.abort(slot)
        self._finished = len(self._slots)

    async def _finish(self, i: int, slot: PutSlot) -> None:
        self._finished = i + 1  # from here on this slot is the commit's business, not abort's
        if slot.copy is not None:
            actual = self._hasher.intdigest()
            self._hasher.reset()
            if slot.checksum is None or slot.checksum == actual:
                self.stored += await self._daemon.commit(slot, actual)
            else:
                self.corrupt.append(i)
                self._daemon.abort(slot)
        self._daemon.counters.bytes_in += slot.size


def block_views(daemon: Daemon, copies: Sequence[Copy]) -> list[memoryview]:
    """The bytes of pinned DRAM copies, in order (zero-copy views)."""
    return [daemon.dram.view(copy.extent, copy.record.size) for copy in copies]
