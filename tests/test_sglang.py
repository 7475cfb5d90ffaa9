"""KVStoreHiCacheStorage inside SGLang's own machinery: built by SGLang's StorageBackendFactory as
the ``dynamic`` backend from a real HiCacheStorageConfig, keyed by SGLang's own page hashes,
over SGLang's real host memory pools (MHA and MLA) allocated on CPU, against a real daemon.

SGLang's host pools import ``sglang.srt.configs``, whose multimodal configs import torchvision.
The torchvision wheels for torch 2.13 are CUDA builds whose ``_C.so`` needs ``libc10_cuda.so``,
which CPU torch lacks, so torchvision cannot be imported here. While the pool modules import, a
stand-in answers for torchvision (image transforms the KV pools never call); it is removed, and
its modules dropped from ``sys.modules``, as soon as they are imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest

pytest.importorskip(
    "sglang.srt.mem_cache.hicache_storage",
    reason="SGLang is not installed (pip install --no-deps sglang==0.5.23 orjson IPython traitlets "
    "dill sentencepiece compressed-tensors loguru gguf)",
)

import torch  # noqa: E402
from conftest import DaemonThread, make_config  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_storage_hash_str  # noqa: E402

from kvstore.errors import ConfigError  # noqa: E402
from kvstore.integrations.sglang import KVStoreHiCacheStorage  # noqa: E402

pytestmark = pytest.mark.engines

PAGE = 4


class _Anything(types.ModuleType):
    """A module whose every attribute is a do-nothing callable class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Anything(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def torchvision_stand_in():
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()   # cached as False before the stand-in exists
    import_utils.is_torchvision_v2_available()
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


with torchvision_stand_in():
    try:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    except ImportError as exc:
        pytest.skip(f"SGLang's host memory pools do not import here ({exc})", allow_module_level=True)


def mha_host_pool(layout: str = "page_first", dtype=torch.bfloat16, layers: int = 3) -> MHATokenToKVPoolHost:
    device = MHATokenToKVPool(64, PAGE, dtype, 2, 8, layers, "cpu", False, start_layer=0, end_layer=layers)
    return MHATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, layout, pin_memory=False,
        device_capacity_tokens=device.size, start_layer=0, end_layer=layers,
    )


def mla_host_pool(layers: int = 2) -> MLATokenToKVPoolHost:
    device = MLATokenToKVPool(64, PAGE, torch.bfloat16, 16, 8, layers, "cpu", False, start_layer=0, end_layer=layers)
    return MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, "page_first", pin_memory=False,
        device_capacity_tokens=device.size, start_layer=0, end_layer=layers, target_layer_num=layers,
        override_kv_cache_dim=device.kv_cache_dim,
    )


def storage_config(address: str, *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False, **extra):
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="test/tiny-llama",
        extra_config={"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
                      "class_name": "KVStoreHiCacheStorage", "address": address, "lookup_timeout_s": 5,
                      "retry_s": 0.2, **extra},
    )


@contextlib.contextmanager
def backend(config: HiCacheStorageConfig, pool, *, connect: bool = True):
    """The backend as SGLang's controller attaches it: the factory, then the host pool."""
    storage = StorageBackendFactory.create_backend("dynamic", config, pool)
    storage.register_mem_pool_host(pool)
    try:
        if connect:
            assert storage.wait_connected(10)
        yield storage
    finally:
        storage.close()


def page_keys(seed: int, pages: int) -> list[str]:
    """SGLang's own chained page hashes of a token sequence."""
    tokens = [(seed * 7919 + i * 31) % 32000 for i in range(pages * PAGE)]
    return get_storage_hash_str(tokens, None, page_size=PAGE)


def fill(pool, pages: int, seed: int) -> torch.Tensor:
    """Host slots of ``pages`` fresh pages, holding random KV."""
    indices = pool.alloc(pages * PAGE)
    generator = torch.Generator().manual_seed(seed)
    for start in indices[::PAGE].tolist():
        page = pool.get_data_page(start, flat=False)
        page.copy_(torch.randn(page.shape, generator=generator).to(page.dtype))
    return indices


def page_bytes(pool, indices: torch.Tensor) -> list[bytes]:
    return [pool.get_data_page(s, flat=True).view(torch.uint8).numpy().tobytes() for s in indices[::PAGE].tolist()]


def test_factory_builds_it_and_legacy_pages_round_trip(daemon_thread):
    pool = mha_host_pool()
    with backend(storage_config(daemon_thread.address), pool) as storage:
        assert isinstance(storage, KVStoreHiCacheStorage)
        keys = page_keys(1, 4)
        indices = fill(pool, 4, seed=1)
        stored = page_bytes(pool, indices)
        assert storage.batch_exists(keys) == 0 and not storage.exists(keys[0])

        assert storage.batch_set(keys[:3], [pool.get_data_page(s) for s in indices[: 3 * PAGE : PAGE].tolist()])
        assert storage.set(keys[3], pool.get_data_page(indices[3 * PAGE].item()))
        assert storage.batch_exists(keys) == 4 and storage.exists(keys[2])
        assert storage.batch_exists([keys[0], keys[1], page_keys(2, 1)[0], keys[3]]) == 2   # the leading run

        targets = [pool.get_dummy_flat_data_page() for _ in range(5)]
        got = storage.batch_get(keys + page_keys(3, 1), targets)
        assert got[4] is None and all(t is target for t, target in zip(got[:4], targets))
        assert [t.view(torch.uint8).numpy().tobytes() for t in got[:4]] == stored
        single = storage.get(keys[1], pool.get_dummy_flat_data_page())
        assert single.view(torch.uint8).numpy().tobytes() == stored[1]
        assert storage.get(page_keys(4, 1)[0], pool.get_dummy_flat_data_page()) is None


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct", "layer_first"])
def test_v1_moves_pages_between_host_slots_and_the_daemon(daemon_thread, layout):
    pool = mha_host_pool(layout)
    with backend(storage_config(daemon_thread.address, interface_v1=1), pool) as storage:
        keys = page_keys(10, 3)
        source = fill(pool, 3, seed=10)
        assert storage.batch_set_v1(keys, source) == [True, True, True]

        target = pool.alloc(4 * PAGE)
        assert storage.batch_get_v1(keys + page_keys(11, 1), target) == [True, True, True, False]
        assert page_bytes(pool, target[: 3 * PAGE]) == page_bytes(pool, source)
        # Legacy and v1 share the page format of a layout: a v1 page reads back as a flat page.
        flat = storage.batch_get(keys[:1], [pool.get_dummy_flat_data_page()])[0]
        assert flat.view(torch.uint8).numpy().tobytes() == page_bytes(pool, source)[0]
        assert storage.batch_get_v1(keys[:2], target[:PAGE]) == [False, False]   # keys and slots disagree


