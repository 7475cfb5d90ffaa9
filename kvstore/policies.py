"""The eviction policies by kind: the one place that knows every implementation."""

from __future__ import annotations

from kvstore.lru import LRUPolicy
from kvstore.policy import EvictionPolicy, PolicyKind
from kvstore.s3fifo import S3FIFOPolicy


def make_policy(kind: PolicyKind, capacity_bytes: int) -> EvictionPolicy:
    if kind is PolicyKind.S3FIFO:
        return S3FIFOPolicy(capacity_bytes)
    return LRUPolicy()
