"""The kvstore daemon: ``kvstore serve`` or ``async with KVStoreServer(config)``."""

from __future__ import annotations

from typing import Any

__all__ = ["KVStoreServer"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so the ``kvstore`` command can set gRPC's environment before gRPC loads.
    if name == "KVStoreServer":
        from kvstore.server.server import KVStoreServer

        return KVStoreServer
    raise AttributeError(f"module 'kvstore.server' has no attribute {name!r}")
