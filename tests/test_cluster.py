"""Three daemons on loopback as one cache: the peer tier end to end.

Clients stay on the remote path (``local="off"``), so nothing crosses between daemons by shared
memory: every byte a daemon serves for a block it did not hold came from a peer over the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence

import numpy as np
import pytest

from kvstore import block_keys
from kvstore.client import KVClient
from kvstore.config import PeerConfig
from kvstore.errors import ConfigError
from kvstore.rendezvous import homes
from kvstore.server.process import DaemonProcess, free_ports
from kvstore.server.server import KVStoreServer
from kvstore.tier_kind import TierKind
from kvstore.tiers.membership import DnsMembers, Membership, MemberSource, StaticMembers
from kvstore.tiers.peer_nixl import nixl_module

from conftest import make_config

MiB = 1 << 20

needs_nixl = pytest.mark.skipif(nixl_module() is None, reason="NIXL is not installed (pip install nixl-cu12)")
TRANSFERS = [pytest.param("grpc", id="grpc"), pytest.param("nixl", id="nixl", marks=needs_nixl)]


def addresses(ports: list[int]) -> tuple[str, ...]:
    return tuple(f"127.0.0.1:{p}" for p in ports)


def chain(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return block_keys(rng.integers(0, 50_000, n * 16, dtype=np.uint32), block_size=16, namespace=b"cluster")


@contextlib.asynccontextmanager
async def cluster(n: int = 3, dram_bytes: int = 64 * MiB, transfers: Sequence[str] = ("grpc",), socket_dir=None, **peer):
    ports = free_ports(n)
    members = addresses(ports)
    servers = []
    try:
        for i, port in enumerate(ports):
            transfer = transfers[i % len(transfers)]
            local = f"{socket_dir}/{port}.sock" if socket_dir else "off"
            config = make_config(dram_bytes, port=port, local_socket=local,
                                 peer=PeerConfig(peers=members, backoff_s=0.2, transfer=transfer, **peer))
            server = KVStoreServer(config)
            await server.start()
            servers.append(server)
        await asyncio.sleep(0.2)   # each has read its member list
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def settled(servers, timeout_s: float = 20.0) -> None:
    """Wait until no daemon has blocks waiting to travel home."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(s.level_queue_empty() for s in map(_Queues, servers)):
            await asyncio.sleep(0.1)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("blocks were still waiting to travel to their homes")


class _Queues:
    def __init__(self, server: KVStoreServer) -> None:
        self.daemon = server.daemon

    def level_queue_empty(self) -> bool:
        return all(s.uploads._queue.empty() for s in self.daemon.shared.levels) and not self.daemon.mover.busy


@pytest.mark.parametrize("transfer", TRANSFERS)
async def test_a_block_put_on_one_daemon_is_found_and_fetched_byte_exact_on_the_others(transfer):
    async with cluster(transfers=[transfer]) as servers:
        keys = chain(48, seed=1)
        blocks = [os.urandom(64 << 10) for _ in keys]
        async with KVClient(servers[0].address, local="off") as first:
            assert (await first.put(keys, blocks)).stored == len(keys)
        await settled(servers)
        for server in servers[1:]:
            async with KVClient(server.address, local="off") as other:
                hit = await other.lookup(keys)
                assert hit.count == len(keys)
                assert TierKind.PEER in set(hit.tiers)   # found at the others, reported as such
                got = await other.get(keys)
                assert [bytes(b) for b in got] == blocks
                again = await other.lookup(keys)   # fetched blocks are kept: a near cache
                assert again.count == len(keys) and set(again.tiers) == {TierKind.DRAM}
        counted = lambda name: sum(getattr(s.daemon.counters, name) for s in servers)  # noqa: E731
        assert counted(f"peer_bytes_out_{transfer}") > 0 and counted(f"peer_bytes_in_{transfer}") > 0
        other = "nixl" if transfer == "grpc" else "grpc"
        assert counted(f"peer_bytes_out_{other}") == counted(f"peer_bytes_in_{other}") == 0
        assert all(s.daemon.counters.peer_members == 2 and s.daemon.counters.peer_live == 2 for s in servers)


