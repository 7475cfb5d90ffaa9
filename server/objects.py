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

S3 being down or slow does not fail calls: each request has a hard deadline
(``S3Tier.request_timeout_s``, retries included), and after a failure S3 is left alone for a
backoff period (``s3.backoff_s``, doubling up to 30 times that, reset by the next success) during which lookups and
gets see misses at once and uploads are skipped; each failure counts in the S3 tier's ``errors``
and is logged at most once every few seconds. Deletes are the exception: a delete S3 could not
carry out fails with UNAVAILABLE (after the local copies are gone), so a caller knows to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.block import BlockRecord, BlockState, Copy
from kvstore.checksum import checksum
from kvstore.errors import UnavailableError
from kvstore.keys import scoped, unscoped
from kvstore.tier_kind import TierKind
from kvstore.tiers.s3 import S3Tier

log = logging.getLogger("kvstore.s3")

NEGATIVE_ENTRIES = 1 << 17
LOG_EVERY_S = 5.0
BACKOFF_GROWTH = 30  # the backoff doubles up to this multiple of s3.backoff_s


class ObjectStore:
    def __init__(self, daemon, tier: S3Tier) -> None:
        self.daemon = daemon
        self.tier = tier
        self.config = tier.config
        self._queue: asyncio.Queue[BlockRecord] | None = None
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self._last_log = 0.0
        self._down_until = 0.0
        self._backoff_s = self.config.backoff_s
        self.known_blocks = 0   # blocks this daemon knows to be in the bucket
        self.known_bytes = 0
        # Records whose only copy is in the bucket, oldest first: the index forgets the oldest
        # beyond s3.max_remembered_blocks (a later lookup finds them again).
        self._remote_only: OrderedDict[bytes, BlockRecord] = OrderedDict()

    async def open(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.queue_blocks)
        await self.tier.open()

    async def close(self) -> None:
        await self.tier.close()

    @property
    def counters(self):
        return self.daemon.counters.tier(TierKind.S3)

    @property
    def reachable(self) -> bool:
        """False during the backoff after a failure: callers treat S3 as absent, without waiting."""
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.counters.errors += 1
        now = time.monotonic()
        self._down_until = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.config.backoff_s * BACKOFF_GROWTH)
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("S3 is unavailable; serving misses for S3-only blocks, retrying in %.0fs (%s)",
                        self._down_until - now, exc)

    def _succeeded(self) -> None:
        self._backoff_s = self.config.backoff_s

    # -- lookups -------------------------------------------------------------------------------

    async def find(self, index_keys: Sequence[bytes], keys: Sequence[bytes], namespace: bytes) -> None:
        """Index the leading keys S3 has (past those present locally) as S3-only records."""
        d = self.daemon
        if not self.reachable:
            return
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
            self._succeeded()
            limit = d.block_limit()[0]
            for j, info in zip(batch, infos):
                index_key = index_keys[j]
                if info is None or info.namespace != namespace or info.size > limit:
                    self._remember_miss(index_key, now)
                    return
                existing = d.index.get(index_key)
                if existing is None:
                    record = BlockRecord(
                        key=index_key, size=info.size, checksum=info.checksum, state=BlockState.READY, namespace=namespace,
                    )
                    self.attach(record)
                    d.index.add(record)
                    self.remote_only(record)
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
        """Read and verify a block from S3: True, False (absent, foreign or corrupt: the object is
        deleted so a put can replace it; the Mover counts it and forgets the copy), or None (S3
        unavailable: a miss this time)."""
        if not self.reachable:
            return None
        key = unscoped(record.key)
        try:
            size = await self.tier.get_into(key, out, record.namespace)
        except UnavailableError as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if size == record.size:
            return True
        self._remember_miss(record.key, time.monotonic())
        try:
            await self.tier.delete([key], record.namespace)
        except UnavailableError as exc:
            self._failed(exc)
        return False

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
        """The write-behind loop: upload queued blocks in batches (of at most 64 MiB)."""
        while True:
            batch = [await self._queue.get()]
            size = batch[0].size
            while len(batch) < 64 and size < 64 << 20 and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                size += batch[-1].size
            try:
                await self.upload(batch)
            except Exception:  # the loop must outlive any one batch
                log.exception("write-behind upload failed; continuing")

    async def upload(self, records: Sequence[BlockRecord]) -> None:
        """Give each block an S3 copy now (from its fastest local copy)."""
        await asyncio.gather(*(self._upload_one(r) for r in records))

    async def _upload_one(self, record: BlockRecord) -> None:
        d = self.daemon
        if record.state is not BlockState.READY or TierKind.S3 in record.copies or not self.reachable:
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
            if source.tier is not TierKind.DRAM and checksum(data) != record.checksum:
                raise OSError("the local copy failed verification")  # never upload bad bytes
            await self.tier.put(unscoped(record.key), data, d.checksum_of(record), record.namespace)
        except UnavailableError as exc:
            self._failed(exc)
            return
        except OSError as exc:
            log.warning("cannot upload block %s: %s", record.key.hex()[:16], exc)
            self.counters.errors += 1
            return
        finally:
            d.mover.busy -= 1
            d.mover.unpin(source)
        self._succeeded()
        if record.state is not BlockState.READY:
            # Deleted while uploading: the object must not outlive the delete.
            with contextlib.suppress(UnavailableError):
                await self.tier.delete([unscoped(record.key)], record.namespace)
        elif TierKind.S3 not in record.copies:
            self.attach(record)
            self.counters.uploads += 1

    def attach(self, record: BlockRecord) -> None:
        """Record that the bucket holds this block."""
        record.copies[TierKind.S3] = Copy(record=record, tier=TierKind.S3, extent=None, filled=True)
        self.known_blocks += 1
        self.known_bytes += record.size

    def remote_only(self, record: BlockRecord) -> None:
        """``record`` now lives only in the bucket: remember it (see :meth:`trim`)."""
        self._remote_only[record.key] = record
        self._remote_only.move_to_end(record.key)

    def trim(self) -> None:
        """Forget the oldest S3-only records beyond the bound (between calls, never inside one,
        so a lookup or get never loses blocks it just found)."""
        while len(self._remote_only) > self.config.max_remembered_blocks:
            _, oldest = self._remote_only.popitem(last=False)
            if oldest.state is BlockState.READY and list(oldest.copies) == [TierKind.S3]:
                del oldest.copies[TierKind.S3]
                self.detached(oldest)
                oldest.advance(BlockState.GONE)
                self.daemon.index.discard(oldest)

    def detached(self, record: BlockRecord) -> None:
        """This daemon no longer counts on the bucket's copy (dropped or deleted)."""
        self.known_blocks -= 1
        self.known_bytes -= record.size

    async def delete(self, keys: Sequence[bytes], namespace: bytes) -> None:
        """Delete the objects of ``keys`` (known here or not); raises UnavailableError if S3 could
        not be reached, so the caller learns the delete is incomplete."""
        now = time.monotonic()
        for index_key in scoped(keys, namespace):
            self._remember_miss(index_key, now)
        try:
            await self.tier.delete(keys, namespace)
        except UnavailableError as exc:
            self._failed(exc)
            raise UnavailableError(f"deleted locally, but not from S3: {exc}") from None
