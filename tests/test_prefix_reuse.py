"""The worker-side adapter on a real (small, random) transformer: reusing cached prefix KV gives
the same logits and the same greedy tokens as recomputing it, and every failure degrades to
recomputation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from kvstore import TierKind  # noqa: E402
from kvstore.client import KVClient, KVLayout, PrefixCache  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    )
    return transformers.LlamaForCausalLM(config).eval()


def layout_of(model, block_size=16):
    c = model.config
    return KVLayout(model_id="test/tiny-llama", num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim, dtype="float32", block_size=block_size)


def continue_greedy(model, logits, cache, steps=6):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(logits[0, -1].argmax())
            out.append(token)
            step = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits, cache = step.logits, step.past_key_values
    return out


def cache_from(model, kv):
    try:
        cache = transformers.DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56
        cache = transformers.DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@pytest.mark.parametrize("mode", ["require", "off"])
async def test_reused_prefix_matches_full_recomputation(server, mode):
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 500, (1, 520), generator=g)        # 32 full blocks and 8 tokens over
    question = torch.randint(0, 500, (1, 12), generator=g)
    prompt = torch.cat([prefix, question], 1)
    async with KVClient(f"127.0.0.1:{server.port}", local=mode) as kv:
        cache = PrefixCache(kv, layout_of(model))
        with torch.no_grad():
            first = model(prefix, use_cache=True)
        assert await cache.save(prefix, first.past_key_values) == 32   # the partial block is not stored

        hit = await cache.lookup(prompt)
        assert (hit.tokens, hit.blocks, set(hit.tiers)) == (512, 32, {TierKind.DRAM})
        loaded = await cache.load(prompt, hit.blocks)
        assert loaded.tokens == 512 and len(loaded.kv) == 3 and loaded.kv[0][0].shape == (1, 2, 512, 32)
        with torch.no_grad():
            full = model(prompt, use_cache=True)
            reused = model(prompt[:, 512:], past_key_values=cache_from(model, loaded.kv), use_cache=True)
        torch.testing.assert_close(reused.logits[0, -1], full.logits[0, -1], rtol=1e-5, atol=1e-5)
        assert continue_greedy(model, reused.logits, reused.past_key_values) == continue_greedy(
            model, full.logits, full.past_key_values
        )


async def test_a_gap_loads_the_blocks_before_it_and_the_rest_is_recomputed(server):
    model = tiny_llama()
    tokens = torch.randint(0, 500, (1, 256), generator=torch.Generator().manual_seed(2))
    async with KVClient(f"127.0.0.1:{server.port}") as kv:
        cache = PrefixCache(kv, layout_of(model))
        with torch.no_grad():
            full = model(tokens, use_cache=True)
        await cache.save(tokens, full.past_key_values)
        await kv.delete(cache.keys(tokens)[10:11])               # block 10 is gone
        loaded = await cache.load(tokens)
        assert loaded.tokens == 160
        with torch.no_grad():
            reused = model(tokens[:, 160:], past_key_values=cache_from(model, loaded.kv), use_cache=True)
        torch.testing.assert_close(reused.logits[0, -1], full.logits[0, -1], rtol=1e-5, atol=1e-5)


async def test_failures_degrade_to_recomputation(server):
    model = tiny_llama()
    layout = layout_of(model)
    tokens = torch.randint(0, 500, (1, 64))
    async with KVClient(f"127.0.0.1:{server.port}") as kv:
        cache = PrefixCache(kv, layout)
        assert (await cache.lookup(tokens)).tokens == 0                  # nothing cached: a miss
        assert (await cache.load(tokens)).tokens == 0
        other = PrefixCache(kv, KVLayout(model_id="another/model", num_layers=3, num_kv_heads=2, head_dim=32,
                                         dtype="float32"))
        with torch.no_grad():
            kv_out = model(tokens, use_cache=True).past_key_values
        await cache.save(tokens, kv_out)
        assert (await other.lookup(tokens)).tokens == 0                  # another layout: never mixed
    # The connection is gone: every call answers "nothing", none raises into the model.
    assert (await cache.lookup(tokens)).tokens == 0
    assert (await cache.load(tokens)).tokens == 0
    assert await cache.save(tokens, kv_out) == 0


async def test_kv_that_does_not_fit_the_layout_is_refused_not_stored(server):
    layout = KVLayout(model_id="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
    tokens = list(range(16))
    async with KVClient(f"127.0.0.1:{server.port}") as kv:
        cache = PrefixCache(kv, layout)
        right = [(torch.randn(1, 2, 16, 8, dtype=torch.bfloat16), torch.randn(1, 2, 16, 8, dtype=torch.bfloat16))
                 for _ in range(2)]
        assert await cache.save(tokens, [(k.half(), v.half()) for k, v in right]) == 0      # wrong dtype
        assert await cache.save(tokens, [(k[:, :, :8], v[:, :, :8]) for k, v in right]) == 0  # too few tokens
        assert await cache.save(tokens, [(k.expand(2, -1, -1, -1), v) for k, v in right]) == 0  # batch of 2
        assert (await cache.lookup(tokens + [99])).tokens == 0
        assert await cache.save(tokens, right) == 4
        loaded = await cache.load(tokens + [99])
        assert loaded.tokens == 16
        for (k, v), (k2, v2) in zip(right, loaded.kv):    # bfloat16, bit for bit
            assert torch.equal(k, k2) and torch.equal(v, v2)
        # A prompt that is all cached still leaves its last token to compute.
        assert (await cache.lookup(tokens)).tokens == 12
        # Different extra bytes (a LoRA adapter): different blocks.
        assert (await cache.lookup(tokens + [99], extra=b"lora-7")).tokens == 0
