"""Put, get and lookup through the client against a daemon, next to memcpy of the same bytes.

Every scenario runs on the same machine in the same run as its baseline, and the table reports
the ratio, so the figures mean something on any machine.
"""

from __future__ import annotations

import os
import numpy as np

from kvstore.bench.measure import Result, compare, summarize, time_async, time_sync
from kvstore.bench.plan import Plan
from kvstore.client import KVClient
from kvstore.keys import Namespace, block_keys

NS = Namespace(model_id="bench", dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)


def memcpy_row(block_bytes: int, batch: int, calls: int) -> Result:
    """numpy copies of the same bytes between warmed buffers: the bandwidth limit."""
    src = [np.frombuffer(os.urandom(block_bytes), np.uint8) for _ in range(batch)]
    dst = [np.ones(block_bytes, np.uint8) for _ in range(batch)]

    def copy(_: int) -> None:
        for s, d in zip(src, dst):
            np.copyto(d, s)

    return summarize("memcpy", block_bytes, batch, time_sync(copy, calls))


async def datapath_rows(kv: KVClient, plan: Plan, path: str = "remote") -> list[Result]:
    rows: list[Result] = []
    for block_bytes in plan.block_sizes:
        for batch in plan.batches:
            calls = plan.calls(block_bytes, batch)
            base = memcpy_row(block_bytes, batch, calls)
            blocks = [np.frombuffer(os.urandom(block_bytes), np.uint8) for _ in range(batch)]

            written: list[bytes] = []

            async def put(i: int) -> None:
                keys = [os.urandom(32) for _ in range(batch)]  # fresh keys: every put stores
                written.extend(keys)
                await kv.put(keys, blocks)

            put_row = summarize(f"put {path}", block_bytes, batch, await time_async(put, calls))
            await kv.delete(written)

            hot = [os.urandom(32) for _ in range(batch)]
            await kv.put(hot, blocks)
            out = [np.empty(block_bytes, np.uint8) for _ in range(batch)]

            async def get(i: int) -> None:
                if await kv.get_into(hot, out) != batch:
                    raise RuntimeError("benchmark blocks were evicted; give the daemon more DRAM")

            get_row = summarize(f"get {path}", block_bytes, batch, await time_async(get, calls))
            await kv.delete(hot)
            rows += [base, compare(put_row, base), compare(get_row, base)]
    return rows


async def lookup_rows(kv: KVClient, plan: Plan) -> list[Result]:
    """Prefix lookup of a 128k-token context (8192 blocks of 16 tokens), all present."""
    tokens = np.random.default_rng(0).integers(0, 128_000, plan.lookup_keys * 16)
    hashing = summarize("block_keys (client)", 0, plan.lookup_keys, time_sync(
        lambda _: block_keys(tokens, block_size=16, namespace=NS), 20
    ))
    keys = block_keys(tokens, block_size=16, namespace=NS)
    for start in range(0, len(keys), 1024):
        await kv.put(keys[start : start + 1024], [b"\0" * 64] * len(keys[start : start + 1024]))

    async def lookup(_: int) -> None:
        if (await kv.lookup(keys)).count != len(keys):
            raise RuntimeError("lookup keys were evicted; give the daemon more DRAM")

    row = summarize("lookup", 0, len(keys), await time_async(lookup, plan.lookup_calls))
    await kv.delete(keys)
    return [hashing, row]
