"""The README's client example: run `kvstore serve` first, then `python examples/quickstart.py`."""

import asyncio

import numpy as np

import kvstore
from kvstore.client import KVClient

NS = kvstore.Namespace(model_id="meta-llama/Llama-3.1-8B", dtype="bfloat16", num_layers=32,
                       num_kv_heads=8, head_dim=128, block_size=16)


async def main() -> None:
    prompt = np.random.default_rng(0).integers(0, 128_000, size=1000)   # token ids
    keys = kvstore.block_keys(prompt, block_size=16, namespace=NS)      # 62 full blocks
    kv_blocks = [np.random.default_rng(i).standard_normal(64 * 1024).astype(np.float16) for i in range(len(keys))]

    async with KVClient("127.0.0.1:7070") as kv:
        print("stored:", await kv.put(keys, kv_blocks))                 # spill blocks

        hit = await kv.lookup(keys)                                     # longest cached prefix
        print(f"{hit.count} of {len(keys)} blocks cached, in {hit.tiers[0].label}")

        out = [np.empty_like(b) for b in kv_blocks[: hit.count]]
        loaded = await kv.get_into(keys[: hit.count], out)              # straight into buffers
        assert all(np.array_equal(a, b) for a, b in zip(out, kv_blocks))
        print(f"loaded {loaded} blocks byte-exact")

        stats = await kv.stats()
        dram = stats.tier_named("dram")
        print(f"dram: {dram.blocks} blocks, {dram.used_bytes} bytes")


asyncio.run(main())
