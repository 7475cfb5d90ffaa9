"""Conformance of ``KVStoreTier`` with vLLM's own tiering offloading: a real
``TieringOffloadingSpec`` builds a real ``TieringOffloadingManager`` (a ``CPUPrimaryTierOffloadingManager``
on a ``SharedOffloadRegion`` in /dev/shm) whose secondary tier vLLM's ``SecondaryTierFactory``
loads from this package; the test drives the manager the way vLLM's offloading scheduler does
(lookup per chunk, prepare/complete store, one ``on_schedule_end`` per step) and plays the GPU
worker by writing and reading the primary tier's rows."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r tests/engines-requirements.txt)")
pytest.importorskip("vllm.v1.kv_offload.tiering.base", reason="this vLLM has no tiering offloading (vllm >= 0.33)")

from conftest import DaemonThread, make_config  # noqa: E402
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.config import (  # noqa: E402
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec  # noqa: E402

from kvstore.client import ClientConfig  # noqa: E402
from kvstore.client.sync import SyncKVClient  # noqa: E402
from kvstore.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.engines

MODULE = "kvstore.integrations.vllm.tier"
BLOCK_BYTES = 4096     # one worker's bytes of one block: a page, so a chunk row is unpadded
NUM_CHUNKS = 8


def tier_config(address: str, **extra) -> dict:
    return {"type": "KVStoreTier", "module_path": MODULE, "address": address, "retry_s": 0.2,
            "timeout_s": 2.0, "lookup_timeout_s": 1.0, "connect_timeout_s": 1.0, **extra}


def make_spec(tiers: list[dict], *, block_bytes: int = BLOCK_BYTES) -> TieringOffloadingSpec:
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layers.0", "layers.1"), group_id=0),),
        worker_kv_bytes_per_block=block_bytes,
        enable_kv_cache_events=False,
        extra_config={"cpu_bytes_to_use": NUM_CHUNKS * block_bytes, "secondary_tiers": tiers,
                      "tier_poll_interval_s": 0},
        engine_id=f"kvstore-test-{uuid.uuid4().hex[:12]}",
        model=OffloadingModelConfig(name="test/tiny", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, data_parallel_index=0,
            data_parallel_size=1, data_parallel_rank_local=None, is_parallelism_agnostic=False,
        ),
    )
    return TieringOffloadingSpec(config)


class Engine:
    """One engine's scheduler side: the spec's manager, driven as vLLM's offloading scheduler does."""

    def __init__(self, address: str, **extra) -> None:
        self.spec = make_spec([tier_config(address, **extra)])
        self.manager = self.spec.get_manager()
        (self.tier,) = self.manager.secondary_tiers
        self.results = []      # every JobResult the tier hands the manager
        report = self.tier.get_finished_jobs

        def recording():
            finished = list(report())
            self.results.extend(finished)
            return finished

        self.tier.get_finished_jobs = recording

    def rows(self) -> np.ndarray:
        return np.asarray(self.manager.primary_tier.get_kv_memoryview()).view(np.uint8)

    def scribble(self) -> None:
        """Overwrite every primary row (nothing in flight), so only a promotion can bring bytes back."""
        rows = self.rows()
        rows[:] = 0xAA
        del rows

    def step(self) -> None:
        with self.manager.lock:
            self.manager.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))

    def settle(self, timeout_s: float = 10.0) -> None:
        """Step until no transfer is in flight."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.step()
            with self.manager.lock:
                if not self.manager.has_pending_work():
                    return
            assert time.monotonic() < deadline, "transfers did not finish"
            time.sleep(0.005)

    def new_request(self, req_id: str) -> ReqContext:
        """A request the manager has been told about."""
        ctx = ReqContext(req_id=req_id)
        with self.manager.lock:
            self.manager.on_new_request(ctx)
        return ctx

    def store(self, req_id: str, keys: list[bytes], payloads: list[np.ndarray]) -> None:
        """A request computes ``keys``: GPU -> primary (this test writes the rows), then the cascade."""
        ctx = self.new_request(req_id)
        with self.manager.lock:
            out = self.manager.prepare_store(keys, ctx)
            assert out is not None and out.keys_to_store == keys
            rows = self.rows()
            for chunk, payload in zip(out.store_spec.chunk_ids, payloads):
                rows[chunk] = payload
            del rows
            self.manager.complete_store(out.keys_to_store, ctx)
            self.manager.on_request_finished(ctx)
        self.settle()

    def lookup(self, ctx: ReqContext, keys: list[bytes]) -> list[LookupResult]:
        with self.manager.lock:
            return [self.manager.lookup(key, ctx) for key in keys]

    def lookup_until(self, ctx: ReqContext, keys: list[bytes], done, timeout_s: float = 10.0) -> list[list[LookupResult]]:
        """Look ``keys`` up once per step until ``done(results)``; every step's answers."""
        seen, deadline = [], time.monotonic() + timeout_s
        while True:
            results = self.lookup(ctx, keys)
            seen.append(results)
            if done(results):
                return seen
            assert time.monotonic() < deadline, f"lookups stuck at {results}"
            self.step()
            time.sleep(0.005)

    def read(self, ctx: ReqContext, keys: list[bytes]) -> list[bytes]:
        """primary -> GPU: the bytes the worker would load for ``keys`` (all HITs)."""
        with self.manager.lock:
            spec = self.manager.prepare_load(keys, ctx)
            rows = self.rows()
            data = [rows[chunk].tobytes() for chunk in spec.chunk_ids]
            del rows
            self.manager.complete_load(keys, ctx)
        return data

    def finish(self, ctx: ReqContext) -> None:
        with self.manager.lock:
            self.manager.on_request_finished(ctx)

    def close(self) -> None:
        self.manager.shutdown()   # without the lock, as vLLM calls it


