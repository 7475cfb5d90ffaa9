"""A serving worker reuses a cached prefix through kvstore and gets the same answer, sooner.

Builds a small Llama-architecture model from a config with random weights (fixed seed, nothing is
downloaded), then:

1. request 1: a long shared prefix (system prompt + documents) and a first question; its prefix
   KV is saved to kvstore through the worker-side adapter (kvstore.client.PrefixCache);
2. request 2: the same prefix and a new question, twice: once by full recomputation, once
   loading the prefix KV from kvstore and computing only the question.

It prints both times to first token, the speedup, how many blocks were loaded and from which
tier, and the largest difference between the two runs' logits. With no arguments it starts a
daemon of its own on a free port (and stops it at the end); --target uses a running one.
--from-nvme pushes the prefix out of DRAM into the NVMe tier before request 2.

    pip install -e '.[dev,hf]'
    python examples/hf_prefix_reuse.py [--target HOST:PORT] [--from-nvme]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvstore.client import KVClient, KVLayout, PrefixCache
from kvstore.server.process import DaemonProcess
from kvstore.tier_kind import TierKind


def build_model(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=16384,
    )
    return LlamaForCausalLM(config).eval()


def layout_of(model: LlamaForCausalLM, block_size: int) -> KVLayout:
    c = model.config
    return KVLayout(
        model_id="example/random-llama-seed0", num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, dtype=str(model.dtype).removeprefix("torch."), block_size=block_size,
    )


def cache_from(model: LlamaForCausalLM, kv: list) -> DynamicCache:
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56
        cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


def greedy(model: LlamaForCausalLM, logits: torch.Tensor, cache: DynamicCache, steps: int) -> list[int]:
    """The next ``steps`` greedy tokens, continuing from ``logits`` and ``cache``."""
    tokens = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        out = forward(model, torch.tensor([[token]]), cache)
        logits, cache = out.logits, out.past_key_values
    return tokens


async def push_out_of_dram(kv: KVClient, block_bytes: int) -> None:
    """Fill DRAM with other blocks so the least recently used (our prefix) is demoted to NVMe."""
    stats = await kv.stats()
    dram = stats.tier(TierKind.DRAM)
    filler = os.urandom(block_bytes)
    count = int(1.5 * dram.capacity_bytes / block_bytes) + 1
    async with KVClient(kv.target, namespace=b"example-filler") as other:
        for start in range(0, count, 64):
            n = min(64, count - start)
            await other.put([os.urandom(32) for _ in range(n)], [filler] * n)
    await asyncio.sleep(0.5)  # let background demotion settle


def forward(model: LlamaForCausalLM, ids: torch.Tensor, past: DynamicCache | None = None):
    """A prefill that computes logits for the last position only, as a server does."""
    with torch.no_grad():
        return model(ids, past_key_values=past, use_cache=True, logits_to_keep=1)


async def run(target: str, args: argparse.Namespace) -> str:
    model = build_model(args.layers)
    layout = layout_of(model, args.block_size)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 32000, (1, args.prefix_tokens), generator=g)
    question_1 = torch.randint(0, 32000, (1, args.question_tokens), generator=g)
    question_2 = torch.randint(0, 32000, (1, args.question_tokens), generator=g)
    prompt = torch.cat([prefix, question_2], 1)

    # Warm up both code paths (first calls pay one-off costs), on other tokens than the prefix.
    warm = forward(model, question_1)
    forward(model, question_2, cache_from(model, [(l.keys, l.values) for l in warm.past_key_values.layers]))

    async with KVClient(target) as kv:
        cache = PrefixCache(kv, layout)
        # Request 1: prefix + question; the worker saves the prefix's full blocks.
        first = forward(model, torch.cat([prefix, question_1], 1))
        saved = await cache.save(prefix, first.past_key_values)
        print(f"request 1: {args.prefix_tokens + args.question_tokens} tokens, saved {saved} prefix blocks "
              f"({layout.block_bytes} bytes each) through kvstore at {target} ({kv.path} path)")

        full_times, reuse_times = [], []
        for _ in range(args.repeats):  # interleaved, medians reported
            # Request 2, the old way: recompute everything.
            start = time.perf_counter()
            full = forward(model, prompt)
            full_times.append(time.perf_counter() - start)

            if args.from_nvme:
                await push_out_of_dram(kv, layout.block_bytes)  # (not timed) the prefix goes to NVMe
            # Request 2 with kvstore: load the cached prefix, compute only what is new.
            start = time.perf_counter()
            hit = await cache.lookup(prompt)
            loaded = await cache.load(prompt, hit.blocks)
            past = cache_from(model, loaded.kv) if loaded.tokens else None
            reused = forward(model, prompt[:, loaded.tokens :], past)
            reuse_times.append(time.perf_counter() - start)

    tiers = Counter(t.label for t in loaded.tiers)
    diff = float((reused.logits[0, -1] - full.logits[0, -1]).abs().max())
    same = greedy(model, full.logits, full.past_key_values, 8) == greedy(model, reused.logits, reused.past_key_values, 8)
    ttft_full, ttft_reuse = statistics.median(full_times), statistics.median(reuse_times)
    speedup = ttft_full / ttft_reuse
    spread = f"(median of {args.repeats}: {min(full_times) * 1e3:.0f}-{max(full_times) * 1e3:.0f} ms)"
    print(f"request 2, full recomputation: time to first token {ttft_full * 1e3:.1f} ms {spread}, "
          f"{prompt.shape[1]} tokens")
    print(f"request 2, prefix from kvstore: time to first token {ttft_reuse * 1e3:.1f} ms "
          f"(median of {args.repeats}: {min(reuse_times) * 1e3:.0f}-{max(reuse_times) * 1e3:.0f} ms), "
          f"{loaded.tokens} tokens loaded in {loaded.tokens // layout.block_size} blocks from "
          f"{', '.join(f'{n} {t}' for t, n in tiers.items()) or 'nowhere'}, {prompt.shape[1] - loaded.tokens} computed")
    print(f"speedup {speedup:.1f}x; largest logit difference {diff:.3g}; greedy continuations "
          f"{'identical' if same else 'DIFFERENT'} for 8 tokens")
    if args.from_nvme and set(tiers) != {"nvme"}:
        print("note: not every block came from NVMe (the daemon's DRAM was larger than the filler)")
    return f"max_abs_diff={diff:.6g} speedup={speedup:.2f}x blocks={loaded.tokens // layout.block_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running kvstore daemon (default: start one on a free port)")
    parser.add_argument("--from-nvme", action="store_true", help="demote the prefix to NVMe before request 2")
    parser.add_argument("--prefix-tokens", type=int, default=3072)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of request 2 (medians reported)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.target:
        line = asyncio.run(run(args.target, args))
    else:
        with tempfile.TemporaryDirectory(prefix="kvstore-example-") as tmp:
            daemon_args = ["--dram-bytes", "64MiB" if args.from_nvme else "1GiB"]
            if args.from_nvme:
                daemon_args += ["--nvme-dir", os.path.join(tmp, "nvme"), "--nvme-bytes", "1GiB"]
            with DaemonProcess(daemon_args) as daemon:
                line = asyncio.run(run(daemon.target, args))
    print(line)


if __name__ == "__main__":
    main()
