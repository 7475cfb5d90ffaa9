"""KVStoreConnector inside vLLM's own machinery: its real v1 Scheduler (which builds the scheduler
side through KVConnectorFactory from the module path), the worker side from the same factory over
KV cache tensors vLLM itself allocates, and a real daemon.

The "model" is a function that writes known KV for every token a step computes, and nothing else:
so a block that holds the right KV in a second engine can only have come from kvstore.
"""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm", reason="vLLM is not installed (pip install --no-deps -r tests/engines-requirements.txt)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor, SlidingWindowSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from kvstore.client import SyncKVClient  # noqa: E402
from kvstore.errors import ConfigError  # noqa: E402
from kvstore.integrations.vllm import KVStoreConnector  # noqa: E402
from kvstore.integrations.vllm.identity import block_keys, check_cache_groups, namespace_of  # noqa: E402

pytestmark = pytest.mark.engines

BLOCK = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SPEC = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama's config: all the scheduler needs (no weights, no tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "float32", "head_dim": 64,
    }))
    return str(path)


def vllm_config(model_dir: str, address: str, **extra) -> VllmConfig:
    transfer = KVTransferConfig(
        kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm", kv_role="kv_both",
        kv_load_failure_policy="recompute", kv_connector_extra_config={"address": address, "lookup_timeout_s": 5, **extra},
    )
    config = VllmConfig(
        model_config=ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=2048),
        cache_config=CacheConfig(block_size=BLOCK),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=8, max_model_len=2048,
                                         is_encoder_decoder=False),
        kv_transfer_config=transfer, device_config=DeviceConfig("cpu"),
    )
    config.cache_config.num_gpu_blocks = NUM_BLOCKS   # what vLLM sets after profiling memory
    return config


def kv_cache_config(block_outermost: bool = False) -> KVCacheConfig:
    page = SPEC.page_size_bytes
    strides = (page, page * len(LAYERS)) if block_outermost else (page * NUM_BLOCKS, page)
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=LAYERS,
                                        layer_stride=strides[0], block_stride=strides[1])],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, SPEC)],
    )


def true_kv(token: int, position: int, layer: int) -> torch.Tensor:
    """The KV the "model" writes for one token: [kv heads, content], a function of all three."""
    heads = torch.arange(SPEC.num_kv_heads, dtype=torch.float32)[:, None]
    content = torch.arange(2 * SPEC.head_size, dtype=torch.float32)[None, :]
    return token * 8.0 + position * 0.5 + layer * 0.25 + heads * 1000.0 + content / 256.0


