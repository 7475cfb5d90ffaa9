"""First fill of a default daemon: puts into never-used arena pages against memcpy of the same bytes.

    python -m kvstore.bench.first_fill

Starts a daemon with only ``--dram-bytes 2GiB`` (``DaemonProcess`` adds ``--nvme-dir off`` and a
free port), twice: populated in the background (the default; the client attaches once the daemon
logs that the arena is populated) and with ``dram.populate = false``. Each puts three batches of
64 fresh 2 MiB blocks through the same-host path.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import numpy as np

from kvstore.client import KVClient
from kvstore.server.process import DaemonProcess

MiB = 1 << 20
BLOCKS, BLOCK_BYTES, ROUNDS = 64, 2 * MiB, 3


async def _measure(target: str) -> tuple[float, list[float]]:
    """(memcpy seconds, put seconds per round) for the same 128 MiB."""
    async with KVClient(target, local="require") as kv:
        blocks = [np.random.default_rng(i).integers(0, 255, BLOCK_BYTES, dtype=np.uint8) for i in range(BLOCKS)]
        dest = [np.empty_like(b) for b in blocks]
        for a, b in zip(dest, blocks):  # warm both sides first
            np.copyto(a, b)
        start = time.perf_counter()
        for a, b in zip(dest, blocks):
            np.copyto(a, b)
        memcpy_s = time.perf_counter() - start
        puts = []
        for _ in range(ROUNDS):
            keys = [os.urandom(32) for _ in blocks]  # fresh keys: fresh arena pages
            start = time.perf_counter()
            await kv.put(keys, blocks)
            puts.append(time.perf_counter() - start)
        return memcpy_s, puts


def run(args: list[str], label: str, wait_for_populate: bool) -> None:
    with DaemonProcess(args) as daemon:
        deadline = time.monotonic() + 60
        while wait_for_populate and "arena populated" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        memcpy_s, puts = asyncio.run(_measure(daemon.target))
    gb = BLOCKS * BLOCK_BYTES / 1e9
    rounds = ", ".join(f"{gb / s:.2f} GB/s ({memcpy_s / s:.2f}x)" for s in puts)
    print(f"{label:<40} memcpy {gb / memcpy_s:.2f} GB/s; first-fill puts {rounds}")


def main() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write("[dram]\npopulate = false\n")
    try:
        for _ in range(2):
            run(["--dram-bytes", "2GiB"], "default (populated in the background)", True)
            run(["--dram-bytes", "2GiB", "--config", cfg.name], "dram.populate = false", False)
    finally:
        os.unlink(cfg.name)


if __name__ == "__main__":
    main()
