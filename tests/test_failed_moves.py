"""Moves that fail or are cancelled half-way: no extent reused while a thread still writes it, no
acknowledged block lost to a failing disk, no bad bytes published to other daemons, and the S3
accounting and negative cache after each. (Found by a review of the tier-stack refactor.)"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from kvstore.checksum import checksum
from kvstore.config import NvmeConfig
from kvstore.server.daemon import Daemon

from conftest import make_config

BLOCK = 64 * 1024


def nvme_daemon(tmp_path, *, dram_blocks: int, **overrides) -> Daemon:
    """A daemon (no server around it) with a DRAM tier of ``dram_blocks`` over a small NVMe tier."""
    nvme = NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=8 * BLOCK, direct_io=False)
    return Daemon(make_config(dram_bytes=dram_blocks * BLOCK, nvme=nvme, **overrides))


async def put_bytes(d: Daemon, key: bytes, data: bytes) -> bool:
    (slot,) = await d.reserve([key], [len(data)], [])
    if slot.copy is None:
        return False
    d.arena.view(slot.copy.location, len(data))[:] = data
    return await d.commit(slot, checksum(data))


async def get_bytes(d: Daemon, key: bytes) -> list[bytes]:
    copies, _ = await d.acquire([key])
    try:
        return [bytes(d.arena.view(c.location, c.record.size)) for c in copies]
    finally:
        d.release(copies)


async def wait_for(flag: threading.Event, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if flag.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


class StalledDisk:
    """An NVMe tier's writes stand for a slow disk: each write call (the first only, with
    ``first_only``) runs its pwrites in a worker thread that waits for ``gate``, and cancelling
    the task awaiting it does not stop the thread (as in ``PosixFileIO``)."""

    def __init__(self, io, *, first_only: bool = True) -> None:
        self.io, self.first_only = io, first_only
        self.started, self.gate, self.finished = threading.Event(), threading.Event(), threading.Event()
        self._real_write, self._real_many, self._stalled = io.write, io.write_many, False
        io.write, io.write_many = self.write, self.write_many

    async def write(self, offset: int, data: memoryview) -> None:
        (outcome,) = await self.write_many([(offset, data)])
        if outcome is not None:
            raise outcome

    async def write_many(self, items):
        if self._stalled and self.first_only:
            return await self._real_many(items)
        self._stalled = True
        payloads = [(offset, bytes(data)) for offset, data in items]

        def blocking() -> None:
            self.started.set()
            self.gate.wait(10)
            for offset, payload in payloads:
                os.pwrite(self.io._fd, payload, offset)
            self.finished.set()

        await asyncio.get_running_loop().run_in_executor(None, blocking)
        return [None] * len(items)


async def cancel_a_demotion(d: Daemon, disk: StalledDisk) -> tuple[bytes, bytes, bytes]:
    """Put A and D (DRAM full, A the coldest), then a put of C that evicts A: A's demotion write
    stalls on the disk and the client gives up on its put. Returns the three blocks' bytes."""
    a, dd, c = os.urandom(BLOCK), os.urandom(BLOCK), os.urandom(BLOCK)
    assert await put_bytes(d, b"A" * 16, a)
    assert await put_bytes(d, b"D" * 16, dd)
    put_c = asyncio.ensure_future(put_bytes(d, b"C" * 16, c))
    await wait_for(disk.started)
    put_c.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put_c
    return a, dd, c


async def test_cancelled_demotion_does_not_release_an_nvme_extent_still_being_written(tmp_path):
    d = nvme_daemon(tmp_path, dram_blocks=2)
    nvme = d.stack.tiers[1]
    disk = StalledDisk(nvme._io)
    try:
        await cancel_a_demotion(d, disk)
        # The write of A into NVMe is still running in its thread: its extent must still be taken.
        assert not disk.finished.is_set()
        assert nvme.used_bytes == BLOCK, "the NVMe extent went back while a write into it was in flight"
    finally:
        disk.gate.set()
        await asyncio.sleep(0.05)
        await d.close()