class Engine:
    """vLLM's scheduler and a worker-side connector over vLLM-allocated KV tensors."""

    def __init__(self, model_dir: str, address: str, *, block_outermost: bool = False,
                 layout: KVCacheLayout = KVCacheLayout.LBHNC, kernel_block_size: int = BLOCK, **extra) -> None:
        self.config = vllm_config(model_dir, address, **extra)
        kv_config = kv_cache_config(block_outermost)
        hash_fn = get_hash_fn_by_name(self.config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.scheduler = Scheduler(self.config, kv_config, StructuredOutputManager(self.config), block_size=BLOCK)
        self.worker = KVConnectorFactory.create_connector(config=self.config, role=KVConnectorRole.WORKER,
                                                          kv_cache_config=kv_config)
        self.kv = allocate_kv_cache(kv_config, torch.device("cpu"), layout, [kernel_block_size])
        self.kernel_block_size = kernel_block_size
        self.worker.register_kv_caches(self.kv)
        self.requests: dict[str, Request] = {}
        self.block_ids: dict[str, list[int]] = {}   # each request's GPU blocks when last scheduled

    @property
    def connector(self) -> KVStoreConnector:
        return self.scheduler.connector

    def wait_connected(self) -> Engine:
        assert self.connector._link.wait_connected(10) and self.worker._link.wait_connected(10)
        return self

    def add(self, req_id: str, tokens: list[int], *, salt: str | None = None) -> Request:
        request = Request(req_id, tokens, SamplingParams(max_tokens=1), None, cache_salt=salt, block_hasher=self.hasher)
        self.requests[req_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self, before_load=None):
        """One step that schedules something (steps that schedule nothing while a lookup is in
        flight run first, as in vLLM's engine loop); returns its output and the load errors."""
        deadline = time.monotonic() + 10
        while True:
            out, errors = self._run_step(before_load)
            if out.num_scheduled_tokens or time.monotonic() > deadline:
                return out, errors

    def _run_step(self, before_load):
        out = self.scheduler.schedule()
        if not out.num_scheduled_tokens:
            time.sleep(0.001)
        meta = out.kv_connector_metadata
        self.worker.bind_connector_metadata(meta)
        if before_load:
            before_load(meta)
        self.worker.start_load_kv(None)
        starts = {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, n in out.num_scheduled_tokens.items():
            self.block_ids[req_id] = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            self._compute(req_id, starts[req_id], starts[req_id] + n)
        for name in LAYERS:
            self.worker.save_kv_layer(name, self.kv[name], None)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        ids = list(out.num_scheduled_tokens)
        sampled = [[7] if starts[r] + out.num_scheduled_tokens[r] >= self.requests[r].num_prompt_tokens else [] for r in ids]
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(invalid_block_ids=errors),
        ))
        self.worker._worker.flush(5)
        return out, errors

    def _compute(self, req_id: str, start: int, stop: int) -> None:
        tokens, block_ids = self.requests[req_id].all_token_ids, self.block_ids[req_id]
        for layer, name in enumerate(LAYERS):
            for pos in range(start, stop):
                self._token(name, block_ids[pos // BLOCK], pos % BLOCK)[:] = true_kv(tokens[pos], pos, layer)

    def _token(self, name: str, block: int, slot: int) -> torch.Tensor:
        """The [kv heads, content] of one token of a vLLM block (in its kernel block, if split)."""
        split = BLOCK // self.kernel_block_size
        kernel, offset = divmod(slot, self.kernel_block_size)
        return self.kv[name][block * split + kernel, :, offset, :]

    def assert_kv(self, req_id: str, upto: int) -> None:
        """Positions [0, upto) of the request hold the true KV of its tokens."""
        tokens, block_ids = self.requests[req_id].all_token_ids, self.block_ids[req_id]
        for layer, name in enumerate(LAYERS):
            for pos in range(upto):
                got = self._token(name, block_ids[pos // BLOCK], pos % BLOCK)
                assert torch.equal(got, true_kv(tokens[pos], pos, layer)), f"layer {layer} position {pos}"


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (n,), generator=g).tolist()


@pytest.mark.parametrize("block_outermost,layout", [
    (False, KVCacheLayout.LBHNC), (True, KVCacheLayout.LBHNC), (False, KVCacheLayout.LBNHC),
], ids=["layer-outermost", "block-outermost", "token-major"])
def test_a_second_engine_loads_a_shared_prefix_byte_exact(model_dir, daemon_thread, block_outermost, layout):
    first = Engine(model_dir, daemon_thread.address, block_outermost=block_outermost, layout=layout)
    assert isinstance(first.connector, KVStoreConnector)
    assert first.connector._link.wait_connected(10)
    shared = prompt(64, seed=1)
    first.add("a", shared + prompt(36, seed=2))             # 100 tokens: 6 full blocks saved
    out, _ = first.step()
    assert out.num_scheduled_tokens["a"] == 100             # nothing cached yet: all computed
    assert first.worker._worker.counts["saved"] == 6

    second = Engine(model_dir, daemon_thread.address, block_outermost=not block_outermost, layout=layout)
    second.wait_connected()
    second.add("b", shared + prompt(40, seed=3))            # shares 4 blocks, then differs
    out, errors = second.step()
    assert errors == set()
    assert out.num_scheduled_tokens["b"] == 104 - 64        # 64 tokens loaded, not computed
    assert second.worker._worker.counts["loaded"] == 4
    second.assert_kv("b", 104)                               # the loaded 64 are the first engine's KV


def test_blocks_split_into_kernel_blocks_are_stored_in_token_order(model_dir, daemon_thread):
    split = Engine(model_dir, daemon_thread.address, kernel_block_size=8).wait_connected()
    assert tuple(split.kv[LAYERS[0]].shape) == (NUM_BLOCKS * 2, 2, 8, 128)   # vLLM's kernel-block view
    tokens = prompt(80, seed=10)
    split.add("a", tokens)
    split.step()
    whole = Engine(model_dir, daemon_thread.address).wait_connected()
    whole.add("b", tokens)
    out, _ = whole.step()
    assert out.num_scheduled_tokens["b"] == 80 - 4 * BLOCK
    whole.assert_kv("b", 80)                                 # the same bytes as an unsplit cache


def test_a_prompt_held_whole_still_computes_its_last_token(model_dir, daemon_thread):
    first = Engine(model_dir, daemon_thread.address)
    first.wait_connected()
    tokens = prompt(96, seed=4)                              # exactly 6 full blocks
    first.add("a", tokens)
    first.step()
    second = Engine(model_dir, daemon_thread.address)
    second.wait_connected()
    second.add("b", tokens)
    out, _ = second.step()
    assert out.num_scheduled_tokens["b"] == 16               # 5 blocks loaded; the last one is computed
    second.assert_kv("b", 96)


def test_a_block_gone_between_lookup_and_load_is_reported_and_recomputed(model_dir, daemon_thread):
    first = Engine(model_dir, daemon_thread.address)
    first.wait_connected()
    tokens = prompt(100, seed=5)
    request = first.add("a", tokens)
    first.step()

    second = Engine(model_dir, daemon_thread.address)
    second.wait_connected()
    victim = block_keys(request.block_hashes, None)[2]

    def evict(meta):   # after the scheduler counted 6 blocks, before the worker loads them
        assert [len(t.keys) for t in meta.loads] == [6]
        with SyncKVClient(daemon_thread.address, namespace=namespace_of(second.config, tp_rank=0)) as kv:
            assert kv.delete([victim]) == 1

    later = second.add("b", tokens)
    out, errors = second.step(before_load=evict)
    loaded_ids = second.block_ids["b"]
    assert errors == set(loaded_ids[2:6])                   # the missing block and every one after it
    assert later.num_computed_tokens == 2 * BLOCK            # vLLM rolled back to the first bad block
    out, errors = second.step()                              # and recomputes from there
    assert out.num_scheduled_tokens["b"] == 100 - 2 * BLOCK and errors == set()
    second.assert_kv("b", 100)


def test_a_request_salt_separates_its_blocks(model_dir, daemon_thread):
    first = Engine(model_dir, daemon_thread.address)
    first.wait_connected()
    tokens = prompt(80, seed=6)
    first.add("a", tokens, salt="tenant-a")
    first.step()
    second = Engine(model_dir, daemon_thread.address)
    second.wait_connected()
    second.add("b", tokens, salt="tenant-b")
    second.add("c", tokens, salt="tenant-a")
    out, _ = second.step()
    assert out.num_scheduled_tokens["b"] == 80               # another salt: nothing found
    assert out.num_scheduled_tokens["c"] == 80 - 4 * BLOCK   # the same salt: 4 blocks loaded


def test_a_lookup_in_flight_asks_vllm_again_and_a_stuck_one_is_a_miss(model_dir, daemon_thread):
    engine = Engine(model_dir, daemon_thread.address, lookup_wait_s=0, lookup_timeout_s=0.3)
    engine.wait_connected()
    daemon_thread.loop.call_soon_threadsafe(time.sleep, 0.2)   # busy: the lookup cannot be answered yet
    engine.add("a", prompt(64, seed=7))
    out = engine.scheduler.schedule()                        # the lookup is in flight
    assert "a" not in out.num_scheduled_tokens
    daemon_thread.loop.call_soon_threadsafe(time.sleep, 1.0)   # the daemon stops answering for a second
    engine.add("b", prompt(64, seed=8))
    started = time.monotonic()
    scheduled = {}
    while "b" not in scheduled:
        scheduled = engine.scheduler.schedule().num_scheduled_tokens
        assert time.monotonic() - started < 0.9, "the scheduler waited for the stuck daemon"
    assert scheduled["b"] == 64                              # counted as a miss: computed in full


def test_a_daemon_that_is_down_costs_misses_not_errors(model_dir, tmp_path):
    engine = Engine(model_dir, "127.0.0.1:9", retry_s=30)    # nothing listens on port 9
    engine.add("a", prompt(64, seed=9))
    out, errors = engine.step()
    assert out.num_scheduled_tokens["a"] == 64 and errors == set()
    assert engine.worker._worker.counts["dropped"] == 4      # the saves were dropped, not raised
    engine.assert_kv("a", 64)


def test_unknown_options_and_models_it_cannot_store_are_refused(model_dir):
    with pytest.raises(ConfigError, match="adress"):
        Engine(model_dir, "127.0.0.1:7070", adress="x")
    with pytest.raises(ConfigError, match="lookup_wait_s"):
        Engine(model_dir, "127.0.0.1:7070", lookup_wait_s=5)
    hybrid = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(LAYERS[:1], SPEC),
        KVCacheGroupSpec(LAYERS[1:], SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=64,
                                                       dtype=torch.float32, sliding_window=32)),
    ])
    with pytest.raises(ConfigError, match="2 \\(FullAttentionSpec, SlidingWindowSpec\\)"):
        check_cache_groups(hybrid)


def test_the_namespace_follows_what_makes_kv_incompatible(model_dir):
    config = vllm_config(model_dir, "127.0.0.1:7070")
    base = namespace_of(config, tp_rank=0)
    assert (base.num_layers, base.num_kv_heads, base.head_dim, base.block_size, base.dtype) == (2, 2, 64, 16, "float32")
    assert namespace_of(config, tp_rank=0, model_id="other").digest != base.digest
    assert "hash=sha256" in base.salt
