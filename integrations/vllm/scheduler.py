"""The scheduler side of the vLLM connector: how much of a request kvstore holds, and what each
step must load and save.

Contract with vLLM's scheduler (``KVConnectorBase_V1``):

- ``matched_tokens`` never blocks past ``lookup_wait_s``: a lookup still in flight answers None
  ("ask again later"), and one older than ``lookup_timeout_s`` counts as a miss. It counts only
  blocks kvstore holds from the first block on, beyond vLLM's own prefix-cache hit, and never the
  whole prompt (the model computes at least the last token).
- ``after_alloc`` records which of the request's GPU blocks the hit goes into.
- ``build`` emits the step's loads, and a save for every block that becomes full and computed in
  this step and that kvstore did not already hold; the worker copies those blocks out during the
  step, so nothing vLLM frees is read later and ``request_finished`` never delays a free.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.integrations.link import DaemonLink
from kvstore.integrations.vllm.identity import block_keys
from kvstore.integrations.vllm.metadata import KVStoreMetadata, Transfer


@dataclass(slots=True)
class _Request:
    request: Any
    keys: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    lookup: concurrent.futures.Future | None = None
    lookup_started: float = 0.0
    hits: int | None = None     # leading blocks kvstore held at the last lookup (None: not asked)
    local_blocks: int = 0       # vLLM's own prefix-cache hit when the hit was counted
    saved: int = 0              # leading blocks that are in kvstore or already sent to be saved

    def current_keys(self) -> list[bytes]:
        hashes = self.request.block_hashes
        if len(self.keys) < len(hashes):
            self.keys += block_keys(hashes[len(self.keys):], self.request.cache_salt)
        return self.keys


class SchedulerSide:
    def __init__(self, link: DaemonLink, *, block_size: int, lookup_wait_s: float, load: bool, save: bool) -> None:
        self.link = link
        self.block_size = block_size
        self.lookup_wait_s = lookup_wait_s
        self.load = load
        self.save = save
        self._requests: dict[str, _Request] = {}
        self._loads: list[Transfer] = []

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _Request(request)
        if state.hits is None and not self._settle_lookup(state):
            return None, False
        state.local_blocks = num_computed_tokens // self.block_size
        state.saved = max(state.saved, state.hits)
        if not self.load:
            return 0, False
        loadable = min(state.hits, (request.num_tokens - 1) // self.block_size)
        return max(loadable * self.block_size - num_computed_tokens, 0), False

    def _settle_lookup(self, state: _Request) -> bool:
        """Start or finish the request's lookup; False while it is still in flight."""
        if state.lookup is None:
            keys = state.current_keys()
            state.lookup = self.link.submit(lambda client: client.lookup(keys)) if keys else None
            state.lookup_started = time.monotonic()
            if state.lookup is None:    # nothing to look up, or the daemon is not reachable
                state.hits = 0
                return True
        try:
            state.hits = state.lookup.result(timeout=self.lookup_wait_s).count
        except concurrent.futures.TimeoutError:
            waited = time.monotonic() - state.lookup_started
            if waited < self.link.config.lookup_timeout_s:
                return False
            state.lookup.cancel()
            self.link.warn(f"a kvstore lookup took longer than {self.link.config.lookup_timeout_s:g}s; treated as a miss")
            state.hits = 0
        except Exception as exc:
            self.link.warn(f"kvstore lookup failed ({type(exc).__name__}: {exc}); treated as a miss")
            state.hits = 0
        state.lookup = None
        return True

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        if num_external_tokens > 0:
            ids = blocks.get_block_ids()[0]
            start = state.local_blocks
            stop = start + num_external_tokens // self.block_size
            self._loads.append(Transfer(request.request_id, state.current_keys()[start:stop], list(ids[start:stop])))
        state.hits = None   # a later call (the request resumed after preemption) looks up afresh

    def build(self, scheduler_output: Any) -> KVStoreMetadata:
        self._track_block_ids(scheduler_output)
        meta = KVStoreMetadata(loads=self._loads)
        self._loads = []
        if not self.save:
            return meta
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            request = state.request
            full = min(len(request.block_hashes), (request.num_computed_tokens + scheduled) // self.block_size)
            full = min(full, len(state.block_ids))
            if full > state.saved:
                keys = state.current_keys()
                meta.saves.append(Transfer(req_id, keys[state.saved:full], state.block_ids[state.saved:full]))
                state.saved = full
        return meta

    def _track_block_ids(self, scheduler_output: Any) -> None:
        """Each request's GPU blocks, in order, from what the step scheduled."""
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None)
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            was_resumed = req_id in resumed if resumed is not None else cached.resumed_from_preemption[i]
            if was_resumed:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids += new_ids[0]

    def finished(self, request: Any) -> tuple[bool, None]:
        state = self._requests.pop(request.request_id, None)
        if state is not None and state.lookup is not None:
            state.lookup.cancel()
        return False, None