def test_v1_page_first_hands_the_daemon_the_pool_memory_itself(daemon_thread):
    pool = mha_host_pool("page_first")
    with backend(storage_config(daemon_thread.address, interface_v1=1), pool) as storage:
        indices = fill(pool, 2, seed=20)
        base, end = pool.kv_buffer.data_ptr(), pool.kv_buffer.data_ptr() + pool.kv_buffer.nbytes
        parts = storage._pages(indices, 2)
        assert len(parts) == 4 and all(p.is_contiguous() and base <= p.data_ptr() < end for p in parts)


def test_mla_ranks_share_pages_and_only_the_writer_stores(daemon_thread):
    pools = [mla_host_pool(), mla_host_pool()]
    configs = [storage_config(daemon_thread.address, tp_rank=r, tp_size=2, mla=True, interface_v1=1) for r in (0, 1)]
    with backend(configs[0], pools[0]) as rank0, backend(configs[1], pools[1]) as rank1:
        assert rank0.namespace == rank1.namespace
        keys = page_keys(30, 2)
        source = fill(pools[1], 2, seed=30)
        assert rank1.batch_set_v1(keys, source) == [True, True]   # not the writer: nothing stored
        assert rank0.batch_exists(keys) == 0

        source = fill(pools[0], 2, seed=31)
        assert rank0.batch_set_v1(keys, source) == [True, True]
        target = pools[1].alloc(2 * PAGE)
        assert rank1.batch_get_v1(keys, target) == [True, True]
        assert page_bytes(pools[1], target) == page_bytes(pools[0], source)


def test_mha_tp_ranks_keep_their_own_pages(daemon_thread):
    pools = [mha_host_pool(), mha_host_pool()]
    configs = [storage_config(daemon_thread.address, tp_rank=r, tp_size=2, interface_v1=1) for r in (0, 1)]
    with backend(configs[0], pools[0]) as rank0, backend(configs[1], pools[1]) as rank1:
        keys = page_keys(40, 2)
        assert rank0.batch_set_v1(keys, fill(pools[0], 2, seed=40)) == [True, True]
        assert rank0.batch_exists(keys) == 2 and rank1.batch_exists(keys) == 0


def test_unknown_extra_config_keys_are_refused(daemon_thread):
    with pytest.raises(ConfigError, match="adress.*hicache-storage-backend-extra-config"):
        StorageBackendFactory.create_backend("dynamic", storage_config(daemon_thread.address, adress="x:1"), None)


def test_a_daemon_that_goes_away_gives_misses_and_a_warning(caplog):
    daemon = DaemonThread(make_config()).start()
    pool = mha_host_pool()
    with backend(storage_config(daemon.address, interface_v1=1, timeout_s=2, lookup_timeout_s=1), pool) as storage:
        keys = page_keys(50, 2)
        indices = fill(pool, 2, seed=50)
        assert storage.batch_set_v1(keys, indices) == [True, True]
        daemon.stop()
        with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
            assert storage.batch_exists(keys) == 0
            assert not storage.exists(keys[0])
            assert storage.batch_get_v1(keys, indices) == [False, False]
            assert storage.batch_set_v1(page_keys(51, 1), indices[:PAGE]) == [False]
            assert storage.batch_get(keys[:1], [pool.get_dummy_flat_data_page()]) == [None]
            assert storage.batch_set(keys[:1], [pool.get_data_page(indices[0].item())]) is False
        assert any("miss" in record.getMessage() for record in caplog.records)


def test_a_daemon_that_never_answers_gives_misses(caplog):
    daemon = DaemonThread(make_config()).start()
    address = daemon.address
    daemon.stop()
    pool = mha_host_pool()
    with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
        with backend(storage_config(address, interface_v1=1, connect_timeout_s=0.5), pool, connect=False) as storage:
            assert not storage.wait_connected(0.5)
            keys = page_keys(60, 1)
            assert storage.batch_exists(keys) == 0
            assert storage.batch_get_v1(keys, pool.alloc(PAGE)) == [False]
            assert storage.batch_set(keys, [pool.get_dummy_flat_data_page()]) is False
    assert any("cannot reach the kvstore daemon" in record.getMessage() for record in caplog.records)


def test_importing_it_without_sglang_says_what_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "kvstore.integrations.sglang")
    with pytest.raises(ImportError, match="needs SGLang.*pip install"):
        importlib.import_module("kvstore.integrations.sglang")
