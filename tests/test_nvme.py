"""The tier hierarchy end to end: DRAM over NVMe, demotion and promotion, crashes, bit rot, scans."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kvstore import TierKind
from kvstore.client import KVClient
from kvstore.config import NvmeConfig
from kvstore.keys import unscoped
from kvstore.server import KVStoreServer
from kvstore.server.process import DaemonProcess
from kvstore.tiers.nvme import DATA_FILE, INDEX_DIR
from kvstore.tiers.nvme_index import NvmeIndex

from conftest import chain, make_config, random_blocks

MiB = 1 << 20


def tiered(tmp_path, dram_mib: int = 8, nvme_mib: int = 64, **overrides):
    return make_config(
        dram_bytes=dram_mib * MiB, nvme=NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=nvme_mib * MiB),
        **overrides,
    )


@pytest.mark.parametrize("path", ["require", "off"])
async def test_several_times_dram_round_trips_the_early_blocks_from_nvme(tmp_path, path):
    async with KVStoreServer(tiered(tmp_path)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local=path) as kv:
            keys = chain(40, seed=100)          # 40 MiB through an 8 MiB DRAM tier
            blocks = random_blocks(40, MiB)
            for i in range(0, 40, 4):
                assert (await kv.put(keys[i : i + 4], blocks[i : i + 4])).stored == 4
            hit = await kv.lookup(keys)
            assert hit.count == 40
            assert hit.tiers[0] is TierKind.NVME and hit.tiers[-1] is TierKind.DRAM
            for key, block in zip(keys, blocks):
                got = await kv.get([key])
                assert len(got) == 1 and bytes(got[0]) == block
            stats = await kv.stats()
            dram, nvme = stats.tier(TierKind.DRAM), stats.tier(TierKind.NVME)
            assert dram.demotions >= 32 and nvme.promotions >= 32 and dram.used_bytes <= dram.capacity_bytes
            assert nvme.blocks >= 32 and stats.integrity_failures == 0


async def test_a_restarted_daemon_serves_what_it_persisted_without_reading_it(tmp_path):
    keys, blocks = chain(12, seed=101), random_blocks(12, MiB)
    async with KVStoreServer(tiered(tmp_path, write_through=True)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert (await kv.put(keys, blocks)).persisted == 12
    async with KVStoreServer(tiered(tmp_path)) as srv:
        assert next(u for u in srv.daemon.usage() if u.kind is TierKind.NVME).used_bytes == 12 * MiB
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            hit = await kv.lookup(keys)
            assert hit.count == 12 and set(hit.tiers) == {TierKind.NVME}
            assert [bytes(b) for b in await kv.get(keys)] == blocks


async def test_write_through_into_a_full_nvme_tier_forgets_its_victims_in_one_commit_per_put(tmp_path):
    async with KVStoreServer(tiered(tmp_path, dram_mib=64, nvme_mib=8, write_through=True)) as srv:
        index, forgets = srv.daemon.mover.tiers[1]._index, []
        delete = index.delete

        async def counted(entries):
            forgets.append(len(entries))
            await delete(entries)

        index.delete = counted
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            keys, blocks = chain(96, seed=103), random_blocks(96, 256 * 1024)   # 24 MiB through 8 MiB
            for i in range(0, 96, 16):
                assert (await kv.put(keys[i : i + 16], blocks[i : i + 16])).persisted == 16
            assert len(forgets) <= 4 and sum(forgets) >= 64   # puts 3-6 each evicted once, 16 blocks at a time
    async with KVStoreServer(tiered(tmp_path, dram_mib=64, nvme_mib=8)) as srv:   # what is durable: the newest
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert (await kv.lookup(keys[64:])).count == 32
            assert [bytes(b) for b in await kv.get(keys[64:])] == blocks[64:]
            assert (await kv.lookup(keys[:1])).count == 0


async def test_flipped_bytes_on_disk_are_misses_never_wrong_data(tmp_path):
    keys, blocks = chain(6, seed=102), random_blocks(6, 256 * 1024)
    async with KVStoreServer(tiered(tmp_path, write_through=True)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            await kv.put(keys, blocks)
    index = NvmeIndex(str(tmp_path / "nvme" / INDEX_DIR), 1 << 20)
    found = index.scan()
    offsets = {unscoped(key): int(offset) for key, offset in zip(found.keys, found.offsets)}
    index.close()
    with open(tmp_path / "nvme" / DATA_FILE, "r+b") as f:
        for victim in (keys[1], keys[4]):
            f.seek(offsets[victim] + 1000)
            byte = f.read(1)
            f.seek(offsets[victim] + 1000)
            f.write(bytes([byte[0] ^ 0x01]))
    async with KVStoreServer(tiered(tmp_path)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert [bytes(b) for b in await kv.get(keys)] == blocks[:1]  # block 1 is a miss
            for i, (key, block) in enumerate(zip(keys, blocks)):
                got = await kv.get([key])
                assert got == [] if i in (1, 4) else [bytes(g) for g in got] == [block]
            stats = await kv.stats()
            assert stats.integrity_failures == 2 and stats.tier(TierKind.NVME).integrity_failures == 2
            assert (await kv.lookup(keys[1:2])).count == 0  # dropped, so a put can repair it
            assert (await kv.put(keys[1:2], blocks[1:2])).stored == 1


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
async def test_a_scan_bigger_than_dram_leaves_the_hot_prefix_in_dram_only_under_s3fifo(tmp_path, policy):
    async with KVStoreServer(tiered(tmp_path, dram_mib=16, nvme_mib=128, policy=policy)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            hot, hot_blocks = chain(4, seed=103), random_blocks(4, MiB)
            await kv.put(hot, hot_blocks)
            for _ in range(3):
                assert len(await kv.get(hot)) == 4    # a shared system prompt, read by every request
            for i in range(12):                        # then one-off documents: 48 MiB, 3x DRAM
                await kv.put(chain(4, seed=1000 + i), random_blocks(4, MiB))
            await asyncio.sleep(0.3)                   # let background demotion settle
            tiers = (await kv.lookup(hot)).tiers
            if policy == "s3fifo":
                assert tiers == [TierKind.DRAM] * 4
            else:
                assert TierKind.DRAM not in tiers      # LRU pushed the hot prefix down to NVMe
            assert [bytes(b) for b in await kv.get(hot)] == hot_blocks


async def test_kill_9_mid_stream_loses_nothing_acknowledged_as_persisted(tmp_path):
    nvme_dir = str(tmp_path / "nvme")
    args = ["--dram-bytes", "16MiB", "--nvme-dir", nvme_dir, "--nvme-bytes", "256MiB", "--write-through"]
    acked: dict[bytes, bytes] = {}
    sent: dict[bytes, bytes] = {}
    daemon = DaemonProcess(args)
    daemon.start()
    try:
        async with KVClient(daemon.target, timeout_s=5) as kv:
            killer = asyncio.get_running_loop().call_later(1.5, daemon.proc.send_signal, signal.SIGKILL)
            try:
                for i in range(10_000):
                    keys, blocks = chain(2, seed=5000 + i), random_blocks(2, 256 * 1024)
                    sent.update(zip(keys, blocks))
                    result = await kv.put(keys, blocks)
                    if result.persisted == 2:
                        acked.update(zip(keys, blocks))
            except Exception:
                pass  # the daemon died under us: that is the point
            finally:
                killer.cancel()
    finally:
        daemon.stop()
    assert len(acked) >= 10, "the daemon died before anything was acknowledged; slow machine?"

    with DaemonProcess(args) as again:
        async with KVClient(again.target) as kv:
            for key, block in acked.items():
                got = await kv.get([key])
                assert [bytes(g) for g in got] == [block]
            for key, block in sent.items():  # nothing, acknowledged or not, comes back wrong
                got = await kv.get([key])
                assert got == [] or bytes(got[0]) == block


async def test_an_nvme_directory_written_by_version_0_1_is_served_and_its_index_converted(tmp_path):
    """The on-disk format, built here byte by byte as 0.1 wrote it (no tier code): ``blocks.dat``
    with blocks at 4 KiB-aligned offsets, and an LMDB ``index/`` mapping each index key
    (namespace tag + block key) to ``<QQQQd`` (offset, length, size, XXH3-64, last use) followed
    by the namespace. This version serves those blocks; it converts the index to format 2 (keyed
    by offset) once and leaves the data file as it is."""
    import struct

    import lmdb

    from kvstore.checksum import checksum
    from kvstore.keys import scoped

    from conftest import NS

    directory = tmp_path / "nvme"
    (directory / INDEX_DIR).mkdir(parents=True)
    keys, blocks = chain(3, seed=130), random_blocks(3, 40_000)
    namespace = NS.digest
    with open(directory / DATA_FILE, "wb") as data:
        data.truncate(64 * MiB)
    env = lmdb.open(str(directory / INDEX_DIR), map_size=1 << 30, subdir=True)
    with env.begin(write=True) as txn, open(directory / DATA_FILE, "r+b") as data:
        for i, (key, block) in enumerate(zip(scoped(keys, namespace), blocks)):
            offset, length = i * 40_960, 40_960
            data.seek(offset)
            data.write(block)
            txn.put(key, struct.pack("<QQQQd", offset, length, len(block), checksum(block), 1000.0 + i) + namespace)
    env.close()

    data_before = (directory / DATA_FILE).read_bytes()
    for _ in range(2):   # converted at the first start, read as format 2 at the second
        async with KVStoreServer(tiered(tmp_path)) as srv:
            async with KVClient(f"127.0.0.1:{srv.port}", namespace=NS) as kv:
                hit = await kv.lookup(keys)
                assert hit.count == 3 and set(hit.tiers) == {TierKind.NVME}
                assert [bytes(b) for b in await kv.get(keys)] == blocks
    assert (directory / DATA_FILE).read_bytes()[: 3 * 40_960] == data_before[: 3 * 40_960]
    env = lmdb.open(str(directory / INDEX_DIR), map_size=1 << 30, subdir=True, readonly=True)
    with env.begin() as txn:
        stored = dict(txn.cursor().iternext())
    env.close()
    assert stored.pop(b"\xff" * 8 + b"kvstore-format") == b"2"
    assert sorted(stored) == [struct.pack(">Q", i * 40_960) for i in range(3)]


def test_converting_an_old_index_makes_room_for_both_formats_while_it_runs(tmp_path):
    """The conversion holds the old entries and the new ones in one transaction: an index whose
    map has room for the old entries alone still converts."""
    import struct

    import lmdb

    path = tmp_path / "index"
    env = lmdb.open(str(path), map_size=64 << 20, subdir=True)
    keys = [os.urandom(40) for _ in range(20_000)]
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            txn.put(key, struct.pack("<QQQQd", i * 4096, 4096, 4000, i, 1000.0 + i) + b"ns")
    env.close()
    tight = (path / "data.mdb").stat().st_size + (64 << 10)
    index = NvmeIndex(str(path), tight)
    try:
        found = index.scan()
        assert found.keys == keys   # by offset, which is the order they were put in
        assert found.offsets.tolist() == [i * 4096 for i in range(20_000)]
        assert found.sizes.tolist() == [4000] * 20_000 and found.namespaces == [b"ns"]
    finally:
        index.close()


def test_closing_the_index_waits_for_a_write_in_flight_and_refuses_later_ones(tmp_path):
    """LMDB's binding never returns from closing an environment under a write transaction of
    another thread (a shutdown hang seen with moves cancelled mid-commit): close waits for it."""
    import threading

    index = NvmeIndex(str(tmp_path / "index"), 1 << 20)
    inside, leave = threading.Event(), threading.Event()

    def writer() -> None:
        with index._write() as txn:
            inside.set()
            leave.wait(10)
            txn.put(b"\0" * 8, b"x")

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(5)
    closer = threading.Thread(target=index.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "closed under a write transaction"
    leave.set()
    closer.join(5)
    thread.join(5)
    assert not closer.is_alive() and not thread.is_alive()
    with pytest.raises(OSError, match="closed"):
        index._delete([(b"k", 0)])


def test_an_index_of_a_later_format_is_refused_naming_the_directory(tmp_path):
    import lmdb

    from kvstore import ConfigError
    from kvstore.tiers import create_tier

    (tmp_path / "nvme" / INDEX_DIR).mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "nvme" / INDEX_DIR), map_size=1 << 20, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"\xff" * 8 + b"kvstore-format", b"3")
    env.close()
    with pytest.raises(ConfigError, match=r"nvme\.dir=.*index is in format 3"):
        create_tier("nvme", NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=MiB))


def _nvme_tier(tmp_path, capacity: int = 64 * MiB):
    from kvstore.tiers import create_tier

    return create_tier("nvme", NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=capacity, direct_io=False))


def _records(n: int, size: int = 4096):
    from kvstore.block import BlockRecord
    from kvstore.checksum import checksum

    data = [os.urandom(size) for _ in range(n)]
    return [BlockRecord(key=os.urandom(16), size=size, checksum=checksum(d), namespace=b"ns") for d in data], data


async def test_blocks_whose_write_fails_lose_the_index_entry_committed_beside_the_write(tmp_path):
    """write_persisted commits the index while the data is written: the blocks whose write failed
    are forgotten again before the call returns, so a restart finds only blocks that were written."""
    import errno

    tier = _nvme_tier(tmp_path)
    records, data = _records(8)
    extents = [tier.reserve(r) for r in records]
    failing = {extents[2].offset, extents[5].offset}
    real = tier._io.write_many

    async def disk_error_at_two_offsets(items):
        good = [(at, view) for at, view in items if at not in failing]
        outcomes = iter(await real(good))
        return [OSError(errno.EIO, "injected") if at in failing else next(outcomes) for at, _ in items]

    tier._io.write_many = disk_error_at_two_offsets
    outcomes = await tier.write_persisted([(r, e, memoryview(d)) for r, e, d in zip(records, extents, data)])
    assert [o is None for o in outcomes] == [True, True, False, True, True, False, True, True]
    await tier.close()
    again = _nvme_tier(tmp_path)
    try:
        found = {b.key: b.location.offset for b in again.recover()}
        assert found == {r.key: e.offset for i, (r, e) in enumerate(zip(records, extents)) if i not in (2, 5)}
    finally:
        await again.close()


async def test_a_failed_write_whose_entry_cannot_be_forgotten_keeps_its_extent_until_restart(tmp_path):
    import errno

    tier = _nvme_tier(tmp_path)
    records, data = _records(2)
    extents = [tier.reserve(r) for r in records]
    real = tier._io.write_many

    async def second_fails(items):
        outcomes = await real(items[:1])
        return [*outcomes, OSError(errno.EIO, "injected")]

    async def index_unwritable(entries):
        raise OSError(errno.EIO, "injected")

    tier._io.write_many, tier._index.delete = second_fails, index_unwritable
    outcomes = await tier.write_persisted([(r, e, memoryview(d)) for r, e, d in zip(records, extents, data)])
    assert outcomes[0] is None and isinstance(outcomes[1], OSError)
    used = tier.used_bytes
    tier.release(extents[1])        # the mover gives it back; an entry still names it: kept
    assert tier.used_bytes == used
    assert tier.reserve(records[1]).offset != extents[1].offset
    await tier.close()


@pytest.mark.parametrize("newer_reached_the_disk", [True, False])
async def test_two_entries_for_one_block_after_a_crash_keep_the_newest_that_verifies(tmp_path, newer_reached_the_disk):
    """A crash between a block's new entry and the forgetting of its older one leaves both: the
    restart keeps the newest whose bytes verify (the newer entry's bytes may never have reached
    the disk) and deletes the other."""
    from kvstore.checksum import checksum
    from kvstore.tiers.nvme_index import IndexEntry, NvmeIndex

    tier = _nvme_tier(tmp_path)
    records, data = _records(2)
    older, newer = [tier.reserve(r) for r in records]
    await tier.write_many([(older, memoryview(data[0])),
                           (newer, memoryview(data[1] if newer_reached_the_disk else bytes(4096)))])
    await tier._io.sync()
    key = records[0].key
    await tier.close()
    index = NvmeIndex(str(tmp_path / "nvme" / INDEX_DIR), 1 << 20)
    index._put([IndexEntry(key, older.offset, older.length, 4096, checksum(data[0]), 100.0, b"ns"),
                IndexEntry(key, newer.offset, newer.length, 4096, checksum(data[1]), 200.0, b"ns")])
    index.close()
    kept = newer if newer_reached_the_disk else older
    for _ in range(2):   # the second restart finds the other entry gone
        tier = _nvme_tier(tmp_path)
        try:
            found = list(tier.recover())
            assert [(b.key, b.location.offset) for b in found] == [(key, kept.offset)]
        finally:
            await tier.close()


async def test_a_write_that_raises_leaves_no_index_entry_behind(tmp_path):
    """The index commit runs beside the write: a write that raises (rather than failing block by
    block) still has the batch's entries forgotten before the call gives up."""
    tier = _nvme_tier(tmp_path)
    records, data = _records(4)
    extents = [tier.reserve(r) for r in records]

    async def broken(items):
        await asyncio.sleep(0.01)   # the index commit lands meanwhile
        raise RuntimeError("a bug in the I/O engine")

    tier._io.write_many = broken
    with pytest.raises(RuntimeError):
        await tier.write_persisted([(r, e, memoryview(d)) for r, e, d in zip(records, extents, data)])
    await tier.close()
    again = _nvme_tier(tmp_path)
    try:
        assert list(again.recover()) == []
    finally:
        await again.close()


