"""kvstore as an LMCache remote-storage plugin: ``KVStoreConnectorAdapter``.

    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
      remote_storage_plugin.kvstore.address: 127.0.0.1:7070
      remote_storage_plugin.kvstore.salt: ""            # optional: separates tenants

The plugin's name must be ``kvstore`` or ``kvstore.<instance>`` (LMCache asks each adapter whether
it serves ``plugin://<name>`` before it gives it the name). Its keys in ``extra_config``, under
``remote_storage_plugin.<name>.``, are the :class:`~kvstore.integrations.link.LinkConfig` keys
(``address``, ``local``, ``timeout_s``, ``lookup_timeout_s``, ...) and :data:`OPTIONS`; any other
key there is refused (a :class:`~kvstore.errors.ConfigError` naming it, which LMCache logs).

The contract, as LMCache 0.5.6's ``RemoteBackend`` uses a ``RemoteConnector``:

- one chunk (a ``CacheEngineKey``) is one kvstore block: the key's ``to_string()`` (its SHA-256,
  hex, when longer than 128 bytes), the memory object's bytes as they are (a partial chunk is a
  shorter block); the namespace comes from ``LMCacheMetadata`` (model, world size, worker id,
  kv dtypes and shapes, chunk size, MLA) and the ``salt`` option;
- lookups and gets are prefix-shaped: they count or return the *leading* cached chunks and stop
  at the first miss (``batched_get`` pads with None);
- a get allocates its memory objects from LMCache's ``LocalCPUBackend`` (without waiting for
  room: no room is a miss) and hands them over with one reference each, the caller's to release;
  a chunk that cannot be delivered is released here;
- a put neither takes nor drops LMCache's reference: ``InstrumentedRemoteConnector`` (which wraps
  every connector LMCache creates) drops it when the put returns. The connector holds a reference
  of its own until the client has finished reading the bytes, even past a timeout;
- every failure (daemon down or slow, no memory, a block of the wrong size) is a miss, or a
  skipped put, plus a rate-limited warning; nothing raises into LMCache. Only ``remote_serde:
  naive`` is supported.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

try:
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.memory_management import MemoryObj
    from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise ImportError(
        f"kvstore.integrations.lmcache needs LMCache ({exc}): pip install --no-deps lmcache==0.5.6, then "
        "pip install sortedcontainers numba llvmlite cffi pycparser aiofile caio cryptography "
        "(--no-deps keeps kvstore's protobuf and your torch)"
    ) from exc

from kvstore.client.client import KVClient
from kvstore.errors import ConfigError
from kvstore.integrations.link import DaemonLink, LinkConfig
from kvstore.keys import Namespace

log = logging.getLogger("kvstore.integrations.lmcache")

T = TypeVar("T")
PLUGIN_TYPE = "kvstore"
MAX_KEY_BYTES = 128
LOADER_KEYS = ("module_path", "class_name")   # LMCache's own keys under the plugin's prefix
OPTIONS: dict[str, Any] = {
    "salt": "",   # mixed into the namespace: chunks of different salts never meet
}


def block_key(key: CacheEngineKey) -> bytes:
    """The kvstore key of an LMCache chunk key: its string, or that string's SHA-256 if too long.

    Every ``to_string()`` holds an ``@`` and no hashed form does, so the two cannot collide.
    """
    raw = key.to_string().encode()
    return raw if len(raw) <= MAX_KEY_BYTES else b"sha256:" + hashlib.sha256(raw).hexdigest().encode()


def namespace_of(metadata: Any, *, salt: str = "") -> Namespace:
    """The namespace of an LMCache worker: what makes its chunks' bytes unlike another's."""
    layers, _, _, heads, head_dim = metadata.kv_shape
    dtypes = ",".join(str(dtype).removeprefix("torch.") for dtype in metadata.get_dtypes())
    shapes = ",".join("x".join(map(str, shape)) for shape in metadata.get_shapes())
    return Namespace(
        model_id=metadata.model_name, dtype=dtypes, num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
        block_size=metadata.chunk_size,
        # MLA caches are the same on every rank; LMCache may read worker 0's copy from any rank.
        tp_rank=0 if metadata.use_mla else metadata.worker_id, tp_size=metadata.world_size,
        salt=f"lmcache;mla={bool(metadata.use_mla)};shapes={shapes};{salt}",
    )


class KVStoreConnectorAdapter(ConnectorAdapter):
    """The plugin class LMCache loads: serves ``plugin://kvstore[.<instance>]``."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        return KVStoreRemoteConnector(context)


