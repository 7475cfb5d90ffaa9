"""kvstore: a tiered KV-cache store for LLM inference.

This package is the pure core (keys, block records, the prefix index, eviction policies, config,
errors). It imports no gRPC, CUDA or storage library, so ``import kvstore`` is cheap anywhere.
The client lives in :mod:`kvstore.client`, the daemon in :mod:`kvstore.server`.
"""

from kvstore.config import DramConfig, ServerConfig, parse_bytes
from kvstore.errors import (
    BlockTooLargeError,
    ConfigError,
    DeadlineExceededError,
    IntegrityError,
    InternalError,
    InvalidArgumentError,
    KVStoreError,
    LeaseExpiredError,
    PermissionDeniedError,
    RateLimitedError,
    ResourceExhaustedError,
    RetryableError,
    StaleSessionError,
    UnauthenticatedError,
    UnavailableError,
)
from kvstore.keys import KEY_BYTES, MAX_KEY_BYTES, Namespace, block_keys
from kvstore.tier_kind import TierKind

__version__ = "0.1.0"

__all__ = [
    "KEY_BYTES", "MAX_KEY_BYTES", "BlockTooLargeError", "ConfigError", "DeadlineExceededError",
    "DramConfig", "IntegrityError", "InternalError", "InvalidArgumentError", "KVStoreError", "LeaseExpiredError",
    "Namespace", "PermissionDeniedError", "RateLimitedError", "ResourceExhaustedError", "RetryableError", "ServerConfig", "StaleSessionError", "TierKind",
    "UnauthenticatedError", "UnavailableError", "block_keys", "parse_bytes",
]
