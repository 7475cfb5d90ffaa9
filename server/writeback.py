"""The write-behind queue: blocks waiting for their copy in the shared level (bounded).

A block that reaches the bottom local level is queued here and uploaded in the background; a full
queue drops the request and counts it (the block is uploaded before its last local copy is
evicted anyway). The queue only holds records; the daemon's background loop drains it through
the mover.
"""

from __future__ import annotations

import asyncio

from kvstore.block import BlockRecord
from kvstore.stats import TierCounters

BATCH_BLOCKS = 64
BATCH_BYTES = 64 << 20


class UploadQueue:
    def __init__(self, level: int, max_blocks: int, counters: TierCounters) -> None:
        self.level = level
        self._queue: asyncio.Queue[BlockRecord] = asyncio.Queue(maxsize=max_blocks)
        self._counters = counters

    def put(self, record: BlockRecord) -> None:
        if record.has_copy(self.level):
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._counters.dropped_uploads += 1

    async def batch(self) -> list[BlockRecord]:
        """Wait for queued blocks; returns up to a batch of them."""
        batch = [await self._queue.get()]
        size = batch[0].size
        while len(batch) < BATCH_BLOCKS and size < BATCH_BYTES and not self._queue.empty():
            batch.append(self._queue.get_nowait())
            size += batch[-1].size
        return batch
