"""Timing primitives: repeated calls, throughput and latency percentiles."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Result:
    name: str            # what was measured, e.g. "get remote"
    block_bytes: int
    batch: int
    calls: int
    gbps: float          # payload GB/s (1e9 bytes/s); 0 where not meaningful
    p50_ms: float
    p99_ms: float
    baseline: str = ""   # name of the row this one is compared with
    ratio: float = 0.0   # gbps / baseline gbps (or baseline p50 / p50 for latency rows)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(name: str, block_bytes: int, batch: int, seconds: list[float]) -> Result:
    total = sum(seconds)
    payload = block_bytes * batch * len(seconds)
    ms = np.array(seconds) * 1e3
    return Result(
        name=name, block_bytes=block_bytes, batch=batch, calls=len(seconds),
        gbps=payload / total / 1e9 if block_bytes else 0.0,
        p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
    )


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


def compare(row: Result, baseline: Result, *, latency: bool = False) -> Result:
    """``row`` with its ratio against ``baseline`` filled in."""
    if latency:
        ratio = baseline.p50_ms / row.p50_ms if row.p50_ms else 0.0
    else:
        ratio = row.gbps / baseline.gbps if baseline.gbps else 0.0
    return Result(**{**row.as_dict(), "baseline": baseline.name, "ratio": ratio})
