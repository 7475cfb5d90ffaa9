"""What the scheduler side tells the workers each step: blocks to load and blocks to save."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(slots=True)
class Transfer:
    """Blocks of one request: ``keys[i]`` is the kvstore key of the GPU block ``block_ids[i]``."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class KVStoreMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