async def test_each_block_travels_to_its_rendezvous_home():
    async with cluster() as servers:
        keys = chain(60, seed=2)
        async with KVClient(servers[1].address, local="off") as kv:
            await kv.put(keys, [os.urandom(4096) for _ in keys])
        await settled(servers)
        members = sorted(s.address for s in servers)
        home_of = [members[i] for i in homes(keys, members).tolist()]
        for server in servers:
            probe = server.daemon.probe(b"".join(keys), 32)[0]
            held = [bool(b) for b in probe]
            for key, home, has in zip(keys, home_of, held):
                if home == server.address:
                    assert has, "a block is missing at its home"
        assert {home for home in home_of} == set(members)   # the test's keys reach every member


async def test_the_peer_tiers_use_is_what_it_holds_elsewhere_and_falls_when_blocks_go():
    async with cluster() as servers:
        keys = chain(40, seed=12)
        size = 8192
        async with KVClient(servers[0].address, local="off") as kv:
            await kv.put(keys, [os.urandom(size) for _ in keys])
            await settled(servers)
            members = sorted(s.address for s in servers)
            away = sum(members[i] != servers[0].address for i in homes(keys, members).tolist())
            peer = next(u for u in (await kv.stats()).tiers if u.tier == TierKind.PEER)
            assert away > 0 and peer.used_bytes == away * size and peer.blocks == away
            assert await kv.delete(keys) == len(keys)
            peer = next(u for u in (await kv.stats()).tiers if u.tier == TierKind.PEER)
            assert peer.used_bytes == 0 and peer.blocks == 0


async def test_a_block_known_only_at_a_peer_is_stored_when_its_bytes_arrive():
    # A daemon that learnt of blocks at a peer (a lookup when another member was their home) and
    # then becomes their home must keep the bytes sent to it, not take them for present.
    from kvstore.checksum import checksum
    from kvstore.keys import scoped

    async with cluster(n=2) as servers:
        home = servers[0]
        d = home.daemon
        peer = d.shared.levels[0]
        keys = [os.urandom(32) for _ in range(10)]
        blocks = [os.urandom(8192) for _ in keys]
        for key, data in zip(keys, blocks):
            record = d.catalog.known(scoped([key], b"")[0], len(data), checksum(data), b"")
            d.catalog.fill(d.catalog.attach(record, peer.level, peer.tier.locate(key, b"", len(data))))
        assert not any(d.probe(b"".join(keys), 32)[0])   # known, but held elsewhere
        async with KVClient(home.address, local="off") as kv:
            result = await kv.put(keys, blocks)
            assert result.stored == len(keys) and result.present == 0
            assert all(d.probe(b"".join(keys), 32)[0])
            assert [bytes(b) for b in await kv.get(keys)] == blocks


@pytest.mark.parametrize("transfer", TRANSFERS)
async def test_three_small_daemons_pool_their_capacity(transfer):
    # 64 MiB of DRAM each and no NVMe: one daemon alone keeps at most 64 MiB of 1 MiB blocks.
    async with cluster(dram_bytes=64 * MiB, transfers=[transfer]) as servers:
        keys = [os.urandom(32) for _ in range(150)]
        data = {key: os.urandom(MiB) for key in keys}
        async with KVClient(servers[0].address, local="off") as kv:
            for start in range(0, len(keys), 10):
                batch = keys[start : start + 10]
                await kv.put(batch, [data[k] for k in batch])
                await settled(servers)
        async with KVClient(servers[2].address, local="off") as reader:
            findable = [key for key in keys if (await reader.lookup([key])).count == 1]
            sample = findable[::10]
            got = await asyncio.gather(*(reader.get([key]) for key in sample))
        assert len(findable) * MiB > 96 * MiB, f"only {len(findable)} MiB findable from one node"
        assert [bytes(g[0]) for g in got] == [data[k] for k in sample]


