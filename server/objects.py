"""S3 placement: blocks flowing to and from the shared bucket below the local tiers.

- **Write-behind**: a block that reaches the bottom local tier (NVMe, or DRAM without NVMe) is
  queued (bounded; a full queue drops the request, counted) and uploaded in the background. A
  block the bottom tier evicts before its upload is uploaded then, before its bytes go. With
  ``s3.write_through`` a put is uploaded before it is acknowledged.
- **Lookups past the local prefix** ask S3 for the next keys, a window at a time, until the first
  key S3 does not have; keys it does have become S3-only records (reported as tier S3), keys it
  does not are remembered as misses for ``s3.negative_ttl_s``.
- **Reads** of S3-only blocks go through :meth:`ObjectStore.fetch_into` (verified) when the Mover
  promotes them into DRAM.

S3 being down or slow never fails a call: lookups and gets see misses, uploads are skipped, each
with a log line (at most one every few seconds) and the ``errors`` counter of the S3 tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.block import BlockRecord, BlockState, Copy
from kvstore.errors import UnavailableError
from kvstore.keys import unscoped
from kvstore.tier_kind import TierKind
from kvstore.tiers.s3 import S3Tier

log = logging.getLogger("kvstore.s3")

NEGATIVE_ENTRIES = 1 << 17
LOG_EVERY_S = 5.0


class ObjectStore:
    def __init__(self, daemon, tier: S3Tier) -> None:
        self.daemon = daemon
        self.tier = tier
        self.config = tier.config
        self._queue: asyncio.Queue[BlockRecord] | None = None
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self._last_log = 0.0
        self.known_blocks = 0   # blocks this daemon knows to be in the bucket
        self.known_bytes = 0

    async def open(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.queue_blocks)
        await self.tier.open()

    async def close(self) -> None:
        await self.tier.close()

    @property
    def counters(self):
        return self.daemon.counters.tier(TierKind.S3)

    def _failed(self, exc: Exception) -> None:
        self.counters.errors += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("S3 is unavailable; serving misses for S3-only blocks (%s)", exc)

    # -- lookups -------------------------------------------------------------------------------

    async def find(self, index_keys: Sequence[bytes], keys: Sequence[bytes], namespace: bytes) -> None:
        """Index the leading keys S3 has (past those present locally) as S3-only records."""
        d = self.daemon
        window = self.config.lookup_window
        now = time.monotonic()
        i = len(d.index.prefix(index_keys))
        while i < len(keys):
            batch = []
            for j in range(i, min(i + window, len(keys))):
                if self._misses.get(index_keys[j], 0.0) > now:
                    break
                batch.append(j)
            if not batch:
                return
            try:
                infos = await self.tier.head_many([keys[j] for j in batch], namespace)
            except UnavailableError as exc:
                self._failed(exc)
                return
            for j, info in zip(batch, infos):
                index_key = index_keys[j]
                if info is None or info.namespace != namespace:
                    self._remember_miss(index_key, now)
                    return
                existing = d.index.get(index_key)
                if existing is None:
                    record = BlockRecord(
                        key=index_key, size=info.size, checksum=info.checksum, state=BlockState.READY, namespace=namespace,
                    )
                    self.attach(record)
                    d.index.add(record)
                elif existing.state is not BlockState.READY:
                    return
            i = batch[-1] + 1

    def _remember_miss(self, index_key: bytes, now: float) -> None:
        self._misses[index_key] = now + self.config.negative_ttl_s
        self._misses.move_to_end(index_key)
        while len(self._misses) > NEGATIVE_ENTRIES:
            self._misses.popitem(last=False)

    # -- reads ---------------------------------------------------------------------------------

    async def fetch_into(self, record: BlockRecord, out: memoryview) -> bool | None:
        """Read and verify a block from S3: True, False (absent or corrupt: its S3 copy is
        forgotten), or None (S3 unavailable: a miss this time)."""
        try:
            size = await self.tier.get_into(unscoped(record.key, record.namespace), out, record.namespace)
        except UnavailableError as exc:
            self._failed(exc)
            return None
        return size == record.size  # anything else: absent, foreign or corrupt (the Mover counts it)

    # -- uploads -------------------------------------------------------------------------------

    def enqueue(self, record: BlockRecord) -> None:
        """Queue a block for write-behind upload (dropped, counted, when the queue is full)."""
        if self._queue is None or TierKind.S3 in record.copies:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.counters.dropped_uploads += 1

    async def run(self) -> None:
        """The write-behind loop: upload queued blocks in batches."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < 64 and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self.upload(batch)

    async def upload(self, records: Sequence[BlockRecord]) -> None:
        """Give each block an S3 copy now (from its fastest local copy)."""
        await asyncio.gather(*(self._upload_one(r) for r in records))

    async def _upload_one(self, record: BlockRecord) -> None:
        d = self.daemon
        if record.state is not BlockState.READY or TierKind.S3 in record.copies:
            return
        source = record.primary()
        if source is None or source.tier is TierKind.S3:
            return
        source.pins += 1
        d.mover.busy += 1
        try:
            if source.tier is TierKind.DRAM:
                data = d.dram.view(source.extent, record.size)
            else:
                data = memoryview(bytearray(record.size))
                await d.tiers[source.tier].read_into(source.extent, 0, data)
            await self.tier.put(unscoped(record.key, record.namespace), data, d.checksum_of(record), record.namespace)
        except UnavailableError as exc:
            self._failed(exc)
            return
        finally:
            d.mover.busy -= 1
            d.mover.unpin(source)
        if record.state is BlockState.READY and TierKind.S3 not in record.copies:
            self.attach(record)
            self.counters.uploads += 1

    def attach(self, record: BlockRecord) -> None:
        """Record that the bucket holds this block."""
        record.copies[TierKind.S3] = Copy(record=record, tier=TierKind.S3, extent=None, filled=True)
        self.known_blocks += 1
        self.known_bytes += record.size

    def detached(self, record: BlockRecord) -> None:
        """This daemon no longer counts on the bucket's copy (dropped or deleted)."""
        self.known_blocks -= 1
        self.known_bytes -= record.size

    async def delete(self, records: Sequence[BlockRecord]) -> None:
        by_namespace: dict[bytes, list[bytes]] = {}
        for r in records:
            by_namespace.setdefault(r.namespace, []).append(unscoped(r.key, r.namespace))
        try:
            for namespace, keys in by_namespace.items():
                await self.tier.delete(keys, namespace)
        except UnavailableError as exc:
            self._failed(exc)