async def test_closing_waits_for_the_io_of_a_move_whose_caller_was_cancelled(tmp_path, caplog):
    """Shutdown cancels what is in flight; the tiers close only once a move's stalled write (and
    its index commit, and the undoing of its entries) are over: nothing writes into a closed
    file or index, nothing is logged as lost."""
    d = nvme_daemon(tmp_path, dram_blocks=2)
    disk = StalledDisk(d.stack.tiers[1]._io)
    await cancel_a_demotion(d, disk)
    closing = asyncio.ensure_future(d.close())
    await asyncio.sleep(0.2)
    assert not closing.done(), "the tiers closed under a write still in flight"
    disk.gate.set()
    await asyncio.wait_for(closing, 10)
    assert disk.finished.is_set()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_block_demoted_after_a_cancelled_demotion_keeps_its_bytes(tmp_path):
    d = nvme_daemon(tmp_path, dram_blocks=2)
    disk = StalledDisk(d.stack.tiers[1]._io)
    try:
        a, dd, c = await cancel_a_demotion(d, disk)
        assert await get_bytes(d, b"A" * 16) == [a]   # A is still in DRAM; now D is the coldest
        assert await put_bytes(d, b"C" * 16, c)       # evicts D: demoted while A's stale write is pending
        disk.gate.set()
        await wait_for(disk.finished)                 # the stale write of A lands
        assert await get_bytes(d, b"D" * 16) == [dd], "D was acknowledged and demoted, then lost"
        assert d.counters.integrity_failures == 0
    finally:
        disk.gate.set()
        await asyncio.sleep(0.05)
        await d.close()


async def test_cancelled_write_through_does_not_release_an_nvme_extent_still_being_written(tmp_path):
    d = nvme_daemon(tmp_path, dram_blocks=4, write_through=True)
    try:
        nvme = d.stack.tiers[1]
        io = nvme._io
        disk = StalledDisk(io, first_only=False)
        started, gate, finished = disk.started, disk.gate, disk.finished
        put_a = asyncio.ensure_future(put_bytes(d, b"A" * 16, os.urandom(BLOCK)))  # commit writes through
        await wait_for(started)
        put_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put_a
        assert not finished.is_set()
        assert nvme.used_bytes == BLOCK, "the NVMe extent went back while a write into it was in flight"
    finally:
        gate.set()
        await asyncio.sleep(0.05)
        await d.close()


async def test_a_write_through_cancelled_while_it_evicts_keeps_no_nvme_extent_reserved(tmp_path):
    """A batch that half fits a full NVMe tier reserves that half, then evicts for the rest; a
    client gone meanwhile must not leave the first half's extents reserved for nothing."""
    d = nvme_daemon(tmp_path, dram_blocks=16, write_through=True)   # NVMe: 8 blocks
    nvme = d.stack.tiers[1]
    try:
        for i in range(6):
            assert await put_bytes(d, b"%015d" % i + b"o", os.urandom(BLOCK))
        forget, stalled, gate = nvme.forget, asyncio.Event(), asyncio.Event()

        async def slow_forget(entries):
            stalled.set()
            await gate.wait()
            await forget(entries)

        nvme.forget = slow_forget
        keys = [b"%015d" % i + b"n" for i in range(4)]
        data = [os.urandom(BLOCK) for _ in keys]
        slots = await d.reserve(keys, [BLOCK] * 4, [])
        for slot, block in zip(slots, data):
            d.arena.view(slot.copy.location, BLOCK)[:] = block
        d.commit_many(slots, [checksum(b) for b in data])
        settling = asyncio.ensure_future(d.settle(slots))   # 2 fit; evicting for the other 2 stalls
        await asyncio.wait_for(stalled.wait(), 5)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        gate.set()
        await d.mover.settle()
        held = sum(1 for record in d.catalog if record.has_copy(1))
        assert nvme.used_bytes == held * BLOCK, "extents reserved for a cancelled write-through stayed taken"
    finally:
        await d.close()


# -- S3 ----------------------------------------------------------------------------------------

BUCKET = "kvstore-review"


def s3_config(url: str, **overrides):
    from kvstore.config import S3Config

    base = dict(bucket=BUCKET, endpoint_url=url, prefix=f"r-{os.urandom(4).hex()}/", connect_timeout_s=0.5,
                read_timeout_s=2, max_attempts=1, negative_ttl_s=30, backoff_s=0.2)
    base.update(overrides)
    return S3Config(**base)


def s3_tier_of(d: Daemon):
    return d.shared.levels[0].tier


def s3_counters(d: Daemon):
    return d.counters.tier("s3")


def s3_usage(d: Daemon):
    from kvstore.tier_kind import TierKind

    return next(u for u in d.usage() if u.kind is TierKind.S3)


