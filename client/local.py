"""The same-host data path: the client maps the daemon's DRAM arena and copies bytes itself.

Attaching connects to the daemon's local socket, receives the arena's memfd and maps it; the
open connection is the session. A put reserves space (``Reserve``), copies each block into its
slot with one memcpy and commits (``Commit``): nothing is visible before the commit. A get leases
the leading blocks (``Acquire``), copies them out with one memcpy each and releases the lease in
the background. Only control messages go through gRPC.

Leases expire after the daemon's ``lease_ttl_s``. A read that took longer than that is not
trusted (the bytes may have been reused) and counts as a miss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import socket
import time
from collections.abc import Callable, Sequence

from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.client.results import PutResult

log = logging.getLogger("kvstore.client")

Targets = Callable[[Sequence[int]], list[memoryview]]
TRUSTED_FRACTION = 0.8
"""A lease is trusted for this fraction of its TTL, measured from before it was asked for."""


class LocalArena:
    """The daemon's arena mapped into this process, and the session that keeps it valid."""

    def __init__(self, conn: socket.socket, arena: mmap.mmap, session: str) -> None:
        self._conn = conn
        self._mmap = arena
        self.view = memoryview(arena)
        self.session = session

    @classmethod
    def open(cls, path: str, arena_id: str, arena_bytes: int, *, timeout_s: float = 5.0) -> LocalArena:
        """Connect, receive the arena fd and map it. Raises OSError or ValueError on any mismatch."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout_s)
            conn.connect(path)
            data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
            try:
                length = int.from_bytes(data[:4], "little")
                hello = json.loads(data[4 : 4 + length])
                if hello.get("arena_id") != arena_id or hello.get("arena_bytes") != arena_bytes or len(fds) != 1:
                    raise ValueError(f"{path} belongs to another daemon")
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map page tables once, now
                arena = mmap.mmap(fds[0], arena_bytes, flags=flags)
            finally:
                for fd in fds:
                    socket.close(fd)
            conn.setblocking(False)
            return cls(conn, arena, hello["session"])
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            log.debug("arena views still alive; unmapped when they go")
        self._conn.close()


class LocalPath:
    name = "local"

    def __init__(self, stub: pb_grpc.KVStoreStub, arena: LocalArena, *, ttl_s: float, timeout_s: float) -> None:
        self.stub = stub
        self.arena = arena
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._releases: set[asyncio.Task] = set()

    async def put(self, keys: Sequence[bytes], views: Sequence[memoryview]) -> PutResult:
        session = self.arena.session
        reserved = await self.stub.Reserve(
            pb.ReserveRequest(session=session, keys=keys, sizes=[v.nbytes for v in views]), timeout=self.timeout_s
        )
        abort = True
        try:
            arena = self.arena.view
            for view, state, offset in zip(views, reserved.states, reserved.offsets):
                if state == pb.SLOT_RESERVED:
                    arena[offset : offset + view.nbytes] = view
            abort = False
        finally:
            response = await self.stub.Commit(
                pb.CommitRequest(session=session, lease=reserved.lease, abort=abort), timeout=self.timeout_s
            )
        return PutResult(stored=response.stored, present=response.present, dropped=response.dropped)

    async def _acquire(self, keys: Sequence[bytes]) -> tuple[pb.AcquireResponse, float]:
        started = time.monotonic()
        response = await self.stub.Acquire(
            pb.AcquireRequest(session=self.arena.session, keys=keys), timeout=self.timeout_s
        )
        return response, started

    def _finish(self, response: pb.AcquireResponse, started: float) -> bool:
        """Release the lease in the background; False if the copy outlived the trusted window."""
        if response.count:
            task = asyncio.ensure_future(
                self.stub.Release(pb.ReleaseRequest(session=self.arena.session, leases=[response.lease]), timeout=self.timeout_s)
            )
            self._releases.add(task)
            task.add_done_callback(self._released)
        if time.monotonic() - started > TRUSTED_FRACTION * self.ttl_s:
            log.warning("a same-host read outlived its lease; treating it as a miss")
            return False
        return True

    def _released(self, task: asyncio.Task) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("lease release failed (it expires on its own): %s", task.exception())

    async def get_into(self, keys: Sequence[bytes], targets: Targets) -> int:
        response, started = await self._acquire(keys)
        if response.count == 0:
            return 0
        try:
            views = targets(response.sizes)
            arena = self.arena.view
            for view, offset, size in zip(views, response.offsets, response.sizes):
                view[:size] = arena[offset : offset + size]
        finally:
            trusted = self._finish(response, started)
        return response.count if trusted else 0

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        response, started = await self._acquire(keys)
        arena = self.arena.view
        try:
            out = [bytearray(arena[o : o + n]) for o, n in zip(response.offsets, response.sizes)]
        finally:
            trusted = self._finish(response, started)
        return out if trusted else []

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        self.arena.close()
