"""``KVStoreConnector``: kvstore as a vLLM v1 KV connector.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"address": "127.0.0.1:7070"}}'

vLLM builds one instance in its scheduler (role SCHEDULER: :mod:`.scheduler`) and one per worker
(role WORKER: :mod:`.worker`); they share nothing but the per-step :class:`KVStoreMetadata`. Each
reaches the daemon through its own :class:`~kvstore.integrations.link.DaemonLink`, so a daemon
that is down or slow costs misses and a log line, never an exception in vLLM's loops.

``kv_connector_extra_config`` takes the :class:`~kvstore.integrations.link.LinkConfig` keys
(``address``, ``local``, ``timeout_s``, ``lookup_timeout_s``, ...) and :data:`OPTIONS`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from kvstore.errors import ConfigError
from kvstore.integrations.link import DaemonLink, LinkConfig
from kvstore.integrations.vllm.identity import check_cache_groups, namespace_of
from kvstore.integrations.vllm.metadata import KVStoreMetadata
from kvstore.integrations.vllm.scheduler import SchedulerSide
from kvstore.integrations.vllm.worker import WorkerSide

log = logging.getLogger("kvstore.integrations.vllm")

OPTIONS: dict[str, Any] = {
    "model_id": None,              # the model's name in the namespace (default: vLLM's model)
    "lookup_wait_s": 0.002,        # how long one scheduler call may wait for a lookup
    "load": True,                  # load hits (False: only save)
    "save": True,                  # save new blocks (False: only load)
    "max_pending_save_bytes": 1 << 30,
}


class KVStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = self._kv_transfer_config
        link_config, own = LinkConfig.split(
            transfer.kv_connector_extra_config or {}, OPTIONS, where="kv_transfer_config.kv_connector_extra_config"
        )
        _check_options(own)
        check_cache_groups(kv_cache_config)
        cache = vllm_config.cache_config
        tp_rank = 0 if role == KVConnectorRole.SCHEDULER else _tp_rank(vllm_config)
        namespace = namespace_of(vllm_config, tp_rank=tp_rank, model_id=own["model_id"])
        if cache.prefix_caching_hash_algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ:
            log.warning("vLLM seeds %s block hashes randomly per process: blocks saved by this engine are "
                        "found by no other process; set PYTHONHASHSEED (the same in every engine) or use sha256",
                        cache.prefix_caching_hash_algo)
        self._link = DaemonLink(link_config, namespace=namespace.digest, owner=f"vllm-{role.name.lower()}")
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if getattr(transfer, "kv_load_failure_policy", "recompute") == "fail":
                log.warning('kv_load_failure_policy is "fail": a block evicted between lookup and load fails '
                            'its request; "recompute" makes it a miss')
            self._scheduler = SchedulerSide(
                self._link, block_size=cache.block_size, lookup_wait_s=own["lookup_wait_s"],
                load=own["load"], save=own["save"],
            )
        else:
            num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else cache.num_gpu_blocks
            self._worker = WorkerSide(
                self._link, block_size=cache.block_size, num_blocks=num_blocks, num_kv_heads=namespace.num_kv_heads,
                max_pending_save_bytes=own["max_pending_save_bytes"],
            )

    @property
    def requires_kv_delivery(self) -> bool:
        return False   # a cache: a save that does not happen is a later miss

    # Worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)
        log.info("kvstore: %d layers of %s, %d bytes per block", self._worker.layout.num_layers,
                 tuple(self._worker.layout.block_shape), self._worker.layout.block_bytes)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return   # start_load_kv has loaded every layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_layer(self._get_connector_metadata(), layer_name)

    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._get_connector_metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.flush(self._link.config.timeout_s)
        self._link.close()

    # Scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreMetadata:
        return self._scheduler.build(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request)


def _tp_rank(vllm_config: Any) -> int:
    if vllm_config.parallel_config.tensor_parallel_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def _check_options(own: dict[str, Any]) -> None:
    where = "kv_connector_extra_config"
    if own["model_id"] is not None and (not isinstance(own["model_id"], str) or not own["model_id"]):
        raise ConfigError(f"{where}.model_id must be a non-empty string, got {own['model_id']!r}")
    wait = own["lookup_wait_s"]
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 1:
        raise ConfigError(f"{where}.lookup_wait_s must be a number of seconds in [0, 1], got {wait!r}")
    for name in ("load", "save"):
        if not isinstance(own[name], bool):
            raise ConfigError(f"{where}.{name} must be true or false, got {own[name]!r}")
    limit = own["max_pending_save_bytes"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConfigError(f"{where}.max_pending_save_bytes must be a positive integer, got {limit!r}")
