"""``KVStoreTier``: kvstore as a secondary tier of vLLM's native KV offloading.

vLLM's tiering offloading (``TieringOffloadingSpec``) keeps a CPU primary tier that the GPU
reads and writes, and cascades every chunk stored there into its secondary tiers; a chunk found
only in a secondary tier is promoted back into the primary tier before the GPU loads it. This
tier is one of those secondary tiers::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector",
        "kv_role": "kv_both", "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8000000000,
            "secondary_tiers": [{"type": "KVStoreTier",
                                 "module_path": "kvstore.integrations.vllm.tier",
                                 "address": "127.0.0.1:7070"}]}}'

How it maps onto kvstore:

- A key is vLLM's ``OffloadKey`` (the chunk's block hash and its 4-byte KV cache group index),
  used as it is; a block is one row of the primary tier's memoryview (``block_size_bytes``: every
  worker's bytes of the chunk and the row's padding), read and written in place.
- The namespace fingerprints what the offloading spec knows about those bytes (model, KV dtype,
  the cache groups' layers and tokens, bytes per block and per chunk, the parallel layout, the KV
  cache layout, the platform), so chunks of different layouts never meet. The spec does not carry
  the head count, the head size or the prefix-caching hash algorithm: the byte sizes stand in for
  the first two, and ``salt`` (or ``model_id``) separates what they cannot.
- ``lookup``: HIT for a chunk this tier stored and the daemon acknowledged; otherwise an
  asynchronous lookup (vLLM's ``AsyncLookupManager``: RETRY until the answer is in, posted once
  per step from ``on_schedule_end``) that asks the daemon for the request's keys in order, so a
  chunk past a gap is a miss (the GPU could not use it).
- ``submit_store`` / ``submit_load``: non-blocking puts and ``get_into`` calls on the daemon
  link; ``get_finished_jobs`` reports the ones that have ended. A promotion that gets fewer
  chunks than asked reports the leading ones as loaded and the rest failed (vLLM frees their
  primary slots and asks again, which is then a miss); bytes are never reported that did not
  arrive.
- ``medium`` is ``Medium.STORAGE`` (hits counted as ``CacheHitSource.DISK``): the daemon is a
  store outside the engine, shared by engines and kept across their restarts, whose blocks may
  be in its DRAM, on NVMe or in S3; ``Medium.CPU`` would count its hits as the engine's own host
  memory, and tier filters (``load_tier_filter``) that pick host memory would pick it too.
- Nothing raises into vLLM once the tier is built: a daemon that is down, slow or failing gives
  misses and failed jobs, with a rate-limited warning
  (:class:`~kvstore.integrations.link.DaemonLink`). A bad tier config is refused when the tier
  is built (``ConfigError`` naming the key).

Tier config keys (besides vLLM's ``type``, ``module_path`` and ``backpressure``): the link's
(``address``, ``local``, ``timeout_s``, ``lookup_timeout_s``, ``connect_timeout_s``,
``retry_s``) and :data:`OPTIONS`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from kvstore.errors import ConfigError
from kvstore.integrations.link import DaemonLink, LinkConfig
from kvstore.keys import MAX_KEY_BYTES, Namespace

log = logging.getLogger("kvstore.integrations.vllm")

OPTIONS: dict[str, Any] = {
    "model_id": None,          # the model's name in the namespace (default: the spec's model name)
    "salt": "",                # separates tenants, or anything the spec cannot tell apart
    "locality": None,          # "LOCAL" or "REMOTE": where the daemon is, for vLLM's tier filters
    "max_known_keys": 100_000,  # how many acknowledged keys answer lookups without asking the daemon
}
# Keys of one get_into call (the client refuses more than its max_keys_per_call).
_LOAD_SLICE = 4096
# How often drain_jobs() says what it is waiting for.
_DRAIN_WARN_S = 5.0


def namespace_of_spec(spec: Any, block_size_bytes: int, *, model_id: str | None = None, salt: str = "") -> Namespace:
    """The namespace of the chunks of an offloading spec whose primary rows are ``block_size_bytes``."""
    config = spec.config
    groups = config.groups
    parallel = config.parallel
    if not groups:
        raise ConfigError("the offloading spec has no KV cache groups to store")
    try:
        from vllm.platforms import current_platform

        platform = str(getattr(current_platform, "device_type", "") or "unknown")
    except Exception:   # pragma: no cover - depends on the environment
        platform = "unknown"
    layout = ";".join((
        "vllm-tier",
        f"groups={'/'.join(f'{g.group_id}:{len(g.layer_names)}x{g.tokens_per_block}' for g in groups)}",
        f"tokens_per_hash={config.cache.tokens_per_hash}",
        f"blocks_per_chunk={config.cache.blocks_per_chunk}",
        f"worker_bytes_per_block={config.worker_kv_bytes_per_block}",
        f"chunk_bytes={block_size_bytes}",
        f"world={parallel.world_size}",
        f"pp={parallel.pp_size}",
        f"pcp={parallel.pcp_size}",
        f"dcp={parallel.dcp_size}",
        f"replicated={bool(getattr(config, 'replicated_layout', False))}",
        f"canonical={bool(getattr(config, 'canonical_layout', False))}",
        f"kv_layout={getattr(config, 'kv_cache_layout', None)}",
        f"platform={platform}",
    ))
    return Namespace(
        model_id=model_id or config.model.name,
        dtype=config.model.dtype,
        num_layers=sum(len(g.layer_names) for g in groups) or 1,
        # Not in the spec; the byte sizes in the salt stand in for them.
        num_kv_heads=1,
        head_dim=1,
        block_size=max(g.tokens_per_block for g in groups) * config.cache.blocks_per_chunk,
        tp_rank=0,   # a primary row holds every worker's bytes of the chunk
        tp_size=max(int(parallel.tp_size), 1),
        salt=f"{layout};salt={salt}" if salt else layout,
    )


def _store_key(key: bytes) -> bytes:
    """The kvstore key of an OffloadKey: itself, or a digest of it when it is too long."""
    key = bytes(key)
    return key if len(key) <= MAX_KEY_BYTES else hashlib.blake2b(key, digest_size=32, person=b"kvstore-vtier").digest()


class _Lookups(AsyncLookupManager):
    """vLLM's asynchronous lookup front end, asking the daemon one request's keys at a time."""

    def __init__(self, tier: KVStoreTier, tier_type: str) -> None:
        self._tier = tier
        super().__init__(tier_type)

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        return self._tier._batch_lookup(keys, req_context)


@dataclass(slots=True)
class _Job:
    job: TransferJob
    future: concurrent.futures.Future | None    # None: failed before it started (no link)
    keys: list[bytes] = field(default_factory=list)   # the keys sent (stores skip known ones)
    failed: bool = False                              # could not even start
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class KVStoreTier(SecondaryTierManager):
    """A vLLM ``SecondaryTierManager`` backed by a kvstore daemon (see the module's docs)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            offloading_spec=offloading_spec, primary_kv_view=primary_kv_view, tier_type=tier_type,
            backpressure_detector=backpressure_detector,
        )
        where = f"the {tier_type!r} secondary tier config"
        link_config, own = LinkConfig.split(options, OPTIONS, where=where)
        self.locality = _locality(own["locality"], where)
        max_known = own["max_known_keys"]
        if isinstance(max_known, bool) or not isinstance(max_known, int) or max_known < 0:
            raise ConfigError(f"max_known_keys must be an int >= 0 in {where}, got {max_known!r}")
        for name in ("model_id", "salt"):
            if own[name] is not None and not isinstance(own[name], str):
                raise ConfigError(f"{name} must be a string in {where}, got {own[name]!r}")
        self.namespace = namespace_of_spec(
            offloading_spec, self.block_size_bytes, model_id=own["model_id"], salt=own["salt"] or "",
        )
        self._rows = _rows_of(primary_kv_view, self.block_size_bytes)
        self._max_known = max_known
        # Keys stored (or found present) by this tier and acknowledged by the daemon: lookups of
        # these are HITs without a round trip. A key the daemon has since evicted fails its
        # promotion, which forgets it.
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._jobs: dict[int, _Job] = {}
        self._lookup_timeout_s = link_config.lookup_timeout_s
        self._link = DaemonLink(link_config, namespace=self.namespace.digest, owner=f"vllm-tier-{tier_type}")
        self._lookups = _Lookups(self, tier_type)
        self._closed = False
        log.info("%s: kvstore secondary tier for %s at %s (%d-byte chunks, %d primary slots)",
                 tier_type, self.namespace.model_id, link_config.address, self.block_size_bytes, len(self._rows))

    # -- helpers -----------------------------------------------------------------------------

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the daemon link is up (tests and tools; vLLM never needs to)."""
        return self._link.wait_connected(timeout_s)

    def _remember(self, keys: Iterable[bytes]) -> None:
        if not self._max_known:
            return
        for key in keys:
            self._known[key] = None
            self._known.move_to_end(key)
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)

    def _forget(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._known.pop(key, None)

    def _batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> list[bool]:
        """One request's keys, present or not (on the lookup thread; never raises)."""
        found = [False] * len(keys)
        # Per cache group, in the request's token order where vLLM recorded it (sliding-window
        # lookups scan backwards), so "leading present" means what the GPU can use.
        runs: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            runs.setdefault(bytes(key[-4:]), []).append(i)
        ordered: list[list[int]] = []
        for indices in runs.values():
            positions = [req_context.get_offload_key_position(keys[i]) for i in indices]
            if all(p is not None for p in positions):
                indices = [i for _, i in sorted(zip(positions, indices))]
            ordered.append(indices)
        batches = [[_store_key(keys[i]) for i in indices] for indices in ordered]

        async def ask(client) -> list[int]:
            return [(await client.lookup(batch)).count for batch in batches]

        counts = self._link.call("lookup", ask, None, timeout_s=self._lookup_timeout_s)
        if counts is None:
            return found
        for indices, count in zip(ordered, counts):
            for i in indices[:count]:
                found[i] = True
        return found

    def _finish(self, job_id: int, entry: _Job) -> JobResult:
        """The result of an ended job (on the scheduler thread)."""
        job = entry.job
        elapsed = (entry.ended or time.monotonic()) - entry.started
        future = entry.future
        if job.is_promotion:
            if entry.failed:
                self._lookups.mark_miss(list(job.keys))
                return JobResult(job_id=job_id, success=False)
            count = 0
            if future is not None:
                count = self._link.result(f"load of {len(entry.keys)} chunks", future, 0, timeout_s=0)
            count = max(0, min(int(count), len(entry.keys)))
            keys = list(job.keys)
            if count == len(keys):
                return JobResult(job_id=job_id, success=True, transfer_time=elapsed,
                                 transfer_bytes=count * self.block_size_bytes)
            failed = keys[count:]
            self._forget(entry.keys[count:])
            self._lookups.mark_miss(failed)
            if future is not None:
                self._link.warn(f"kvstore had {count} of {len(keys)} chunks to promote; the rest are misses")
            return JobResult(job_id=job_id, success=False, successful_keys=keys[:count] or None,
                             transfer_time=elapsed, transfer_bytes=count * self.block_size_bytes)
        if entry.failed:
            return JobResult(job_id=job_id, success=False)
        if not entry.keys:   # every key was known present
            return JobResult(job_id=job_id, success=True, transfer_time=0.0, transfer_bytes=0)
        result = None
        if future is not None:
            result = self._link.result(f"store of {len(entry.keys)} chunks", future, None, timeout_s=0)
        ok = result is not None and result.dropped == 0 and result.stored + result.present == len(entry.keys)
        if ok:
            self._remember(entry.keys)
        elif result is not None:
            self._link.warn(f"kvstore stored {result.stored} and had {result.present} of {len(entry.keys)} "
                            f"chunks; {result.dropped} dropped (the daemon is full of blocks in use)")
        return JobResult(job_id=job_id, success=ok, transfer_time=elapsed,
                         transfer_bytes=len(entry.keys) * self.block_size_bytes if ok else None)

    def _start(self, job: TransferJob, keys: list[bytes], call) -> None:
        future = None if self._closed else self._link.submit(call)
        entry = _Job(job=job, future=future, keys=keys)
        if future is not None:
            def ended(_future, entry=entry) -> None:
                entry.ended = time.monotonic()

            future.add_done_callback(ended)
        self._jobs[job.job_id] = entry

    # -- SecondaryTierManager ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        try:
            skey = _store_key(key)
            if skey in self._known:
                self._known.move_to_end(skey)
                return LookupResult.HIT
            if self._closed or not self._link.connected:
                return LookupResult.MISS
            found = self._lookups.lookup(key, req_context)
        except Exception as exc:   # never into vLLM's scheduler
            self._link.warn(f"lookup failed ({type(exc).__name__}: {exc}); treated as a miss")
            return LookupResult.MISS
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        try:
            keys = [_store_key(k) for k in job_metadata.keys]
            chunk_ids = np.asarray(job_metadata.chunk_ids).tolist()
            pairs = [(k, c) for k, c in zip(keys, chunk_ids) if k not in self._known]
            send = [k for k, _ in pairs]
            rows = [self._rows[c] for _, c in pairs]
            if not send:
                self._jobs[job_metadata.job_id] = _Job(job=job_metadata, future=None, keys=[])
                return
            self._start(job_metadata, send, lambda client: client.put(send, rows))
        except Exception as exc:
            self._link.warn(f"store failed to start ({type(exc).__name__}: {exc})")
            self._jobs[job_metadata.job_id] = _Job(job=job_metadata, future=None, failed=True)

    def submit_load(self, job_metadata: TransferJob) -> None:
        try:
            keys = [_store_key(k) for k in job_metadata.keys]
            rows = [self._rows[c] for c in np.asarray(job_metadata.chunk_ids).tolist()]

            async def load(client) -> int:
                done = 0
                for start in range(0, len(keys), _LOAD_SLICE):
                    want = keys[start:start + _LOAD_SLICE]
                    got = await client.get_into(want, rows[start:start + _LOAD_SLICE])
                    done += got
                    if got < len(want):
                        break
                return done

            self._start(job_metadata, keys, load)
        except Exception as exc:
            self._link.warn(f"load failed to start ({type(exc).__name__}: {exc})")
            self._jobs[job_metadata.job_id] = _Job(job=job_metadata, future=None, failed=True)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        done = [job_id for job_id, entry in self._jobs.items() if entry.future is None or entry.future.done()]
        results = []
        for job_id in done:
            entry = self._jobs.pop(job_id)
            try:
                results.append(self._finish(job_id, entry))
            except Exception as exc:   # pragma: no cover - defensive
                self._link.warn(f"job {job_id} ended badly ({type(exc).__name__}: {exc})")
                results.append(JobResult(job_id=job_id, success=False))
        return results

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        try:
            self._lookups.cleanup(req_context.req_id)
        except Exception as exc:   # pragma: no cover - defensive
            self._link.warn(f"lookup cleanup failed ({type(exc).__name__}: {exc})")

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        try:
            self._lookups.flush()
        except Exception as exc:   # pragma: no cover - defensive
            self._link.warn(f"lookup flush failed ({type(exc).__name__}: {exc})")

    def drain_jobs(self) -> None:
        """Wait for every transfer in flight: they read or write the primary tier's memory."""
        pending = [entry.future for entry in self._jobs.values() if entry.future is not None]
        started = time.monotonic()
        while pending:
            _, not_done = concurrent.futures.wait(pending, timeout=_DRAIN_WARN_S)
            pending = list(not_done)
            if pending:
                log.warning("%s: waiting for %d kvstore transfers to end (%.0fs so far)",
                            self.tier_type, len(pending), time.monotonic() - started)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.drain_jobs()
            self._lookups.shutdown()
        finally:
            self._link.close()
            # Let go of the primary tier's memory, which vLLM releases next.
            self._jobs.clear()
            self._rows = np.empty((0, self.block_size_bytes), dtype=np.uint8)


def _locality(value: Any, where: str) -> Locality | None:
    if value is None:
        return None
    try:
        return Locality(str(value).upper())
    except ValueError:
        raise ConfigError(f"locality must be 'LOCAL' or 'REMOTE' in {where}, got {value!r}") from None


def _rows_of(view: memoryview, row_bytes: int) -> np.ndarray:
    """The primary tier's memory as one row of bytes per chunk slot (no copy)."""
    flat = np.asarray(view)
    if flat.size and not flat.flags.c_contiguous:
        raise ConfigError("the primary tier's memoryview is not contiguous")
    raw = flat.reshape(-1).view(np.uint8) if flat.size else np.empty(0, dtype=np.uint8)
    if raw.size % row_bytes:
        raise ConfigError(f"the primary tier's memory ({raw.size} bytes) is not whole {row_bytes}-byte chunks")
    return raw.reshape(-1, row_bytes)


__all__: Sequence[str] = ["KVStoreTier", "OPTIONS", "namespace_of_spec"]