@pytest.mark.parametrize("transfer", TRANSFERS)
async def test_bytes_changed_after_their_commit_are_refused_by_the_home(transfer):
    """A block travels home with the checksum it was committed with, and the home verifies the
    bytes against it: bytes changed in the sender's arena after the commit (a same-host client
    can still write there) never become the home's copy."""
    from kvstore.block import BlockRecord
    from kvstore.checksum import checksum
    from kvstore.keys import scoped
    from kvstore.tiers.base import ObjectRef

    async with cluster(n=2, transfers=[transfer]) as servers:
        sender, home = servers
        members = sorted(s.address for s in servers)
        keys = [k for k in chain(64, seed=9) if members[homes([k], members)[0]] == home.address][:2]
        blocks = [os.urandom(8192) for _ in keys]
        arena = sender.daemon.arena
        items = []
        for key, block, bad in zip(keys, blocks, (False, True)):
            record = BlockRecord(key=scoped([key], b"")[0], size=len(block), checksum=checksum(block), namespace=b"")
            extent = arena.reserve(record)
            view = arena.view(extent, len(block))
            view[:] = block
            if bad:
                view[100] ^= 0xFF   # after the commit's checksum
            items.append((record, ObjectRef(key=key, namespace=b"", length=len(block)), view))
        level = next(lv for lv in sender.daemon.shared.levels if lv.tier.capabilities.pooled)
        await level.tier.write_persisted(items)
        async with KVClient(home.address, local="off") as kv:
            assert [bytes(b) for b in await kv.get(keys[:1])] == blocks[:1]
            assert await kv.get(keys[1:]) == []
        assert home.daemon.counters.integrity_failures >= 1


async def test_a_block_whose_peer_copy_is_corrupt_is_a_miss_never_wrong_bytes():
    async with cluster(n=2) as servers:
        keys = chain(32, seed=3)   # enough that some surely have their home on the other daemon
        blocks = [os.urandom(8192) for _ in keys]
        async with KVClient(servers[0].address, local="off") as kv:
            await kv.put(keys, blocks)
        await settled(servers)
        holder = next(s for s in servers if s.address != servers[1].address)
        # Corrupt, in the holder's memory, a block the other daemon does not hold itself.
        reader = servers[1]
        probe = reader.daemon.probe(b"".join(keys), 32)[0]
        victim = next(i for i, b in enumerate(probe) if not b)
        from kvstore.keys import scoped

        record = holder.daemon.catalog.get(scoped([keys[victim]], b"")[0])
        view = holder.daemon.arena.view(record.primary().location, record.size)
        view[0] ^= 0xFF
        async with KVClient(reader.address, local="off") as kv:
            got = await kv.get(keys)
        assert len(got) == victim and [bytes(b) for b in got] == blocks[:victim]
        assert reader.daemon.counters.integrity_failures == 1


@needs_nixl
async def test_a_nixl_transfer_leaves_the_event_loop_running():
    """UCX over TCP does a whole transfer inside NIXL's transfer() call: run on the event loop,
    it stopped the daemon for as long (the loop did not tick once in 48 ms for 64 MiB)."""
    import mmap
    import time

    from kvstore.tiers.base import address_of
    from kvstore.tiers.peer_nixl import NixlAgent

    n, parts = 64 * MiB, 32
    maps = [mmap.mmap(-1, n), mmap.mmap(-1, n)]
    source, target = (memoryview(m) for m in maps)
    source[:] = os.urandom(n)
    home, reader = NixlAgent("home", address_of(source), n), NixlAgent("reader", address_of(target), n)
    try:
        name = await reader.add(home.metadata)
        await home.add(reader.metadata)
        ticks, moving = 0, True

        async def tick() -> None:
            nonlocal ticks
            while moving:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        step = n // parts
        start = time.perf_counter()
        await reader.move("READ", [(reader.base + i * step, step) for i in range(parts)],
                          [(home.base + i * step, step) for i in range(parts)], name, time.monotonic() + 30)
        took = time.perf_counter() - start
        moving = False
        await ticker
        assert target == source
        assert ticks >= min(5, took * 1000 / 4), f"the loop ticked {ticks} times in a {took * 1e3:.0f} ms transfer"
    finally:
        home.close()
        reader.close()
        del source, target


@needs_nixl
async def test_auto_takes_the_grpc_stream_to_a_peer_without_nixl():
    async with cluster(n=2, transfers=["auto", "grpc"]) as servers:
        keys = chain(40, seed=6)
        blocks = [os.urandom(16384) for _ in keys]
        async with KVClient(servers[0].address, local="off") as kv:
            await kv.put(keys, blocks)
        await settled(servers)
        async with KVClient(servers[1].address, local="off") as kv:
            assert [bytes(b) for b in await kv.get(keys)] == blocks
        auto = servers[0].daemon.counters
        assert auto.peer_bytes_out_grpc > 0 and auto.peer_bytes_out_nixl == 0