def test_asking_for_kvikio_where_it_is_not_installed_is_a_config_error(tmp_path):
    import importlib.util

    from kvstore import ConfigError
    from kvstore.tiers import create_tier

    if importlib.util.find_spec("kvikio") is not None:
        pytest.skip("kvikio is installed here")
    with pytest.raises(ConfigError, match=r"^nvme\.io_engine=kvikio: kvikio is not installed"):
        create_tier("nvme", NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=MiB, io_engine="kvikio"))
    create_tier("nvme", NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=MiB, io_engine="posix"))  # lock released


async def test_concurrent_persists_share_flushes_and_every_one_is_durable_when_it_returns(tmp_path):
    from kvstore.block import BlockRecord
    from kvstore.tiers import create_tier

    config = NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=64 * MiB, direct_io=False)
    tier = create_tier("nvme", config)
    syncs = 0
    real_sync = tier._io.sync

    async def counted_sync() -> None:
        nonlocal syncs
        syncs += 1
        await real_sync()

    tier._io.sync = counted_sync
    records = [BlockRecord(key=os.urandom(16), size=4096, checksum=i, namespace=b"ns") for i in range(64)]
    extents = [tier.reserve(r) for r in records]
    await asyncio.gather(*(tier.write(e, 0, memoryview(os.urandom(4096))) for e in extents))
    await asyncio.gather(*(tier.persist([(r, e)]) for r, e in zip(records, extents)))
    assert syncs < 64 // 4  # grouped: a flush and an index commit per batch, not per block
    await tier.close()
    again = create_tier("nvme", config)
    try:
        assert {(b.key, b.checksum) for b in again.recover()} == {(r.key, r.checksum) for r in records}
    finally:
        await again.close()


