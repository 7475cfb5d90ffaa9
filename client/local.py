"""The same-host data path: the client maps the daemon's DRAM arena and copies bytes itself.

Attaching connects to the daemon's local socket, receives the arena's memfd and maps it; the
open connection is the session, and it carries the control calls (framed ``kvstore.v1``
messages, :mod:`kvstore.proto.local`). A put reserves space (``Reserve``), copies each block into
its slot with one memcpy and commits (``Commit``): nothing is visible before the commit. A get
leases the leading blocks (``Acquire``), copies them out with one memcpy each and releases the
lease in the background. Block bytes never go through a socket.

Leases expire after the daemon's ``lease_ttl_s``. A read that took longer than that is not
trusted (the bytes may have been reused) and counts as a miss.
"""

from __future__ import annotations

import asyncio
import functools
import contextlib
import json
import logging
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from kvstore.block import check_sizes
from kvstore.errors import StaleSessionError
from kvstore.proto.local import METHOD_IDS, PROTOCOL_VERSION, FrameError, FramedSocket, frame
from kvstore.proto.status import error_for
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.client.buffers import Targets
from kvstore.client.gpu import CudaCopier, DeviceBuffer
from kvstore.client.path import DataPath, lookup_request, lookup_result
from kvstore.client.results import LookupResult, PutResult

log = logging.getLogger("kvstore.client")

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
TRUSTED_FRACTION = 0.8
"""A lease is trusted for this fraction of its TTL, measured from before it was asked for."""


