"""The thin client serving workers import: ``KVClient`` (async) and ``SyncKVClient``."""

from kvstore.client.client import KVClient
from kvstore.client.config import ClientConfig, LocalMode
from kvstore.client.prefix_cache import KVLayout, LoadedKV, PrefixCache, PrefixHit
from kvstore.client.results import LookupResult, PutResult, Stats, TierStats
from kvstore.client.sync import SyncKVClient

__all__ = [
    "ClientConfig", "KVClient", "KVLayout", "LoadedKV", "LocalMode", "LookupResult", "PrefixCache", "PrefixHit",
    "PutResult", "Stats", "SyncKVClient", "TierStats",
]
