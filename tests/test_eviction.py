"""Capacity pressure: LRU order, byte-exactness under churn, and pins held by readers."""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import pytest

from kvstore import TierKind
from kvstore.client import KVClient
from kvstore.keys import scoped
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server import KVStoreServer

from conftest import chain, pins, make_config, random_blocks

MiB = 1 << 20


def raw_get(channel: grpc.aio.Channel, keys: list[bytes]):
    """A Get stream the test reads message by message, to hold the daemon's pins open."""
    return channel.unary_stream(
        "/kvstore.v1.KVStore/Get",
        request_serializer=pb.GetRequest.SerializeToString,
        response_deserializer=pb.GetResponse.FromString,
    )(pb.GetRequest(keys=keys))


async def present(kv: KVClient, keys: list[bytes]) -> list[bool]:
    """Which keys are present, each looked up on its own (not as a chain)."""
    return [(await kv.lookup([k])).count == 1 for k in keys]


async def test_oldest_untouched_blocks_are_evicted_first():
    async with KVStoreServer(make_config(dram_bytes=16 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            old = chain(16, seed=10)
            old_blocks = random_blocks(16, MiB)
            assert (await kv.put(old, old_blocks)).stored == 16
            for k in old[:4]:
                await kv.get([k])  # touch blocks 0-3: now the hottest

            new = chain(8, seed=11)
            new_blocks = random_blocks(8, MiB)
            assert (await kv.put(new, new_blocks)).stored == 8

            assert await present(kv, old) == [True] * 4 + [False] * 8 + [True] * 4
            assert await present(kv, new) == [True] * 8
            for key, block in zip(old[:4] + old[12:] + new, old_blocks[:4] + old_blocks[12:] + new_blocks):
                assert bytes((await kv.get([key]))[0]) == block
            stats = await kv.stats()
            assert stats.tier(TierKind.DRAM).evictions == 8
            assert stats.tier(TierKind.DRAM).evicted_bytes == 8 * MiB


@pytest.mark.parametrize("path", ["require", "off"])
async def test_a_batch_put_into_a_full_level_makes_its_room_with_one_eviction(path):
    async with KVStoreServer(make_config(dram_bytes=16 * MiB)) as srv:
        mover, catalog, plans = srv.daemon.mover, srv.daemon.catalog, []
        execute, evict_slots = mover.execute, catalog.evict_slots

        async def counted(plan):   # an eviction plan (views)...
            plans.append(len(plan.victims))
            await execute(plan)

        def counted_slots(level, slots):   # ...or a plain drop of slots in one pass
            plans.append(len(slots))
            return evict_slots(level, slots)

        mover.execute, catalog.evict_slots = counted, counted_slots
        async with KVClient(f"127.0.0.1:{srv.port}", local=path) as kv:
            old, old_blocks = chain(64, seed=13), random_blocks(64, 256 * 1024)
            assert (await kv.put(old, old_blocks)).stored == 64       # the level is full
            assert plans == []
            new, new_blocks = chain(24, seed=14), random_blocks(24, 256 * 1024)
            assert (await kv.put(new, new_blocks)).stored == 24
            # One per put round (4 MiB: a quarter of the level), not one per block; the remote
            # path frees a round's room when the first block that does not fit arrives.
            assert plans == [16, 8]
            assert await present(kv, old) == [False] * 24 + [True] * 40   # the oldest went
            assert [bytes(b) for b in await kv.get(new)] == new_blocks
            assert [bytes(b) for b in await kv.get(old[24:])] == old_blocks[24:]
            assert (await kv.stats()).tier(TierKind.DRAM).evictions == 24


@pytest.mark.parametrize("path", ["require", "off"])
async def test_putting_again_blocks_a_full_level_holds_evicts_nothing(path):
    async with KVStoreServer(make_config(dram_bytes=16 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local=path) as kv:
            keys, blocks = chain(64, seed=15), random_blocks(64, 256 * 1024)
            assert (await kv.put(keys, blocks)).stored == 64          # full
            for again in (keys[56:], keys[:8]):                        # the newest, then the coldest
                result = await kv.put(again, blocks[:8])
                assert (result.stored, result.present) == (0, 8)
            stats = await kv.stats()
            assert stats.tier(TierKind.DRAM).evictions == 0
            assert (await kv.lookup(keys)).count == 64


async def test_churn_of_mixed_sizes_never_returns_wrong_bytes():
    rng = random.Random(12)
    async with KVStoreServer(make_config(dram_bytes=8 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            written: dict[bytes, bytes] = {}
            for round_ in range(30):
                keys = chain(4, seed=1000 + round_)
                blocks = [os.urandom(rng.choice([4096, 70_000, 512 * 1024, MiB + 3])) for _ in keys]
                result = await kv.put(keys, blocks)
                assert result.stored + result.present + result.dropped == 4
                written.update(zip(keys, blocks))
                sample = rng.sample(list(written), min(8, len(written)))
                for key in sample:
                    got = await kv.get([key])
                    assert got == [] or bytes(got[0]) == written[key]
            stats = await kv.stats()
            dram = stats.tier(TierKind.DRAM)
            assert dram.evictions > 0 and dram.used_bytes <= dram.capacity_bytes


async def test_a_reader_keeps_its_blocks_while_a_writer_forces_eviction():
    async with KVStoreServer(make_config(dram_bytes=24 * MiB, stream_chunk_bytes=256 * 1024)) as srv:
        target = f"127.0.0.1:{srv.port}"
        async with KVClient(target) as writer:
            leased = chain(4, seed=20)
            leased_blocks = random_blocks(4, 4 * MiB)
            await writer.put(leased, leased_blocks)

            async with grpc.aio.insecure_channel(target) as channel:
                call = raw_get(channel, leased)
                stream = aiter(call)
                header = (await anext(stream)).header
                assert header.count == 4  # the daemon now pins all four blocks

                flood = chain(5, seed=21)
                result = await writer.put(flood, random_blocks(5, 4 * MiB))
                # 8 MiB were free: the flood could only evict its own earlier blocks, never the
                # pinned 16 MiB.
                assert result.stored == 5
                assert (await writer.stats()).tier(TierKind.DRAM).evictions >= 3
                assert (await writer.lookup(leased)).count == 4

                received = bytearray()
                async for message in stream:
                    received += message.data
                assert bytes(received) == b"".join(leased_blocks)

            # Released: now they are ordinary cold blocks and a new flood evicts them.
            await asyncio.sleep(0.05)
            await writer.put(chain(6, seed=22), random_blocks(6, 4 * MiB))
            assert (await writer.lookup(leased)).count == 0


async def test_a_cancelled_reader_releases_its_pins():
    async with KVStoreServer(make_config(dram_bytes=16 * MiB, stream_chunk_bytes=64 * 1024)) as srv:
        target = f"127.0.0.1:{srv.port}"
        async with KVClient(target) as kv:
            keys = chain(3, seed=30)
            await kv.put(keys, random_blocks(3, 4 * MiB))
            async with grpc.aio.insecure_channel(target) as channel:
                call = raw_get(channel, keys)
                assert (await anext(aiter(call))).header.count == 3
                call.cancel()
            for _ in range(50):  # the daemon notices the cancellation asynchronously
                if all(not pins(r) for r in srv.daemon.catalog):
                    break
                await asyncio.sleep(0.02)
            result = await kv.put(chain(4, seed=31), random_blocks(4, 4 * MiB))
            assert result.stored == 4
            assert (await kv.lookup(keys)).count == 0


async def test_bytes_corrupted_in_the_arena_are_a_miss_never_wrong_data(server, remote_kv):
    # The remote path verifies end to end. (The same-host path reads host memory directly and
    # trusts it, as it trusts any other RAM; see docs/architecture.md.)
    kv = remote_kv
    keys = chain(4, seed=60)
    blocks = random_blocks(4, 64 * 1024)
    await kv.put(keys, blocks)
    record = server.daemon.catalog.get(scoped(keys[2:3], b"")[0])
    view = server.daemon.arena.view(record.primary().location, record.size)
    view[100] ^= 0xFF  # a bit flip in block 2, behind the daemon's back

    out = [bytearray(64 * 1024) for _ in keys]
    assert await kv.get_into(keys, out) == 2  # block 2 fails verification: a miss from there
    assert [bytes(o) for o in out[:2]] == blocks[:2]

    # The bad copy was dropped, so the chain now stops there and a put repairs it.
    assert (await kv.lookup(keys)).count == 2
    assert (await kv.put(keys, blocks)).stored == 1
    assert [bytes(g) for g in await kv.get(keys)] == blocks
