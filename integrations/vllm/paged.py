"""vLLM's paged KV cache seen block by block.

vLLM hands a connector one tensor per attention layer. A kvstore block is one vLLM block across
every layer: for each layer in order, that block's slice of the layer's tensor, in the tensor's
logical order with the block dimension removed (``[kv heads, tokens, content]`` on vLLM >= 0.33,
whose logical layout is the same for every attention backend; where a backend splits a block into
smaller kernel blocks, the pieces are put back in token order, so the bytes do not depend on it).

:class:`PagedLayout` reads that structure from the tensors themselves, checks it against the
model's shape, and moves many blocks at once: :meth:`gather` copies blocks of one layer out into a
staging tensor, :meth:`scatter` copies them back into (other) GPU blocks, each one indexed copy
per layer whatever the number of blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvstore.errors import ConfigError


@dataclass(frozen=True)
class PagedLayout:
    names: tuple[str, ...]          # layer names, in model order
    views: tuple[torch.Tensor, ...]  # per layer: [num_blocks, *block_shape] (a view of vLLM's tensor)
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, kv_caches: Mapping[str, torch.Tensor], *, num_blocks: int, block_size: int, num_kv_heads: int) -> PagedLayout:
        """The layout of ``kv_caches`` (layer name -> tensor), refused with ConfigError when the
        tensors do not have one consistent, recognisable block structure."""
        if not kv_caches:
            raise ConfigError("vLLM registered no KV cache tensors")
        names = sorted(kv_caches, key=_layer_order)
        views = tuple(_block_view(name, kv_caches[name], num_blocks, block_size, num_kv_heads) for name in names)
        first = views[0]
        for name, view in zip(names, views):
            if view.shape != first.shape or view.dtype != first.dtype or view.device != first.device:
                raise ConfigError(
                    f"KV cache layers differ ({names[0]}: {tuple(first.shape)} {first.dtype}, "
                    f"{name}: {tuple(view.shape)} {view.dtype}); KVStoreConnector needs one shape for every layer"
                )
        return cls(tuple(names), views, tuple(first.shape[1:]), first.dtype, first.device)

    @property
    def num_layers(self) -> int:
        return len(self.views)

    @property
    def block_bytes(self) -> int:
        return self.num_layers * math.prod(self.block_shape) * self.dtype.itemsize

    def staging(self, n: int) -> torch.Tensor:
        """An empty ``[n, layers, *block_shape]`` tensor: row ``i`` is block ``i``'s payload."""
        return torch.empty((n, self.num_layers, *self.block_shape), dtype=self.dtype, device=self.device)

    def index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(block_ids, dtype=torch.long).to(self.device)

    def gather(self, layer: int, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of layer ``layer`` into ``out[:, layer]``."""
        out[:, layer] = self.views[layer].index_select(0, block_ids)

    def scatter(self, layer: int, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src[:, layer]`` into blocks ``block_ids`` of layer ``layer``."""
        self.views[layer].index_copy_(0, block_ids, src[:, layer])


def payloads(staging: torch.Tensor) -> list[torch.Tensor]:
    """The bytes of each row of a staging tensor, as the client's buffers."""
    raw = staging.view(staging.shape[0], -1).view(torch.uint8)
    return [raw[i] for i in range(staging.shape[0])]


def _layer_order(name: str) -> tuple[int, str]:
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return (int(numbers[0]) if numbers else -1, name)


def _block_view(name: str, tensor: torch.Tensor, num_blocks: int, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """``tensor`` as ``[num_blocks, *block]`` with block contents in token order."""
    shape = tuple(tensor.shape)
    if tensor.dim() == 4 and shape[0] % num_blocks == 0:
        # vLLM >= 0.33: [B, H, N, C]; B = num_blocks * k when a block is split into k kernel blocks.
        split = shape[0] // num_blocks
        if shape[1] != num_kv_heads or shape[2] * split != block_size:
            raise ConfigError(
                f"KV cache of {name} has shape {shape}; expected [blocks, {num_kv_heads} kv heads, "
                f"{block_size} tokens, content] (or kernel blocks that divide {block_size})"
            )
        if split == 1:
            return tensor
        # [B*k, H, N/k, C] -> [B, k, H, N/k, C] -> [B, H, k, N/k, C]: kernel blocks back in token order.
        return tensor.unflatten(0, (num_blocks, split)).transpose(1, 2)
    dims = [d for d, size in enumerate(shape) if size == num_blocks]
    if len(dims) != 1:
        raise ConfigError(
            f"cannot tell which dimension of {name}'s KV cache {shape} holds its {num_blocks} blocks"
        )
    return tensor.movedim(dims[0], 0)
