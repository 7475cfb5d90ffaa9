"""The data-path interface: how block bytes move between the client and a daemon.

:class:`~kvstore.client.client.KVClient` keeps the control calls (delete, stats, attach) and hands
every lookup, put and get to one :class:`DataPath`: the same-host path
(:class:`~kvstore.client.local.LocalPath`, shared memory) or the remote one
(:class:`~kvstore.client.remote.RemotePath`, gRPC streams). A path gets batches the client has
already checked and sized: ``keys`` within ``max_keys_per_call``, sources as flat byte views or
GPU regions (:class:`~kvstore.client.gpu.DeviceBuffer`). Failures raise :mod:`kvstore.errors` classes (or
``grpc.RpcError``, which the client maps); :class:`~kvstore.errors.StaleSessionError` means the
path's session is gone and the client may attach again. A miss is a short count, never an error.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from kvstore.keys import KEY_BYTES
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.tier_kind import TierKind
from kvstore.client.buffers import Targets
from kvstore.client.gpu import DeviceBuffer
from kvstore.client.results import LookupResult, PutResult, TierList

_TIERS = {kind.value: kind for kind in TierKind}


class DataPath(abc.ABC):
    """One way of moving block bytes; every call takes a batch of keys in chain order."""

    name: ClassVar[str]
    """What ``KVClient.path`` reports while this path is in use (``"local"``, ``"remote"``)."""

    @abc.abstractmethod
    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading ``keys`` are present, and the tier of each of them."""

    @abc.abstractmethod
    async def put(self, keys: Sequence[bytes], sources: Sequence[memoryview | DeviceBuffer]) -> PutResult:
        """Store ``sources[i]`` under ``keys[i]``; keys already present are left as they are."""

    @abc.abstractmethod
    async def get_into(self, keys: Sequence[bytes], targets: Targets) -> int:
        """Copy the leading present blocks into ``targets(start, sizes)``; returns how many."""

    @abc.abstractmethod
    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        """The bytes of the leading present blocks, in order."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the path holds (mappings, leases, sessions); the client's channel stays."""


def lookup_request(keys: Sequence[bytes], namespace: bytes) -> pb.LookupRequest:
    """A ``LookupRequest`` for ``keys``: packed end to end when they are of one length (block
    digests always are), so neither side makes a protobuf object per key."""
    packed = getattr(keys, "packed", None)   # BlockKeys carry it (block_keys' keys are 32 bytes each)
    if packed is not None and keys:
        return pb.LookupRequest(packed_keys=packed, key_bytes=KEY_BYTES, namespace=namespace)
    width = len(keys[0]) if keys else 0
    if width:
        packed = b"".join(keys)
        # all ``width`` long: none shorter, and together exactly n of them
        if len(packed) == width * len(keys) and min(map(len, keys)) == width:
            return pb.LookupRequest(packed_keys=packed, key_bytes=width, namespace=namespace)
    return pb.LookupRequest(keys=keys, namespace=namespace)


def lookup_result(response: pb.LookupResponse) -> LookupResult:
    """The domain form of a ``LookupResponse`` (both paths answer lookups with one)."""
    if response.packed_tiers:
        return LookupResult(count=response.count, tiers=TierList(response.packed_tiers))
    return LookupResult(count=response.count, tiers=list(map(_TIERS.__getitem__, response.tiers)))
