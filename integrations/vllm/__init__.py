"""kvstore for vLLM (v1): ``KVStoreConnector``, a ``KVConnectorBase_V1`` loaded with
``kv_connector="KVStoreConnector"`` and ``kv_connector_module_path="kvstore.integrations.vllm"``;
and ``KVStoreTier``, a secondary tier of vLLM's native offloading (``TieringOffloadingSpec``).

See docs/integration.md for the flags, the keys and the versions tested.
"""

try:
    import vllm  # noqa: F401
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise ImportError(
        "kvstore.integrations.vllm needs vLLM (pip install vllm; see docs/integration.md for the tested versions)"
    ) from exc

import importlib.util

from kvstore.integrations.vllm.connector import KVStoreConnector
from kvstore.integrations.vllm.metadata import KVStoreMetadata

__all__ = ["KVStoreConnector", "KVStoreMetadata"]

if importlib.util.find_spec("vllm.v1.kv_offload.tiering") is not None:   # vLLM >= 0.33's native tiers
    from kvstore.integrations.vllm.tier import KVStoreTier

    __all__ += ["KVStoreTier"]
