"""kvstore for SGLang's HiCache: ``KVStoreHiCacheStorage``, an L3 ``HiCacheStorage`` backend.

Loaded by SGLang's ``StorageBackendFactory`` as the ``dynamic`` backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.integrations.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "address": "127.0.0.1:7070"}'

The contract, as SGLang's ``HiCacheController`` uses it:

- Pages, not tokens. SGLang names every page (``page_size`` tokens) by a hex SHA-256 string
  chained over the tokens before it; kvstore stores a page under that hash (decoded to its 32
  bytes), one block per component: ``<hash>:k`` and ``<hash>:v`` for MHA, ``<hash>:k`` alone for
  MLA, whose latent KV is one tensor.
- A namespace fingerprints what makes a page's bytes incompatible: model, KV dtype, the host
  pool's geometry (layers, heads, head size, page size), its class and layout, and the shard this
  rank holds (TP rank and size; pipeline, context and decode-context parallel shards). MLA KV is
  the same on every TP rank, so all ranks share one namespace without TP in it and only SGLang's
  storage writer (``HiCacheStorageConfig.is_storage_writer``: TP rank 0, per DCP shard) writes;
  the others' writes succeed without storing.
- The namespace needs the host pool, so the daemon link opens in ``register_mem_pool_host``
  (SGLang calls it right after building the backend); before that every call is a miss.
- ``batch_exists`` returns the leading run of pages present (prefix semantics), as do
  ``batch_get`` (tensors, then None) and ``batch_get_v1`` (True, then False).
- ``interface_v1`` (zero copy): ``batch_get_v1/batch_set_v1(keys, host_indices)`` take one page
  key per ``page_size`` host slots, page ``i`` starting at ``host_indices[i * page_size]``. Each
  page component is a view of the host pool's ``kv_buffer`` (``get_data_page(flat=False)``): the
  daemon reads and writes it in place where the layout keeps it contiguous (``page_first``,
  ``page_first_direct``, ``page_head``); ``layer_first`` goes through one copy per page.
  The legacy calls store the same bytes (the halves of SGLang's flat data page), so both
  interfaces read each other's pages for one layout.
- Nothing raises into SGLang once it runs: a daemon that is down, slow or failing gives misses
  and False, with a rate-limited warning (:class:`~kvstore.integrations.link.DaemonLink`). A bad
  extra config is refused when the backend is built (``ConfigError`` naming the key).

Extra-config keys: the link's (``address``, ``local``, ``timeout_s``, ``lookup_timeout_s``,
``connect_timeout_s``, ``retry_s``), SGLang's own (``backend_name``, ``module_path``,
``class_name``, ``interface_v1``, ``tp_lcm_size``, the ``prefetch_*`` knobs and
``hicache_storage_pass_prefix_keys``), and ``model_id`` (instead of SGLang's model
name) and ``salt`` (separates tenants). Not supported: the v2 interface (hybrid models' extra
pools) and heterogeneous-TP head splitting (``tp_lcm_size``: pages stay per TP size).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from typing import Any

try:
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise ImportError(
        "kvstore.integrations.sglang needs SGLang (pip install 'sglang>=0.5.23'; see docs/integration.md)"
    ) from exc

from kvstore.errors import ConfigError
from kvstore.integrations.link import DaemonLink, LinkConfig
from kvstore.keys import MAX_KEY_BYTES, Namespace

log = logging.getLogger("kvstore.integrations.sglang")

OWN_KEYS = {"model_id": None, "salt": ""}
# What SGLang itself puts in (or reads from) the extra config; accepted and left to SGLang.
SGLANG_KEYS = dict.fromkeys((
    "backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size", "prefetch_threshold",
    "prefetch_timeout_base", "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys",
))
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _never_raises(default):
    """Turn any exception of a storage call into ``default`` and a log line."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                warn = self._link.warn if self._link else log.warning
                warn(f"{method.__name__} failed ({type(exc).__name__}: {exc}); treated as a miss")
                return default(*args) if callable(default) else default
        return call
    return wrap



def _no_pages(keys, *_):
    return [False] * len(keys)


