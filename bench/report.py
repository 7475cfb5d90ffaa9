"""Tables and JSON for benchmark results."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence

from kvstore.bench.measure import Result
from kvstore.config import format_bytes


def table(rows: Sequence[Result]) -> str:
    head = (
        f"{'scenario':<20} {'block':>9} {'batch':>6} {'GB/s':>7} {'p50 ms':>9} {'p99 ms':>9}"
        f" {'vs memcpy':>10} {'vs redis':>9} {'vs raw':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        block = format_bytes(r.block_bytes) if r.block_bytes else "-"
        gbps = f"{r.gbps:.2f}" if r.gbps else "-"
        vs_memcpy = f"{r.vs_memcpy:.2f}" if r.vs_memcpy is not None else ""
        vs_redis = f"{r.vs_redis:.1f}x" if r.vs_redis is not None else ""
        vs_raw = f"{r.vs_raw:.2f}" if r.vs_raw is not None else ""
        lines.append(
            f"{r.name:<20} {block:>9} {r.batch:>6} {gbps:>7} {r.p50_ms:>9.3f} {r.p99_ms:>9.3f}"
            f" {vs_memcpy:>10} {vs_redis:>9} {vs_raw:>7}"
        )
    return "\n".join(lines)


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def write_json(path: str, rows: Sequence[Result], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), **meta, "results": [r.as_dict() for r in rows]}, f, indent=2)