@pytest.mark.parametrize("direct", [True, False])
async def test_a_batch_written_as_runs_of_back_to_back_blocks_lands_byte_for_byte(tmp_path, direct):
    """write_many joins blocks that lie back to back into vectored writes (capped in bytes and
    buffers), keeps gaps apart, sends unaligned buffers through the bounce path, and reports a
    failed write on every block of its run."""
    import mmap

    from kvstore.tiers import file_io

    io = file_io.PosixFileIO(str(tmp_path / "data"), threads=2, direct=direct)
    try:
        io.preallocate(64 * MiB)
        page = 4096
        items, expected = [], {}

        def aligned(nbytes: int) -> memoryview:
            view = memoryview(mmap.mmap(-1, nbytes))
            view[:] = os.urandom(nbytes)
            return view

        offset = 0
        for _ in range(1500):                 # one long run: beyond the iovec limit per call
            items.append((offset, aligned(page)))
            offset += page
        offset += 3 * page                     # a gap, then a run beyond RUN_BYTES
        for _ in range(3):
            items.append((offset, aligned(file_io.RUN_BYTES // 2)))
            offset += file_io.RUN_BYTES // 2
        unaligned = memoryview(bytearray(os.urandom(page + 1)))[1:]
        items.append((offset + page, unaligned))   # needs the bounce buffer under O_DIRECT
        items.reverse()                            # the order given does not matter
        outcomes = await io.write_many(items)
        assert outcomes == [None] * len(items)
        for at, view in items:
            expected[at] = bytes(view)
        await io.sync()
        with open(tmp_path / "data", "rb") as f:
            for at, data in expected.items():
                f.seek(at)
                assert f.read(len(data)) == data
        # Writes the file refuses fail on every block of each run (two runs here).
        writable, io._fd = io._fd, os.open(tmp_path / "data", os.O_RDONLY)
        try:
            outcomes = await io.write_many([(0, aligned(page)), (page, aligned(page)), (8 * page, aligned(page))])
        finally:
            os.close(io._fd)
            io._fd = writable
        assert all(isinstance(o, OSError) for o in outcomes)
    finally:
        io.close()


# -- encryption at rest ---------------------------------------------------------------------------


def encrypted(tmp_path, secrets: list[bytes], **overrides) -> NvmeConfig:
    files = []
    for i, secret in enumerate(secrets):
        path = tmp_path / f"nvme-secret-{secret[:2].hex()}-{i}"
        path.write_bytes(secret)
        files.append(str(path))
    base = dict(dir=str(tmp_path / "nvme"), capacity_bytes=32 << 20, encrypt=True, secret_files=tuple(files))
    base.update(overrides)
    return NvmeConfig(**base)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
async def test_encrypted_blocks_round_trip_survive_a_restart_and_never_touch_the_disk_in_the_clear(tmp_path, direct):
    secret = os.urandom(32)
    keys, blocks = chain(8, seed=50), random_blocks(8, 100_000)   # not a multiple of the alignment
    nvme = encrypted(tmp_path, [secret], direct_io=direct)
    async with KVStoreServer(make_config(nvme=nvme, write_through=True)) as server:
        async with KVClient(server.address, local="off") as kv:
            assert (await kv.put(keys, blocks)).persisted == 8
    on_disk = (tmp_path / "nvme" / DATA_FILE).read_bytes()
    assert not any(block[:64] in on_disk for block in blocks)
    async with KVStoreServer(make_config(nvme=nvme)) as server:
        async with KVClient(server.address, local="off") as kv:
            assert (await kv.lookup(keys)).tiers == [TierKind.NVME] * 8
            assert [bytes(b) for b in await kv.get(keys)] == blocks


async def test_encrypted_blocks_open_with_a_rotated_list_and_are_misses_without_their_secret(tmp_path):
    old, new = os.urandom(32), os.urandom(32)
    keys, blocks = chain(4, seed=51), random_blocks(4, 50_000)
    async with KVStoreServer(make_config(nvme=encrypted(tmp_path, [old]), write_through=True)) as server:
        async with KVClient(server.address, local="off") as kv:
            await kv.put(keys, blocks)
    async with KVStoreServer(make_config(nvme=encrypted(tmp_path, [new, old]))) as server:
        async with KVClient(server.address, local="off") as kv:
            assert [bytes(b) for b in await kv.get(keys)] == blocks
    async with KVStoreServer(make_config(nvme=encrypted(tmp_path, [new]))) as server:
        async with KVClient(server.address, local="off") as kv:
            assert await kv.get(keys[2:]) == []            # cannot decrypt: a miss, never bytes
            stats = await kv.stats()
        assert next(t for t in stats.tiers if t.name == "nvme").integrity_failures >= 1


def test_encryption_without_a_secret_is_refused_naming_the_setting(tmp_path, monkeypatch):
    from kvstore.errors import ConfigError
    from kvstore.tiers.nvme import NvmeTier

    monkeypatch.delenv("KVSTORE_NVME_SECRET", raising=False)
    with pytest.raises(ConfigError, match="nvme.encrypt needs a secret"):
        NvmeTier(NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=16 << 20, encrypt=True))
    assert not (tmp_path / "nvme").exists()   # refused before anything was created
