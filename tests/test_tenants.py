"""Tenants: bearer tokens, the tenant in every block's identity, shared namespaces, peers.

The attacks of the issue are replayed between two tenants of one daemon: putting first under the
victim's public keys (poisoning), reading the victim's keys, writing a namespace one may only
read; on the gRPC path and on the same-host path, where each session maps a window of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from kvstore.client import KVClient
from kvstore.config import PeerConfig
from kvstore.errors import (
    ConfigError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError, UnavailableError,
)
from kvstore.keys import Namespace
from kvstore.server.process import free_ports
from kvstore.server.server import KVStoreServer
from kvstore.tenants import TenantTable, hash_token, tenant_namespace
from kvstore.tier_kind import TierKind

from conftest import chain, make_config, random_blocks

SHARED = Namespace(model_id="shared/system-prompts", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=64,
                   block_size=16).digest
TOKENS = {"alice": "alice-secret", "bob": "bob-secret", "reader": "reader-secret", "writer": "writer-secret",
          "cluster": "cluster-secret", "slow": "slow-secret"}


def tenants_file(path) -> str:
    h = {name: hash_token(token) for name, token in TOKENS.items()}
    path.write_text(f"""
[[tenant]]
name = "alice"
token_sha256 = ["{h['alice']}"]

[[tenant]]
name = "bob"
token_sha256 = ["{h['bob']}"]

[[tenant]]
name = "reader"
token_sha256 = ["{h['reader']}"]
read = ["{SHARED.hex()}"]

[[tenant]]
name = "writer"
token_sha256 = ["{h['writer']}"]
write = ["{SHARED.hex()}"]

[[tenant]]
name = "cluster"
token_sha256 = ["{h['cluster']}"]
peer = true

