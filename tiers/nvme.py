"""NVMe tier: one large preallocated file under a directory, an extent allocator over it, and a
persistent LMDB index beside it.

Layout of ``nvme.dir``::

    blocks.dat   the data file, ``capacity_bytes`` long, preallocated; extents 4 KiB aligned
    index/       LMDB: key -> (offset, length, size, checksum, last use)

Durability protocol: a block's bytes are written and flushed (``fdatasync``) before its index
entry is committed (a synchronous LMDB transaction), and an entry is deleted before its extent
can be reused. After a crash the index never names bytes that did not reach the disk; a restart
rebuilds the allocator and the daemon's index from LMDB alone. Every read is verified against
the stored checksum by the daemon, so bytes that rotted on disk become misses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.config import NvmeConfig
from kvstore.errors import ConfigError
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import ExtentTier, PersistentTier
from kvstore.tiers.file_io import open_file_io
from kvstore.tiers.nvme_index import IndexEntry, NvmeIndex

log = logging.getLogger("kvstore.tiers.nvme")

DATA_FILE = "blocks.dat"
INDEX_DIR = "index"


class NvmeTier(ExtentTier, PersistentTier):
    kind = TierKind.NVME

    def __init__(self, config: NvmeConfig) -> None:
        self.config = config
        directory = config.resolved_dir()
        try:
            os.makedirs(directory, exist_ok=True)
            self._allocator = ExtentAllocator(config.capacity_bytes, config.alignment_bytes)
            self._io = open_file_io(
                os.path.join(directory, DATA_FILE), threads=config.io_threads, direct=config.direct_io,
                engine=config.io_engine,
            )
            self._io.preallocate(self._allocator.capacity_bytes)
            self._index = NvmeIndex(os.path.join(directory, INDEX_DIR), config.index_map_bytes)
        except OSError as exc:
            raise ConfigError(f"nvme.dir={directory}: cannot set up the NVMe tier ({exc.strerror or exc})") from None
        self.directory = directory
        self.recovered = self._recover()

    @classmethod
    def from_config(cls, config: NvmeConfig) -> NvmeTier:
        return cls(config)

    @property
    def io_description(self) -> str:
        return self._io.description

    def _recover(self) -> list[IndexEntry]:
        """Entries of a previous run whose extents fit this tier; their extents are re-reserved."""
        kept, dropped = [], []
        for entry in sorted(self._index.entries(), key=lambda e: e.offset):
            if self._allocator.claim(Extent(entry.offset, entry.length)):
                kept.append(entry)
            else:
                dropped.append(entry.key)
        if dropped:
            log.warning("%d index entries outside this tier's capacity or overlapping were dropped", len(dropped))
            self._index._delete(dropped)
        return kept

    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        self._check_range(extent, offset, data.nbytes)
        await self._io.write(extent.offset + offset, data)

    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        self._check_range(extent, offset, out.nbytes)
        await self._io.read_into(extent.offset + offset, out)

    async def persist(self, entries: Sequence[IndexEntry]) -> None:
        """Make written blocks durable: flush the data, then commit their index entries."""
        await self._io.sync()
        await self._index.put(entries)

    async def forget(self, keys: Sequence[bytes]) -> None:
        """Durably drop index entries (before their extents are reused)."""
        await self._index.delete(keys)

    async def close(self) -> None:
        self._io.close()
        self._index.close()
