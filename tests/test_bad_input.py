"""Bad input gets a clear status (and a clear client exception) and leaves stored data intact."""

from __future__ import annotations

import asyncio
import os

import grpc
import numpy as np
import pytest

from kvstore import BlockTooLargeError, IntegrityError, InvalidArgumentError, UnavailableError
from kvstore.checksum import checksum
from kvstore.client import KVClient
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server import KVStoreServer

from conftest import chain, make_config, random_blocks

MiB = 1 << 20


@pytest.fixture
async def stored(kv):
    """Blocks already in the daemon; every test checks they survive its bad request."""
    keys = chain(6, seed=40)
    blocks = random_blocks(6, 50_000)
    await kv.put(keys, blocks)
    yield keys, blocks
    assert [bytes(b) for b in await kv.get(keys)] == blocks
    stats = await kv.stats()
    assert stats.tiers[0].blocks == stats.put_stored_blocks - stats.deleted_blocks


@pytest.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def raw_unary(channel, method: str):
    """A call that sends raw bytes, so a test can put anything on the wire."""
    return channel.unary_unary(f"/kvstore.v1.KVStore/{method}")


def put_call(channel):
    return channel.stream_unary(
        "/kvstore.v1.KVStore/Put", request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.PutResponse.FromString,
    )


async def expect_status(awaitable, code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


@pytest.mark.parametrize(
    "keys, match",
    [([b"ok", b""], "key 1 is empty"), ([b"k" * 129], "key 0 is 129 bytes")],
)
async def test_bad_keys_are_invalid_argument_on_every_rpc(kv, stored, keys, match):
    for call in (kv.lookup(keys), kv.get(keys), kv.delete(keys), kv.put(keys, [b"x"] * len(keys))):
        with pytest.raises(InvalidArgumentError, match=match):
            await call


async def test_empty_batches_are_empty_results_and_the_daemon_refuses_them(kv, channel, stored):
    assert (await kv.lookup([])).count == 0
    assert await kv.get([]) == [] and await kv.get_into([], []) == 0
    assert (await kv.put([], [])).stored == 0 and await kv.delete([]) == 0
    lookup = channel.unary_unary("/kvstore.v1.KVStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString)
    await expect_status(lookup(pb.LookupRequest(keys=[])), grpc.StatusCode.INVALID_ARGUMENT, "no keys")


async def test_too_many_keys(server, kv, channel, stored):
    keys = [os.urandom(16) for _ in range(server.config.max_keys_per_request + 1)]
    lookup = channel.unary_unary("/kvstore.v1.KVStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString)
    await expect_status(lookup(pb.LookupRequest(keys=keys)), grpc.StatusCode.INVALID_ARGUMENT, "at most 65536")
    # The client splits long batches at the daemon's limit instead.
    assert (await kv.lookup(stored[0] + keys)).count == 6
    with pytest.raises(InvalidArgumentError, match="at most 65536 keys"):
        await kv.get(keys)


async def test_empty_and_oversized_blocks(kv, stored):
    keys = chain(2, seed=41)
    with pytest.raises(InvalidArgumentError, match="block 1 is empty"):
        await kv.put(keys, [b"x", b""])
    with pytest.raises(InvalidArgumentError, match="largest block"):
        await kv.put(keys, [b"x", bytes(64 * MiB + 1)])
    assert (await kv.lookup(keys)).count == 0  # nothing of a rejected batch was stored


async def test_a_block_bigger_than_the_whole_tier():
    async with KVStoreServer(make_config(dram_bytes=4 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            with pytest.raises(InvalidArgumentError, match="dram capacity=4194304"):
                await kv.put(chain(1), [bytes(5 * MiB)])


async def test_client_side_shape_errors(kv, stored):
    keys = chain(3, seed=42)
    with pytest.raises(InvalidArgumentError, match="3 keys but 2 blocks"):
        await kv.put(keys, [b"a", b"b"])
    with pytest.raises(InvalidArgumentError, match="3 keys but 1 buffers"):
        await kv.get_into(keys, [bytearray(1)])
    with pytest.raises(InvalidArgumentError, match="not a buffer"):
        await kv.put(keys[:1], [object()])
    with pytest.raises(InvalidArgumentError, match="not C-contiguous"):
        await kv.put(keys[:1], [np.zeros((64, 64))[:, ::2]])
    with pytest.raises(InvalidArgumentError, match="read-only"):
        await kv.get_into(stored[0][:1], [b"immutable"])
    with pytest.raises(InvalidArgumentError, match="buffer 0 holds 10 bytes but block 0 is 50000"):
        await kv.get_into(stored[0][:1], [bytearray(10)])


async def test_mismatched_counts_on_the_wire(channel, stored):
    header = pb.PutHeader(keys=[b"a", b"b"], sizes=[1])
    await expect_status(
        put_call(channel)(iter([pb.PutRequest(header=header)])), grpc.StatusCode.INVALID_ARGUMENT, "2 keys but 1 block sizes"
    )
    header = pb.PutHeader(keys=[b"a"], sizes=[1], checksums=[1, 2])
    await expect_status(
        put_call(channel)(iter([pb.PutRequest(header=header)])), grpc.StatusCode.INVALID_ARGUMENT, "1 keys but 2 checksums"
    )


@pytest.mark.parametrize("request_, match", [
    (pb.LookupRequest(packed_keys=b"x" * 33, key_bytes=32), "not a whole number of 32-byte keys"),
    (pb.LookupRequest(packed_keys=b"x" * 32, key_bytes=32, keys=[b"k"]), "keys or packed_keys, not both"),
    (pb.LookupRequest(packed_keys=b"x" * 129, key_bytes=129), "key 0 is 129 bytes"),
    (pb.LookupRequest(packed_keys=b"x" * 8 * 65537, key_bytes=8), "65537 keys"),
    (pb.LookupRequest(packed_keys=b"x" * 32), "key 0 is empty"),
])
async def test_bad_packed_lookups_are_invalid_argument(channel, stored, request_, match):
    lookup = channel.unary_unary("/kvstore.v1.KVStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString,
                                 response_deserializer=pb.LookupResponse.FromString)
    await expect_status(lookup(request_), grpc.StatusCode.INVALID_ARGUMENT, match)


async def test_packed_and_listed_lookups_answer_alike(channel, stored):
    keys, _ = stored
    lookup = channel.unary_unary("/kvstore.v1.KVStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString,
                                 response_deserializer=pb.LookupResponse.FromString)
    asked = keys[:4] + [b"\0" * 32] + keys[4:]
    listed = await lookup(pb.LookupRequest(keys=asked))
    packed = await lookup(pb.LookupRequest(packed_keys=b"".join(asked), key_bytes=32))
    assert listed.count == packed.count == 4 and list(listed.tiers) == list(packed.packed_tiers)
    mixed = await lookup(pb.LookupRequest(keys=[keys[0], keys[1][:20]]))   # keys of two lengths
    assert mixed.count == 1


@pytest.mark.parametrize("method", ["Lookup", "Get", "Delete", "Stats"])
async def test_garbage_on_the_wire(channel, stored, method):
    garbage = b"\xff\xff\xff\xff\x0f" + os.urandom(64)
    call = raw_unary(channel, method)(garbage) if method != "Get" else channel.unary_stream(
        "/kvstore.v1.KVStore/Get"
    )(garbage).read()
    await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "cannot decode")


async def test_garbage_put_stream(channel, stored):
    await expect_status(put_call(channel)(iter([b"\xff\xff\xff\xff\x0f"])), grpc.StatusCode.INVALID_ARGUMENT, "cannot decode")
    await expect_status(put_call(channel)(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "must start with a header")
    data_first = [pb.PutRequest(data=b"abc")]
    await expect_status(put_call(channel)(iter(data_first)), grpc.StatusCode.INVALID_ARGUMENT, "must start with a header")


async def test_truncated_and_overlong_streams_store_nothing(channel, kv, stored):
    keys = chain(2, seed=43)
    blocks = random_blocks(2, 10_000)
    header = pb.PutHeader(keys=keys, sizes=[10_000, 10_000], checksums=[checksum(b) for b in blocks])
    short = [pb.PutRequest(header=header), pb.PutRequest(data=blocks[0]), pb.PutRequest(data=blocks[1][:5000])]
    await expect_status(put_call(channel)(iter(short)), grpc.StatusCode.INVALID_ARGUMENT, "ended after 15000 of the 20000")
    # The first block had all its bytes and verified, so it was committed; the second was not.
    assert (await kv.lookup(keys)).count == 1
    assert (await kv.lookup(keys[1:])).count == 0

    keys = chain(1, seed=44)
    header = pb.PutHeader(keys=keys, sizes=[100])
    long = [pb.PutRequest(header=header), pb.PutRequest(data=bytes(150))]
    await expect_status(put_call(channel)(iter(long)), grpc.StatusCode.INVALID_ARGUMENT, "more bytes than the 100")
    assert (await kv.lookup(keys)).count == 0

    twice = [pb.PutRequest(header=header), pb.PutRequest(header=header)]
    await expect_status(put_call(channel)(iter(twice)), grpc.StatusCode.INVALID_ARGUMENT, "only the first message")


async def test_a_block_that_fails_its_checksum_is_not_stored(channel, kv, stored):
    keys = chain(3, seed=45)
    blocks = random_blocks(3, 4096)
    sums = [checksum(b) for b in blocks]
    sums[1] ^= 1
    messages = [pb.PutRequest(header=pb.PutHeader(keys=keys, sizes=[4096] * 3, checksums=sums))]
    messages += [pb.PutRequest(data=b) for b in blocks]
    await expect_status(put_call(channel)(iter(messages)), grpc.StatusCode.DATA_LOSS, "blocks [1] did not match")
    assert [(await kv.lookup([k])).count for k in keys] == [1, 0, 1]
    assert bytes((await kv.get(keys[:1]))[0]) == blocks[0]
    stats = await kv.stats()
    assert stats.integrity_failures == 1
    assert await kv.delete([keys[0], keys[2]]) == 2


async def test_client_maps_data_loss_to_integrity_error(remote_kv, monkeypatch):
    # A client whose checksum disagrees with its bytes (a corrupted buffer in flight).
    import kvstore.client.remote as remote_module

    monkeypatch.setattr(remote_module, "checksum", lambda view: 12345)
    with pytest.raises(IntegrityError, match="did not match"):
        await remote_kv.put(chain(1, seed=46), [b"payload"])


async def test_no_daemon_is_a_clear_unavailable_error():
    with pytest.raises(UnavailableError, match="no kvstore daemon answered at 127.0.0.1:1"):
        async with KVClient("127.0.0.1:1", connect_timeout_s=0.5):
            pass


async def test_block_too_large_error_is_an_invalid_argument():
    assert issubclass(BlockTooLargeError, InvalidArgumentError)


async def test_a_rejected_header_is_answered_at_once_even_if_the_stream_stays_open(channel):
    import time

    async def held_open():
        yield pb.PutRequest(header=pb.PutHeader(keys=[b"a", b"b"], sizes=[1]))
        await asyncio.sleep(60)  # a client that neither sends nor closes

    started = time.perf_counter()
    await expect_status(put_call(channel)(held_open()), grpc.StatusCode.INVALID_ARGUMENT, "2 keys but 1 block sizes")
    assert time.perf_counter() - started < 5  # not the 30 s idle timeout
