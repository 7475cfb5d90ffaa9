"""The local-socket protocol: the same ``kvstore.v1`` messages, framed for a Unix socket.

Same-host clients send their control calls (lookups and the lease calls of the shared-memory data
path) over their session socket instead of gRPC: a round trip there costs tens of microseconds
instead of a millisecond, which matters when the data itself moves at memory speed.

On connect the daemon sends one hello frame with the arena's memfd attached (SCM_RIGHTS)::

    u32 LE length | JSON {"version", "arena_id", "session", "arena_bytes"}

Then the client sends requests and the daemon answers each, in order::

    request:  u32 LE length of the rest | u8 method | serialized request message
    response: u32 LE length of the rest | u8 status | serialized response message, or UTF-8 error text

``status`` is 0 for OK, else the gRPC status code number, so errors map to the same kvstore
exception classes on both transports. The session field of a request is ignored: the socket is
the session.
"""

from __future__ import annotations

import socket

from kvstore.proto.v1 import kvstore_pb2 as pb

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 << 20
STREAM_LIMIT = 4 << 20
"""How much a session's stream buffers before it stops reading, and what each end asks of the
kernel for the socket's buffers: a lookup of 8,192 keys (256 KiB) crosses in one write and one
read instead of a ping-pong of partial writes and wake-ups at the defaults (64 KiB, ~200 KiB)."""


def widen(sock: socket.socket) -> None:
    """Ask for socket buffers of :data:`STREAM_LIMIT` (the kernel may grant less)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, STREAM_LIMIT)
        except OSError:
            pass

METHODS: tuple[tuple[str, type, type], ...] = (
    ("Lookup", pb.LookupRequest, pb.LookupResponse),
    ("Reserve", pb.ReserveRequest, pb.ReserveResponse),
    ("Commit", pb.CommitRequest, pb.PutResponse),
    ("Acquire", pb.AcquireRequest, pb.AcquireResponse),
    ("Release", pb.ReleaseRequest, pb.ReleaseResponse),
)
METHOD_IDS = {name: i for i, (name, _, _) in enumerate(METHODS)}


def frame(kind: int, payload: bytes) -> bytes:
    """One frame: length, a method or status byte, the payload."""
    return (len(payload) + 1).to_bytes(4, "little") + bytes((kind,)) + payload