def offload_keys(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [make_offload_key(rng.bytes(32), 0) for _ in range(n)]


def payloads(n: int, seed: int, size: int = BLOCK_BYTES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def client_of(daemon: DaemonThread, tier) -> SyncKVClient:
    return SyncKVClient(daemon.address, config=ClientConfig(namespace=tier.namespace.digest, local="off"))


def all_are(result):
    return lambda results: all(r is result for r in results)


def test_cascade_reset_and_promote_back(daemon_thread):
    """Chunks stored into the primary tier cascade into kvstore; after the primary is reset they
    are promoted back (HIT_PENDING, then HIT) with the bytes they were stored with."""
    engine = Engine(daemon_thread.address)
    try:
        assert engine.tier.wait_connected(10)
        keys, data = offload_keys(4, seed=1), payloads(4, seed=1)
        engine.store("a", keys, data)
        assert [r.success for r in engine.results] == [True]
        with client_of(daemon_thread, engine.tier) as client:
            assert client.lookup(keys).count == 4
            assert [bytes(b) for b in client.get(keys)] == [d.tobytes() for d in data]

        with engine.manager.lock:
            engine.manager.reset_cache()
            engine.manager.on_reset_flushed()
        engine.scribble()
        ctx = engine.new_request("b")
        # Acknowledged by the daemon: a HIT in this tier at once, so the manager starts promoting.
        seen = engine.lookup_until(ctx, keys, all_are(LookupResult.HIT))
        assert seen[0] == [LookupResult.HIT_PENDING] * 4
        assert engine.read(ctx, keys) == [d.tobytes() for d in data]
        assert [r.success for r in engine.results] == [True, True]
        engine.finish(ctx)
    finally:
        engine.close()


def test_another_engine_finds_them_and_a_deleted_chunk_never_loads(daemon_thread):
    """A second engine (a restart: nothing known) asks the daemon: RETRY until the lookup is in,
    then HIT. A chunk deleted from kvstore before its promotion fails the job from there on
    (a partial JobResult); the chunks before it load with their bytes, none after it do."""
    keys, data = offload_keys(4, seed=2), payloads(4, seed=2)
    first = Engine(daemon_thread.address)
    try:
        assert first.tier.wait_connected(10)
        first.store("a", keys, data)
    finally:
        first.close()

    engine = Engine(daemon_thread.address)
    try:
        assert engine.tier.wait_connected(10)
        assert engine.tier.namespace == first.tier.namespace
        engine.scribble()
        ctx = engine.new_request("b")
        seen = engine.lookup_until(ctx, keys, all_are(LookupResult.HIT_PENDING))
        assert seen[0] == [LookupResult.RETRY] * 4
        # The promotion is queued (submitted at the end of this step); the daemon loses chunk 2.
        with client_of(daemon_thread, engine.tier) as client:
            assert client.delete([keys[2]]) == 1
        engine.settle()
        (load,) = engine.results
        assert not load.success and list(load.successful_keys) == keys[:2]

        after = engine.lookup(ctx, keys)
        assert after[:2] == [LookupResult.HIT] * 2
        assert after[2:] == [LookupResult.MISS] * 2    # never a HIT for bytes that did not arrive
        assert engine.read(ctx, keys[:2]) == [d.tobytes() for d in data[:2]]
        engine.finish(ctx)
        engine.step()

        # Another request asks afresh: chunk 3 is there, but past the gap it is no use.
        ctx = engine.new_request("c")
        seen = engine.lookup_until(ctx, keys, lambda r: LookupResult.RETRY not in r)
        assert seen[-1] == [LookupResult.HIT, LookupResult.HIT, LookupResult.MISS, LookupResult.MISS]
        engine.finish(ctx)
    finally:
        engine.close()


@pytest.mark.parametrize("local", ["off", "auto"])
def test_daemon_down_is_misses_and_failed_jobs(local):
    """A daemon that goes away, then none at all: misses and failed jobs, nothing raised
    (on the gRPC path and on the same-host one)."""
    daemon = DaemonThread(make_config()).start()
    address = daemon.address
    engine = Engine(address, local=local)
    try:
        assert engine.tier.wait_connected(10)
        assert engine.tier._link.path == ("remote" if local == "off" else "local")
        keys, data = offload_keys(3, seed=3), payloads(3, seed=3)
        engine.store("a", keys, data)
        assert [r.success for r in engine.results] == [True]
        daemon.stop()

        # Stores fail; chunks this tier knew of start promoting, fail, and are misses after.
        more, more_data = offload_keys(2, seed=4), payloads(2, seed=4)
        engine.store("b", more, more_data)
        assert engine.results[-1].success is False
        with engine.manager.lock:
            engine.manager.reset_cache()
            engine.manager.on_reset_flushed()
        ctx = engine.new_request("c")
        assert engine.lookup(ctx, keys) == [LookupResult.HIT_PENDING] * 3
        engine.settle()
        assert engine.results[-1].success is False and not engine.results[-1].successful_keys
        seen = engine.lookup_until(ctx, keys, all_are(LookupResult.MISS))
        assert all(r in (LookupResult.RETRY, LookupResult.MISS) for step in seen for r in step)
        engine.finish(ctx)
    finally:
        engine.close()
        daemon.stop()

    # Never reachable: every lookup a miss at once, every store a failed job.
    engine = Engine(address)
    try:
        ctx = engine.new_request("d")
        assert engine.lookup(ctx, keys) == [LookupResult.MISS] * 3
        engine.finish(ctx)
        engine.store("e", keys, data)
        assert [r.success for r in engine.results] == [False]
    finally:
        engine.close()


def test_tier_config_is_checked():
    """vLLM's factory passes the tier config's keys to the tier: unknown ones are refused, by name."""
    spec = make_spec([])
    view = memoryview(np.zeros((NUM_CHUNKS, BLOCK_BYTES), dtype=np.int8))
    with pytest.raises(ConfigError, match="adress"):
        SecondaryTierFactory.create_secondary_tier(
            {"type": "KVStoreTier", "module_path": MODULE, "adress": "127.0.0.1:1"}, view, spec)
    with pytest.raises(ConfigError, match="locality"):
        SecondaryTierFactory.create_secondary_tier(tier_config("127.0.0.1:1", locality="MOON"), view, spec)

    tier = SecondaryTierFactory.create_secondary_tier(tier_config("127.0.0.1:1", locality="local"), view, spec)
    try:
        assert type(tier).__name__ == "KVStoreTier" and tier.tier_type == "KVStoreTier"
        assert tier.locality.value == "LOCAL" and tier.block_size_bytes == BLOCK_BYTES
        assert tier.cache_hit_source.name == "DISK"
        # Chunks of another layout (here: twice the bytes) never meet these.
        other_view = memoryview(np.zeros((NUM_CHUNKS, 2 * BLOCK_BYTES), dtype=np.int8))
        other = SecondaryTierFactory.create_secondary_tier(
            tier_config("127.0.0.1:1"), other_view, make_spec([], block_bytes=2 * BLOCK_BYTES))
        try:
            assert other.namespace.digest != tier.namespace.digest
        finally:
            other.shutdown()
    finally:
        tier.shutdown()
