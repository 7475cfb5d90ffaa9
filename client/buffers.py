"""Turning caller objects (bytes, numpy arrays, memoryviews, CPU tensors) into flat byte views."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgumentError


# Fixed-size numeric formats (with optional byte order) that cast to bytes.
_PLAIN_FORMATS = {p + c for p in ("", "@", "=", "<", ">", "!") for c in "bBhHiIlLqQnNefd?c"}


def byte_view(obj: Any, index: int, *, writable: bool = False) -> memoryview:
    """A flat, C-contiguous ``uint8`` view of ``obj`` without copying.

    Anything with the buffer protocol works; objects that only offer ``__array__`` (CPU torch
    tensors) are viewed through numpy, which shares their memory.
    """
    try:
        view = memoryview(obj)
    except ValueError as exc:  # a buffer of items with no byte format (numpy datetime64, ...)
        raise InvalidArgumentError(f"block {index}: cannot view its items as bytes ({exc})") from None
    except TypeError:
        if not hasattr(obj, "__array__"):
            raise InvalidArgumentError(
                f"block {index}: a {type(obj).__name__} is not a buffer (pass bytes, a numpy array "
                "or a memoryview)"
            ) from None
        try:
            view = memoryview(np.asarray(obj))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(f"block {index}: cannot view a {type(obj).__name__} as bytes: {exc}") from None
    if view.format not in _PLAIN_FORMATS:
        raise InvalidArgumentError(f"block {index}: cannot view items of format {view.format!r} as bytes")
    if not view.c_contiguous:
        raise InvalidArgumentError(f"block {index} is not C-contiguous; pass a contiguous copy")
    if writable and view.readonly:
        raise InvalidArgumentError(f"buffer {index} is read-only")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


Targets = Callable[[int, Sequence[int]], list]
"""``targets(start, sizes)``: the buffers blocks ``start, start+1, ...`` of those sizes go into."""


def check_targets(views: Sequence[Any]) -> Targets:
    """A ``targets(start, sizes)`` callback that hands out caller buffers checked against the
    announced block sizes."""

    def targets(start: int, sizes: Sequence[int]) -> list:
        for i, size in enumerate(sizes, start):
            if views[i].nbytes < size:
                raise InvalidArgumentError(f"buffer {i} holds {views[i].nbytes} bytes but block {i} is {size} bytes")
        return list(views[start : start + len(sizes)])

    return targets
