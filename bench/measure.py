"""Timing primitives: repeated calls, throughput and latency percentiles."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Result:
    name: str            # what was measured, e.g. "get local"
    block_bytes: int
    batch: int
    calls: int
    gbps: float          # payload GB/s (1e9 bytes/s); 0 where not meaningful
    p50_ms: float
    p99_ms: float
    vs_memcpy: float | None = None   # gbps / memcpy gbps of the same bytes
    vs_redis: float | None = None    # gbps / Redis gbps of the same operation and bytes
    vs_raw: float | None = None      # gbps / raw file I/O gbps of the same bytes (tier rows)

    def as_dict(self) -> dict:
        return asdict(self)

    def compared(self, **ratios: float | None) -> Result:
        return dataclasses.replace(self, **ratios)


def summarize(name: str, block_bytes: int, batch: int, seconds: list[float]) -> Result:
    total = sum(seconds)
    payload = block_bytes * batch * len(seconds)
    ms = np.array(seconds) * 1e3
    return Result(
        name=name, block_bytes=block_bytes, batch=batch, calls=len(seconds),
        gbps=payload / total / 1e9 if block_bytes else 0.0,
        p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
    )


def ratio(row: Result, baseline: Result | None) -> float | None:
    return row.gbps / baseline.gbps if baseline is not None and baseline.gbps else None


async def time_async(fn: Callable[[int], Awaitable[object]], calls: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``calls`` awaited calls ``fn(i)``, after ``warmup`` untimed ones."""
    for i in range(warmup):
        await fn(-1 - i)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - start)
    return out


def time_sync(fn: Callable[[int], object], calls: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out
