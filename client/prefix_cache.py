"""The worker-side adapter: a model's KV cache in and out of kvstore, block by block.

An engine describes its KV layout once (:class:`KVLayout`) and gets a :class:`PrefixCache` with
the calls it needs:

- ``await cache.lookup(token_ids)``: how many leading tokens of a prompt can be loaded, and from
  which tiers (the scheduler-side question);
- ``await cache.load(token_ids, num_blocks)``: the KV of those leading blocks as per-layer
  ``(key, value)`` tensors of shape ``[1, kv_heads, tokens, head_dim]``, ready to continue from;
- ``await cache.save(token_ids, kv)``: store the full blocks of a sequence's KV (a trailing
  partial block is never stored).

A block's payload is the KV of its ``block_size`` tokens for every layer, laid out
``[layer][key, value][kv_head][token][dim]``. Keys chain over the token ids within a namespace
derived from the layout and model id, so incompatible KV never meets. Nothing here raises into
the model: a miss, a short prefix, an unreachable daemon or a failed load all come back as "load
fewer tokens" (and a warning), and the engine recomputes.

Works with CPU torch tensors, and with CUDA tensors where CUDA and CuPy (the ``gpu`` extra) are
present: the client then moves bytes between the daemon's memory and the GPU directly (not yet run
on a GPU). torch is imported when a call needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.keys import Namespace, block_keys
from kvstore.tier_kind import TierKind

log = logging.getLogger("kvstore.prefix_cache")


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """What makes a model's KV blocks what they are."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str            # torch dtype name: "float32", "float16", "bfloat16", ...
    block_size: int = 16  # tokens per block
    tp_rank: int = 0
    tp_size: int = 1
    salt: str = ""
    namespace: Namespace = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "namespace", Namespace(
            model_id=self.model_id, dtype=self.dtype, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, block_size=self.block_size, tp_rank=self.tp_rank, tp_size=self.tp_size,
            salt=self.salt,
        ))

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def block_bytes(self) -> int:
        import torch

        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * itemsize


@dataclass(frozen=True, slots=True)
class PrefixHit:
    tokens: int              # leading tokens that can be loaded (a multiple of the block size)
    blocks: int
    tiers: list[TierKind]    # where each of those blocks is


@dataclass(frozen=True, slots=True)
class LoadedKV:
    tokens: int
    kv: list[tuple[Any, Any]]   # per layer: (key, value), each [1, kv_heads, tokens, head_dim]
    tiers: list[TierKind]


