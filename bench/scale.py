"""``kvstore bench --scale N``: how the daemon behaves with N blocks in it.

- **put**: N fresh 4 KiB blocks through the same-host path in batches of 8192 (blocks/s of the put
  calls; their keys are ``block_keys`` of random tokens, computed outside the timing).
- **memory**: the daemon's anonymous memory (``RssAnon``, the arena is shared memory and not in
  it) after the puts minus before, per block.
- **lookup**: the 8192 keys of one put batch (as ``block_keys`` returned them) at that index size,
  on both paths (p50/p99 of 50 calls), and a lookup of one key: the path's per-call floor, so
  what the index adds can be told from what the transport costs.
- **write-through**: up to 20,000 blocks of 16 KiB put with ``--write-through`` in batches of
  256, against raw ``pwrite`` of the same blocks with one ``fdatasync`` per batch, same filesystem:
  with ``O_DIRECT`` (how the NVMe tier opens its file by default) and through the page cache; in
  four alternating rounds, so the three see the same disk.
- **full**: the same two puts into levels already full, where every put must evict first (a
  cache in service is full): 4 KiB puts into a DRAM-only daemon a quarter the size of N blocks
  (at least 64 MiB), after it filled once, and write-through puts into an NVMe tier holding a
  quarter of the write-through blocks, after it filled once.
- **restart**: a daemon started on an NVMe directory whose index names N blocks (written here in
  the tier's on-disk format), until it answers.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 4096
BATCH = 8192
TOKENS = 16   # per block: the keys are block_keys of random token ids
WT_BLOCK, WT_BATCH, WT_MAX, WT_ROUNDS = 16 << 10, 256, 20_000, 4


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _pcts(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2] * 1e3, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3


async def _fill_and_look(target: str, n: int, pid: int) -> dict:
    from kvstore import block_keys
    from kvstore.client import KVClient

    out: dict = {}
    payload = [os.urandom(BLOCK)] * BATCH
    async with KVClient(target, local="require", timeout_s=600) as kv, KVClient(target, local="off", timeout_s=600) as remote:
        before = _rss_anon(pid)
        keys: list[bytes] = []
        putting = 0.0
        for done in range(0, n, BATCH):
            # Chained keys of a fresh random context, as an engine's connector computes them.
            count = min(BATCH, n - done)
            tokens = np.frombuffer(os.urandom(count * TOKENS * 4), dtype=np.uint32)
            batch = block_keys(tokens, block_size=TOKENS, namespace=b"kvstore-bench-scale")
            start = time.perf_counter()
            result = await kv.put(batch, payload[:count])
            putting += time.perf_counter() - start
            if result.stored != count:
                raise SystemExit(f"kvstore bench --scale: only {result.stored} of {count} blocks stored")
            if count == BATCH:
                keys = batch  # the lookups ask for a whole batch: 8192 keys
        out["put_blocks_per_s"] = n / putting
        out["bytes_per_block"] = (_rss_anon(pid) - before) / n
        for name, client in (("local", kv), ("remote", remote)):
            samples = []
            for _ in range(50):
                start = time.perf_counter()
                hit = await client.lookup(keys)
                samples.append(time.perf_counter() - start)
            if hit.count != len(keys):
                raise SystemExit("kvstore bench --scale: the lookup missed blocks it just stored")
            out[f"lookup_{name}_ms"] = _pcts(samples)
            samples = []
            for _ in range(50):   # the call's floor on this path: what 8192 keys cost beyond it is the index
                start = time.perf_counter()
                await client.lookup(keys[:1])
                samples.append(time.perf_counter() - start)
            out[f"lookup1_{name}_ms"] = _pcts(samples)
    return out


async def _write_through(target: str, n: int, directory: str) -> dict:
    """Blocks/s of write-through puts and of the raw writes, in alternating rounds (this disk's
    speed drifts within a minute: measured one after the other, the ratio moved 2x run to run)."""
    from kvstore.client import KVClient

    blocks = [os.urandom(WT_BLOCK) for _ in range(WT_BATCH)]
    per_round = max(n // WT_ROUNDS // WT_BATCH, 1)
    spent = {"write_through": 0.0, "raw_direct_write": 0.0, "raw_write": 0.0}
    async with KVClient(target, local="require", timeout_s=600) as kv:
        await kv.put([os.urandom(32) for _ in blocks], blocks)   # the session's first call, untimed
        for _ in range(WT_ROUNDS):
            start = time.perf_counter()
            for _ in range(per_round):
                result = await kv.put([os.urandom(32) for _ in blocks], blocks)
                if result.persisted != len(blocks):
                    raise SystemExit("kvstore bench --scale: a write-through put was not persisted")
            spent["write_through"] += time.perf_counter() - start
            for name, direct in (("raw_direct_write", True), ("raw_write", False)):
                took = _raw_write_through(directory, per_round * WT_BATCH, direct=direct)
                spent[name] = None if took is None or spent[name] is None else spent[name] + took
    total = WT_ROUNDS * per_round * WT_BATCH
    return {f"{name}_blocks_per_s": (total / took if took else None) for name, took in spent.items()}


async def _put_full(target: str, n: int, block: int, batch: int, capacity_blocks: int) -> float:
    """Blocks/s of ``n`` puts of fresh keys into a daemon already holding ``capacity_blocks``."""
    from kvstore.client import KVClient

    payload = [os.urandom(block)] * batch
    async with KVClient(target, local="require", timeout_s=600) as kv:
        for _ in range(-(-capacity_blocks // batch)):   # fill it (untimed)
            await kv.put([os.urandom(32) for _ in payload], payload)
        start, rounds = time.perf_counter(), max(n // batch, 1)
        for _ in range(rounds):
            result = await kv.put([os.urandom(32) for _ in payload], payload)
            if result.stored + result.present != batch:
                raise SystemExit("kvstore bench --scale: a put into a full daemon dropped blocks")
        return rounds * batch / (time.perf_counter() - start)


def _raw_write_through(directory: str, n: int, *, direct: bool) -> float | None:
    """Seconds for batches of ``pwrite`` then one ``fdatasync``, from page-aligned buffers, with
    ``O_DIRECT`` (the NVMe tier's default mode) or through the page cache; None when the filesystem
    refuses O_DIRECT."""
    blocks = []
    for _ in range(WT_BATCH):
        buf = mmap.mmap(-1, WT_BLOCK)   # page aligned, as O_DIRECT wants
        buf.write(os.urandom(WT_BLOCK))
        blocks.append(buf)
    path = os.path.join(directory, "raw-direct.dat" if direct else "raw.dat")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, n * WT_BLOCK)
        start = time.perf_counter()
        for r in range(n // WT_BATCH):
            for i, block in enumerate(blocks):
                os.pwritev(fd, [block], (r * WT_BATCH + i) * WT_BLOCK)
            os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def _index_of(directory: str, n: int) -> int:
    """An NVMe directory whose index names ``n`` 4 KiB blocks (the bytes are not read at start)."""
    from kvstore.keys import scoped
    from kvstore.tiers.nvme import DATA_FILE, INDEX_DIR
    from kvstore.tiers.nvme_index import IndexEntry, NvmeIndex

    capacity = n * BLOCK
    with open(os.path.join(directory, DATA_FILE), "wb") as data:
        data.truncate(capacity)
    index = NvmeIndex(os.path.join(directory, INDEX_DIR), max(1 << 30, n * 256))
    try:
        index._put([
            IndexEntry(key, i * BLOCK, BLOCK, BLOCK, i, 1000.0 + i)
            for i, key in enumerate(scoped([os.urandom(32) for _ in range(n)], b""))
        ])
    finally:
        index.close()
    return capacity


def _restart_s(directory: str, capacity: int, n: int) -> float:
    ready = os.path.join(directory, "ready.json")
    cmd = [
        sys.executable, "-m", "kvstore.server.cli", "serve", "--port", "0", "--metrics-port", "0",
        "--dram-bytes", "256MiB", "--nvme-dir", directory, "--nvme-bytes", str(capacity),
        "--ready-file", ready, "--log-level", "warning",
    ]
    config = os.path.join(directory, "scale.toml")
    Path(config).write_text(f'[nvme]\nindex_map_bytes = {max(1 << 30, n * 256)}\n')
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise SystemExit(f"kvstore bench --scale: the daemon did not start: {proc.stderr.read().decode()}")
            time.sleep(0.01)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)


def run(n: int, directory: str | None, json_path: str | None) -> int:
    from kvstore.server.process import DaemonProcess

    results: dict = {"blocks": n}
    dram = f"{max(n * BLOCK * 5 // 4, 64 << 20)}"
    with DaemonProcess(["--dram-bytes", dram, "--dram-prefault"], start_timeout_s=300) as daemon:
        results.update(asyncio.run(_fill_and_look(daemon.target, n, daemon.proc.pid)))
    root = tempfile.mkdtemp(prefix="kvstore-scale-", dir=directory)
    try:
        wt_n = min(n, WT_MAX)
        nvme = os.path.join(root, "wt")
        with DaemonProcess(["--dram-bytes", str(max(wt_n * WT_BLOCK * 2, 64 << 20)), "--nvme-dir", nvme,
                            "--nvme-bytes", str(wt_n * WT_BLOCK * 2), "--write-through"]) as daemon:
            results.update(asyncio.run(_write_through(daemon.target, wt_n, root)))
        full_dram = max(n * BLOCK // 4, 64 << 20)
        with DaemonProcess(["--dram-bytes", str(full_dram), "--nvme-dir", "off"]) as daemon:
            results["full_put_blocks_per_s"] = asyncio.run(
                _put_full(daemon.target, max(n, 2 * full_dram // BLOCK), BLOCK, BATCH, full_dram // BLOCK))
        full_wt = max(wt_n // 4, WT_BATCH * 4)
        with DaemonProcess(["--dram-bytes", str(max(wt_n * WT_BLOCK * 2, 64 << 20)), "--nvme-dir", os.path.join(root, "full"),
                            "--nvme-bytes", str(full_wt * WT_BLOCK), "--write-through"]) as daemon:
            results["full_write_through_blocks_per_s"] = asyncio.run(
                _put_full(daemon.target, wt_n, WT_BLOCK, WT_BATCH, full_wt))
        restart_dir = os.path.join(root, "restart")
        os.makedirs(restart_dir)
        results["restart_s"] = _restart_s(restart_dir, _index_of(restart_dir, n), n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wt, raw = results["write_through_blocks_per_s"], results["raw_write_blocks_per_s"]
    raw_direct = results["raw_direct_write_blocks_per_s"]
    print(f"kvstore bench --scale {n}")
    print(f"  put (same-host, 4 KiB, batches of {BATCH}): {results['put_blocks_per_s']:,.0f} blocks/s")
    print(f"  daemon memory per block:                   {results['bytes_per_block']:,.0f} bytes")
    for path in ("local", "remote"):
        p50, p99 = results[f"lookup_{path}_ms"]
        print(f"  lookup of 8192 keys, {path:<6}                {p50:.2f} ms p50, {p99:.2f} ms p99")
        p50, p99 = results[f"lookup1_{path}_ms"]
        print(f"    (one key, the call's floor:              {p50:.2f} ms p50, {p99:.2f} ms p99)")
    print(f"  write-through (16 KiB, batches of {WT_BATCH}):      {wt:,.0f} blocks/s")
    if raw_direct:
        print(f"    vs raw O_DIRECT pwrite+fdatasync (the tier's mode): {wt / raw_direct:.2f}x ({raw_direct:,.0f} blocks/s)")
    print(f"    vs raw buffered pwrite+fdatasync:                  {wt / raw:.2f}x ({raw:,.0f} blocks/s)")
    print(f"  into full levels (every put evicts first): put {results['full_put_blocks_per_s']:,.0f} blocks/s, "
          f"write-through {results['full_write_through_blocks_per_s']:,.0f} blocks/s")
    print(f"  restart to ready with {n:,} blocks indexed:    {results['restart_s']:.2f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0