class KVStoreHiCacheStorage(HiCacheStorage):
    """SGLang HiCache L3 storage in a kvstore daemon (see the module docstring).

    Args:
        storage_config: what SGLang's controller builds (ranks, MLA, model name, extra config).
        kwargs: the factory's extra arguments (unused).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        self.link_config, own = LinkConfig.split(
            extra, {**SGLANG_KEYS, **OWN_KEYS}, where="--hicache-storage-backend-extra-config"
        )
        self.storage_config = storage_config
        self.model_id = own["model_id"] or storage_config.model_name
        if not self.model_id:
            raise ConfigError("KVStoreHiCacheStorage needs a model name: SGLang's, or model_id in the extra config")
        self.salt = str(own["salt"])
        self.is_mla = bool(storage_config.is_mla_model)
        self.writer = storage_config.is_storage_writer
        self.suffixes = (b":k",) if self.is_mla else (b":k", b":v")
        if storage_config.should_split_heads:
            log.warning("KVStoreHiCacheStorage does not split heads for tp_lcm_size; pages are kept per TP size")
        self.mem_pool_host = None
        self.namespace: Namespace | None = None
        self._link: DaemonLink | None = None

    # -- identity -------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        try:
            namespace = self.namespace_of(mem_pool_host)
        except AttributeError as exc:
            raise ConfigError(f"KVStoreHiCacheStorage cannot store the pages of a {type(mem_pool_host).__name__} "
                              f"host pool ({exc})") from exc
        super().register_mem_pool_host(mem_pool_host)
        self.namespace = namespace
        if self._link is not None:
            self._link.close()
        self._link = DaemonLink(self.link_config, namespace=self.namespace, owner="sglang-hicache")

    def namespace_of(self, pool) -> Namespace:
        """The namespace of this rank's pages in ``pool``."""
        cfg = self.storage_config
        shards = [f"pp={cfg.pp_rank}/{cfg.pp_size}", f"cp={cfg.attn_cp_rank}/{cfg.attn_cp_size}"]
        if cfg.dcp_size > 1:
            shards.append(f"dcp={cfg.dcp_rank}/{cfg.dcp_size}")
        if self.is_mla:
            heads, head_dim, tp_rank, tp_size = 1, pool.kv_cache_dim, 0, 1   # replicated on every TP rank
        else:
            heads, head_dim, tp_rank, tp_size = pool.head_num, pool.head_dim, cfg.tp_rank, cfg.tp_size
            shards.append(f"v_head_dim={pool.v_head_dim}")
        page_size = cfg.logical_page_size or pool.page_size
        return Namespace(
            model_id=self.model_id, dtype=str(pool.dtype).removeprefix("torch."), num_layers=pool.layer_num,
            num_kv_heads=heads, head_dim=head_dim, block_size=page_size, tp_rank=tp_rank, tp_size=tp_size,
            salt=";".join(["sglang", type(pool).__name__, f"layout={pool.layout}", *shards, self.salt]),
        )

    def block_keys(self, keys: list[str]) -> list[bytes]:
        """kvstore keys of SGLang page keys: one per page component, page by page."""
        out = []
        for key in keys:
            raw = bytes.fromhex(key) if _SHA256_HEX.fullmatch(key) else key.encode()
            if len(raw) + 2 > MAX_KEY_BYTES:
                raw = hashlib.blake2b(raw, digest_size=32).digest()
            out += [raw + suffix for suffix in self.suffixes]
        return out

    # -- pages as byte buffers ------------------------------------------------------------------

    def _components(self, page: torch.Tensor) -> list[torch.Tensor]:
        """A page (flat, or as the host pool's view) split into its K and V parts (MLA: one)."""
        if page.dim() == 1:
            return list(page.chunk(len(self.suffixes)))
        return [page] if self.is_mla else list(page.unbind(0))

    def _pages(self, host_indices: torch.Tensor, count: int) -> list[torch.Tensor]:
        pool = self.mem_pool_host
        if pool is None:
            raise RuntimeError("no host memory pool registered (register_mem_pool_host)")
        size = self.storage_config.logical_page_size or pool.page_size   # DCP: pages are logical
        if host_indices.numel() != count * size:
            raise ValueError(f"{count} page keys but {host_indices.numel()} host slots (page size {size})")
        starts = host_indices[::size].tolist()
        return [part for start in starts for part in self._components(pool.get_data_page(start, flat=False))]

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> torch.Tensor:
        """A flat uint8 view of ``tensor`` (any dtype, bf16 included); a copy when not contiguous."""
        return tensor.contiguous().view(-1).view(torch.uint8)

    def _call(self, what: str, call, default, *, timeout_s: float | None = None):
        """``call(client)`` on the link, or ``default`` on failure once the call has let go of
        the host pages it was given (:meth:`DaemonLink.call`: an abandoned load must not write
        into pages SGLang reuses)."""
        if self._link is None:
            log.debug("no host memory pool registered yet: %s is a miss", what)
            return default
        return self._link.call(what, call, default, timeout_s=timeout_s)

    def _load(self, keys: list[str], buffers: list[torch.Tensor]) -> int:
        """Fill ``buffers`` (page components, in order) from the leading pages cached; pages filled."""
        if not keys:
            return 0
        staged = [b if b.is_contiguous() else torch.empty_like(b, memory_format=torch.contiguous_format)
                  for b in buffers]
        filled = self._call("load", lambda client: client.get_into(
            self.block_keys(keys), [self._bytes(b) for b in staged]), 0)
        pages = filled // len(self.suffixes)
        for target, source in zip(buffers[: pages * len(self.suffixes)], staged):
            if target is not source:
                target.copy_(source)
        return pages

    def _store(self, keys: list[str], buffers: list[torch.Tensor]) -> list[bool]:
        if not self.writer:   # MLA: another rank writes the replicated pages
            return [True] * len(keys)
        if not keys:
            return []
        block_keys = self.block_keys(keys)
        result = self._call("save", lambda client: client.put(block_keys, [self._bytes(b) for b in buffers]), None)
        if result is None:
            return [False] * len(keys)
        if result.dropped == 0 and result.stored + result.present == len(block_keys):
            return [True] * len(keys)
        self._link.warn(f"kvstore kept {result.stored + result.present} of {len(block_keys)} blocks of a save "
                        f"({result.dropped} dropped: the daemon is full of blocks in use)")
        present = self._call("lookup", lambda client: client.lookup(block_keys), None,
                             timeout_s=self.link_config.lookup_timeout_s)
        pages = present.count // len(self.suffixes) if present is not None else 0
        return [i < pages for i in range(len(keys))]

    # -- SGLang's interface ---------------------------------------------------------------------

    @_never_raises(0)
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        block_keys = self.block_keys(keys)
        hit = self._call("lookup", lambda client: client.lookup(block_keys), None,
                         timeout_s=self.link_config.lookup_timeout_s)
        return 0 if hit is None else hit.count // len(self.suffixes)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    @_never_raises(_no_pages)
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        pages = self._load(keys, self._pages(host_indices, len(keys)))
        return [i < pages for i in range(len(keys))]

    @_never_raises(_no_pages)
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._store(keys, self._pages(host_indices, len(keys)))

    @_never_raises(lambda keys, *_: [None] * len(keys))
    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list:
        """Pages into ``target_locations`` (flat pages, as ``get_dummy_flat_data_page`` makes them;
        new ones when None): the leading pages found, then None."""
        if target_locations is None:
            if self.mem_pool_host is None:
                raise RuntimeError("no host memory pool registered (register_mem_pool_host)")
            target_locations = [self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
        pages = self._load(keys, [part for t in target_locations for part in self._components(t.view(-1))])
        return [t if i < pages else None for i, t in enumerate(target_locations)]

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    @_never_raises(False)
    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        """Store flat pages (``get_data_page(index, flat=True)``); True when every page is stored."""
        return all(self._store(keys, [part for v in values for part in self._components(v.reshape(-1))]))

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def clear(self) -> None:
        log.info("KVStoreHiCacheStorage.clear: kvstore keeps its blocks until its own eviction drops them")

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the daemon link is up within ``timeout_s`` (False before a pool is registered)."""
        return self._link is not None and self._link.wait_connected(timeout_s)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