async def test_a_corrupt_s3_object_is_remembered_as_a_miss_even_when_its_delete_fails(moto):
    from kvstore.errors import UnavailableError
    from kvstore.tiers.s3 import S3Tier

    cfg = s3_config(moto.url)
    d = Daemon(make_config(dram_bytes=4 * BLOCK, s3=cfg))
    await d.start()
    writer = S3Tier(cfg)
    await writer.open()
    try:
        key, data = b"K" * 16, os.urandom(BLOCK)
        await writer.put(key, memoryview(data), checksum(data) ^ 1, b"")   # metadata that lies
        assert len(await d.lookup([key])) == 1
        tier = s3_tier_of(d)

        async def delete_fails(keys, namespace=b""):
            raise UnavailableError("S3 delete failed")

        tier.delete = delete_fails
        assert await get_bytes(d, key) == []                # a miss, never wrong bytes
        assert d.counters.integrity_failures == 1
        assert await d.lookup([key]) == [], "a corrupt object must be a remembered miss, not found again"
    finally:
        await writer.close()
        await d.close()


async def test_s3_usage_counts_what_the_bucket_holds_for_this_daemon(moto):
    cfg = s3_config(moto.url, write_through=True)
    d = Daemon(make_config(dram_bytes=4 * BLOCK, s3=cfg))
    await d.start()
    try:
        keys = [bytes([i]) * 16 for i in range(8)]
        blocks = [os.urandom(BLOCK) for _ in keys]
        for k, b in zip(keys[:3], blocks[:3]):
            assert await put_bytes(d, k, b)
        assert (s3_usage(d).used_bytes, s3_usage(d).blocks) == (3 * BLOCK, 3)
        assert await d.delete([keys[0]]) == 1
        assert (s3_usage(d).used_bytes, s3_usage(d).blocks) == (2 * BLOCK, 2)
        for k, b in zip(keys[3:], blocks[3:]):
            assert await put_bytes(d, k, b)
        assert (s3_usage(d).used_bytes, s3_usage(d).blocks) == (7 * BLOCK, 7)
        assert s3_counters(d).uploads == 8
        assert await get_bytes(d, keys[1]) == [blocks[1]]     # promoted back from S3
        assert (s3_usage(d).used_bytes, s3_usage(d).blocks) == (7 * BLOCK, 7)
    finally:
        await d.close()


async def test_a_cancelled_then_deleted_promotion_frees_each_extent_once_after_the_read(tmp_path):
    d = nvme_daemon(tmp_path, dram_blocks=2)
    try:
        nvme = d.stack.tiers[1]
        io = nvme._io
        real_read = io.read_into
        started, gate, finished = threading.Event(), threading.Event(), threading.Event()
        slow = []

        async def slow_read(offset: int, out: memoryview) -> None:
            if slow:
                def blocking() -> None:
                    started.set()
                    gate.wait(10)
                    os.preadv(io._fd, [out], offset)
                    finished.set()

                await asyncio.get_running_loop().run_in_executor(None, blocking)
                return
            await real_read(offset, out)

        io.read_into = slow_read
        a, b, c = (os.urandom(BLOCK) for _ in range(3))
        for k, v in ((b"A" * 16, a), (b"B" * 16, b), (b"C" * 16, c)):
            assert await put_bytes(d, k, v)          # A demoted to NVMe, dropped from DRAM
        record = d.catalog.get(next(iter([r.key for r in d.catalog if r.key.endswith(b"A" * 16)])))
        assert list(record.copies) == [1]
        slow.append(True)
        get_a = asyncio.ensure_future(get_bytes(d, b"A" * 16))
        await wait_for(started)
        get_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await get_a
        assert d.arena.used_bytes == 2 * BLOCK       # the landing extent being filled is still held
        assert await d.delete([b"A" * 16]) == 1
        gate.set()
        await wait_for(finished)
        await asyncio.sleep(0.05)
        assert d.arena.used_bytes == BLOCK          # C only (B was evicted to make room)
        assert nvme.used_bytes == BLOCK              # B only
        assert all(c.holds == 0 for r in d.catalog for c in r.copies.values())
    finally:
        gate.set()
        await asyncio.sleep(0.05)
        await d.close()


async def test_an_upload_that_lands_after_a_delete_is_removed(moto):
    from kvstore.tiers.s3 import S3Tier

    cfg = s3_config(moto.url, write_through=True)
    d = Daemon(make_config(dram_bytes=4 * BLOCK, s3=cfg))
    await d.start()
    reader = S3Tier(cfg)
    await reader.open()
    try:
        tier = s3_tier_of(d)
        real_put = tier.put
        entered, gate = asyncio.Event(), asyncio.Event()

        async def slow_put(*args, **kwargs):
            entered.set()
            await gate.wait()
            return await real_put(*args, **kwargs)

        tier.put = slow_put
        key = b"U" * 16
        put = asyncio.ensure_future(put_bytes(d, key, os.urandom(BLOCK)))
        await entered.wait()
        assert await d.delete([key]) == 1
        gate.set()
        assert await put is True
        assert await reader.head_many([key], b"") == [None]
        assert (s3_usage(d).used_bytes, s3_usage(d).blocks) == (0, 0)
        assert await d.lookup([key]) == []
    finally:
        await reader.close()
        await d.close()


