"""CUDA buffers through both data paths (runs wherever a GPU is present)."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.client import KVClient

from conftest import chain

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["require", "off"])
async def test_cupy_arrays_round_trip_byte_exact(server, mode):
    import cupy

    async with KVClient(f"127.0.0.1:{server.port}", local=mode) as kv:
        keys = chain(8, seed=90)
        rng = cupy.random.default_rng(0)
        blocks = [rng.standard_normal(256 * 1024, dtype=cupy.float32).astype(cupy.float16) for _ in keys]
        assert (await kv.put(keys, blocks)).stored == 8
        out = [cupy.empty_like(b) for b in blocks]
        assert await kv.get_into(keys, out) == 8
        for a, b in zip(out, blocks):
            assert cupy.array_equal(a, b)
        # Host and device buffers mix in one batch; bytes put from the GPU read back on the host.
        host = [np.empty(b.nbytes, np.uint8) for b in blocks]
        assert await kv.get_into(keys, host) == 8
        assert all(np.array_equal(h, cupy.asnumpy(b).view(np.uint8)) for h, b in zip(host, blocks))


async def test_torch_cuda_tensors_round_trip(server):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    async with KVClient(f"127.0.0.1:{server.port}", local="require") as kv:
        keys = chain(4, seed=91)
        blocks = [torch.randn(2, 8, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in keys]
        await kv.put(keys, blocks)
        out = [torch.empty_like(b) for b in blocks]
        assert await kv.get_into(keys, out) == 4
        assert all(torch.equal(a, b) for a, b in zip(out, blocks))


async def test_non_contiguous_gpu_arrays_are_refused(server):
    import cupy

    from kvstore import InvalidArgumentError

    async with KVClient(f"127.0.0.1:{server.port}") as kv:
        with pytest.raises(InvalidArgumentError, match="not C-contiguous on the GPU"):
            await kv.put(chain(1, seed=92), [cupy.zeros((64, 64))[:, ::2]])


async def test_the_hbm_tier_sits_above_dram_and_its_blocks_are_read_through_dram():
    """HBM is a stack entry above DRAM: puts still land in DRAM (the mapped tier); a block whose
    only copy is in HBM is promoted into DRAM for a reader, verified, byte-exact."""
    from kvstore import TierKind
    from kvstore.config import HbmConfig
    from kvstore.keys import scoped
    from kvstore.server import KVStoreServer

    from conftest import make_config, random_blocks

    async with KVStoreServer(make_config(dram_bytes=8 << 20, hbm=HbmConfig(capacity_bytes=8 << 20))) as srv:
        daemon = srv.daemon
        assert [level.name for level in daemon.layout.levels] == ["hbm", "dram"] and daemon.layout.landing == 1
        async with KVClient(f"127.0.0.1:{srv.port}", local="off") as kv:
            keys, blocks = chain(4, seed=93), random_blocks(4, 256 * 1024)
            assert (await kv.put(keys, blocks)).stored == 4
            records = daemon.catalog.prefix(scoped(keys, b""))
            for record in records:
                assert await daemon.mover.replicate(record, 0)     # a copy into the GPU pool
            await daemon.mover.drop([record.copies[1] for record in records])  # only HBM holds them now
            assert (await kv.lookup(keys)).tiers == [TierKind.HBM] * 4
            assert [bytes(b) for b in await kv.get(keys)] == blocks
            assert (await kv.stats()).tier_named("hbm").promotions == 4
