"""HBM tier: one GPU memory pool (CuPy, plain cudaMalloc) with the same extent allocator as DRAM.

Blocks move between host buffers and the pool with ``cudaMemcpyAsync`` on a stream of the tier's
own. ``ipc_handle()`` exports the pool for same-GPU clients (CUDA IPC), who will copy device to
device without a host hop.

It is a stack entry above DRAM when ``hbm.capacity_bytes`` (``--hbm-bytes``) is set and a CUDA
device answers: puts land in DRAM as before, HBM copies demote to DRAM on its watermarks, and
reads copy them into DRAM. The CUDA IPC client path for same-GPU clients is not written yet (it
needs a session with a GPU to build and verify); the tier runs through the tier contract suite
(``tests/test_tiers.py``) wherever a GPU is present.
"""

from __future__ import annotations

import asyncio

import numpy as np

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.config import HbmConfig, format_bytes
from kvstore.errors import ConfigError
from kvstore.layout import Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import ExtentTier

_H2D, _D2H = 1, 2


class HbmTier(ExtentTier):
    name = "hbm"
    kind = TierKind.HBM
    capabilities = Capabilities()
    config_class = HbmConfig

    def __init__(self, config: HbmConfig) -> None:
        try:
            import cupy

            if not cupy.cuda.is_available():
                raise ConfigError("an HBM tier needs a CUDA device, and none answers here")
        except ImportError:
            raise ConfigError("an HBM tier needs CuPy (pip install -e '.[gpu]')") from None
        self._cupy = cupy
        self.config = config
        self._allocator = ExtentAllocator(config.capacity_bytes, config.alignment_bytes)
        with cupy.cuda.Device(config.device):
            self._pool = cupy.empty(self._allocator.capacity_bytes, dtype=cupy.uint8)
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self._base = self._pool.data.ptr

    @classmethod
    def from_config(cls, config: HbmConfig) -> HbmTier:
        return cls(config)

    @classmethod
    def unavailable(cls, config: HbmConfig) -> str | None:
        try:
            import cupy
        except ImportError:
            return "CuPy is not installed (pip install -e '.[gpu]')"
        try:
            if cupy.cuda.is_available() and config.device < cupy.cuda.runtime.getDeviceCount():
                return None
        except Exception:  # no driver: CUDARuntimeError
            pass
        return f"no CUDA device {config.device} answers here"

    @property
    def description(self) -> str:
        return f"hbm {format_bytes(self.capacity_bytes)} on GPU {self.config.device}"

    def device_pointer(self, extent: Extent) -> int:
        return self._base + extent.offset

    def ipc_handle(self) -> bytes:
        """The pool's CUDA IPC handle, for a same-GPU process to open."""
        return bytes(self._cupy.cuda.runtime.ipcGetMemHandle(self._base))

    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        self._check_range(extent, offset, data.nbytes)
        host = np.frombuffer(data, dtype=np.uint8)
        await self._copy(self._base + extent.offset + offset, host.ctypes.data, host.nbytes, _H2D)

    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        self._check_range(extent, offset, out.nbytes)
        host = np.frombuffer(out, dtype=np.uint8)
        await self._copy(host.ctypes.data, self._base + extent.offset + offset, host.nbytes, _D2H)

    async def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        with self._cupy.cuda.Device(self.config.device):
            self._cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, self._stream.ptr)
        await asyncio.to_thread(self._stream.synchronize)

    async def close(self) -> None:
        await asyncio.to_thread(self._stream.synchronize)
        self._pool = None