async def test_same_host_puts_are_checksummed_at_commit_when_peers_may_ask(tmp_path):
    from kvstore.keys import scoped

    async with cluster(n=2, socket_dir=tmp_path) as servers:
        d = servers[0].daemon
        keys = chain(8, seed=9)
        async with KVClient(servers[0].address, local="require") as kv:
            await kv.put(keys, [os.urandom(8192) for _ in keys])
        records = [d.catalog.get(k) for k in scoped(keys, b"")]
        assert all(r is not None and d.catalog.checksum_at(r.slot) is not None for r in records)


async def test_a_daemon_without_peers_runs_as_before_and_a_bad_peer_setting_is_one_error():
    with pytest.raises(ConfigError, match="peer.peers must be HOST:PORT"):
        PeerConfig(peers=("no-port",))
    with pytest.raises(ConfigError, match="peer.transfer must be one of"):
        PeerConfig(peers=("a:1",), transfer="carrier-pigeon")
    with pytest.raises(ConfigError, match="peer.timeout_s"):
        PeerConfig(peers=("a:1",), timeout_s=0)


def test_a_bad_peers_flag_is_one_line_and_exit_status_2(tmp_path):
    import subprocess
    import sys

    for flag, value, setting in (("--peers", "10.0.0.1", "peer.peers"), ("--peers-dns", "svc", "peer.dns"),
                                 ("--transfer", "smoke", "peer.transfer")):
        extra = ["--peers", "127.0.0.1:1"] if flag == "--transfer" else []
        done = subprocess.run(
            [sys.executable, "-m", "kvstore.server.cli", "serve", "--port", "0", "--nvme-dir", "off", *extra, flag, value],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and setting in lines[0], done.stderr


class _Flaky(MemberSource):
    def __init__(self) -> None:
        self.answer: list[str] | None = ["a:1", "b:2"]

    async def resolve(self) -> list[str]:
        if self.answer is None:
            raise OSError("name resolution failed")
        return list(self.answer)


async def test_membership_keeps_its_members_when_the_source_fails_and_skips_failed_peers():
    source = _Flaky()
    members = Membership(source, backoff_s=0.2)
    members.advertise("a:1")
    await members.refresh()
    assert members.peers == ["b:2"] and members.live() == ["a:1", "b:2"]
    source.answer = None
    await members.refresh()
    assert members.peers == ["b:2"]   # a failed lookup of the source changes nothing
    members.failed("b:2", OSError("refused"))
    assert members.live() == ["a:1"]   # skipped during its backoff...
    await asyncio.sleep(0.25)
    assert members.live() == ["a:1", "b:2"]   # ...and back afterwards
    source.answer = ["a:1", "c:3"]
    await members.refresh()
    assert members.peers == ["c:3"]


async def test_the_dns_source_resolves_a_name_to_every_address_with_the_port():
    found = await DnsMembers("localhost:7070").resolve()
    assert "127.0.0.1:7070" in found
    with pytest.raises(OSError):
        await DnsMembers("no-such-host.invalid:7070").resolve()
    assert await StaticMembers(["a:1", "a:1", "b:2"]).resolve() == ["a:1", "b:2"]


def test_rendezvous_homes_move_only_the_keys_of_a_member_that_joins():
    keys = [os.urandom(32) for _ in range(6000)]
    three = ["a:1", "b:2", "c:3"]
    before = homes(keys, three)
    assert np.bincount(before).min() > 1800   # spread evenly
    after = homes(keys, [*three, "d:4"])
    moved = before != after
    assert 0.2 < moved.mean() < 0.3 and (after[moved] == 3).all()
    assert (homes(keys, three) == before).all()   # the same members give the same homes


@pytest.mark.slow
@pytest.mark.parametrize("transfer", TRANSFERS)
def test_a_daemon_killed_mid_run_costs_misses_within_the_deadline_and_a_late_one_joins(transfer):
    ports = free_ports(3)
    members = ",".join(addresses(ports))
    common = ["--dram-bytes", "64MiB", "--local-socket", "off", "--peers", members, "--peer-timeout-s", "0.5",
              "--transfer", transfer]
    a = DaemonProcess([*common, "--port", str(ports[0])])
    b = DaemonProcess([*common, "--port", str(ports[1])])
    c = DaemonProcess([*common, "--port", str(ports[2])])
    with a, b:
        c.start()
        try:
            asyncio.run(_kill_and_join(a, b, c, ports))
        except BaseException:
            print("A:", a.log(), "B:", b.log(), sep="\n")
            raise
        finally:
            c.stop()


async def _kill_and_join(a: DaemonProcess, b: DaemonProcess, c: DaemonProcess, ports: list[int]) -> None:
    keys = chain(90, seed=4)
    blocks = [os.urandom(16384) for _ in keys]
    members = sorted(addresses(ports))
    home = [members[i] for i in homes(keys, members).tolist()]
    async with KVClient(a.target, local="off") as ka, KVClient(b.target, local="off") as kb:
        await ka.put(keys, blocks)
        await _until(lambda: _count(kb, keys), len(keys))
        c.proc.send_signal(signal.SIGKILL)   # mid-run: no goodbye
        c.proc.wait()
        # What lived on C is gone; lookups past it answer within the deadline, never with an error.
        for client in (ka, kb):
            start = time.monotonic()
            hit = await client.lookup(keys)
            assert time.monotonic() - start < 1.5
            assert hit.count <= len(keys)
        # A and B lose nothing of their own: every block homed at one of them is still served.
        own = [i for i, h in enumerate(home) if h != c.target]
        assert 0 < len(own) < len(keys)
        for i in own:
            got = await kb.get([keys[i]])
            assert len(got) == 1 and bytes(got[0]) == blocks[i]
        # A daemon started later on C's address joins and serves.
        c.start()
        later = chain(30, seed=5)
        more = [os.urandom(16384) for _ in later]
        async with KVClient(c.target, local="off") as kc:
            await kc.put(later, more)
        await _until(lambda: _count(ka, later), len(later), timeout_s=30)
        got = await ka.get(later)
        assert [bytes(g) for g in got] == more


async def _count(client: KVClient, keys) -> int:
    return (await client.lookup(keys)).count


async def _until(probe, want: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    got = -1
    while time.monotonic() < deadline:
        got = await probe()
        if got >= want:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"only {got} of {want} within {timeout_s}s")


@pytest.mark.slow
def test_a_stuck_peer_holds_a_lookup_at_most_its_deadline_then_is_skipped():
    ports = free_ports(2)
    members = ",".join(addresses(ports))
    common = ["--dram-bytes", "64MiB", "--local-socket", "off", "--peers", members, "--peer-timeout-s", "0.5"]
    with DaemonProcess([*common, "--port", str(ports[0])]) as a, DaemonProcess([*common, "--port", str(ports[1])]) as b:
        asyncio.run(_stuck(a, b))


async def _stuck(a: DaemonProcess, b: DaemonProcess) -> None:
    keys = chain(64, seed=7)
    homed = sorted([a.target, b.target])
    at_b = [k for k, i in zip(keys, homes(keys, homed).tolist()) if homed[i] == b.target]
    assert at_b
    async with KVClient(b.target, local="off") as kb, KVClient(a.target, local="off", timeout_s=10) as ka:
        await kb.put(at_b, [os.urandom(4096) for _ in at_b])   # held by B, their home
        assert (await ka.lookup(at_b)).count == len(at_b)    # found from A
        b.proc.send_signal(signal.SIGSTOP)   # alive but silent: connections open, no answers
        try:
            fresh = chain(64, seed=8)
            fresh_at_b = [k for k, i in zip(fresh, homes(fresh, homed).tolist()) if homed[i] == b.target]
            start = time.monotonic()
            hit = await ka.lookup(fresh_at_b)
            first = time.monotonic() - start
            start = time.monotonic()
            again = await ka.lookup(fresh_at_b[::-1])
            second = time.monotonic() - start
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert hit.count == 0 and again.count == 0   # misses, not errors
        assert first < 1.5, f"a silent peer held a lookup {first:.2f}s (deadline 0.5s)"
        assert second < 0.3, f"the silent peer was asked again at once ({second:.2f}s)"
