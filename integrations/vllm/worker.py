"""The worker side of the vLLM connector: blocks in and out of the paged KV cache.

- Loads run in ``start_load_kv``, before the forward pass that reads them: every request's blocks
  are fetched concurrently into a staging tensor, then copied into the GPU blocks vLLM allocated
  (one indexed copy per layer). A block that is not fetched (evicted since the lookup, failed
  verification, daemon gone, past the deadline) is never copied in: it is reported through
  ``load_errors`` and vLLM recomputes from the first such block.
- Saves are gathered layer by layer as vLLM finishes each layer (``save_kv_layer``; layers it did
  not report are gathered in ``wait_for_save``), so once the step ends nothing reads GPU blocks
  any more; the puts then run in the background from the staging copy. If more than
  ``max_pending_save_bytes`` are still being put, a step's saves are dropped (a future miss, with
  a warning) rather than holding up the model.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.integrations.link import DaemonLink
from kvstore.integrations.vllm.metadata import KVStoreMetadata
from kvstore.integrations.vllm.paged import PagedLayout, payloads


@dataclass(slots=True)
class _StepSave:
    meta: KVStoreMetadata
    ids: torch.Tensor
    staging: torch.Tensor
    gathered: set[int] = field(default_factory=set)


class WorkerSide:
    def __init__(self, link: DaemonLink, *, block_size: int, num_blocks: int, num_kv_heads: int,
                 max_pending_save_bytes: int) -> None:
        self.link = link
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.max_pending_save_bytes = max_pending_save_bytes
        self.layout: PagedLayout | None = None
        self.counts: collections.Counter[str] = collections.Counter()   # loaded, failed, saved, dropped
        self._layer_of: dict[str, int] = {}
        self._load_errors: set[int] = set()
        self._save: _StepSave | None = None
        self._pending: collections.deque = collections.deque()   # (future, bytes, blocks)
        self._pending_bytes = 0

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = PagedLayout.of(
            kv_caches, num_blocks=self.num_blocks, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
        )
        self._layer_of = {name: i for i, name in enumerate(self.layout.names)}

    def load(self, meta: KVStoreMetadata) -> None:
        layout = self.layout
        if layout is None or not meta.loads:
            return
        started = []
        for transfer in meta.loads:
            staging = layout.staging(len(transfer.keys))
            buffers = payloads(staging)
            future = self.link.submit(lambda client, keys=transfer.keys, buffers=buffers: client.get_into(keys, buffers))
            started.append((transfer, staging, future))
        ids, rows = [], []
        deadline = time.monotonic() + self.link.config.timeout_s   # one deadline for the step's loads
        for transfer, staging, future in started:
            left = max(deadline - time.monotonic(), 0.001)
            count = 0 if future is None else self.link.result("load", future, 0, timeout_s=left)
            if count < len(transfer.keys):
                self._load_errors.update(transfer.block_ids[count:])
                self.counts["failed"] += len(transfer.keys) - count
            if count:
                ids += transfer.block_ids[:count]
                rows.append(staging[:count])
                self.counts["loaded"] += count
        if ids:
            index, src = layout.index(ids), rows[0] if len(rows) == 1 else torch.cat(rows)
            for layer in range(layout.num_layers):
                layout.scatter(layer, index, src)

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _step_save(self, meta: KVStoreMetadata) -> _StepSave | None:
        if self.layout is None or not meta.saves:
            return None
        if self._save is None or self._save.meta is not meta:
            ids = [block for transfer in meta.saves for block in transfer.block_ids]
            self._save = _StepSave(meta, self.layout.index(ids), self.layout.staging(len(ids)))
        return self._save

    def save_layer(self, meta: KVStoreMetadata, layer_name: str) -> None:
        step = self._step_save(meta)
        layer = self._layer_of.get(layer_name)
        if step is None or layer is None or layer in step.gathered:
            return
        self.layout.gather(layer, step.ids, step.staging)
        step.gathered.add(layer)

    def wait_for_save(self, meta: KVStoreMetadata) -> None:
        step = self._step_save(meta)
        self._save = None
        if step is None:
            return
        for layer in range(self.layout.num_layers):
            if layer not in step.gathered:
                self.layout.gather(layer, step.ids, step.staging)
        if step.staging.is_cuda:   # the gathers are queued on torch's stream; the puts read them
            torch.cuda.current_stream(step.staging.device).synchronize()
        self._reap()
        block_bytes = self.layout.block_bytes
        nbytes = len(step.ids) * block_bytes
        if self._pending_bytes + nbytes > self.max_pending_save_bytes:
            self.counts["dropped"] += len(step.ids)
            self.link.warn(f"{self._pending_bytes} bytes of saves still in flight; this step's "
                           f"{len(step.ids)} blocks are not saved")
            return
        row = 0
        for transfer in meta.saves:
            n = len(transfer.keys)
            buffers = payloads(step.staging[row:row + n])
            row += n
            future = self.link.submit(lambda client, keys=transfer.keys, buffers=buffers: client.put(keys, buffers))
            if future is None:
                self.counts["dropped"] += n
                continue
            self._pending.append((future, n * block_bytes, n))
            self._pending_bytes += n * block_bytes

    def _reap(self, *, wait_s: float = 0.0) -> None:
        """Account for saves that finished (waiting up to ``wait_s`` for each)."""
        while self._pending and (wait_s or self._pending[0][0].done()):
            future, nbytes, blocks = self._pending.popleft()
            self._pending_bytes -= nbytes
            result = self.link.result("save", future, None, timeout_s=wait_s or None)
            if result is None:
                self.counts["dropped"] += blocks
            else:
                self.counts["saved"] += result.stored + result.present
                self.counts["dropped"] += result.dropped

    def flush(self, timeout_s: float) -> None:
        """Wait for the saves in flight (tests, shutdown)."""
        self._reap(wait_s=timeout_s)
