"""What a vLLM block is in kvstore: the namespace of a model's KV, and keys from vLLM's own hashes.

vLLM hashes every full block of a request itself (``request.block_hashes``: a chain over the token
ids, with multimodal inputs, LoRA and ``cache_salt`` mixed in, seeded so it is the same in every
process for sha256). kvstore stores a block under that hash, in a namespace that fingerprints what
makes the bytes of the same tokens incompatible: model, KV dtype, layers, this rank's KV heads,
head size, block size, tensor-parallel rank and size, the hash algorithm, and the payload layout
and platform (the CPU backend's block bytes are not a GPU backend's).
A request's ``cache_salt`` is also mixed into its keys here, so salted blocks are separate even
where an engine's hash would not be.

What is refused, with a message, rather than stored under keys that would lie: MLA models (their
latent cache is one per node, not per rank), pipeline parallelism, and more than one KV cache
group (hybrid models: Mamba or sliding-window groups under the hybrid allocator). Sliding-window
layers that vLLM allocates as full attention (the hybrid allocator off, as with this connector)
hold every token's KV and are stored like any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import vllm

from kvstore.errors import ConfigError
from kvstore.keys import MAX_KEY_BYTES, Namespace

# The payload of a block, per layer: vLLM >= 0.33 gives connectors every layer as a logical
# [blocks, kv heads, tokens, content] view whatever the backend (its KVCacheLayout RFC); older
# versions are named by version. What "content" holds is up to the platform's kernels (the CPU
# backend keeps K transposed within a block), so the platform is part of the layout too.
LAYOUT = "BHNC" if importlib.util.find_spec("vllm.v1.kv_cache_layout") else f"vllm-{vllm.__version__}"


def _platform() -> str:
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_type", "") or "unknown")


def namespace_of(vllm_config: Any, *, tp_rank: int, model_id: str | None = None) -> Namespace:
    """The namespace of one tensor-parallel rank's blocks; raises ConfigError for what is refused."""
    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if model.use_mla:
        raise ConfigError("KVStoreConnector does not store MLA (latent) KV caches yet; run without it")
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError("KVStoreConnector does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
    dtype = cache.cache_dtype if cache.cache_dtype != "auto" else str(model.dtype).removeprefix("torch.")
    name = model_id or (f"{model.model}@{model.revision}" if model.revision else model.model)
    return Namespace(
        model_id=name, dtype=dtype, num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel), head_dim=model.get_head_size(),
        block_size=cache.block_size, tp_rank=tp_rank, tp_size=parallel.tensor_parallel_size,
        salt=f"vllm;layout={LAYOUT};platform={_platform()};hash={cache.prefix_caching_hash_algo}",
    )


def check_cache_groups(kv_cache_config: Any) -> None:
    """Refuse KV cache configurations whose blocks are not one full-attention group."""
    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        raise ConfigError(f"KVStoreConnector stores one full-attention KV cache group; this model has {len(groups)} ({kinds})")
    spec = groups[0].kv_cache_spec
    if type(spec).__name__ != "FullAttentionSpec":
        raise ConfigError(f"KVStoreConnector stores full-attention KV caches only, not {type(spec).__name__}")


def block_keys(hashes: Sequence[bytes], cache_salt: str | None) -> list[bytes]:
    """kvstore keys of vLLM block hashes: the hashes themselves, or salted digests of them."""
    if not cache_salt:
        return [bytes(h) if len(h) <= MAX_KEY_BYTES else _digest(b"", h) for h in hashes]
    salt = hashlib.blake2b(cache_salt.encode(), digest_size=32, person=b"kvstore-salt").digest()
    return [_digest(salt, h) for h in hashes]


def _digest(salt: bytes, block_hash: bytes) -> bytes:
    return hashlib.blake2b(salt + bytes(block_hash), digest_size=32).digest()
