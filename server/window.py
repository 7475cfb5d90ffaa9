"""Windows: same-host clients of a daemon with tenants, kept out of each other's blocks.

The arena holds every tenant's blocks, so with tenants no client may map it. Each same-host
session gets a window instead: shared memory of its own (``local_window_bytes``), mapped by that
client and the daemon only. The client's protocol does not change (offsets it is given are in
the memory it mapped), but the daemon moves the bytes between the window and the arena:

- a put reserves room in the arena and room in the window; at commit the daemon copies the
  window's bytes into the arena (and checksums them there), then frees the window's room;
- a get holds the blocks in the arena just long enough to copy them into the window, and the
  window's room is the client's until it releases it.

One more memcpy each way, done by the daemon off the event loop for large batches; in exchange a
client reads and writes only memory holding its own tenant's blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os
import time
from collections.abc import Sequence

import numpy as np

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.errors import LeaseExpiredError, ResourceExhaustedError
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server.daemon import Daemon
from kvstore.server.leasing import Leasing, slot_state
from kvstore.tiers.dram import map_shared_memory

OFF_LOOP_BYTES = 4 << 20
"""Copies of more bytes than this run in a thread (numpy releases the GIL), not on the loop."""


class Window:
    """One session's shared memory and the room taken in it."""

    def __init__(self, size: int) -> None:
        self.mapping, self.fd = map_shared_memory(size, mmap.MAP_SHARED)
        self.size = size
        self.view = memoryview(self.mapping)
        self.room = ExtentAllocator(size, 4096)

    def take_leading(self, sizes: Sequence[int]) -> list[Extent]:
        """Room for the leading sizes that fit, in order."""
        taken = []
        for size in sizes:
            extent = self.room.allocate(size)
            if extent is None:
                break
            taken.append(extent)
        return taken

    def take(self, sizes: Sequence[int]) -> list[Extent] | None:
        """Room for every size, or None (and nothing taken) when it does not all fit."""
        taken = self.take_leading(sizes)
        if len(taken) < len(sizes):
            self.give(taken)
            return None
        return taken

    def give(self, extents: Sequence[Extent]) -> None:
        for extent in extents:
            self.room.free(extent)

    def close(self) -> None:
        self.view.release()
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)


async def copy_all(pairs: Sequence[tuple[memoryview, memoryview]]) -> None:
    """``dst[:] = src`` for each pair; in a thread when there is much to copy."""

    def run() -> None:
        for dst, src in pairs:
            np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))

    if sum(src.nbytes for _, src in pairs) > OFF_LOOP_BYTES:
        await asyncio.to_thread(run)
    else:
        run()


class WindowedCalls:
    """The lease calls of one same-host session, answered through its window."""

    def __init__(self, daemon: Daemon, leasing: Leasing, session: str, window: Window) -> None:
        self.daemon = daemon
        self.leasing = leasing
        self.session = session
        self.window = window
        self._writes: dict[int, list[tuple[Extent, object]]] = {}   # write lease -> (room, slot)
        self._reads: dict[int, list[Extent]] = {}                   # read lease (ours) -> room
        self._read_ids = itertools.count(1)

    def close(self) -> None:
        self._writes.clear()
        self._reads.clear()
        self.window.close()

    def _window(self, extent: Extent, size: int) -> memoryview:
        return self.window.view[extent.offset : extent.offset + size]

    async def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        lease, slots = await self.leasing.reserve(
            self.session, request.keys, request.sizes, time.monotonic(), request.namespace
        )
        reserved = [slot for slot in slots if slot.copy is not None]
        room = self.window.take([slot.size for slot in reserved])
        if room is None:
            await self.leasing.commit(self.session, lease.id, (), abort=True)
            raise ResourceExhaustedError(
                f"this session's window ({self.window.size} bytes) has no room for the put: "
                "release earlier reads, or put in smaller batches"
            )
        self._writes[lease.id] = list(zip(room, reserved))
        at = {id(slot): extent.offset for extent, slot in self._writes[lease.id]}
        return pb.ReserveResponse(
            lease=lease.id,
            states=[slot_state(slot) for slot in slots],
            offsets=[at.get(id(slot), 0) for slot in slots],
        )

    async def commit(self, request: pb.CommitRequest) -> tuple[int, list]:
        pairs = self._writes.pop(request.lease, None)
        if pairs is None:
            raise LeaseExpiredError(f"write lease {request.lease} expired or is unknown; nothing of it was stored")
        try:
            if not request.abort:
                arena = self.daemon.arena
                await copy_all([
                    (arena.view(slot.copy.location, slot.size), self._window(extent, slot.size))
                    for extent, slot in pairs if slot.copy is not None
                ])
        finally:
            self.window.give([extent for extent, _ in pairs])
        return await self.leasing.commit(self.session, request.lease, request.checksums, request.abort)

    async def acquire(self, request: pb.AcquireRequest) -> pb.AcquireResponse:
        free = self.window.room.largest_free
        if free == 0:
            raise ResourceExhaustedError(f"this session's window ({self.window.size} bytes) is full of reads not yet released")
        lease, partial = await self.leasing.acquire(
            self.session, request.keys, time.monotonic(), request.namespace, max_bytes=free   # no more than fits
        )
        if lease is None:
            return pb.AcquireResponse()
        copies = lease.records
        try:
            # As many as fit; the rest is asked for again (partial).
            room = self.window.take_leading([copy.record.size for copy in copies])
            if not room and copies[0].record.size > self.window.size:
                return pb.AcquireResponse()   # a block larger than any window: a miss on this path
            if not room:
                raise ResourceExhaustedError(
                    f"this session's window ({self.window.size} bytes) is full of reads not yet released"
                )
            held = copies[: len(room)]
            await copy_all([
                (self._window(extent, c.record.size), self.daemon.arena.view(c.location, c.record.size))
                for extent, c in zip(room, held)
            ])
        finally:
            self.leasing.release(self.session, [lease.id])   # the bytes are in the window now
        read_id = next(self._read_ids)
        self._reads[read_id] = room
        levels = self.daemon.layout.levels
        return pb.AcquireResponse(
            lease=read_id, count=len(held), offsets=[e.offset for e in room], sizes=[c.record.size for c in held],
            tiers=[levels[c.level].kind for c in held], partial=partial or len(held) < len(copies),
        )

    def release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        released = 0
        for read_id in request.leases:
            room = self._reads.pop(read_id, None)
            if room is not None:
                self.window.give(room)
                released += 1
        return pb.ReleaseResponse(released=released)