class KVStoreRemoteConnector(RemoteConnector):
    """An LMCache ``RemoteConnector`` over one :class:`~kvstore.integrations.link.DaemonLink`."""

    def __init__(self, context: ConnectorContext) -> None:
        config, metadata = context.config, context.metadata
        super().__init__(config, metadata)
        name = context.plugin_name or PLUGIN_TYPE
        where = f"LMCache extra_config (remote_storage_plugin.{name}.*)"
        if config.remote_serde != "naive":
            raise ConfigError(f"remote_serde must be 'naive' for kvstore ({where}), got {config.remote_serde!r}")
        link_config, own = LinkConfig.split(_plugin_options(config, name), OPTIONS, where=where)
        if not isinstance(own["salt"], str):
            raise ConfigError(f"salt must be a string in {where}, got {own['salt']!r}")
        self.namespace = namespace_of(metadata, salt=own["salt"])
        self._name = name
        self._allocator = context.local_cpu_backend
        self._link = DaemonLink(link_config, namespace=self.namespace.digest, owner=f"lmcache-{name}")
        log.info("LMCache plugin %s uses kvstore at %s", name, link_config.address)

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the daemon answered within ``timeout_s`` (until then every call is a miss)."""
        return self._link.wait_connected(timeout_s)

    # -- lookups ---------------------------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self.batched_async_contains("", [key]) == 1

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self.batched_contains([key]) == 1

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        """How many leading ``keys`` are cached (blocking: LMCache calls it from its own threads)."""
        if not keys:
            return 0
        ids = [block_key(key) for key in keys]
        hit = self._link.call("lookup", lambda client: client.lookup(ids), None,
                              timeout_s=self._link.config.lookup_timeout_s)
        return 0 if hit is None else hit.count

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        if not keys:
            return 0
        ids = [block_key(key) for key in keys]
        hit = await self._ask("lookup", lambda client: client.lookup(ids), None, self._link.config.lookup_timeout_s)
        return 0 if hit is None else hit.count

    # -- gets ------------------------------------------------------------------------------------

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        found = await self._fetch([key])
        return found[0] if found else None

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        found: list[MemoryObj | None] = list(await self._fetch(keys))
        return found + [None] * (len(keys) - len(found))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        return await self._fetch(keys)

    async def _fetch(self, keys: Sequence[CacheEngineKey]) -> list[MemoryObj]:
        """The leading cached chunks of ``keys`` in new memory objects (one reference each)."""
        if not keys:
            return []
        ids = [block_key(key) for key in keys]
        blocks = await self._ask("get", lambda client: client.get(ids), [])
        found = []
        for block in blocks:
            memory_obj = self._memory_obj(block)
            if memory_obj is None:   # a chunk that cannot be delivered ends the prefix
                break
            found.append(memory_obj)
        return found

    def _memory_obj(self, block: bytearray) -> MemoryObj | None:
        """``block`` copied into a memory object shaped for it, or None (with a warning)."""
        memory_obj = None
        try:
            if not 0 < len(block) <= self.full_chunk_size_bytes:
                raise ValueError(f"a block of {len(block)} bytes (a chunk holds {self.full_chunk_size_bytes})")
            memory_obj = self._allocator.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt, busy_loop=False)
            if memory_obj is None:
                self._link.warn("no free LMCache CPU memory for a chunk from kvstore; treated as a miss")
                return None
            memory_obj.byte_array.cast("B")[: len(block)] = block
            return self.reshape_partial_chunk(memory_obj, len(block))   # checks a partial chunk's size
        except Exception as exc:
            if memory_obj is not None:
                memory_obj.ref_count_down()
            self._link.warn(f"cannot hand a kvstore block to LMCache ({type(exc).__name__}: {exc}); a miss")
            return None

    # -- puts ------------------------------------------------------------------------------------

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        if not keys:
            return
        ids = [block_key(key) for key in keys]
        views = [memory_obj.byte_array for memory_obj in memory_objs]
        hold = _Hold(memory_objs)   # ours until the client is done reading, even after a timeout

        async def put(client: KVClient):
            if not hold.claim():   # cancelled before it started: already released
                return None
            try:
                return await client.put(ids, views)
            finally:
                hold.release()

        future = self._link.submit(put)
        if future is None:   # not connected: the put never started
            hold.cancel()
            return
        future.add_done_callback(lambda done: done.cancelled() and hold.cancel())
        stored = await self._wait("put", future, None)
        if stored is not None and stored.dropped:
            self._link.warn(f"kvstore had no room for {stored.dropped} of {len(keys)} chunks")

    # -- the rest --------------------------------------------------------------------------------

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return self._link.call("delete", lambda client: client.delete([block_key(key)]), 0) > 0

    async def list(self) -> list[str]:
        """Empty: kvstore stores chunks under their keys' bytes in a namespace and lists none."""
        return []

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._link.close)

    def __repr__(self) -> str:
        return f"<KVStoreRemoteConnector {self._name} at {self._link.config.address}>"

    async def _ask(self, what: str, call: Callable[[KVClient], Awaitable[T]], default: T,
                   timeout_s: float | None = None) -> T:
        """``call(client)`` on the link, awaited without blocking LMCache's loop; ``default`` on failure."""
        return await self._wait(what, self._link.submit(call), default, timeout_s)

    async def _wait(self, what: str, future: Future[T] | None, default: T, timeout_s: float | None = None) -> T:
        if future is None:   # not connected (the link has said so)
            return default
        timeout_s = timeout_s or self._link.config.timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:   # wait_for has cancelled the call
            self._link.warn(f"kvstore {what} took longer than {timeout_s:g}s; treated as a miss")
        except Exception as exc:
            self._link.warn(f"kvstore {what} failed ({type(exc).__name__}: {exc}); treated as a miss")
        return default