class LocalArena:
    """The daemon's arena mapped into this process, and the session connection that keeps it valid."""

    def __init__(self, conn: socket.socket, arena: mmap.mmap, session: str, *, prefaulted: bool = False) -> None:
        self.conn = conn
        self.mapping = arena
        self.view = memoryview(arena)
        self.session = session
        self.prefaulted = prefaulted  # the daemon had the pages in: this mapping was faulted in too

    @classmethod
    def open(
        cls, path: str, arena_id: str, arena_bytes: int, *, timeout_s: float = 5.0, ticket: str = "",
        daemon_uid: int | None = None,
    ) -> LocalArena:
        """Connect, receive the arena's fd (or, with tenants, the session window's) and map it.
        Raises OSError or ValueError on any mismatch, a listener of another user included."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout_s)
            conn.connect(path)
            if daemon_uid is not None:   # whoever listens there must be the daemon's user
                _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != daemon_uid:
                    raise ValueError(f"{path} is served by uid {uid}, not the daemon's ({daemon_uid}): not using it")
            if ticket:   # a daemon with tenants: the ticket from Attach binds this session to ours
                message = json.dumps({"ticket": ticket}).encode()
                conn.sendall(len(message).to_bytes(4, "little") + message)
            data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
            try:
                length = int.from_bytes(data[:4], "little")
                hello = json.loads(data[4 : 4 + length])
                if "error" in hello:
                    raise ValueError(f"the daemon refused this process: {hello['error']}")
                if hello.get("arena_id") != arena_id or hello.get("arena_bytes") != arena_bytes or len(fds) != 1:
                    raise ValueError(f"{path} belongs to another daemon")
                if hello.get("version") != PROTOCOL_VERSION or "session" not in hello:
                    raise ValueError(f"{path} speaks local protocol {hello.get('version')}, not {PROTOCOL_VERSION}")
                arena = mmap.mmap(fds[0], arena_bytes, flags=mmap.MAP_SHARED)
            finally:
                for fd in fds:
                    os.close(fd)
            if hello.get("prefaulted"):
                # The daemon committed the pages (charged to it); map them here too, writable, so
                # copies do not fault. Without that, populating here would commit the whole arena
                # to this process's memory cgroup, so pages fault in as they are used instead.
                _populate_for_writing(arena)
            return cls(conn, arena, hello["session"], prefaulted=bool(hello.get("prefaulted")))
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.view.release()
        try:
            self.mapping.close()
        except BufferError:
            log.debug("arena views still alive; unmapped when they go")


def put_round_bytes(info: pb.AttachResponse) -> int:
    """The most bytes one same-host put round reserves: what the daemon says, or, from a daemon
    that predates ``put_round_bytes``, a quarter of its arena."""
    return info.put_round_bytes or max(info.arena_bytes // 4, 1)


def _populate_for_writing(arena: mmap.mmap) -> None:
    """Fault the whole mapping in, writable, now: later copies then run at memcpy speed."""
    try:
        arena.madvise(MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):
        pass  # older kernels: pages fault in on first touch instead


class LocalChannel:
    """Request/response over the session socket; one call at a time, in order."""

    def __init__(self, framed: FramedSocket, timeout_s: float) -> None:
        self._framed = framed
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._broken: str | None = None

    @classmethod
    async def open(cls, conn: socket.socket, timeout_s: float) -> LocalChannel:
        return cls(FramedSocket(conn), timeout_s)

    async def call(self, method: str, request: Message, response_cls: type[Message]) -> Any:
        payload = frame(METHOD_IDS[method], request.SerializeToString())
        async with self._lock:
            if self._broken:
                raise StaleSessionError(f"the same-host session is unusable: {self._broken}")
            try:
                if sys.version_info >= (3, 11):
                    async with asyncio.timeout(self._timeout_s):  # no task per call, unlike wait_for
                        await self._framed.write(payload)
                        body = await self._framed.read_frame()
                else:  # pragma: no cover
                    await asyncio.wait_for(self._framed.write(payload), self._timeout_s)
                    body = await asyncio.wait_for(self._framed.read_frame(), self._timeout_s)
            except BaseException as exc:
                # A call interrupted after its request went out (cancelled, timed out, cut off)
                # leaves its answer unread, and the next call would read it as its own. The
                # session is closed instead; the client attaches again.
                self._broken = f"{method} was interrupted ({type(exc).__name__})"
                self._framed.close()
                if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError, FrameError)):
                    raise StaleSessionError(f"the same-host session ended during {method} ({exc!r})") from None
                raise
        if body[0] != 0:
            raise error_for(body[0], body[1:].decode(errors="replace"))
        return response_cls.FromString(body[1:])

    async def close(self) -> None:
        self._framed.close()


class LocalPath(DataPath):
    name = "local"

    def __init__(
        self, arena: LocalArena, channel: LocalChannel, *, ttl_s: float, block_limit: tuple[int, str],
        put_round_bytes: int, namespace: bytes,
    ) -> None:
        self.arena = arena
        self.namespace = namespace
        self.channel = channel
        self.ttl_s = ttl_s
        self.block_limit = block_limit
        self.put_round_bytes = put_round_bytes
        self._releases: set[asyncio.Task] = set()
        self._cuda: CudaCopier | None = None

    @classmethod
    async def attach(cls, info: pb.AttachResponse, timeout_s: float, namespace: bytes) -> LocalPath:
        arena = await asyncio.to_thread(
            functools.partial(
                LocalArena.open, info.socket_path, info.arena_id, info.arena_bytes, ticket=info.ticket,
                daemon_uid=info.daemon_uid if info.HasField("daemon_uid") else None,
            )
        )
        try:
            channel = await LocalChannel.open(arena.conn, timeout_s)
        except BaseException:
            arena.conn.close()
            arena.close()
            raise
        return cls(
            arena, channel, ttl_s=info.lease_ttl_s, block_limit=(info.max_block_bytes, info.max_block_reason),
            put_round_bytes=put_round_bytes(info), namespace=namespace,
        )

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        request = lookup_request(keys, self.namespace)
        return lookup_result(await self.channel.call("Lookup", request, pb.LookupResponse))

    async def _cuda_copier(self) -> CudaCopier:
        if self._cuda is None:  # page-locking the arena takes a while: off the event loop
            self._cuda = await asyncio.to_thread(CudaCopier, self.arena.mapping)
        return self._cuda

    async def put(self, keys: Sequence[bytes], sources: Sequence[memoryview | DeviceBuffer]) -> PutResult:
        """Put in rounds of at most ``put_round_bytes`` (a block larger than that is a round of its
        own), so that one round's reservations never crowd out each other (earlier rounds are
        committed, so they can be demoted to make room)."""
        check_sizes([s.nbytes for s in sources], *self.block_limit)  # the whole batch, before any round
        total = PutResult(0, 0, 0)
        limit = self.put_round_bytes
        start = 0
        while start < len(sources):
            stop, size = start, 0
            while stop < len(sources) and (stop == start or size + sources[stop].nbytes <= limit):
                size += sources[stop].nbytes
                stop += 1
            total += await self._put_round(keys[start:stop], sources[start:stop])
            start = stop
        return total

    async def _put_round(self, keys: Sequence[bytes], sources: Sequence[memoryview | DeviceBuffer]) -> PutResult:
        await self._settled()
        reserved = await self.channel.call(
            "Reserve", pb.ReserveRequest(keys=keys, sizes=[s.nbytes for s in sources], namespace=self.namespace),
            pb.ReserveResponse,
        )
        abort = True
        copier = None
        try:
            arena = self.arena.view
            if any(isinstance(src, DeviceBuffer) for src in sources):
                copier = await self._cuda_copier()
                await copier.wait_for_producers()
            for src, state, offset in zip(sources, reserved.states, reserved.offsets):
                if state != pb.SLOT_RESERVED:
                    continue
                if isinstance(src, DeviceBuffer):
                    copier.to_host(offset, src)
                else:
                    arena[offset : offset + src.nbytes] = src
            if copier is not None:
                await copier.synchronize()
            abort = False
        finally:
            if copier is not None and abort:
                copier.synchronize_now()  # no DMA may land in space the abort gives back
            response = await self.channel.call(
                "Commit", pb.CommitRequest(lease=reserved.lease, abort=abort), pb.PutResponse
            )
        return PutResult.from_proto(response)

    async def _settled(self) -> None:
        """Let releases still in the background go first: a session's room (its window, with
        tenants) is free again before the next call asks for some."""
        if self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    async def _acquire(self, keys: Sequence[bytes]) -> tuple[pb.AcquireResponse, float]:
        await self._settled()
        started = time.monotonic()
        response = await self.channel.call(
            "Acquire", pb.AcquireRequest(keys=keys, namespace=self.namespace), pb.AcquireResponse
        )
        return response, started

    async def _finish(self, response: pb.AcquireResponse, started: float) -> bool:
        """End the lease; False if the copy outlived the trusted window (then it is not used).

        The release goes in the background unless the read was partial: then the next round
        needs the room it frees.
        """
        if response.count:
            release = self.channel.call("Release", pb.ReleaseRequest(leases=[response.lease]), pb.ReleaseResponse)
            if response.partial:
                await release
            else:
                task = asyncio.ensure_future(release)
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

    async def _rounds(self, keys: Sequence[bytes], copy_out) -> int:
        """Acquire, copy out with ``copy_out(start, response)``, release; again while partial."""
        done = 0
        while done < len(keys):
            response, started = await self._acquire(keys[done:])
            if response.count == 0:
                break
            try:
                await copy_out(done, response)
            finally:
                trusted = await self._finish(response, started)
            if not trusted:
                break
            done += response.count
            if not response.partial:
                break
        return done

    async def get_into(self, keys: Sequence[bytes], targets: Targets) -> int:
        arena = self.arena.view

        async def copy_out(start: int, response: pb.AcquireResponse) -> None:
            dests = targets(start, response.sizes)
            copier = await self._cuda_copier() if any(isinstance(d, DeviceBuffer) for d in dests) else None
            done = False
            try:
                for dest, offset, size in zip(dests, response.offsets, response.sizes):
                    if isinstance(dest, DeviceBuffer):
                        copier.to_device(dest, offset, size)
                    else:
                        dest[:size] = arena[offset : offset + size]
                if copier is not None:
                    await copier.synchronize()  # before the lease ends
                done = True
            finally:
                if copier is not None and not done:
                    copier.synchronize_now()  # the lease ends next: no DMA may still read the arena

        return await self._rounds(keys, copy_out)

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        arena = self.arena.view
        out: list[bytearray] = []

        async def copy_out(start: int, response: pb.AcquireResponse) -> None:
            del out[start:]
            out.extend(bytearray(arena[o : o + n]) for o, n in zip(response.offsets, response.sizes))

        count = await self._rounds(keys, copy_out)
        del out[count:]
        return out

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self.channel.close()
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        self.arena.close()
