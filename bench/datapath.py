"""Put, get and lookup through the client, next to memcpy and Redis on the same bytes.

Every scenario runs on the same machine in the same run as its baselines, and the table reports
the ratios, so the figures mean something on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kvstore.bench.baselines import memcpy_row, redis_rows
from kvstore.bench.measure import Result, ratio, summarize, time_async, time_sync
from kvstore.bench.plan import Plan
from kvstore.client import KVClient
from kvstore.keys import Namespace, block_keys

NS = Namespace(model_id="bench", dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)


async def kvstore_rows(kv: KVClient, blocks: Sequence[np.ndarray], out: Sequence[np.ndarray], calls: int) -> tuple[Result, Result]:
    """Timed puts of fresh keys, then timed gets of one resident batch into ``out``."""
    batch, size = len(blocks), blocks[0].nbytes
    written: list[bytes] = []

    async def put(i: int) -> None:
        keys = [os.urandom(32) for _ in range(batch)]  # fresh keys: every put stores
        written.extend(keys)
        await kv.put(keys, blocks)

    put_row = summarize(f"put {kv.path}", size, batch, await time_async(put, calls))
    await kv.delete(written)

    hot = [os.urandom(32) for _ in range(batch)]
    await kv.put(hot, blocks)

    async def get(i: int) -> None:
        if await kv.get_into(hot, out) != batch:
            raise RuntimeError("benchmark blocks were evicted; give the daemon more DRAM")

    get_row = summarize(f"get {kv.path}", size, batch, await time_async(get, calls))
    await kv.delete(hot)
    return put_row, get_row


async def datapath_rows(clients: Sequence[KVClient], plan: Plan, redis_port: int | None) -> list[Result]:
    rows: list[Result] = []
    for size in plan.block_sizes:
        for batch in plan.batches:
            calls = plan.calls(size, batch)
            blocks = [np.frombuffer(os.urandom(size), np.uint8) for _ in range(batch)]
            out = [np.ones(size, np.uint8) for _ in range(batch)]  # touched: no first-touch faults
            memcpy = memcpy_row(blocks, out, calls)
            redis_put = redis_get = None
            if redis_port is not None:
                redis_put, redis_get = await redis_rows(redis_port, blocks, calls)
            case = [memcpy]
            for kv in clients:
                put, get = await kvstore_rows(kv, blocks, out, calls)
                case += [
                    put.compared(vs_memcpy=ratio(put, memcpy), vs_redis=ratio(put, redis_put)),
                    get.compared(vs_memcpy=ratio(get, memcpy), vs_redis=ratio(get, redis_get)),
                ]
            if redis_put is not None:
                case += [redis_put.compared(vs_memcpy=ratio(redis_put, memcpy)),
                         redis_get.compared(vs_memcpy=ratio(redis_get, memcpy))]
            rows += case
    return rows


async def lookup_rows(kv: KVClient, plan: Plan) -> list[Result]:
    """Prefix lookup of a 128k-token context (8192 blocks of 16 tokens), all present."""
    tokens = np.random.default_rng(0).integers(0, 128_000, plan.lookup_keys * 16)
    hashing = summarize("block_keys (client)", 0, plan.lookup_keys, time_sync(
        lambda _: block_keys(tokens, block_size=16, namespace=NS), 20
    ))
    keys = block_keys(tokens, block_size=16, namespace=NS)
    await kv.put(keys, [b"\0" * 64] * len(keys))

    async def lookup(_: int) -> None:
        if (await kv.lookup(keys)).count != len(keys):
            raise RuntimeError("lookup keys were evicted; give the daemon more DRAM")

    row = summarize("lookup", 0, len(keys), await time_async(lookup, plan.lookup_calls))
    await kv.delete(keys)
    return [hashing, row]
