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