async def test_a_failed_demotion_write_does_not_lose_the_victim(tmp_path):
    d = nvme_daemon(tmp_path, dram_blocks=2)
    try:
        nvme = d.stack.tiers[1]
        io = nvme._io

        async def failing_write(offset: int, data: memoryview) -> None:
            raise OSError(5, "Input/output error")

        async def failing_writes(items):
            return [OSError(5, "Input/output error") for _ in items]

        a, dd, c = os.urandom(BLOCK), os.urandom(BLOCK), os.urandom(BLOCK)
        assert await put_bytes(d, b"A" * 16, a)
        assert await put_bytes(d, b"D" * 16, dd)
        io.write, io.write_many = failing_write, failing_writes
        try:
            await put_bytes(d, b"C" * 16, c)             # evicting A: its demotion write fails
        except OSError:
            pass                                          # 0.1: the put fails, A stays
        assert await get_bytes(d, b"A" * 16) == [a], "an acknowledged block was dropped because the disk failed"
    finally:
        await d.close()


async def test_a_restart_after_a_cancelled_demotion_never_finds_another_blocks_bytes_under_a_key(tmp_path):
    config = make_config(
        dram_bytes=2 * BLOCK,
        nvme=NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=8 * BLOCK, direct_io=False),
    )
    a, dd, c = os.urandom(BLOCK), os.urandom(BLOCK), os.urandom(BLOCK)
    d = Daemon(config)
    gate, started = threading.Event(), threading.Event()
    try:
        index = d.stack.tiers[1]._index
        real_put = index._put
        calls = []

        def slow_index_put(entries):            # runs in asyncio.to_thread: the LMDB commit is slow
            if not calls:
                calls.append(entries)
                started.set()
                gate.wait(10)
            real_put(entries)

        index._put = slow_index_put
        assert await put_bytes(d, b"A" * 16, a)
        assert await put_bytes(d, b"D" * 16, dd)
        put_c = asyncio.ensure_future(put_bytes(d, b"C" * 16, c))   # A's demotion reaches its index commit
        await wait_for(started)
        put_c.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put_c
        assert await get_bytes(d, b"A" * 16) == [a]
        assert await put_bytes(d, b"C" * 16, c)      # D demoted into the extent A's entry is about to name
        gate.set()
        await asyncio.sleep(0.2)                    # A's entry lands
    finally:
        gate.set()
        await asyncio.sleep(0.05)
        await d.close()

    d = Daemon(config)                              # restart on the same directory
    try:
        got_a, got_d = await get_bytes(d, b"A" * 16), await get_bytes(d, b"D" * 16)
        assert d.counters.integrity_failures == 0, "a recovered key named another block's bytes"
        assert got_d == [dd], "D was persisted before the restart and is gone after it"
        assert got_a in ([], [a])
    finally:
        await d.close()


async def test_bytes_corrupted_in_the_arena_are_never_published_as_valid_to_other_daemons(moto):
    from kvstore.keys import scoped

    cfg = s3_config(moto.url)
    first = Daemon(make_config(dram_bytes=2 * BLOCK, s3=cfg))
    await first.start()
    key, a = b"Z" * 16, os.urandom(BLOCK)
    try:
        assert await put_bytes(first, key, a)
        record = first.catalog.get(scoped([key], b"")[0])
        copy = record.primary()
        view = first.arena.view(copy.location, BLOCK)
        view[100] ^= 0xFF                      # a bit flip behind the daemon's back (a stray same-host write)
        for k in (b"Y" * 16, b"X" * 16):       # the arena fills: Z would be uploaded, then evicted
            assert await put_bytes(first, k, os.urandom(BLOCK))
        assert s3_counters(first).uploads == 0 and s3_counters(first).errors == 1  # refused, counted
    finally:
        await first.close()

    second = Daemon(make_config(dram_bytes=2 * BLOCK, s3=cfg))
    await second.start()
    try:
        got = await get_bytes(second, key)
        assert got in ([], [a]), "another daemon was handed bytes that are not the block that was put"
    finally:
        await second.close()
