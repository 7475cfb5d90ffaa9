"""What a benchmark run measures: block sizes, batch sizes and how much data per case."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Plan:
    block_sizes: tuple[int, ...] = (256 * 1024, 2 * MiB, 8 * MiB)
    batches: tuple[int, ...] = (1, 64)
    bytes_per_case: int = 512 * MiB   # payload moved per (op, size, batch) case
    lookup_keys: int = 8192
    lookup_calls: int = 200

    def calls(self, block_bytes: int, batch: int) -> int:
        return max(3, min(200, self.bytes_per_case // (block_bytes * batch)))