[[tenant]]
name = "slow"
token_sha256 = ["{h['slow']}"]
requests_per_s = 5
""")
    return str(path)


@pytest.fixture
async def daemon(tmp_path):
    async with KVStoreServer(make_config(tenants=tenants_file(tmp_path / "tenants.toml"))) as server:
        yield server


def client(server, tenant: str | None, **options) -> KVClient:
    token = {"token": TOKENS[tenant]} if tenant else {}
    return KVClient(server.address, local="off", **token, **options)


async def test_calls_without_a_token_or_with_an_unknown_one_are_unauthenticated(daemon):
    keys = chain(2, seed=1)
    for kv in (client(daemon, None), KVClient(daemon.address, local="off", token="guess")):
        async with kv:
            with pytest.raises(UnauthenticatedError):
                await kv.lookup(keys)
            with pytest.raises(UnauthenticatedError):
                await kv.put(keys, random_blocks(2, 4096))
            with pytest.raises(UnauthenticatedError):
                await kv.get(keys)
    # A same-host attach asks too, so a client in "auto" mode fails at connect.
    with pytest.raises(UnauthenticatedError):
        async with KVClient(daemon.address):
            pass
    assert daemon.daemon.counters.unauthenticated_calls == 7


async def test_putting_first_under_a_victims_keys_does_not_poison_the_victim(daemon):
    keys = chain(8, seed=2)   # public: anyone can compute block_keys(prompt, namespace)
    poison, real = random_blocks(8, 16384), random_blocks(8, 16384)
    async with client(daemon, "bob") as attacker:
        assert (await attacker.put(keys, poison)).stored == 8
    async with client(daemon, "alice") as victim:
        result = await victim.put(keys, real)
        assert result.stored == 8 and result.present == 0   # not "already present"
        assert [bytes(b) for b in await victim.get(keys)] == real
    async with client(daemon, "bob") as attacker:
        assert [bytes(b) for b in await attacker.get(keys)] == poison


async def test_another_tenants_blocks_are_misses_and_cannot_be_deleted(daemon):
    keys, blocks = chain(6, seed=3), random_blocks(6, 8192)
    async with client(daemon, "alice") as alice:
        await alice.put(keys, blocks)
    async with client(daemon, "bob") as bob:
        assert (await bob.lookup(keys)).count == 0
        assert await bob.get(keys) == []
        assert await bob.delete(keys) == 0
    async with client(daemon, "alice") as alice:
        assert (await alice.lookup(keys)).count == 6


async def test_a_shared_namespace_is_shared_and_a_read_only_tenant_cannot_write_it(daemon):
    keys, blocks = chain(4, seed=4), random_blocks(4, 8192)
    async with client(daemon, "reader", namespace=SHARED) as reader:
        with pytest.raises(PermissionDeniedError, match="may read the shared namespace"):
            await reader.put(keys, blocks)
        with pytest.raises(PermissionDeniedError):
            await reader.delete(keys)
    async with client(daemon, "writer", namespace=SHARED) as writer:
        assert (await writer.put(keys, blocks)).stored == 4
    async with client(daemon, "reader", namespace=SHARED) as reader:
        assert [bytes(b) for b in await reader.get(keys)] == blocks
    # A tenant without access to it gets its own namespace of that name: a miss.
    async with client(daemon, "alice", namespace=SHARED) as alice:
        assert (await alice.lookup(keys)).count == 0
    # The reader's own namespaces it writes as it likes.
    async with client(daemon, "reader") as reader:
        assert (await reader.put(keys, blocks)).stored == 4


async def test_the_calls_between_daemons_are_only_for_the_cluster_tenant(daemon):
    from kvstore.proto.v1 import kvstore_pb2 as pb

    keys = chain(2, seed=5)
    async with client(daemon, "alice") as alice:
        with pytest.raises(Exception) as info:
            await alice.stub.Probe(pb.ProbeRequest(packed_keys=b"".join(keys), key_bytes=32), timeout=5)
        assert "PERMISSION_DENIED" in str(info.value.code())
        with pytest.raises(Exception) as info:
            call = alice.stub.Get(pb.GetRequest(keys=keys, local_only=True), timeout=5)
            async for _ in call:
                pass
        assert "PERMISSION_DENIED" in str(info.value.code())


async def test_a_tenant_over_its_request_rate_is_told_to_slow_down(daemon):
    keys = chain(1, seed=6)
    refused = 0
    async with client(daemon, "slow") as slow:
        for _ in range(20):
            try:
                await slow.lookup(keys)
            except ResourceExhaustedError:
                refused += 1
    assert refused >= 10   # a burst of 5, then about 5 per second
    assert daemon.daemon.counters.rate_limited_calls == refused
    async with client(daemon, "alice") as alice:   # others are not slowed
        for _ in range(20):
            await alice.lookup(keys)


@pytest.fixture
async def small_windows(tmp_path):
    """A daemon with tenants whose same-host sessions get 1 MiB windows (batches take rounds)."""
    config = make_config(tenants=tenants_file(tmp_path / "tenants.toml"), local_window_bytes=1 << 20)
    async with KVStoreServer(config) as server:
        yield server


def same_host(server, tenant: str, **options) -> KVClient:
    return KVClient(server.address, local="require", token=TOKENS[tenant], **options)


async def test_same_host_clients_of_a_tenant_map_a_window_of_their_own_and_round_trip(small_windows):
    keys, blocks = chain(10, seed=11), random_blocks(10, 256 << 10)   # 2.5 MiB: several rounds
    async with same_host(small_windows, "alice") as kv:
        assert kv.path == "local"
        assert len(kv._local.arena.mapping) == 1 << 20   # its window, not the 64 MiB arena
        assert (await kv.put(keys, blocks)).stored == 10
        assert [bytes(b) for b in await kv.get(keys)] == blocks
        out = [bytearray(256 << 10) for _ in keys]
        assert await kv.get_into(keys, out) == 10 and [bytes(o) for o in out] == blocks
        assert (await kv.lookup(keys)).count == 10
    async with KVClient(small_windows.address, local="off", token=TOKENS["alice"]) as remote:
        assert [bytes(b) for b in await remote.get(keys)] == blocks   # the same blocks either way


async def test_a_same_host_client_cannot_reach_another_tenants_blocks(small_windows):
    keys = chain(4, seed=12)
    secret, poison = random_blocks(4, 128 << 10), random_blocks(4, 128 << 10)
    async with same_host(small_windows, "alice") as alice:
        assert (await alice.put(keys, secret)).stored == 4
    async with same_host(small_windows, "bob") as bob:
        assert (await bob.lookup(keys)).count == 0 and await bob.get(keys) == []
        result = await bob.put(keys, poison)        # under the same keys: bob's own blocks
        assert result.stored == 4 and result.present == 0
        assert [bytes(b) for b in await bob.get(keys)] == poison
        window = bytes(bob._local.arena.mapping)    # everything bob's process can see of the daemon
        assert not any(block[:4096] in window for block in secret)
    async with same_host(small_windows, "alice") as alice:
        assert [bytes(b) for b in await alice.get(keys)] == secret
    async with same_host(small_windows, "reader", namespace=SHARED) as reader:
        with pytest.raises(PermissionDeniedError):
            await reader.put(keys, secret)


async def test_a_same_host_session_needs_a_fresh_ticket(small_windows):
    import json
    import socket

    async with same_host(small_windows, "alice") as kv:
        path = kv._local.arena.conn.getpeername()

    def hello(first: bytes | None) -> dict:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(15)
        conn.connect(path)
        if first is not None:
            conn.sendall(len(first).to_bytes(4, "little") + first)
        data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
        conn.close()
        return {"fds": len(fds), **json.loads(data[4 : 4 + int.from_bytes(data[:4], "little")])}

    from kvstore.proto.v1 import kvstore_pb2 as pb

    async with KVClient(small_windows.address, local="off", token=TOKENS["alice"]) as kv:
        ticket = (await kv.stub.Attach(pb.AttachRequest(), timeout=5)).ticket
    first = await asyncio.to_thread(hello, json.dumps({"ticket": ticket}).encode())
    again = await asyncio.to_thread(hello, json.dumps({"ticket": ticket}).encode())
    forged = await asyncio.to_thread(hello, json.dumps({"ticket": "made-up"}).encode())
    assert first["fds"] == 1 and "error" not in first
    assert again["fds"] == 0 and "used or expired" in again["error"]
    assert forged["fds"] == 0 and "unknown" in forged["error"]
    assert small_windows.daemon.counters.local_refused == 2


async def test_peers_present_the_cluster_token_and_tenants_stay_apart_across_nodes(tmp_path):
    tenants = tenants_file(tmp_path / "tenants.toml")
    token_file = tmp_path / "peer-token"
    token_file.write_text(TOKENS["cluster"] + "\n")
    ports = free_ports(2)
    members = tuple(f"127.0.0.1:{p}" for p in ports)
    servers = []
    try:
        for port in ports:
            config = make_config(port=port, local_socket="off", tenants=tenants,
                                 peer=PeerConfig(peers=members, backoff_s=0.2, token_file=str(token_file)))
            servers.append(KVStoreServer(config))
            await servers[-1].start()
        keys, blocks = chain(24, seed=7), random_blocks(24, 8192)
        async with client(servers[0], "alice") as alice:
            assert (await alice.put(keys, blocks)).stored == 24
        async with client(servers[1], "alice") as alice:
            deadline = time.monotonic() + 10
            while (hit := await alice.lookup(keys)).count < 24 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert hit.count == 24 and TierKind.PEER in hit.tiers
            assert [bytes(b) for b in await alice.get(keys)] == blocks
        async with client(servers[1], "bob") as bob:
            assert (await bob.lookup(keys)).count == 0
    finally:
        for server in servers:
            await server.stop()


def test_a_peer_token_without_peers_is_refused():
    with pytest.raises(ConfigError, match="no peers"):
        make_config(peer=PeerConfig(token_file="/some/token"))


def test_the_tenant_is_part_of_the_stored_namespace():
    ns = b"\x01" * 32
    assert tenant_namespace("alice", ns) != tenant_namespace("bob", ns)
    assert tenant_namespace("alice", ns) != ns
    table = TenantTable.from_mapping({"tenant": [{"name": "a", "token_sha256": hash_token("t")}]})
    assert table.authenticate("Bearer t").scope(ns, write=True) == tenant_namespace("a", ns)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[tenant]]\nname = "a"\n', "token_sha256 must list"),
        ('[[tenant]]\nname = "a"\ntoken_sha256 = ["abc"]\n', "64 hex digits"),
        (f'[[tenant]]\nname = "a"\ntoken_sha256 = ["{"0" * 64}"]\ncolour = 1\n', "unknown key 'colour'"),
        (f'[[tenant]]\nname = "a"\ntoken_sha256 = ["{"0" * 64}"]\n[[tenant]]\nname = "a"\ntoken_sha256 = ["{"1" * 64}"]\n',
         "used twice"),
        (f'[[tenant]]\nname = "a"\ntoken_sha256 = ["{"0" * 64}"]\nread = ["xyz"]\n', "not a namespace in hex"),
        ("tenant = 3\n", "array of tables"),
        ("[[tenant\n", "not valid TOML"),
    ],
)
def test_a_bad_tenants_file_is_one_line_and_exit_status_2(tmp_path, text, message):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server.cli", "serve", "--port", "0", "--metrics-port", "0", "--nvme-dir", "off",
         "--dram-bytes", "16MiB", "--tenants", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_kvstore_token_prints_a_table_with_the_hash_and_the_token_apart(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvstore.server.cli", "token", "--name", "team-a"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    token = result.stderr.strip().rsplit(" ", 1)[-1]
    assert token not in result.stdout
    import tomllib

    table = TenantTable.from_mapping(tomllib.loads(result.stdout))
    assert table.authenticate(f"Bearer {token}").name == "team-a"
    with pytest.raises(ConfigError):
        TenantTable.from_mapping({"tenant": []})
    path = tmp_path / "team-b.token"
    result = subprocess.run([sys.executable, "-m", "kvstore.server.cli", "token", "--name", "team-b",
                             "--token-file", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and (path.stat().st_mode & 0o777) == 0o600
    table = TenantTable.from_mapping(tomllib.loads(result.stdout))
    assert table.authenticate("Bearer " + path.read_text().strip()).name == "team-b"
    again = subprocess.run([sys.executable, "-m", "kvstore.server.cli", "token", "--token-file", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "cannot create" in again.stderr   # never overwrites a token


# -- quotas ---------------------------------------------------------------------------------------


def quota_file(path, quota: str) -> str:
    path.write_text(f"""