class PrefixCache:
    def __init__(self, client, layout: KVLayout) -> None:
        self.client = client
        self.layout = layout

    def keys(self, token_ids: Any, *, extra: bytes = b"") -> list[bytes]:
        """Block keys of every full block of ``token_ids``; ``extra`` separates requests whose KV
        differs for the same tokens (a LoRA adapter, multimodal inputs)."""
        return block_keys(_ids(token_ids), block_size=self.layout.block_size, namespace=self.layout.namespace, extra=extra)

    def _loadable_keys(self, token_ids: Any, extra: bytes) -> list[bytes]:
        """Keys of the blocks a prompt may load: never all of it, the model computes at least
        its last token (it needs that token's logits)."""
        ids = _ids(token_ids)
        return self.keys(ids, extra=extra)[: max(len(ids) - 1, 0) // self.layout.block_size]

    async def lookup(self, token_ids: Any, *, extra: bytes = b"") -> PrefixHit:
        """How many leading tokens can be loaded; 0 on any failure."""
        try:
            hit = await self.client.lookup(self._loadable_keys(token_ids, extra))
        except Exception as exc:
            log.warning("kvstore lookup failed; recomputing: %s", exc)
            return PrefixHit(0, 0, [])
        return PrefixHit(hit.count * self.layout.block_size, hit.count, hit.tiers)

    async def load(self, token_ids: Any, num_blocks: int | None = None, *, device: Any = None, extra: bytes = b"") -> LoadedKV:
        """The KV of up to ``num_blocks`` leading blocks (all present ones when None), on
        ``device`` (CPU by default; CUDA needs the ``gpu`` extra).

        Returns fewer blocks (possibly none) when some are missing or fail to load; never raises.
        """
        try:
            return await self._load(token_ids, num_blocks, device, extra)
        except Exception as exc:
            log.warning("kvstore load failed; recomputing: %s", exc)
            return LoadedKV(0, [], [])

    async def _load(self, token_ids: Any, num_blocks: int | None, device: Any, extra: bytes) -> LoadedKV:
        import torch

        L = self.layout
        keys = self._loadable_keys(token_ids, extra)
        if num_blocks is not None:
            keys = keys[:num_blocks]
        if not keys:
            return LoadedKV(0, [], [])
        hit = await self.client.lookup(keys)
        keys = keys[: hit.count]
        if not keys:
            return LoadedKV(0, [], [])
        out = torch.empty(
            (len(keys), L.num_layers, 2, L.num_kv_heads, L.block_size, L.head_dim), dtype=L.torch_dtype, device=device
        )
        if out.is_cuda:  # the memory may still be in use by work queued on torch's stream
            torch.cuda.current_stream(out.device).synchronize()
        raw = out.view(torch.uint8)  # bytes of any dtype (bfloat16 included) for the client
        count = await self.client.get_into(keys, [raw[i] for i in range(len(keys))])
        if count == 0:
            return LoadedKV(0, [], [])
        # [blocks, layer, kv, head, token, dim] -> per layer [1, head, blocks*tokens, dim]
        kv = out[:count].permute(1, 2, 3, 0, 4, 5).reshape(
            L.num_layers, 2, L.num_kv_heads, count * L.block_size, L.head_dim
        )
        layers = [(kv[i, 0].unsqueeze(0).contiguous(), kv[i, 1].unsqueeze(0).contiguous()) for i in range(L.num_layers)]
        return LoadedKV(count * L.block_size, layers, hit.tiers[:count])

    async def save(self, token_ids: Any, kv: Any, *, start_block: int = 0, extra: bytes = b"") -> int:
        """Store the full blocks of ``kv`` from ``start_block`` on; returns how many are stored.

        ``kv``: per-layer ``(key, value)`` pairs of ``[1, kv_heads, tokens, head_dim]`` tensors, a
        transformers cache object with ``.layers`` (``keys``/``values``), or one tensor
        ``[layers, 2, kv_heads, tokens, head_dim]``. KV whose dtype or shape does not match the
        layout, or that does not cover every token (a sliding-window cache), is refused with a
        warning: it would be wrong KV under these keys. Never raises.
        """
        try:
            return await self._save(token_ids, kv, start_block, extra)
        except Exception as exc:
            log.warning("kvstore save failed (the KV is simply not cached): %s", exc)
            return 0

    async def _save(self, token_ids: Any, kv: Any, start_block: int, extra: bytes) -> int:
        import torch

        L = self.layout
        ids = _ids(token_ids)
        keys = self.keys(ids, extra=extra)
        n = len(keys)
        if n <= start_block:
            return 0
        stacked = _stack(kv, start_block * L.block_size, n * L.block_size)
        expected = (L.num_layers, 2, L.num_kv_heads, (n - start_block) * L.block_size, L.head_dim)
        if stacked.dtype != L.torch_dtype or tuple(stacked.shape) != expected:
            raise ValueError(
                f"KV of dtype {stacked.dtype} and shape {tuple(stacked.shape)} does not match the layout "
                f"({L.torch_dtype}, {expected}) for {len(ids)} tokens"
            )
        blocks = stacked.reshape(L.num_layers, 2, L.num_kv_heads, n - start_block, L.block_size, L.head_dim)
        blocks = blocks.permute(3, 0, 1, 2, 4, 5).contiguous().view(torch.uint8)
        result = await self.client.put(keys[start_block:n], [blocks[i] for i in range(n - start_block)])
        return result.stored + result.present


def _ids(token_ids: Any) -> Any:
    """A flat sequence of token ids from a list, array or tensor of one sequence."""
    shape = getattr(token_ids, "shape", None)
    if shape is not None and len(shape) == 2:
        if shape[0] != 1:
            raise ValueError(f"one sequence at a time: token ids of shape {tuple(shape)}")
        token_ids = token_ids[0]
    if hasattr(token_ids, "detach"):  # a torch tensor, possibly on a GPU
        return token_ids.detach().cpu().numpy()
    return token_ids


def _stack(kv: Any, start: int, stop: int):
    """``[layers, 2, kv_heads, stop - start, head_dim]`` from any of the accepted shapes, sliced
    before stacking (one copy). Raises if the KV is not of one sequence or does not reach ``stop``."""
    import torch

    if isinstance(kv, torch.Tensor):
        if kv.shape[3] < stop:
            raise ValueError(f"the KV covers {kv.shape[3]} tokens, not {stop}")
        return kv[:, :, :, start:stop]
    if hasattr(kv, "layers"):
        if any(getattr(layer, "is_sliding", False) for layer in kv.layers):
            raise ValueError("a sliding-window cache does not hold the KV of every token")
        pairs: Sequence = [(layer.keys, layer.values) for layer in kv.layers]
    else:
        pairs = kv
    for k, v in pairs:
        if k.shape[0] != 1 or v.shape[0] != 1:
            raise ValueError(f"one sequence at a time: KV of batch {k.shape[0]}")
        if k.shape[2] < stop or v.shape[2] < stop:
            raise ValueError(f"the KV covers {k.shape[2]} tokens, not {stop}")
    return torch.stack([torch.stack([k[0, :, start:stop], v[0, :, start:stop]]) for k, v in pairs])
