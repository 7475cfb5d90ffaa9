"""CUDA buffers as block sources and destinations.

Anything exposing ``__cuda_array_interface__`` (CuPy, PyTorch, Numba) or a CUDA DLPack device
(``__dlpack_device__``) can be put from and read into directly. On the same-host path the
client's mapping of the daemon's arena is page-locked once (``cudaHostRegister``), so each block
moves between the arena and the GPU in one DMA copy on a CUDA stream. On the remote path blocks
are staged through host memory.

CuPy is imported only when a CUDA buffer is actually passed, so CPU-only workers never load it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgumentError

_DL_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_H2D, _D2H = 1, 2   # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
_HOST_REGISTER_PORTABLE = 1


@dataclass(frozen=True, slots=True)
class DeviceBuffer:
    """A contiguous region of GPU memory and the object that owns it (kept alive)."""

    ptr: int
    nbytes: int
    owner: Any


def device_buffer(obj: Any, index: int, *, writable: bool = False) -> DeviceBuffer | None:
    """The GPU region behind ``obj``, or None when ``obj`` is not in CUDA device memory."""
    owner = obj
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except Exception as exc:  # torch raises for tensors that require grad, for example
        raise InvalidArgumentError(f"block {index}: {exc}") from None
    if cai is None:
        dlpack_device = getattr(obj, "__dlpack_device__", None)
        if dlpack_device is None or dlpack_device()[0] not in _DL_CUDA:
            return None
        import cupy

        owner = cupy.from_dlpack(obj)
        cai = owner.__cuda_array_interface__
    shape, typestr = tuple(cai["shape"]), cai["typestr"]
    itemsize = np.dtype(typestr).itemsize
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, itemsize):
        raise InvalidArgumentError(f"block {index} is not C-contiguous on the GPU; pass a contiguous copy")
    ptr, readonly = cai["data"]
    if writable and readonly:
        raise InvalidArgumentError(f"buffer {index} is a read-only GPU array")
    return DeviceBuffer(ptr=ptr, nbytes=math.prod(shape) * itemsize, owner=owner)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class CudaCopier:
    """DMA copies between a page-locked host region and GPU buffers, on one stream.

    Ordering: before copying *from* GPU buffers the device is synchronized, so kernels that
    produced the KV (on any stream) have finished; copies *into* GPU buffers are complete, for
    every stream, when :meth:`synchronize` returns.
    """

    def __init__(self, host: Any) -> None:
        import cupy

        self._cupy = cupy
        array = np.frombuffer(host, dtype=np.uint8)
        self.host_ptr, self.host_bytes = array.ctypes.data, array.nbytes
        del array
        # Portable: the pinning holds for every device and context of this process.
        cupy.cuda.runtime.hostRegister(self.host_ptr, self.host_bytes, _HOST_REGISTER_PORTABLE)
        self._stream = cupy.cuda.Stream(non_blocking=True)

    async def wait_for_producers(self) -> None:
        """Let every kernel queued on the device finish (it may be writing the blocks to copy)."""
        await asyncio.to_thread(self._cupy.cuda.runtime.deviceSynchronize)

    def to_host(self, offset: int, src: DeviceBuffer) -> None:
        self._copy(self.host_ptr + offset, src.ptr, src.nbytes, _D2H)

    def to_device(self, dst: DeviceBuffer, offset: int, nbytes: int) -> None:
        self._copy(dst.ptr, self.host_ptr + offset, nbytes, _H2D)

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if nbytes:
            self._cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, self._stream.ptr)

    async def synchronize(self) -> None:
        """Wait for every queued copy (off the event loop)."""
        await asyncio.to_thread(self._stream.synchronize)

    def synchronize_now(self) -> None:
        """Wait for every queued copy, on this thread: for cleanup paths that must not be cut short."""
        self._stream.synchronize()

    def close(self) -> None:
        self._stream.synchronize()
        self._cupy.cuda.runtime.hostUnregister(self.host_ptr)


def host_views(sources: Sequence[memoryview | DeviceBuffer]) -> list[memoryview]:
    """Host views of every source, copying GPU blocks into host memory (remote path staging)."""
    if all(isinstance(s, memoryview) for s in sources):
        return list(sources)
    import cupy

    out = []
    for src in sources:
        if isinstance(src, DeviceBuffer):
            host = np.empty(src.nbytes, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(host.ctypes.data, src.ptr, src.nbytes, _D2H)
            src = memoryview(host)
        out.append(src)
    return out


def staged_targets(dests: Sequence[memoryview | DeviceBuffer]) -> tuple[list[memoryview], Callable[[int], None]]:
    """Host views to receive into, and a function that moves the first N staged blocks to the GPU."""
    hosts = [memoryview(np.empty(d.nbytes, dtype=np.uint8)) if isinstance(d, DeviceBuffer) else d for d in dests]

    def finish(count: int) -> None:
        pairs = [(h, d) for h, d in zip(hosts[:count], dests[:count]) if isinstance(d, DeviceBuffer)]
        if not pairs:
            return
        import cupy

        for host, dev in pairs:
            array = np.frombuffer(host, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(dev.ptr, array.ctypes.data, array.nbytes, _H2D)

    return hosts, finish
