"""Engine connectors: kvstore behind the plug-in interfaces of serving engines.

- :mod:`kvstore.integrations.vllm`: ``KVStoreConnector`` (a vLLM ``KVConnectorBase_V1``) and
  ``KVStoreTier`` (a secondary tier of vLLM's native offloading);
- :mod:`kvstore.integrations.sglang`: ``KVStoreHiCacheStorage`` (SGLang's HiCache ``dynamic``
  storage backend);
- :mod:`kvstore.integrations.lmcache`: ``KVStoreConnectorAdapter`` (an LMCache remote-storage
  plugin).

Importing this package needs no engine; each submodule imports its engine and says which package
to install when it is missing. Every connector reaches its daemon through a
:class:`~kvstore.integrations.link.DaemonLink`, which turns an unreachable or slow daemon into
misses and a log line, never an exception in the engine's loop.
"""

from kvstore.integrations.link import DaemonLink, LinkConfig

__all__ = ["DaemonLink", "LinkConfig"]
