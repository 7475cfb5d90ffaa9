"""How caller objects become byte views (host) or device regions (CUDA interface parsing)."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import InvalidArgumentError
from kvstore.client.buffers import byte_view
from kvstore.client.gpu import DeviceBuffer, device_buffer


class CudaArrayLike:
    """Any object exposing the CUDA array interface, as CuPy, PyTorch and Numba arrays do."""

    def __init__(self, shape, typestr="<f2", strides=None, readonly=False, ptr=0x7F0000000000):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "strides": strides, "data": (ptr, readonly), "version": 3,
        }


def test_host_objects_are_not_device_buffers():
    for obj in (b"abc", bytearray(4), np.zeros(4), memoryview(b"x")):
        assert device_buffer(obj, 0) is None


def test_cuda_array_interface_gives_pointer_and_size():
    buf = device_buffer(CudaArrayLike((2, 8, 128)), 0)
    assert isinstance(buf, DeviceBuffer)
    assert (buf.ptr, buf.nbytes) == (0x7F0000000000, 2 * 8 * 128 * 2)
    explicit = device_buffer(CudaArrayLike((4, 16), typestr="<f4", strides=(64, 4)), 0)
    assert explicit.nbytes == 256


def test_non_contiguous_and_read_only_device_arrays_are_refused():
    with pytest.raises(InvalidArgumentError, match="not C-contiguous on the GPU"):
        device_buffer(CudaArrayLike((4, 16), typestr="<f4", strides=(128, 4)), 3)
    with pytest.raises(InvalidArgumentError, match="buffer 1 is a read-only GPU array"):
        device_buffer(CudaArrayLike((4,), readonly=True), 1, writable=True)


def test_byte_views_of_host_objects():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = byte_view(arr, 0)
    assert view.format == "B" and view.nbytes == 48 and bytes(view) == arr.tobytes()
    with pytest.raises(InvalidArgumentError, match="cannot view its items as bytes"):
        byte_view(np.array(["2020-01-01"], dtype="datetime64[D]"), 0)