def _plugin_options(config: Any, name: str) -> dict[str, Any]:
    """The keys under ``remote_storage_plugin.<name>.`` without the loader's own, nor those of
    another plugin whose name extends this one (``kvstore.b`` when this is ``kvstore``)."""
    prefix = f"remote_storage_plugin.{name}."
    others = [f"remote_storage_plugin.{other}." for other in config.remote_storage_plugins or ()
              if other.startswith(f"{name}.")]
    options = {}
    for key, value in (config.extra_config or {}).items():
        if key.startswith(prefix) and not any(key.startswith(other) for other in others):
            if key[len(prefix):] not in LOADER_KEYS:
                options[key[len(prefix):]] = value
    return options


class _Hold:
    """A reference of the connector's own on the memory objects a put reads, dropped exactly once:
    by the put when it ends, or when the put is cancelled before it starts."""

    def __init__(self, memory_objs: Sequence[MemoryObj]) -> None:
        self._memory_objs = memory_objs
        self._lock = threading.Lock()
        self._claimed = False
        for memory_obj in memory_objs:
            memory_obj.ref_count_up()

    def claim(self) -> bool:
        """True once: for the put (which then releases) or for :meth:`cancel`, whichever is first."""
        with self._lock:
            first, self._claimed = not self._claimed, True
        return first

    def release(self) -> None:
        for memory_obj in self._memory_objs:
            memory_obj.ref_count_down()

    def cancel(self) -> None:
        """The put will not read the bytes: release them unless it has already started."""
        if self.claim():
            self.release()
