"""KVStoreConnectorAdapter inside LMCache's own machinery: its storage-backend factory loads the
plugin from extra_config, its real RemoteBackend drives the connector (through LMCache's
InstrumentedRemoteConnector), its LocalCPUBackend allocates every memory object, and a real
daemon stores the chunks.

Memory objects are checked exactly: a chunk LMCache puts comes back to the reference count it had,
a chunk a get returns holds one reference, and the allocator's usage returns to where it started
(with no LMCache warning about a negative count or a collected object that was never released).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip(
    "lmcache",
    reason="LMCache is not installed (pip install --no-deps lmcache==0.5.6; "
    "pip install sortedcontainers numba llvmlite aiofile caio cffi pycparser cryptography)",
)

import torch  # noqa: E402
from conftest import DaemonThread, make_config  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend import CreateStorageBackends  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402

from kvstore.client import SyncKVClient  # noqa: E402
from kvstore.errors import ConfigError  # noqa: E402
from kvstore.integrations.lmcache import KVStoreRemoteConnector, block_key, namespace_of  # noqa: E402

pytestmark = pytest.mark.engines

CHUNK = 16
MODEL = "test/tiny-lmcache"
PLUGIN = "remote_storage_plugin.{}."


def plugin_config(plugins: dict[str, dict], **overrides) -> LMCacheEngineConfig:
    """An LMCache config whose remote storage is the kvstore plugin instances ``plugins`` (name ->
    options), loaded by module path and class name as a deployment would."""
    extra = {}
    for name, options in plugins.items():
        extra[PLUGIN.format(name) + "module_path"] = "kvstore.integrations.lmcache"
        extra[PLUGIN.format(name) + "class_name"] = "KVStoreConnectorAdapter"
        extra.update({PLUGIN.format(name) + key: value for key, value in options.items()})
    return LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, max_local_cpu_size=0.01, remote_storage_plugins=list(plugins), extra_config=extra,
        **overrides,
    )


def metadata(worker_id: int = 0, world_size: int = 1) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name=MODEL, world_size=world_size, local_world_size=world_size, worker_id=worker_id,
        local_worker_id=worker_id, kv_dtype=torch.float16, kv_shape=(2, 2, CHUNK, 2, 8), chunk_size=CHUNK,
        role="worker",
    )


class Engine:
    """One LMCache worker's storage backends, built by LMCache's own factory."""

    def __init__(self, loop, plugins: dict[str, dict], *, worker_id: int = 0, world_size: int = 1) -> None:
        self.loop = loop
        self.metadata = metadata(worker_id, world_size)
        self.backends = CreateStorageBackends(plugin_config(plugins), self.metadata, loop, dst_device="cpu")
        self.cpu = self.backends["LocalCPUBackend"]
        self.allocator = self.cpu.memory_allocator.pin_allocator
        self.baseline = self.usage()

    def remote(self, name: str = "kvstore"):
        return self.backends[f"RemoteBackend-{name}"]

    def connector(self, name: str = "kvstore") -> KVStoreRemoteConnector:
        return self.remote(name).connection.getWrappedConnector()

    def usage(self) -> tuple[int, int]:
        return self.allocator.num_active_allocations, self.allocator.total_allocated_size

    def key(self, chunk_hash: int) -> CacheEngineKey:
        md = self.metadata
        return CacheEngineKey(md.model_name, md.world_size, md.worker_id, chunk_hash, md.kv_dtype)

    def chunk(self, tokens: int = CHUNK):
        """A memory object from LMCache's allocator holding random KV of ``tokens`` tokens."""
        memory_obj = self.cpu.allocate(self.metadata.get_shapes(tokens), self.metadata.get_dtypes())
        memory_obj.byte_array.cast("B")[:] = os.urandom(memory_obj.get_size())
        return memory_obj

    def put(self, keys, memory_objs, name: str = "kvstore") -> None:
        """LMCache's batched put, waited for: it is done when LMCache has dropped the reference it
        took, which must leave each chunk at the one reference its owner holds."""
        self.remote(name).batched_submit_put_task(keys, memory_objs)
        assert wait_for(lambda: all(obj.get_ref_count() == 1 for obj in memory_objs)), \
            [obj.get_ref_count() for obj in memory_objs]

    def on_loop(self, coro, timeout_s: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        for backend in reversed(self.backends.values()):
            backend.close()


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def release(memory_objs) -> None:
    for memory_obj in memory_objs:
        if memory_obj is not None:
            memory_obj.ref_count_down()


def same_bytes(a, b) -> bool:
    return a.get_size() == b.get_size() and bytes(a.byte_array) == bytes(b.byte_array)


@pytest.fixture(scope="module")
def loop():
    """The event loop LMCache runs its storage backends on, in its own thread as in an engine."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def engines(loop):
    """Builds :class:`Engine`s; afterwards each one's allocator must be back where it started and
    LMCache's memory manager must not have warned (a double release, or an object collected while
    still referenced)."""
    memory_log = logging.getLogger("lmcache.v1.memory_management")   # LMCache's loggers do not propagate
    records = _Records()
    memory_log.addHandler(records)
    built: list[Engine] = []

    def build(plugins: dict[str, dict], **kwargs) -> Engine:
        engine = Engine(loop, plugins, **kwargs)
        built.append(engine)
        for name in plugins:
            connection = engine.remote(name).connection
            assert connection is not None, f"LMCache did not load plugin {name}"
        return engine

    yield build
    try:
        for engine in built:
            assert engine.usage() == engine.baseline
        assert [r.getMessage() for r in records.records] == []
    finally:
        memory_log.removeHandler(records)
        for engine in built:
            engine.close()


def connected(engine: Engine, *names: str) -> Engine:
    for name in names or ("kvstore",):
        assert engine.connector(name).wait_connected(10)
    return engine


@pytest.mark.parametrize("local", ["require", "off"])
def test_chunks_round_trip_byte_exact(engines, daemon_thread, local):
    engine = connected(engines({"kvstore": {"address": daemon_thread.address, "local": local}}))
    remote = engine.remote()
    keys = [engine.key(h) for h in (11, 12, 13, 14)]
    chunks = [engine.chunk() for _ in keys]

    remote.submit_put_task(keys[0], chunks[0]).result(10)   # one chunk
    assert chunks[0].get_ref_count() == 1
    engine.put(keys[1:], chunks[1:])                         # a batch

    # The daemon holds each chunk's bytes under the key's string, in the worker's namespace.
    connector = engine.connector()
    assert block_key(keys[0]) == keys[0].to_string().encode()
    with SyncKVClient(daemon_thread.address, namespace=connector.namespace.digest) as kv:
        assert [bytes(b) for b in kv.get([block_key(k) for k in keys])] == [bytes(c.byte_array) for c in chunks]

    assert remote.contains(keys[2]) and remote.batched_contains(keys) == 4
    assert engine.on_loop(remote.batched_async_contains("req-1", keys)) == 4

    one = remote.get_blocking(keys[1])
    batch = remote.batched_get_blocking(keys)
    prefetched = engine.on_loop(remote.batched_get_non_blocking("req-1", keys))
    for got in (one, *batch, *prefetched):
        assert got.get_ref_count() == 1 and got.get_shapes() == chunks[0].get_shapes()
    assert same_bytes(one, chunks[1])
    assert all(same_bytes(got, chunk) for got, chunk in zip(batch, chunks, strict=True))
    assert all(same_bytes(got, chunk) for got, chunk in zip(prefetched, chunks, strict=True))
    assert engine.usage()[0] == engine.baseline[0] + 4 + 1 + 4 + 4
    release([one, *batch, *prefetched, *chunks])


def test_lookups_and_gets_stop_at_the_first_missing_chunk(engines, daemon_thread):
    engine = connected(engines({"kvstore": {"address": daemon_thread.address}}))
    remote = engine.remote()
    keys = [engine.key(h) for h in (21, 22, 23, 24)]
    chunks = [engine.chunk() for _ in keys]
    engine.put([keys[0], keys[1], keys[3]], [chunks[0], chunks[1], chunks[3]])   # chunk 2 never saved

    assert remote.batched_contains(keys) == 2
    assert engine.on_loop(remote.batched_async_contains("req-2", keys)) == 2
    assert remote.contains(keys[3]) and not remote.contains(keys[2])
    assert remote.get_blocking(keys[2]) is None

    batch = remote.batched_get_blocking(keys)
    assert [got is not None for got in batch] == [True, True, False, False]
    prefetched = engine.on_loop(remote.batched_get_non_blocking("req-2", keys))
    assert len(prefetched) == 2 and all(same_bytes(g, c) for g, c in zip(prefetched, chunks, strict=False))
    assert engine.on_loop(remote.batched_get_non_blocking("req-3", keys[2:])) == []
    # Only the leading hits were allocated: nothing was allocated for chunk 3, or left behind.
    assert engine.usage()[0] == engine.baseline[0] + 4 + 2 + 2
    release([*batch, *prefetched, *chunks])


def test_a_partial_chunk_comes_back_with_its_own_shape(engines, daemon_thread):
    engine = connected(engines({"kvstore": {"address": daemon_thread.address}}))
    remote = engine.remote()
    key, tail = engine.key(31), engine.chunk(tokens=5)   # the last 5 tokens of a sequence
    engine.put([key], [tail])

    got = remote.get_blocking(key)
    assert got.get_shape()[2] == 5 and same_bytes(got, tail)
    release([got, tail])


def test_a_block_of_the_wrong_size_is_a_miss_not_garbage(engines, daemon_thread):
    engine = connected(engines({"kvstore": {"address": daemon_thread.address}}))
    remote = engine.remote()
    keys = [engine.key(h) for h in (41, 42)]
    chunks = [engine.chunk() for _ in keys]
    engine.put(keys[:1], chunks[:1])
    with SyncKVClient(daemon_thread.address, namespace=engine.connector().namespace.digest) as kv:
        kv.put([block_key(keys[1])], [b"x" * 7])   # not a whole number of tokens

    assert remote.batched_contains(keys) == 2   # present: a lookup cannot tell
    prefetched = engine.on_loop(remote.batched_get_non_blocking("req-4", keys))
    assert len(prefetched) == 1 and same_bytes(prefetched[0], chunks[0])
    assert remote.get_blocking(keys[1]) is None
    release([*prefetched, *chunks])


def test_namespaces_share_chunks_between_equal_workers_only(engines, daemon_thread):
    address = daemon_thread.address
    writer = connected(engines({"kvstore": {"address": address}, "kvstore.b": {"address": address, "salt": "b"}}),
                       "kvstore", "kvstore.b")
    twin = connected(engines({"kvstore": {"address": address}}))
    salted = connected(engines({"kvstore": {"address": address, "salt": "tenant-2"}}))
    key, chunk = writer.key(51), writer.chunk()
    writer.put([key], [chunk])

    got = twin.remote().get_blocking(key)          # another process of the same model and rank
    assert same_bytes(got, chunk)
    assert salted.remote().batched_contains([key]) == 0
    assert writer.remote("kvstore.b").batched_contains([key]) == 0   # the second instance: its own salt
    assert writer.connector().namespace != writer.connector("kvstore.b").namespace
    assert namespace_of(metadata(0, 2)).digest != namespace_of(metadata(1, 2)).digest
    release([got, chunk])


def test_a_daemon_that_is_down_gives_misses_and_a_log_line(engines, caplog):
    daemon = DaemonThread(make_config()).start()
    options = {"address": daemon.address, "timeout_s": 1.0, "lookup_timeout_s": 0.3, "retry_s": 0.2}
    engine = connected(engines({"kvstore": options}))
    remote = engine.remote()
    keys = [engine.key(h) for h in (61, 62)]
    chunks = [engine.chunk() for _ in keys]
    engine.put(keys[:1], chunks[:1])
    assert remote.batched_contains(keys) == 1

    daemon.stop()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
        assert remote.batched_contains(keys) == 0
        assert not remote.contains(keys[0])
        assert engine.on_loop(remote.batched_async_contains("req-5", keys)) == 0
        assert remote.get_blocking(keys[0]) is None
        assert remote.batched_get_blocking(keys) == [None, None]
        assert engine.on_loop(remote.batched_get_non_blocking("req-5", keys)) == []
        engine.put(keys[1:], chunks[1:])                   # dropped, and the chunk released
        remote.submit_put_task(keys[1], chunks[1]).result(10)
        assert chunks[1].get_ref_count() == 1
    assert time.monotonic() - start < 10
    assert any("treated as a miss" in r.getMessage() for r in caplog.records if r.name == "kvstore.integrations")
    release(chunks)


@pytest.mark.parametrize("local", ["auto", "off"])
def test_a_slow_daemon_costs_a_deadline_then_a_miss(engines, daemon_thread, caplog, local):
    options = {"address": daemon_thread.address, "local": local, "timeout_s": 0.2, "lookup_timeout_s": 0.1}
    engine = connected(engines({"kvstore": options}))
    remote = engine.remote()
    keys = [engine.key(h) for h in (81, 82)]
    chunks = [engine.chunk() for _ in keys]
    engine.put(keys[:1], chunks[:1])

    frozen = threading.Event()
    daemon_thread.loop.call_soon_threadsafe(lambda: (frozen.set(), time.sleep(1.0)))   # the daemon stalls
    assert frozen.wait(5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
        assert remote.batched_contains(keys) == 0
        assert remote.get_blocking(keys[0]) is None
        engine.put(keys[1:], chunks[1:])   # gives up; the chunk keeps no extra reference
    assert time.monotonic() - start < 0.95
    assert any("took longer than" in r.getMessage() for r in caplog.records)

    assert wait_for(lambda: remote.batched_contains(keys[:1]) == 1)   # the daemon answers again
    got = remote.get_blocking(keys[0])
    assert same_bytes(got, chunks[0])
    release([got, *chunks])


def test_no_daemon_at_all_gives_misses(engines, caplog):
    options = {"address": "127.0.0.1:1", "connect_timeout_s": 0.5, "retry_s": 0.2}
    with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
        engine = engines({"kvstore": options})
        remote = engine.remote()
        key, chunk = engine.key(71), engine.chunk()
        engine.put([key], [chunk])
        assert remote.batched_contains([key]) == 0 and not remote.contains(key)
        assert remote.get_blocking(key) is None
        assert engine.on_loop(remote.batched_get_non_blocking("req-6", [key])) == []
        assert wait_for(lambda: any("cannot reach the kvstore daemon" in r.getMessage() for r in caplog.records))
    release([chunk])


def test_unknown_options_are_refused_by_name(engines, daemon_thread, loop):
    engine = engines({"kvstore": {"address": daemon_thread.address}})
    config = plugin_config({"kvstore": {"adress": daemon_thread.address}})
    with pytest.raises(ConfigError, match=r"adress.*remote_storage_plugin\.kvstore\."):
        CreateConnector("plugin://kvstore", loop, engine.cpu, config, engine.metadata, plugin_name="kvstore")
    with pytest.raises(ConfigError, match="remote_serde"):
        config = plugin_config({"kvstore": {"address": daemon_thread.address}}, remote_serde="cachegen")
        CreateConnector("plugin://kvstore", loop, engine.cpu, config, engine.metadata, plugin_name="kvstore")


def test_importing_without_lmcache_says_what_to_install():
    code = ("import sys; sys.modules['lmcache'] = None\n"
            "try:\n    import kvstore.integrations.lmcache\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install --no-deps lmcache" in out.stdout, out.stdout + out.stderr
