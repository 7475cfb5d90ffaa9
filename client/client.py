"""The async client that serving workers import.

    async with KVClient("127.0.0.1:7070") as kv:
        keys = kvstore.block_keys(tokens, block_size=16, namespace=ns)
        hit = await kv.lookup(keys)            # how many leading blocks are cached, and where
        blocks = await kv.get(keys[: hit.count])
        await kv.put(new_keys, new_blocks)

Every call is batch-first. A miss is a result (a short count), never an exception; failures raise
the kvstore error classes (:mod:`kvstore.errors`). Every block travels with its XXH3-64 checksum
and is verified on arrival at both ends: a block that does not verify is never handed back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from kvstore.checksum import checksum
from kvstore.errors import InternalError, InvalidArgumentError, UnavailableError
from kvstore.framing import Unpacker, pack
from kvstore.proto import CHANNEL_OPTIONS
from kvstore.proto.status import error_from_rpc
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.tier_kind import TierKind
from kvstore.client.buffers import byte_view
from kvstore.client.results import LookupResult, PutResult, Stats

log = logging.getLogger("kvstore.client")

MiB = 1 << 20
MAX_CHUNK_BYTES = 16 * MiB


class KVClient:
    """Connection to one kvstore daemon.

    Args:
        target: ``host:port`` of the daemon.
        timeout_s: deadline of each call.
        connect_timeout_s: how long entering the context waits for the daemon to answer.
        chunk_bytes: size of the data messages a put sends.
        max_put_stream_bytes: a put of more bytes is split into several streams.
        max_keys_per_call: longer batches are split into several calls (the daemon's
            ``max_keys_per_request``).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        chunk_bytes: int = 1 * MiB,
        max_put_stream_bytes: int = 256 * MiB,
        max_keys_per_call: int = 65536,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgumentError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if max_put_stream_bytes <= 0 or max_keys_per_call <= 0:
            raise InvalidArgumentError("max_put_stream_bytes and max_keys_per_call must be positive")
        self.target = target
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_put_stream_bytes = max_put_stream_bytes
        self.max_keys_per_call = max_keys_per_call
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStoreStub | None = None

    async def __aenter__(self) -> KVClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel and wait until the daemon answers."""
        channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            await channel.close()
            raise UnavailableError(
                f"no kvstore daemon answered at {self.target} within {self.connect_timeout_s:g}s "
                "(is `kvstore serve` running there?)"
            ) from None
        except BaseException:
            await channel.close()
            raise
        self._channel = channel
        self._stub = pb_grpc.KVStoreStub(channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

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

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading ``keys`` are cached, and which tier holds each of them."""
        tiers: list[TierKind] = []
        for start in range(0, len(keys), self.max_keys_per_call):
            batch = keys[start : start + self.max_keys_per_call]
            async with self._errors():
                response = await self.stub.Lookup(pb.LookupRequest(keys=batch), timeout=self.timeout_s)
            tiers += [TierKind(t) for t in response.tiers]
            if response.count < len(batch):
                break
        return LookupResult(count=len(tiers), tiers=tiers)

    async def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> PutResult:
        """Store ``blocks[i]`` under ``keys[i]``. Keys already present are left as they are."""
        if len(keys) != len(blocks):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(blocks)} blocks")
        views = [byte_view(block, i) for i, block in enumerate(blocks)]
        stored = present = dropped = 0
        for start, stop in self._put_batches(views):
            result = await self._put_stream(keys[start:stop], views[start:stop])
            stored += result.stored
            present += result.present
            dropped += result.dropped
        return PutResult(stored=stored, present=present, dropped=dropped)

    def _put_batches(self, views: Sequence[memoryview]) -> list[tuple[int, int]]:
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

    async def _put_stream(self, keys: Sequence[bytes], views: Sequence[memoryview]) -> pb.PutResponse:
        header = pb.PutHeader(
            keys=keys, sizes=[v.nbytes for v in views], checksums=[checksum(v) for v in views]
        )

        def messages():
            yield pb.PutRequest(header=header)
            for chunk in pack(views, self.chunk_bytes):
                yield pb.PutRequest(data=chunk)

        async with self._errors():
            return await self.stub.Put(messages(), timeout=self.timeout_s)

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        """The bytes of the leading cached ``keys``, in order (stops at the first miss)."""
        out: list[bytearray] = []

        def targets(sizes: Sequence[int]) -> list[memoryview]:
            out.extend(bytearray(size) for size in sizes)
            return [memoryview(b) for b in out]

        count = await self._get(keys, targets)
        del out[count:]
        return out

    async def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> int:
        """Write the leading cached blocks into ``buffers``; returns how many were filled.

        ``buffers[i]`` must be writable, contiguous and at least as large as block ``i``.
        """
        if len(keys) != len(buffers):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [byte_view(buf, i, writable=True) for i, buf in enumerate(buffers)]

        def targets(sizes: Sequence[int]) -> list[memoryview]:
            for i, size in enumerate(sizes):
                if views[i].nbytes < size:
                    raise InvalidArgumentError(
                        f"buffer {i} holds {views[i].nbytes} bytes but block {i} is {size} bytes"
                    )
            return views

        return await self._get(keys, targets)

    async def _get(self, keys: Sequence[bytes], targets: Callable[[Sequence[int]], list[memoryview]]) -> int:
        """Stream the leading blocks into ``targets(sizes)``; returns how many verified."""
        if not keys:
            return 0
        if len(keys) > self.max_keys_per_call:
            raise InvalidArgumentError(
                f"a get takes at most {self.max_keys_per_call} keys; look up the chain, then get it in parts"
            )
        async with self._errors():
            call = self.stub.Get(pb.GetRequest(keys=keys), timeout=self.timeout_s)
            try:
                stream = aiter(call)
                first = await anext(stream, None)
                header = first.header if first is not None else None
                if header is None or not header.count == len(header.sizes) == len(header.checksums) <= len(keys):
                    raise InternalError("the daemon answered a get with a malformed header")
                if header.count == 0:
                    return 0
                views = targets(header.sizes)
                unpacker = Unpacker(header.sizes)
                async for message in stream:
                    for i, offset, piece in unpacker.feed(message.data):
                        views[i][offset : offset + piece.nbytes] = piece
                unpacker.check_complete()
            finally:
                call.cancel()
        for i, size in enumerate(header.sizes):
            if checksum(views[i][:size]) != header.checksums[i]:
                log.warning("block %d of a get failed its checksum: a miss from there on; dropping it", i)
                # Drop the bad copy (only if it is still the one we read) so a put can repair it.
                async with self._errors():
                    await self.stub.Delete(
                        pb.DeleteRequest(keys=[keys[i]], if_checksums=[header.checksums[i]]), timeout=self.timeout_s
                    )
                return i
        return header.count

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys``; returns how many were present."""
        deleted = 0
        for start in range(0, len(keys), self.max_keys_per_call):
            batch = keys[start : start + self.max_keys_per_call]
            async with self._errors():
                response = await self.stub.Delete(pb.DeleteRequest(keys=batch), timeout=self.timeout_s)
            deleted += response.deleted
        return deleted

    async def stats(self) -> Stats:
        async with self._errors():
            response = await self.stub.Stats(pb.StatsRequest(), timeout=self.timeout_s)
        return Stats.from_proto(response)
