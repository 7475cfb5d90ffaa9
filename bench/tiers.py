"""Tier I/O against the raw library calls on the same bytes, in the same run.

NVMe, against raw file I/O on the same filesystem:

- **nvme write**: ``NvmeTier.write`` of a batch of blocks into reserved extents, then
  ``NvmeTier.persist`` (``fdatasync`` of the data file + one synchronous LMDB transaction), i.e.
  what a demotion or a write-through costs.
- **nvme read**: ``NvmeTier.read_into`` of the same blocks into DRAM-arena-like aligned buffers.
- **raw file write / read**: the same blocks at the same offsets of a plain preallocated file with
  ``os.pwrite`` / ``os.preadv`` from a pool of as many threads, ``O_DIRECT`` when the filesystem
  allows it, then one ``fdatasync``: the best a program can do with plain POSIX calls.

S3, against raw aiobotocore on the same bucket:

- **s3 put / get**: ``S3Tier.put`` / ``S3Tier.get_into`` (metadata, verification, bounded
  concurrency) of a batch of blocks.
- **raw s3 put / get**: ``put_object`` / ``get_object`` of the same bytes with the same client
  settings and concurrency, nothing else.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from kvstore.bench.measure import Result, ratio, summarize
from kvstore.config import NvmeConfig
from kvstore.block import BlockRecord
from kvstore.tiers import create_tier

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


async def against_raw(
    ops: dict[str, Callable[[], Awaitable[object]]], rounds: int, size: int, batch: int, pairs: list[tuple[str, str]]
) -> list[Result]:
    """Time every op ``rounds`` times, interleaved (so each sees the same medium state), and
    return each raw row followed by its tier row with the ratio filled in."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            start = time.perf_counter()
            await op()
            times[name].append(time.perf_counter() - start)
    results = {name: summarize(name, size, batch, t) for name, t in times.items()}
    rows = []
    for tier_name, raw_name in pairs:
        base = results[raw_name]
        rows += [base, results[tier_name].compared(vs_raw=ratio(results[tier_name], base))]
    return rows


async def nvme_rows(block_sizes: tuple[int, ...], batch: int, rounds: int, directory: str | None = None) -> list[Result]:
    rows: list[Result] = []
    root = tempfile.mkdtemp(prefix="kvstore-bench-", dir=directory)
    try:
        for size in block_sizes:
            capacity = size * batch * 2
            config = NvmeConfig(dir=os.path.join(root, f"tier-{size}"), capacity_bytes=capacity, io_engine="posix")
            tier = create_tier("nvme", config)
            raw = RawFile(os.path.join(root, f"raw-{size}.dat"), capacity, config.io_threads)
            try:
                blocks = _aligned_blocks(batch, size)
                probe = BlockRecord(key=b"", size=size)
                extents = [tier.reserve(probe) for _ in range(batch)]
                offsets = [e.offset for e in extents]

                async def tier_write() -> None:
                    await asyncio.gather(*(tier.write(e, 0, b) for e, b in zip(extents, blocks)))
                    await tier.persist([(BlockRecord(key=os.urandom(16), size=size, checksum=0), e) for e in extents])

                async def tier_read() -> None:
                    await asyncio.gather(*(tier.read_into(e, 0, b) for e, b in zip(extents, blocks)))

                ops = {
                    "nvme write": tier_write, "raw write": lambda: raw.write(blocks, offsets),
                    "nvme read": tier_read, "raw read": lambda: raw.read(blocks, offsets),
                }
                rows += await against_raw(ops, rounds, size, batch, [("nvme write", "raw write"), ("nvme read", "raw read")])
            finally:
                raw.close()
                await tier.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


async def s3_rows(endpoint_url: str, bucket: str, block_sizes: tuple[int, ...], batch: int, rounds: int) -> list[Result]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from kvstore.checksum import checksum
    from kvstore.config import S3Config
    from kvstore.tiers.s3 import S3Tier

    rows: list[Result] = []
    config = S3Config(bucket=bucket, endpoint_url=endpoint_url, prefix="bench/")
    tier = S3Tier(config)
    await tier.open()
    try:
        same = AioConfig(  # the tier's own client settings, so only the tier's work differs
            connect_timeout=config.connect_timeout_s, read_timeout=config.read_timeout_s,
            retries={"max_attempts": config.max_attempts, "mode": "standard"},
            max_pool_connections=config.max_concurrency,
        )
        async with get_session().create_client(
            "s3", endpoint_url=endpoint_url, region_name=config.region, config=same
        ) as raw:
            try:
                await raw.create_bucket(Bucket=bucket)
            except raw.exceptions.BucketAlreadyOwnedByYou:
                pass
            slots = asyncio.Semaphore(config.max_concurrency)
            for size in block_sizes:
                blocks = [memoryview(os.urandom(size)) for _ in range(batch)]
                sums = [checksum(b) for b in blocks]
                keys = [os.urandom(16) for _ in range(batch)]
                outs = [memoryview(bytearray(size)) for _ in range(batch)]

                async def raw_put_one(i: int) -> None:
                    async with slots:
                        await raw.put_object(Bucket=bucket, Key=f"raw/{keys[i].hex()}", Body=bytes(blocks[i]))

                async def raw_get_one(i: int) -> None:
                    async with slots:
                        r = await raw.get_object(Bucket=bucket, Key=f"raw/{keys[i].hex()}")
                        async with r["Body"] as body:
                            outs[i][:] = await body.read()

                async def tier_get_one(i: int) -> None:
                    if await tier.get_into(keys[i], outs[i]) != size:
                        raise RuntimeError("S3 benchmark object missing")

                ops = {
                    "raw s3 put": lambda: asyncio.gather(*(raw_put_one(i) for i in range(batch))),
                    "s3 put": lambda: asyncio.gather(*(tier.put(keys[i], blocks[i], sums[i]) for i in range(batch))),
                    "raw s3 get": lambda: asyncio.gather(*(raw_get_one(i) for i in range(batch))),
                    "s3 get": lambda: asyncio.gather(*(tier_get_one(i) for i in range(batch))),
                }
                rows += await against_raw(ops, rounds, size, batch, [("s3 put", "raw s3 put"), ("s3 get", "raw s3 get")])
                await tier.delete(keys)
                await raw.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": f"raw/{k.hex()}"} for k in keys], "Quiet": True}
                )
    finally:
        await tier.close()
    return rows