[[tenant]]
name = "small"
token_sha256 = ["{hash_token(TOKENS['alice'])}"]
quota = {quota}

[[tenant]]
name = "big"
token_sha256 = ["{hash_token(TOKENS['bob'])}"]
""")
    return str(path)


def own_bytes(server, tenant_name: str, tier: str) -> int:
    daemon = server.daemon
    tenant = next(t for t in server.gate.tenants.tenants if t.name == tenant_name)
    level = next(i for i, level in enumerate(daemon.layout.levels) if level.name == tier)
    return daemon.catalog.namespace_bytes(level, tenant.namespaces)


@pytest.mark.parametrize("local", ["off", "require"])
async def test_a_tenant_over_its_quota_gives_up_its_own_coldest_blocks_and_drops_the_rest(tmp_path, local):
    MiB = 1 << 20
    config = make_config(64 * MiB, tenants=quota_file(tmp_path / "t.toml", '{ dram = "1MiB" }'))
    async with KVStoreServer(config) as server:
        first, second = chain(12, seed=20), chain(4, seed=21)
        async with KVClient(server.address, local=local, token=TOKENS["alice"]) as small:
            result = await small.put(first, random_blocks(12, 256 << 10))
            assert (result.stored, result.dropped) == (4, 8)     # 1 MiB of 3: the rest dropped, counted
            assert own_bytes(server, "small", "dram") == 1 * MiB
            assert (await small.put(second, random_blocks(4, 256 << 10))).stored == 4   # its own oldest made room
            assert own_bytes(server, "small", "dram") <= 1 * MiB
            assert (await small.lookup(second)).count == 4 and (await small.lookup(first)).count == 0
        async with KVClient(server.address, local=local, token=TOKENS["bob"]) as big:   # no quota: unaffected
            assert (await big.put(chain(32, seed=22), random_blocks(32, 256 << 10))).stored == 32
        assert server.daemon.counters.put_dropped_blocks == 8


async def test_quotas_hold_in_each_tier_blocks_move_down_within_them(tmp_path):
    from kvstore.config import NvmeConfig

    MiB = 1 << 20
    config = make_config(64 * MiB, tenants=quota_file(tmp_path / "t.toml", '{ dram = "1MiB", nvme = "2MiB" }'),
                         nvme=NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=32 * MiB))
    async with KVStoreServer(config) as server:
        async with KVClient(server.address, local="off", token=TOKENS["alice"]) as small:
            for seed in range(6):   # 6 MiB in rounds of 1 MiB
                assert (await small.put(chain(4, seed=30 + seed), random_blocks(4, 256 << 10))).stored == 4
            await asyncio.sleep(0.3)   # demotions settle
            assert own_bytes(server, "small", "dram") <= 1 * MiB
            assert own_bytes(server, "small", "nvme") <= 2 * MiB
            # The newest are in DRAM, the two rounds before them on NVMe, the oldest gone.
            assert (await small.lookup(chain(4, seed=35))).tiers == [TierKind.DRAM] * 4
            assert (await small.lookup(chain(4, seed=33))).tiers == [TierKind.NVME] * 4
            assert (await small.lookup(chain(4, seed=30))).count == 0


def test_a_quota_for_a_tier_the_daemon_lacks_is_one_line_and_exit_status_2(tmp_path):
    path = quota_file(tmp_path / "t.toml", '{ hbm = "1GiB" }')
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server.cli", "serve", "--port", "0", "--metrics-port", "0", "--nvme-dir", "off",
         "--dram-bytes", "16MiB", "--tenants", path],
        capture_output=True, text=True, timeout=60,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "quota names tier 'hbm'" in lines[0], result.stderr


# -- found in review ------------------------------------------------------------------------------


def test_a_rate_below_one_call_per_second_still_admits_calls():
    from kvstore.tenants import RateLimit

    limit = RateLimit(0.5)
    assert limit.take(100.0) and not limit.take(100.1)
    assert limit.take(102.2)   # two seconds later: one more


def test_tokens_and_tenant_names_are_checked_where_they_enter():
    from kvstore.client import ClientConfig

    for token in ("with space", "new\nline", "ümlaut", "tab\t"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            ClientConfig(token=token)
    result = subprocess.run([sys.executable, "-m", "kvstore.server.cli", "token", "--name", 'x"\npeer = true\n#'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "tenant name" in result.stderr and "peer" not in result.stdout


async def test_a_read_only_reader_of_a_corrupt_shared_block_gets_a_miss_not_an_error(daemon):
    from kvstore.keys import scoped

    keys, blocks = chain(3, seed=40), random_blocks(3, 8192)
    async with client(daemon, "writer", namespace=SHARED) as writer:
        await writer.put(keys, blocks)
    record = daemon.daemon.catalog.get(scoped([keys[1]], SHARED)[0])
    daemon.daemon.arena.view(record.primary().location, record.size)[0] ^= 0xFF
    async with client(daemon, "reader", namespace=SHARED) as reader:
        got = await reader.get(keys)   # the reader may not drop the bad copy: still a miss
    assert [bytes(b) for b in got] == blocks[:1]


async def test_a_block_larger_than_a_window_is_a_miss_on_the_same_host_path(small_windows):
    keys, blocks = chain(2, seed=41), random_blocks(2, 2 << 20)   # 2 MiB each, windows of 1 MiB
    async with KVClient(small_windows.address, local="off", token=TOKENS["alice"]) as remote:
        assert (await remote.put(keys, blocks)).stored == 2
    async with same_host(small_windows, "alice") as kv:
        assert await kv.get(keys) == []
        assert (await kv.lookup(keys)).count == 2   # it is there: the gRPC path serves it
    async with KVClient(small_windows.address, local="off", token=TOKENS["alice"]) as remote:
        assert [bytes(b) for b in await remote.get(keys)] == blocks


async def test_the_socket_refuses_a_malformed_first_frame_and_caps_tickets_and_sessions(tmp_path):
    import json
    import socket

    config = make_config(tenants=tenants_file(tmp_path / "tenants.toml"), local_window_bytes=1 << 20,
                         local_sessions_per_tenant=2)
    async with KVStoreServer(config) as server:
        local = server._local
        path = local.path

        def first_frame(payload: bytes) -> dict:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(15)
            conn.connect(path)
            conn.sendall(len(payload).to_bytes(4, "little") + payload)
            data = conn.recv(65536)
            conn.close()
            return json.loads(data[4 : 4 + int.from_bytes(data[:4], "little")])

        deep = b"[" * 100_000 + b"]" * 100_000
        assert "ticket" in (await asyncio.to_thread(first_frame, deep[:4000]))["error"]
        tenant = next(t for t in server.gate.tenants.tenants if t.name == "alice")
        for _ in range(100):
            local.ticket_for(tenant)
        assert len(local._tickets) == 64
        sessions = [same_host(server, "alice") for _ in range(3)]
        await sessions[0].connect()
        await sessions[1].connect()
        try:
            with pytest.raises(UnavailableError, match="same-host sessions"):
                await sessions[2].connect()
        finally:
            for kv in sessions:
                await kv.close()


@pytest.mark.parametrize("token, message", [
    (None, "set peer.token_file"),
    ("not-a-token-of-anyone", "is no tenant's"),
    (TOKENS["alice"], "which is not peer = true"),
])
async def test_peers_with_tenants_need_the_token_of_a_peer_tenant(tmp_path, token, message):
    token_file = ""
    if token is not None:
        (tmp_path / "peer-token").write_text(token)
        token_file = str(tmp_path / "peer-token")
    config = make_config(tenants=tenants_file(tmp_path / "tenants.toml"),
                         peer=PeerConfig(peers=("127.0.0.1:1",), token_file=token_file))
    with pytest.raises(ConfigError, match=message):
        async with KVStoreServer(config):
            pass


async def test_back_to_back_reads_and_puts_that_fill_a_window_never_find_it_full(small_windows):
    """Releases of a read go in the background; the next call must still find the window free."""
    keys, blocks = chain(4, seed=70), random_blocks(4, 256 << 10)   # exactly one 1 MiB window
    async with same_host(small_windows, "alice") as kv:
        await kv.put(keys, blocks)
        out = [bytearray(256 << 10) for _ in keys]
        for round_ in range(5):
            assert await kv.get_into(keys, out) == 4
            assert await kv.get_into(keys, out) == 4
            assert (await kv.put(chain(4, seed=80 + round_), random_blocks(4, 256 << 10))).stored == 4
