"""Daemon scenarios below the wire: eviction under fragmentation, idle streams, conditional delete."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvstore.checksum import checksum
from kvstore.keys import namespace_tag
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server import KVStoreServer
from kvstore.server.daemon import Daemon

from conftest import make_config

PAGE = 4096


@pytest.fixture
async def daemon():
    d = Daemon(make_config(dram_bytes=4 * PAGE))
    yield d
    await d.close()


async def put_now(d: Daemon, key: bytes, size: int = PAGE) -> bool:
    """Reserve and commit one block without bytes (the bytes are not what these tests check)."""
    (slot,) = await d.reserve([key], [size], [])
    return slot.copy is not None and await d.commit(slot, 0)


async def test_eviction_under_fragmentation_evicts_nothing_when_it_cannot_help(daemon):
    for k in (b"k0", b"k1", b"k2", b"k3"):
        assert await put_now(daemon, k)
    pinned = (await daemon.acquire([b"k1"]))[0] + (await daemon.acquire([b"k3"]))[0]
    # Pages 1 and 3 are pinned: no two adjacent pages can be freed for a 2-page block.
    (slot,) = await daemon.reserve([b"big"], [2 * PAGE], [])
    assert slot.copy is None and not slot.present
    assert await daemon.lookup([b"k0"]) and await daemon.lookup([b"k2"])  # nothing was evicted for nothing
    assert daemon.counters.put_dropped_blocks == 1
    daemon.release(pinned)
    # Unpinned: coldest first, k0, k2, then k1 (which joins them into three free pages).
    assert await put_now(daemon, b"big", 2 * PAGE)
    assert [bool(await daemon.lookup([k])) for k in (b"k0", b"k1", b"k2", b"k3", b"big")] == [False, False, False, True, True]
    assert daemon.arena.used_bytes == 3 * PAGE


async def test_a_put_that_goes_quiet_times_out_and_gives_its_space_back():
    config = make_config(dram_bytes=16 * PAGE, stream_idle_timeout_s=0.3)
    async with KVStoreServer(config) as srv:
        async def header_then_silence():
            yield pb.PutRequest(header=pb.PutHeader(keys=[b"a", b"b"], sizes=[PAGE, PAGE])).SerializeToString()
            await asyncio.sleep(3)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            put = channel.stream_unary("/kvstore.v1.KVStore/Put")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await put(header_then_silence())
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 0.3s" in info.value.details()
        assert srv.daemon.arena.used_bytes == 0 and len(srv.daemon.catalog) == 0


async def test_conditional_delete_keeps_a_block_whose_checksum_differs(daemon):
    (slot,) = await daemon.reserve([b"k"], [PAGE], [])
    await daemon.commit(slot, checksum(b"good"))
    assert await daemon.delete([b"k"], [checksum(b"bad")]) == 0
    assert await daemon.lookup([b"k"])
    assert await daemon.delete([b"k"], [checksum(b"good")]) == 1
    assert not await daemon.lookup([b"k"])


async def test_a_block_deleted_while_being_written_is_not_stored(daemon):
    (slot,) = await daemon.reserve([b"k"], [PAGE], [])
    assert await daemon.delete([b"k"]) == 1
    assert await daemon.commit(slot, 0) is False
    assert not await daemon.lookup([b"k"]) and daemon.arena.used_bytes == 0


async def test_a_batch_reserves_what_fits_at_once_and_the_rest_one_by_one(daemon):
    assert await put_now(daemon, b"old")
    # a, b at once; "old" is present (skipped); c one by one after it
    slots = await daemon.reserve([b"a", b"b", b"old", b"c"], [PAGE] * 4, [])
    assert [s.copy is not None for s in slots] == [True, True, False, True] and slots[2].present
    for slot in slots:
        if slot.copy is not None:
            assert await daemon.commit(slot, 0)
    assert len(await daemon.lookup([b"old", b"a", b"b", b"c"])) == 4
    assert daemon.arena.used_bytes == 4 * PAGE and daemon.catalog.blocks_at(0) == 4


async def test_a_key_twice_in_one_batch_is_stored_once(daemon):
    slots = await daemon.reserve([b"x", b"y", b"x"], [PAGE] * 3, [])
    assert [s.copy is not None for s in slots] == [True, True, False] and slots[2].present
    for slot in slots[:2]:
        assert await daemon.commit(slot, 0)
    assert daemon.catalog.blocks_at(0) == 2 and len(daemon.catalog) == 2


async def test_a_batch_larger_than_the_free_room_evicts_for_its_tail(daemon):
    for k in (b"k0", b"k1"):
        assert await put_now(daemon, k)
    slots = await daemon.reserve([b"n0", b"n1", b"n2"], [PAGE] * 3, [])   # 2 free pages, then evict
    assert all(s.copy is not None for s in slots)
    for slot in slots:
        assert await daemon.commit(slot, 0)
    assert len(await daemon.lookup([b"n0", b"n1", b"n2"])) == 3
    assert daemon.catalog.blocks_at(0) == 4


async def test_committing_a_batch_skips_what_was_deleted_meanwhile(daemon):
    slots = await daemon.reserve([b"p", b"q", b"r"], [PAGE] * 3, [])
    assert await daemon.delete([b"q"]) == 1          # deleted while being written
    assert daemon.commit_many(slots, [None, None, 7]) == 2
    assert len(await daemon.lookup([b"p"])) == 1 and await daemon.lookup([b"q"]) == []
    (r,) = daemon.catalog.prefix([b"r"], namespace_tag(b""))
    assert r.checksum == 7 and r.primary().level == 0
    assert daemon.arena.used_bytes == 2 * PAGE and daemon.catalog.blocks_at(0) == 2
