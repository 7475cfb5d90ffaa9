"""The kvstore daemon: ``kvstore serve`` or ``async with KVStoreServer(config)``."""

from kvstore.server.server import KVStoreServer

__all__ = ["KVStoreServer"]
