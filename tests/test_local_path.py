"""The same-host path: leases, sessions that die with their client, TTLs, and re-attaching."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvstore import ConfigError, LeaseExpiredError, UnavailableError
from kvstore.client import KVClient
from kvstore.keys import scoped
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server import KVStoreServer

from conftest import chain, pins, make_config, random_blocks

MiB = 1 << 20


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from kvstore.client import KVClient
    from kvstore.proto.v1 import kvstore_pb2 as pb

    async def main(target, role, keys):
        async with KVClient(target, local="require") as kv:
            session = kv._local.arena.session
            if role == "writer":
                r = await kv.stub.Reserve(pb.ReserveRequest(session=session, keys=keys, sizes=[1 << 20] * len(keys)))
                kv._local.arena.view[r.offsets[0] : r.offsets[0] + 4096] = b"x" * 4096  # half-written
            else:
                r = await kv.stub.Acquire(pb.AcquireRequest(session=session, keys=keys))
            print("holding", flush=True)
            time.sleep(120)

    asyncio.run(main(sys.argv[1], sys.argv[2], [bytes.fromhex(k) for k in sys.argv[3:]]))
    """
)


async def start_child(target: str, role: str, keys: list[bytes]) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, target, role, *(k.hex() for k in keys)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = await asyncio.to_thread(child.stdout.readline)
    assert line.strip() == "holding", line + child.stdout.read()
    return child


async def test_a_client_killed_mid_put_leaves_nothing_readable_and_its_space_is_reclaimed():
    async with KVStoreServer(make_config(dram_bytes=16 * MiB)) as srv:
        daemon = srv.daemon
        keys = chain(3, seed=70)
        child = await start_child(f"127.0.0.1:{srv.port}", "writer", keys)
        try:
            assert daemon.arena.used_bytes == 3 * MiB  # reserved...
            async with KVClient(f"127.0.0.1:{srv.port}") as kv:
                assert (await kv.lookup(keys)).count == 0  # ...but nothing visible
                child.send_signal(signal.SIGKILL)
                child.wait()
                await wait_until(lambda: daemon.arena.used_bytes == 0)
                assert len(daemon.catalog) == 0 and len(srv.leasing) == 0
                blocks = random_blocks(3, MiB)
                assert (await kv.put(keys, blocks)).stored == 3
                assert [bytes(b) for b in await kv.get(keys)] == blocks
        finally:
            child.kill()


