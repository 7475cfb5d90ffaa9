"""The async client that serving workers import.

    async with KVClient("127.0.0.1:7070") as kv:
        keys = kvstore.block_keys(tokens, block_size=16, namespace=ns)
        hit = await kv.lookup(keys)            # how many leading blocks are cached, and where
        blocks = await kv.get(keys[: hit.count])
        await kv.put(new_keys, new_blocks)

Every call is batch-first. A miss is a result (a short count), never an exception; failures raise
the kvstore error classes (:mod:`kvstore.errors`).

Bytes take one of two paths, chosen when the client connects: on the daemon's host the client
maps the daemon's DRAM arena and copies blocks in and out itself (:mod:`kvstore.client.local`);
anywhere else they travel in chunked gRPC streams with end-to-end checksums
(:mod:`kvstore.client.remote`). ``kv.path`` says which one is in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from kvstore.errors import InvalidArgumentError, KVStoreError, StaleSessionError, UnavailableError
from kvstore.keys import MAX_NAMESPACE_BYTES, Namespace
from kvstore.proto import CHANNEL_OPTIONS
from kvstore.proto.status import error_from_rpc
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.tier_kind import TierKind
from kvstore.client.buffers import byte_view, check_targets
from kvstore.client.gpu import device_buffer
from kvstore.client.local import LocalPath
from kvstore.client.remote import RemotePath
from kvstore.client.results import LookupResult, PutResult, Stats

log = logging.getLogger("kvstore.client")

MiB = 1 << 20
MAX_CHUNK_BYTES = 16 * MiB
LOCAL_MODES = ("auto", "off", "require")
REATTACH_INTERVAL_S = 5.0
_TIERS = {kind.value: kind for kind in TierKind}


class KVClient:
    """Connection to one kvstore daemon.

    Args:
        target: ``host:port`` of the daemon.
        namespace: scopes every key of this client (a :class:`~kvstore.Namespace` or up to 64 bytes):
            blocks of different namespaces never meet, in the daemon or in a shared S3 bucket.
            Keys from :func:`kvstore.block_keys` already depend on their namespace; this also
            scopes engines' own block hashes.
        local: ``"auto"`` uses the same-host shared-memory path when the daemon's arena can be
            mapped from here and the remote path otherwise; ``"off"`` always streams over gRPC;
            ``"require"`` fails to connect unless the same-host path works.
        timeout_s: deadline of each call.
        connect_timeout_s: how long entering the context waits for the daemon to answer.
        chunk_bytes: size of the data messages a remote put sends (at most 16 MiB).
        max_put_stream_bytes: a remote put of more bytes is split into several streams.
        max_keys_per_call: longer batches are split into several calls (the daemon's
            ``max_keys_per_request``).
    """

    def __init__(
        self,
        target: str,
        *,
        namespace: Namespace | bytes = b"",
        local: str = "auto",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        chunk_bytes: int = 1 * MiB,
        max_put_stream_bytes: int = 256 * MiB,
        max_keys_per_call: int = 65536,
    ) -> None:
        if local not in LOCAL_MODES:
            raise InvalidArgumentError(f"local must be one of {LOCAL_MODES}, got {local!r}")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgumentError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if max_put_stream_bytes <= 0 or max_keys_per_call <= 0:
            raise InvalidArgumentError("max_put_stream_bytes and max_keys_per_call must be positive")
        self.target = target
        self.namespace = namespace.digest if isinstance(namespace, Namespace) else bytes(namespace)
        if len(self.namespace) > MAX_NAMESPACE_BYTES:
            raise InvalidArgumentError(f"namespace is {len(self.namespace)} bytes; at most {MAX_NAMESPACE_BYTES}")
        self.local = local
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_put_stream_bytes = max_put_stream_bytes
        self.max_keys_per_call = max_keys_per_call
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStoreStub | None = None
        self._remote: RemotePath | None = None
        self._local: LocalPath | None = None
        self._next_attach = 0.0

    async def __aenter__(self) -> KVClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel, wait until the daemon answers, and pick the data path."""
        channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
            self._channel = channel
            self._stub = pb_grpc.KVStoreStub(channel)
            self._remote = RemotePath(
                self._stub, chunk_bytes=self.chunk_bytes, timeout_s=self.timeout_s, namespace=self.namespace
            )
            if self.local != "off":
                await self._attach()
        except asyncio.TimeoutError:
            await self.close()
            await channel.close()
            raise UnavailableError(
                f"no kvstore daemon answered at {self.target} within {self.connect_timeout_s:g}s "
                "(is `kvstore serve` running there?)"
            ) from None
        except BaseException:
            await self.close()
            await channel.close()
            raise

    async def _attach(self) -> None:
        """Map the daemon's arena if this process can; else stay on the remote path."""
        if self._local is not None:
            await self._local.close()
            self._local = None
        try:
            info = await self._stub.Attach(pb.AttachRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise error_from_rpc(exc) from None
            info = pb.AttachResponse()  # a daemon without the same-host path
        reason = "the daemon offers no same-host socket"
        if info.socket_path:
            try:
                self._local = await asyncio.wait_for(
                    LocalPath.attach(info, self.timeout_s, self.namespace), self.connect_timeout_s
                )
                return
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                reason = f"cannot map the daemon's arena through {info.socket_path}: {exc}"
        if self.local == "require":
            raise UnavailableError(f"same-host path required but unavailable: {reason}")
        log.info("using the remote data path to %s (%s)", self.target, reason)

    async def close(self) -> None:
        if self._local is not None:
            local, self._local = self._local, None
            await local.close()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._stub = self._remote = None
            await channel.close()

    @property
    def path(self) -> str:
        """``"local"`` (shared memory) or ``"remote"`` (gRPC streams)."""
        return "local" if self._local is not None else "remote"

    @property
    def stub(self) -> pb_grpc.KVStoreStub:
        if self._stub is None:
            raise UnavailableError("the client is not connected (use `async with KVClient(...)`)")
        return self._stub

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def _data(self, op: str, *args: Any) -> Any:
        """Run ``op`` on the data path in use; re-attach once if the daemon restarted."""
        if self._stub is None:
            raise UnavailableError("the client is not connected (use `async with KVClient(...)`)")
        if self._local is None and self.local != "off" and time.monotonic() >= self._next_attach:
            # The same-host path was lost (a restart, a failed attach): try again, now and then.
            self._next_attach = time.monotonic() + REATTACH_INTERVAL_S
            try:
                await self._attach()
            except KVStoreError:
                if self.local == "require":
                    raise
        for attempt in (1, 2):
            path = self._local or self._remote
            try:
                async with self._errors():
                    return await getattr(path, op)(*args)
            except StaleSessionError:
                if path is not self._local or attempt == 2:
                    raise
                log.info("same-host session ended (daemon restarted?); attaching again")
                await self._attach()  # raises in "require" mode if the same-host path is gone

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading ``keys`` are cached, and which tier holds each of them."""
        tiers: list[TierKind] = []
        for start in range(0, len(keys), self.max_keys_per_call):
            batch = keys[start : start + self.max_keys_per_call]
            response = await self._data("lookup", batch)
            tiers += map(_TIERS.__getitem__, response.tiers)
            if response.count < len(batch):
                break
        return LookupResult(count=len(tiers), tiers=tiers)

    async def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> PutResult:
        """Store ``blocks[i]`` under ``keys[i]``. Keys already present are left as they are."""
        if len(keys) != len(blocks):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(blocks)} blocks")
        views = [device_buffer(block, i) or byte_view(block, i) for i, block in enumerate(blocks)]
        total = PutResult(0, 0, 0)
        for start, stop in self._put_batches(views):
            total += await self._data("put", keys[start:stop], views[start:stop])
        return total

    def _put_batches(self, views: Sequence[Any]) -> list[tuple[int, int]]:
        if not views:
            return []
        batches, start, total = [], 0, 0
        for i, view in enumerate(views):
            full = i - start == self.max_keys_per_call or total + view.nbytes > self.max_put_stream_bytes
            if i > start and full:
                batches.append((start, i))
                start, total = i, 0
            total += view.nbytes
        batches.append((start, len(views)))
        return batches

    def _check_get(self, keys: Sequence[bytes]) -> None:
        if len(keys) > self.max_keys_per_call:
            raise InvalidArgumentError(
                f"a get takes at most {self.max_keys_per_call} keys; look up the chain, then get it in parts"
            )

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        """The bytes of the leading cached ``keys``, in order (stops at the first miss)."""
        if not keys:
            return []
        self._check_get(keys)
        return await self._data("get", keys)

    async def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> int:
        """Write the leading cached blocks into ``buffers``; returns how many were filled.

        ``buffers[i]`` must be writable, contiguous and at least as large as block ``i``.
        """
        if len(keys) != len(buffers):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} buffers")
        if not keys:
            return 0
        self._check_get(keys)
        views = [
            device_buffer(buf, i, writable=True) or byte_view(buf, i, writable=True) for i, buf in enumerate(buffers)
        ]
        return await self._data("get_into", keys, check_targets(views))

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys``; returns how many were present."""
        deleted = 0
        for start in range(0, len(keys), self.max_keys_per_call):
            batch = keys[start : start + self.max_keys_per_call]
            async with self._errors():
                response = await self.stub.Delete(
                    pb.DeleteRequest(keys=batch, namespace=self.namespace), timeout=self.timeout_s
                )
            deleted += response.deleted
        return deleted

    async def stats(self) -> Stats:
        async with self._errors():
            response = await self.stub.Stats(pb.StatsRequest(), timeout=self.timeout_s)
        return Stats.from_proto(response)
