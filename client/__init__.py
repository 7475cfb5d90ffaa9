"""The thin client serving workers import: ``KVClient`` (async) and ``SyncKVClient``."""

from kvstore.client.client import KVClient
from kvstore.client.results import LookupResult, PutResult, Stats, TierStats
from kvstore.client.sync import SyncKVClient

__all__ = ["KVClient", "LookupResult", "PutResult", "Stats", "SyncKVClient", "TierStats"]