async def test_a_reader_killed_while_holding_a_lease_does_not_pin_memory():
    async with KVStoreServer(make_config(dram_bytes=8 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            keys = chain(4, seed=71)
            await kv.put(keys, random_blocks(4, MiB))
            child = await start_child(f"127.0.0.1:{srv.port}", "reader", keys)
            try:
                assert all(pins(r) == 1 for r in srv.daemon.catalog)
                flood = chain(8, seed=72)
                assert (await kv.put(flood, random_blocks(8, MiB))).stored == 8  # evicting each other...
                assert (await kv.lookup(keys)).count == 4                        # ...not the leased 4 MiB
                child.send_signal(signal.SIGKILL)
                child.wait()
                await wait_until(lambda: len(srv.leasing) == 0)
                assert (await kv.put(chain(8, seed=73), random_blocks(8, MiB))).stored == 8
                assert (await kv.lookup(keys)).count == 0  # unpinned, so evicted like any cold block
            finally:
                child.kill()


async def test_a_leased_block_survives_eviction_pressure_and_reads_back_exact():
    async with KVStoreServer(make_config(dram_bytes=8 * MiB)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as reader, KVClient(
            f"127.0.0.1:{srv.port}", local="require"
        ) as writer:
            keys = chain(2, seed=74)
            blocks = random_blocks(2, 2 * MiB)
            await writer.put(keys, blocks)
            session = reader._local.arena.session
            lease = await reader.stub.Acquire(pb.AcquireRequest(session=session, keys=keys))
            await writer.put(chain(6, seed=75), random_blocks(6, 2 * MiB))  # wants the whole arena
            arena = reader._local.arena.view
            got = [bytes(arena[o : o + n]) for o, n in zip(lease.offsets, lease.sizes)]
            assert got == blocks
            released = await reader.stub.Release(pb.ReleaseRequest(session=session, leases=[lease.lease]))
            assert released.released == 1


async def test_leases_expire_after_their_ttl():
    async with KVStoreServer(make_config(dram_bytes=8 * MiB, lease_ttl_s=0.3)) as srv:
        daemon = srv.daemon
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            keys = chain(2, seed=76)
            await kv.put(keys, random_blocks(2, MiB))
            session = kv._local.arena.session
            await kv.stub.Acquire(pb.AcquireRequest(session=session, keys=keys))
            pending = chain(1, seed=77)
            r = await kv.stub.Reserve(pb.ReserveRequest(session=session, keys=pending, sizes=[MiB]))
            assert all(pins(rec) == 1 for rec in daemon.catalog if rec.key in keys)
            await wait_until(lambda: len(srv.leasing) == 0)
            assert all(pins(rec) == 0 for rec in daemon.catalog)
            # The expired write lease is gone from the index, but its bytes stay reserved while
            # its session lives (the client might still be writing into them).
            assert daemon.catalog.get(scoped(pending, b"")[0]) is None
            assert daemon.arena.used_bytes == 3 * MiB
            with pytest.raises(LeaseExpiredError, match="expired"):
                await _commit(kv, session, r.lease)
        await wait_until(lambda: daemon.arena.used_bytes == 2 * MiB)  # session closed: quarantine freed


async def _commit(kv: KVClient, session: str, lease: int) -> None:
    async with kv._errors():
        await kv.stub.Commit(pb.CommitRequest(session=session, lease=lease))


async def test_the_client_attaches_again_after_the_daemon_restarts():
    first = KVStoreServer(make_config())
    await first.__aenter__()
    port = first.port
    try:
        async with KVClient(f"127.0.0.1:{port}", local="require") as kv:
            old_session = kv._local.arena.session
            await first.stop()
            second = KVStoreServer(make_config(port=port))
            async with second:
                keys = chain(2, seed=78)
                blocks = random_blocks(2, 100_000)
                await asyncio.wait_for(kv.stub.Stats(pb.StatsRequest(), wait_for_ready=True), 10)
                assert (await kv.put(keys, blocks)).stored == 2
                assert kv.path == "local" and kv._local.arena.session != old_session
                assert [bytes(b) for b in await kv.get(keys)] == blocks
    finally:
        await first.stop()


async def test_local_modes_when_the_daemon_offers_no_socket():
    async with KVStoreServer(make_config(local_socket="off")) as srv:
        with pytest.raises(UnavailableError, match="same-host path required"):
            async with KVClient(f"127.0.0.1:{srv.port}", local="require"):
                pass
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert kv.path == "remote"
            await kv.put(chain(1), [b"still works"])


async def test_socket_paths_stale_and_in_use(tmp_path):
    path = str(tmp_path / "kv.sock")
    import socket as socket_module

    stale = socket_module.socket(socket_module.AF_UNIX)
    stale.bind(path)  # a socket file nobody listens on: what a crashed daemon leaves
    stale.close()
    async with KVStoreServer(make_config(local_socket=path)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            assert kv.path == "local"
        with pytest.raises(ConfigError, match="in use by another daemon"):
            async with KVStoreServer(make_config(local_socket=path)):
                pass
    assert not os.path.exists(path)  # removed on shutdown


async def raw_session(path: str):
    """A bare local-socket session: the hello (with its fd) read, then raw frames."""
    import socket as socket_module

    def hello() -> socket_module.socket:  # blocking: run off the loop the daemon serves on
        conn = socket_module.socket(socket_module.AF_UNIX)
        conn.connect(path)
        _, fds, _, _ = socket_module.recv_fds(conn, 65536, 1)
        for fd in fds:
            os.close(fd)
        conn.setblocking(False)
        return conn

    conn = await asyncio.to_thread(hello)
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    return reader, writer


async def read_frame(reader) -> tuple[int, bytes]:
    length = int.from_bytes(await reader.readexactly(4), "little")
    body = await reader.readexactly(length)
    return body[0], body[1:]


async def test_bad_frames_on_the_local_socket_get_clear_errors_and_lose_nothing():
    from kvstore.proto.local import METHOD_IDS, frame

    async with KVStoreServer(make_config()) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            keys = chain(3, seed=80)
            blocks = random_blocks(3, 10_000)
            await kv.put(keys, blocks)
            reader, writer = await raw_session(srv.config.local_socket_path(srv.port))
            writer.write(frame(200, b""))  # no such method
            status, text = await read_frame(reader)
            assert status == 3 and b"unknown local method 200" in text  # INVALID_ARGUMENT
            writer.write(frame(METHOD_IDS["Lookup"], b"\xff\xff\xff\xff\x0f"))
            status, text = await read_frame(reader)
            assert status == 3 and b"cannot decode" in text
            writer.write(frame(METHOD_IDS["Reserve"], pb.ReserveRequest(keys=[b"k"], sizes=[0]).SerializeToString()))
            status, text = await read_frame(reader)
            assert status == 3 and b"block 0 is empty" in text
            # Another session's lease cannot be released from here (the socket is the session).
            lease = await kv.stub.Acquire(pb.AcquireRequest(session=kv._local.arena.session, keys=keys))
            writer.write(frame(METHOD_IDS["Release"], pb.ReleaseRequest(
                session=kv._local.arena.session, leases=[lease.lease]).SerializeToString()))
            status, body = await read_frame(reader)
            assert status == 0 and pb.ReleaseResponse.FromString(body).released == 0
            assert all(pins(r) == 1 for r in srv.daemon.catalog)
            # A frame claiming more than the limit ends the session.
            writer.write((1 << 31).to_bytes(4, "little"))
            assert await reader.read() == b""
            writer.close()
            assert [bytes(b) for b in await kv.get(keys)] == blocks


async def test_a_lease_id_of_the_wrong_kind_changes_nothing():
    async with KVStoreServer(make_config()) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            keys = chain(2, seed=81)
            await kv.put(keys, random_blocks(2, 4096))
            session = kv._local.arena.session
            read = await kv.stub.Acquire(pb.AcquireRequest(session=session, keys=keys))
            write = await kv.stub.Reserve(pb.ReserveRequest(session=session, keys=chain(1, seed=82), sizes=[4096]))
            with pytest.raises(LeaseExpiredError):
                await _commit(kv, session, read.lease)      # a read lease is not committable...
            released = await kv.stub.Release(pb.ReleaseRequest(session=session, leases=[write.lease]))
            assert released.released == 0                  # ...and a write lease is not releasable
            assert len(srv.leasing) == 2             # both are still held, neither leaked
            await _commit(kv, session, write.lease)
            assert (await kv.stub.Release(pb.ReleaseRequest(session=session, leases=[read.lease]))).released == 1
            assert len(srv.leasing) == 0 and all(pins(r) == 0 for r in srv.daemon.catalog)


async def test_a_call_cancelled_mid_flight_never_hands_its_answer_to_the_next_call():
    async with KVStoreServer(make_config()) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            a, b = chain(1, seed=83), chain(1, seed=84)
            block_a, block_b = b"A" * 5000, b"B" * 7000
            await kv.put(a + b, [block_a, block_b])
            first_session = kv._local.arena.session
            task = asyncio.ensure_future(kv.get(a))
            await asyncio.sleep(0)        # the Acquire for A is on the wire...
            task.cancel()                 # ...and its answer will never be read
            with pytest.raises(asyncio.CancelledError):
                await task
            got = await kv.get(b)         # must not receive A's answer
            assert [bytes(g) for g in got] == [block_b]
            assert kv._local.arena.session != first_session  # the session was replaced
            await wait_until(lambda: all(pins(r) == 0 for r in srv.daemon.catalog))


async def test_the_arena_fd_handed_to_clients_cannot_be_resized():
    import socket as socket_module

    async with KVStoreServer(make_config()) as srv:
        def try_to_shrink() -> OSError | None:
            conn = socket_module.socket(socket_module.AF_UNIX)
            conn.connect(srv.config.local_socket_path(srv.port))
            _, fds, _, _ = socket_module.recv_fds(conn, 65536, 1)
            try:
                os.ftruncate(fds[0], 0)   # would SIGBUS the daemon and every client
            except OSError as exc:
                return exc
            finally:
                os.close(fds[0])
                conn.close()
            return None

        error = await asyncio.to_thread(try_to_shrink)
        assert isinstance(error, PermissionError)
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            await kv.put(chain(1, seed=85), [b"still fine"])


async def test_the_arena_is_populated_in_the_background_without_touching_stored_bytes():
    from conftest import make_config as config_of

    async with KVStoreServer(config_of(dram_bytes=512 * MiB)) as srv:
        arena = srv.daemon.arena
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as kv:
            keys, blocks = chain(8, seed=410), random_blocks(8, MiB)
            assert (await kv.put(keys, blocks)).stored == 8     # while the arena is being populated
            await wait_until(lambda: arena.prefaulted, timeout_s=30)
            assert [bytes(b) for b in await kv.get(keys)] == blocks
        async with KVClient(f"127.0.0.1:{srv.port}", local="require") as later:
            assert later._local.arena.prefaulted                   # told to map it populated


async def test_populating_the_arena_leaves_the_event_loop_running():
    """The background populate runs without the GIL: the loop keeps ticking through it (with
    Python's mmap.madvise, which holds the GIL, it ticked once per 64 MiB chunk, and the first
    put into a fresh daemon waited for the whole arena)."""
    import time

    from kvstore.config import DramConfig
    from kvstore.tiers import create_tier
    from kvstore.tiers.dram import POPULATE_CHUNK_BYTES

    size = 1 << 30
    tier = create_tier("dram", DramConfig(capacity_bytes=size))
    try:
        warming = asyncio.ensure_future(asyncio.to_thread(tier.warm))
        ticks = 0
        while not warming.done():
            await asyncio.sleep(0.001)
            ticks += 1
        await warming
        assert tier.prefaulted
        assert ticks >= 2 * size // POPULATE_CHUNK_BYTES, f"the loop ran {ticks} times while 1 GiB was populated"
    finally:
        await tier.close()


async def test_frames_arrive_whole_however_the_bytes_are_cut():
    """The session socket's reader: frames split across reads, several in one read, one larger
    than its buffer, an impossible length and a peer that closes mid-frame."""
    import socket

    from kvstore.proto.local import MAX_FRAME_BYTES, FrameError, FramedSocket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    framed = FramedSocket(ours)
    big = os.urandom(3 << 20)   # beyond the 64 KiB the reader starts with
    frames = [b"\x01", os.urandom(1000), big, b"\x02tail"]
    wire = b"".join(len(f).to_bytes(4, "little") + f for f in frames)

    async def send_in_pieces():
        loop = asyncio.get_running_loop()
        theirs.setblocking(False)
        cuts = [0, 2, 3, 1500, 1507, len(wire) - 5, len(wire)]   # mid-length, mid-body, several at once
        for a, b in zip(cuts, cuts[1:]):
            await loop.sock_sendall(theirs, wire[a:b])
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(send_in_pieces())
    assert [await framed.read_frame() for _ in frames] == frames
    await sender
    # A length beyond the limit, then a peer that goes away halfway through a frame.
    theirs.sendall((MAX_FRAME_BYTES + 1).to_bytes(4, "little"))
    with pytest.raises(FrameError):
        await framed.read_frame()
    framed.close()
    ours, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    framed = FramedSocket(ours)
    theirs2.sendall((100).to_bytes(4, "little") + b"only part")
    theirs2.close()
    with pytest.raises(asyncio.IncompleteReadError):
        await framed.read_frame()
    framed.close()
    theirs.close()
