"""The data-path seam without a daemon: which path a call runs on, re-attaching after a restart,
and how the same-host path sizes its put rounds.

Daemon-backed behaviour of both paths lives in test_roundtrip.py and test_local_path.py.
"""

from __future__ import annotations

import pytest

from kvstore import StaleSessionError
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.tier_kind import TierKind
from kvstore.client import KVClient, LocalMode, LookupResult, PutResult
from kvstore.client.local import LocalPath, put_round_bytes
from kvstore.client.path import DataPath
from kvstore.client.remote import RemotePath


class FakePath(DataPath):
    """A path that records calls; ``stale`` makes its next call end the session."""

    name = "local"

    def __init__(self, *, stale: bool = False) -> None:
        self.calls: list[str] = []
        self.stale = stale

    async def lookup(self, keys):
        self.calls.append("lookup")
        if self.stale:
            raise StaleSessionError("the daemon restarted")
        return LookupResult(count=len(keys), tiers=[TierKind.DRAM] * len(keys))

    async def put(self, keys, sources):
        self.calls.append("put")
        return PutResult(stored=len(keys), present=0, dropped=0)

    async def get_into(self, keys, targets):
        self.calls.append("get_into")
        return 0

    async def get(self, keys):
        self.calls.append("get")
        return []

    async def close(self):
        self.calls.append("close")


def connected(local: DataPath | None, mode: LocalMode = LocalMode.AUTO) -> KVClient:
    """A client that looks connected, with ``local`` as its same-host path and a fake remote one."""
    kv = KVClient("127.0.0.1:7070", local=mode)
    kv._stub = object()
    kv._remote = FakePath()
    kv._remote.name = "remote"
    kv._local = local
    return kv


def test_both_paths_implement_the_interface():
    assert issubclass(LocalPath, DataPath) and issubclass(RemotePath, DataPath)
    assert (LocalPath.name, RemotePath.name) == ("local", "remote")


async def test_calls_run_on_the_same_host_path_when_attached():
    local = FakePath()
    kv = connected(local)
    assert (await kv.lookup([b"a", b"b"])).count == 2
    assert (await kv.put([b"a"], [b"x"])).stored == 1
    assert local.calls == ["lookup", "put"] and kv._remote.calls == []
    assert kv.path == "local"


async def test_a_stale_session_attaches_again_once_and_retries_there(monkeypatch):
    stale, fresh = FakePath(stale=True), FakePath()
    kv = connected(stale)

    async def attach():
        kv._local = fresh

    monkeypatch.setattr(kv, "_attach", attach)
    assert (await kv.lookup([b"a"])).count == 1
    assert stale.calls == ["lookup"] and fresh.calls == ["lookup"]


async def test_a_second_stale_session_in_a_row_is_raised(monkeypatch):
    kv = connected(FakePath(stale=True))

    async def attach():
        kv._local = FakePath(stale=True)

    monkeypatch.setattr(kv, "_attach", attach)
    with pytest.raises(StaleSessionError):
        await kv.lookup([b"a"])


async def test_with_local_off_the_remote_path_is_used_and_nothing_attaches(monkeypatch):
    kv = connected(None, LocalMode.OFF)

    async def attach():
        raise AssertionError("local='off' never attaches")

    monkeypatch.setattr(kv, "_attach", attach)
    await kv.get([b"a"])
    assert kv._remote.calls == ["get"] and kv.path == "remote"


def test_the_put_round_size_comes_from_the_daemon_or_a_quarter_of_the_arena():
    assert put_round_bytes(pb.AttachResponse(arena_bytes=64 << 20, put_round_bytes=1 << 20)) == 1 << 20
    assert put_round_bytes(pb.AttachResponse(arena_bytes=64 << 20)) == 16 << 20  # an older daemon
    assert put_round_bytes(pb.AttachResponse(arena_bytes=3)) == 1


class FakeArena:
    def __init__(self, nbytes: int) -> None:
        self.view = memoryview(bytearray(nbytes))


class FakeChannel:
    """Reserves every block back to back from offset 0 and records each round's sizes."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []

    async def call(self, method, request, response_cls):
        if method == "Reserve":
            self.rounds.append(list(request.sizes))
            offsets = [sum(request.sizes[:i]) for i in range(len(request.sizes))]
            return pb.ReserveResponse(lease=1, states=[pb.SLOT_RESERVED] * len(offsets), offsets=offsets)
        assert method == "Commit" and not request.abort
        return pb.PutResponse(stored=len(self.rounds[-1]))


async def test_a_same_host_put_goes_in_rounds_of_the_daemons_round_size():
    channel = FakeChannel()
    path = LocalPath(
        FakeArena(1 << 20), channel, ttl_s=30.0, block_limit=(1 << 20, "test"), put_round_bytes=10_000, namespace=b""
    )
    sources = [memoryview(bytes(4000))] * 5 + [memoryview(bytes(12_000))]
    result = await path.put([bytes([i]) for i in range(6)], sources)
    # Rounds fill up to 10 000 bytes; a block larger than a round goes alone.
    assert channel.rounds == [[4000, 4000], [4000, 4000], [4000], [12_000]]
    assert result.stored == 6
