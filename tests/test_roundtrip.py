"""Put, lookup, get and delete through the real client against a real daemon."""

from __future__ import annotations

import asyncio
import os
import random

import numpy as np
from kvstore import TierKind
from kvstore.client import KVClient, SyncKVClient

from conftest import chain, random_blocks


async def test_random_blocks_round_trip_byte_exact(kv):
    rng = random.Random(1)
    keys = chain(40, seed=1)
    blocks = [os.urandom(rng.choice([1, 100, 4096, 65_537, 1 << 20, 3 * (1 << 20) + 5])) for _ in keys]
    result = await kv.put(keys, blocks)
    assert (result.stored, result.present, result.dropped) == (40, 0, 0)

    hit = await kv.lookup(keys)
    assert hit.count == 40 and hit.tiers == [TierKind.DRAM] * 40
    got = await kv.get(keys)
    assert [bytes(g) for g in got] == blocks


async def test_get_into_caller_buffers(kv):
    keys = chain(8, seed=2)
    blocks = [np.random.default_rng(i).standard_normal(2048).astype(np.float16) for i in range(8)]
    await kv.put(keys, blocks)
    out = [np.zeros(2048, dtype=np.float16) for _ in keys]
    assert await kv.get_into(keys, out) == 8
    for a, b in zip(out, blocks):
        np.testing.assert_array_equal(a, b)
    # A larger buffer is filled at its start.
    big = bytearray(3 * 4096)
    assert await kv.get_into(keys[:1], [big]) == 1
    assert bytes(big[:4096]) == blocks[0].tobytes()


async def test_lookup_and_get_stop_at_the_first_gap(kv):
    keys = chain(10, seed=3)
    blocks = random_blocks(10, 8192)
    await kv.put(keys, blocks)
    assert await kv.delete([keys[6]]) == 1

    hit = await kv.lookup(keys)
    assert hit.count == 6
    got = await kv.get(keys)
    assert [bytes(g) for g in got] == blocks[:6]
    out = [bytearray(8192) for _ in keys]
    assert await kv.get_into(keys, out) == 6
    assert out[6] == bytearray(8192)  # nothing written past the gap
    # A chain whose first block is missing finds nothing, even though later blocks are present.
    assert (await kv.lookup(keys[6:])).count == 0
    assert (await kv.lookup(keys[7:])).count == 3


async def test_putting_a_present_key_is_a_no_op(kv):
    keys = chain(4, seed=4)
    first = random_blocks(4, 4096)
    await kv.put(keys, first)
    result = await kv.put(keys, random_blocks(4, 4096))
    assert (result.stored, result.present) == (0, 4)
    assert [bytes(g) for g in await kv.get(keys)] == first


async def test_duplicate_keys_in_one_batch_store_the_first(kv):
    key = chain(1, seed=5)[0]
    a, b = os.urandom(4096), os.urandom(4096)
    result = await kv.put([key, key], [a, b])
    assert (result.stored, result.present) == (1, 1)
    assert bytes((await kv.get([key]))[0]) == a


async def test_delete_ignores_absent_keys_and_counts_present_ones(kv):
    keys = chain(3, seed=6)
    await kv.put(keys[:2], random_blocks(2, 100))
    assert await kv.delete(keys) == 2
    assert (await kv.lookup(keys)).count == 0
    assert await kv.get(keys) == []


async def test_large_put_is_split_into_several_streams(server):
    async with KVClient(f"127.0.0.1:{server.port}", max_put_stream_bytes=3 << 20, chunk_bytes=256 << 10) as kv:
        keys = chain(10, seed=7)
        blocks = random_blocks(10, 1 << 20)
        result = await kv.put(keys, blocks)
        assert result.stored == 10
        assert [bytes(g) for g in await kv.get(keys)] == blocks


async def test_stats_count_what_happened(kv):
    keys = chain(5, seed=8)
    await kv.put(keys, random_blocks(5, 10_000))
    await kv.lookup(keys + chain(2, seed=99))
    await kv.get(keys[:3])
    stats = await kv.stats()
    dram = stats.tier(TierKind.DRAM)
    assert dram.blocks == 5 and dram.used_bytes == 5 * 12288 and dram.hits == 3
    assert stats.put_stored_blocks == 5
    assert (stats.lookup_hit_blocks, stats.lookup_miss_blocks) == (5, 2)
    assert stats.bytes_in == 50_000 and stats.bytes_out == 30_000


async def test_sync_client_round_trip(server):
    # The daemon runs on this test's event loop; the blocking client runs in a worker thread.
    def use_sync_client():
        with SyncKVClient(f"127.0.0.1:{server.port}") as kv:
            keys = chain(3, seed=9)
            blocks = random_blocks(3, 5000)
            assert kv.put(keys, blocks).stored == 3
            assert kv.lookup(keys).count == 3
            assert [bytes(g) for g in kv.get(keys)] == blocks
            assert kv.delete(keys[:1]) == 1
            assert kv.stats().deleted_blocks == 1

    await asyncio.to_thread(use_sync_client)


async def test_namespaces_scope_every_call(server):
    from kvstore import Namespace

    tenant_a = Namespace(model_id="m", dtype="bf16", num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, salt="a")
    target = f"127.0.0.1:{server.port}"
    for mode in ("require", "off"):
        async with KVClient(target, namespace=tenant_a, local=mode) as a, KVClient(target, namespace=b"tenant-b", local=mode) as b:
            keys = [os.urandom(16) for _ in range(3)]   # an engine's own hashes, the same for both
            await a.put(keys, [b"A" * 100] * 3)
            assert (await b.lookup(keys)).count == 0 and await b.get(keys) == []
            await b.put(keys, [b"B" * 100] * 3)
            assert [bytes(x) for x in await a.get(keys)] == [b"A" * 100] * 3
            assert [bytes(x) for x in await b.get(keys)] == [b"B" * 100] * 3
            assert await b.delete(keys) == 3 and (await a.lookup(keys)).count == 3
