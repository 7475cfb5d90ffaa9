"""kvstore errors <-> gRPC status codes, in one table used by both sides of the wire.

The servicer turns a :class:`~kvstore.errors.KVStoreError` into a status with :func:`code_for`;
the client turns an ``AioRpcError`` back into the same class with :func:`error_from_rpc`.
"""

from __future__ import annotations

import grpc

from kvstore import errors

_CODES: list[tuple[type[errors.KVStoreError], grpc.StatusCode]] = [
    # Most specific first: code_for walks this list in order.
    (errors.BlockTooLargeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.StaleSessionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.LeaseExpiredError, grpc.StatusCode.ABORTED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
]
_ERRORS = {code: cls for cls, code in _CODES}
_ERRORS[grpc.StatusCode.CANCELLED] = errors.UnavailableError


def code_for(exc: errors.KVStoreError) -> grpc.StatusCode:
    """The status code a server answers ``exc`` with."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode | int | None, detail: str) -> errors.KVStoreError:
    """The kvstore error for a status code (a ``grpc.StatusCode`` or its number)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code)
    cls = _ERRORS.get(code, errors.InternalError)
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{detail} [{name}]")


def error_from_rpc(exc: grpc.RpcError) -> errors.KVStoreError:
    """The kvstore error a client raises for a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code, detail)
