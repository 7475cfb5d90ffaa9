"""NVMe tier I/O against raw file I/O of the same bytes, in the same run, on the same filesystem.

- **nvme write**: ``NvmeTier.write`` of a batch of blocks into reserved extents, then
  ``NvmeTier.persist`` (``fdatasync`` of the data file + one synchronous LMDB transaction), i.e.
  what a demotion or a write-through costs.
- **nvme read**: ``NvmeTier.read_into`` of the same blocks into DRAM-arena-like aligned buffers.
- **raw file write / read**: the same blocks at the same offsets of a plain preallocated file with
  ``os.pwrite`` / ``os.preadv`` from a pool of as many threads, ``O_DIRECT`` when the filesystem
  allows it, then one ``fdatasync``: the best a program can do with plain POSIX calls.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from kvstore.bench.measure import Result, ratio, summarize
from kvstore.config import NvmeConfig
from kvstore.tier_kind import TierKind
from kvstore.tiers import create_tier
from kvstore.tiers.nvme_index import IndexEntry

MiB = 1 << 20


def _aligned_blocks(count: int, size: int) -> list[memoryview]:
    """Page-aligned buffers (as DRAM-arena extents are), filled with random bytes."""
    arena = mmap.mmap(-1, count * size)
    view = memoryview(arena)
    for i in range(count):
        view[i * size : (i + 1) * size] = os.urandom(size)
    return [view[i * size : (i + 1) * size] for i in range(count)]


class RawFile:
    def __init__(self, path: str, nbytes: int, threads: int) -> None:
        flags = os.O_RDWR | os.O_CREAT
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
            self.direct = hasattr(os, "O_DIRECT")
        except OSError:
            self.fd, self.direct = os.open(path, flags, 0o600), False
        os.posix_fallocate(self.fd, 0, nbytes)
        self.pool = ThreadPoolExecutor(max_workers=threads)

    async def write(self, blocks: list[memoryview], offsets: list[int]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, os.pwrite, self.fd, b, o) for b, o in zip(blocks, offsets)))
        await loop.run_in_executor(self.pool, os.fdatasync, self.fd)

    async def read(self, blocks: list[memoryview], offsets: list[int]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, os.preadv, self.fd, [b], o) for b, o in zip(blocks, offsets)))

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)


async def nvme_rows(block_sizes: tuple[int, ...], batch: int, rounds: int, directory: str | None = None) -> list[Result]:
    rows: list[Result] = []
    root = tempfile.mkdtemp(prefix="kvstore-bench-", dir=directory)
    try:
        for size in block_sizes:
            capacity = size * batch * 2
            config = NvmeConfig(dir=os.path.join(root, f"tier-{size}"), capacity_bytes=capacity, io_engine="posix")
            tier = create_tier(TierKind.NVME, config)
            raw = RawFile(os.path.join(root, f"raw-{size}.dat"), capacity, config.io_threads)
            try:
                blocks = _aligned_blocks(batch, size)
                extents = [tier.reserve(size) for _ in range(batch)]
                offsets = [e.offset for e in extents]
                times: dict[str, list[float]] = {k: [] for k in ("nvme write", "raw write", "nvme read", "raw read")}

                async def tier_write() -> None:
                    await asyncio.gather(*(tier.write(e, 0, b) for e, b in zip(extents, blocks)))
                    await tier.persist([IndexEntry(os.urandom(16), e.offset, e.length, size, 0, 0.0) for e in extents])

                async def tier_read() -> None:
                    await asyncio.gather(*(tier.read_into(e, 0, b) for e, b in zip(extents, blocks)))

                ops = {
                    "nvme write": tier_write, "raw write": lambda: raw.write(blocks, offsets),
                    "nvme read": tier_read, "raw read": lambda: raw.read(blocks, offsets),
                }
                for _ in range(rounds):  # interleaved, so both see the same disk state
                    for name, op in ops.items():
                        start = time.perf_counter()
                        await op()
                        times[name].append(time.perf_counter() - start)
                results = {name: summarize(name, size, batch, t) for name, t in times.items()}
                for op in ("write", "read"):
                    base = results[f"raw {op}"]
                    rows += [base, results[f"nvme {op}"].compared(vs_raw=ratio(results[f"nvme {op}"], base))]
            finally:
                raw.close()
                await tier.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows
