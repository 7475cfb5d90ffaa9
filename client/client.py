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
(:mod:`kvstore.client.remote`); both implement :class:`~kvstore.client.path.DataPath`.
``kv.path`` says which one is in use. Settings come in one :class:`~kvstore.client.ClientConfig`
(or as its fields, as keyword arguments).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from kvstore.errors import InvalidArgumentError, KVStoreError, StaleSessionError, UnavailableError
from kvstore.proto.channel import open_channel, wait_until_ready
from kvstore.proto.status import error_from_rpc
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.tier_kind import TierKind
from kvstore.client.buffers import byte_view, check_targets
from kvstore.client.config import ClientConfig, LocalMode
from kvstore.client.gpu import device_buffer
from kvstore.client.local import LocalPath
from kvstore.client.path import DataPath
from kvstore.client.remote import RemotePath
from kvstore.client.results import LookupResult, PutResult, Stats

log = logging.getLogger("kvstore.client")

REATTACH_INTERVAL_S = 5.0
T = TypeVar("T")


class KVClient:
    """Connection to one kvstore daemon.

    Args:
        target: ``host:port`` of the daemon.
        config: the client's settings (:class:`~kvstore.client.ClientConfig`).
        **options: instead of ``config``, its fields (``namespace=``, ``local=``, ``timeout_s=``, ...).

    Raises:
        InvalidArgumentError: a bad setting (the message names the field), or both ``config`` and
            ``options``.
        TypeError: an option that is not a field of ``ClientConfig``.
    """

    def __init__(self, target: str, *, config: ClientConfig | None = None, **options: Any) -> None:
        self.target = target
        self.config = _config(config, options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStoreStub | None = None
        self._remote: RemotePath | None = None
        self._local: LocalPath | None = None
        self._next_attach = 0.0

    @property
    def namespace(self) -> bytes:
        """The namespace that scopes every key of this client (``config.namespace``)."""
        return self.config.namespace

    async def __aenter__(self) -> KVClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel, wait until the daemon answers, and pick the data path."""
        config = self.config
        tls = config.channel_tls()
        channel = open_channel(self.target, tls, config.token)
        try:
            await wait_until_ready(channel, self.target, tls, config.connect_timeout_s)
            self._channel = channel
            self._stub = pb_grpc.KVStoreStub(channel)
            self._remote = RemotePath(
                self._stub, chunk_bytes=config.chunk_bytes, timeout_s=config.timeout_s, namespace=config.namespace
            )
            if config.local is not LocalMode.OFF:
                await self._attach()
        except asyncio.TimeoutError:
            await self.close()
            await channel.close()
            raise UnavailableError(
                f"no kvstore daemon answered at {self.target} within {config.connect_timeout_s:g}s "
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
            info = await self._stub.Attach(pb.AttachRequest(), timeout=self.config.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise error_from_rpc(exc) from None
            info = pb.AttachResponse()  # a daemon without the same-host path
        reason = "the daemon offers no same-host socket"
        if info.socket_path:
            try:
                self._local = await asyncio.wait_for(
                    LocalPath.attach(info, self.config.timeout_s, self.config.namespace),
                    self.config.connect_timeout_s,
                )
                return
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                reason = f"cannot map the daemon's arena through {info.socket_path}: {exc}"
        if self.config.local is LocalMode.REQUIRE:
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
        return LocalPath.name if self._local is not None else RemotePath.name

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

    async def _data(self, call: Callable[[DataPath], Awaitable[T]]) -> T:
        """``call(path)`` on the data path in use; re-attach once if the daemon restarted.

        ``call`` may run twice (again on a new session after a restart), so it should do nothing
        but call one method of the path.
        """
        if self._stub is None:
            raise UnavailableError("the client is not connected (use `async with KVClient(...)`)")
        mode = self.config.local
        if self._local is None and mode is not LocalMode.OFF and time.monotonic() >= self._next_attach:
            # The same-host path was lost (a restart, a failed attach): try again, now and then.
            self._next_attach = time.monotonic() + REATTACH_INTERVAL_S
            try:
                await self._attach()
            except KVStoreError:
                if mode is LocalMode.REQUIRE:
                    raise
        for attempt in (1, 2):
            path = self._local or self._remote
            try:
                async with self._errors():
                    return await call(path)
            except StaleSessionError:
                if path is not self._local or attempt == 2:
                    raise
                log.info("same-host session ended (daemon restarted?); attaching again")
                await self._attach()  # raises in "require" mode if the same-host path is gone

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading ``keys`` are cached, and which tier holds each of them."""
        step = self.config.max_keys_per_call
        if 0 < len(keys) <= step:   # one call: its answer as it came
            return await self._data(lambda path: path.lookup(keys))
        tiers: list[TierKind] = []
        for start in range(0, len(keys), step):
            batch = keys[start : start + step]
            hit = await self._data(lambda path: path.lookup(batch))
            tiers += hit.tiers
            if hit.count < len(batch):
                break
        return LookupResult(count=len(tiers), tiers=tiers)

    async def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> PutResult:
        """Store ``blocks[i]`` under ``keys[i]``. Keys already present are left as they are."""
        if len(keys) != len(blocks):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(blocks)} blocks")
        views = [device_buffer(block, i) or byte_view(block, i) for i, block in enumerate(blocks)]
        total = PutResult(0, 0, 0)
        for start, stop in self._put_batches(views):
            batch_keys, batch_views = keys[start:stop], views[start:stop]
            total += await self._data(lambda path: path.put(batch_keys, batch_views))
        return total

    def _put_batches(self, views: Sequence[Any]) -> list[tuple[int, int]]:
        if not views:
            return []
        max_keys, max_bytes = self.config.max_keys_per_call, self.config.max_put_stream_bytes
        batches, start, total = [], 0, 0
        for i, view in enumerate(views):
            full = i - start == max_keys or total + view.nbytes > max_bytes
            if i > start and full:
                batches.append((start, i))
                start, total = i, 0
            total += view.nbytes
        batches.append((start, len(views)))
        return batches

    def _check_get(self, keys: Sequence[bytes]) -> None:
        if len(keys) > self.config.max_keys_per_call:
            raise InvalidArgumentError(
                f"a get takes at most {self.config.max_keys_per_call} keys; look up the chain, then get it in parts"
            )

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        """The bytes of the leading cached ``keys``, in order (stops at the first miss)."""
        if not keys:
            return []
        self._check_get(keys)
        return await self._data(lambda path: path.get(keys))

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
        targets = check_targets(views)
        return await self._data(lambda path: path.get_into(keys, targets))

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys``; returns how many were present."""
        deleted, step = 0, self.config.max_keys_per_call
        for start in range(0, len(keys), step):
            request = pb.DeleteRequest(keys=keys[start : start + step], namespace=self.config.namespace)
            async with self._errors():
                response = await self.stub.Delete(request, timeout=self.config.timeout_s)
            deleted += response.deleted
        return deleted

    async def stats(self) -> Stats:
        async with self._errors():
            response = await self.stub.Stats(pb.StatsRequest(), timeout=self.config.timeout_s)
        return Stats.from_proto(response)


def _config(config: ClientConfig | None, options: dict[str, Any]) -> ClientConfig:
    """The client's settings from ``config=`` or from its fields as keyword arguments, not both."""
    if config is None:
        unknown = options.keys() - {f.name for f in dataclasses.fields(ClientConfig)}
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(ClientConfig))
            raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}; the settings are: {fields}")
        return ClientConfig(**options)
    if options:
        raise InvalidArgumentError(f"pass config= or keyword settings, not both (got config= and {', '.join(options)})")
    if not isinstance(config, ClientConfig):
        raise InvalidArgumentError(f"config must be a ClientConfig, got {type(config).__name__}")
    return config
