"""Moving block bytes between daemons over gRPC: the transport that works everywhere.

A fetch is one ``Get`` stream from the block's home, asked with ``local_only`` so the home answers
from its own tiers and never asks its own peers in turn; a send is one ``Put`` stream to the home,
each block with its checksum, so the home verifies the bytes before it stores them. Each call has
a deadline. Errors are raised as :class:`~kvstore.errors.UnavailableError` (the peer is then left
alone for a while by the caller) or :class:`~kvstore.errors.IntegrityError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from kvstore.errors import IntegrityError, InvalidArgumentError, UnavailableError
from kvstore.framing import Unpacker, pack
from kvstore.proto.channel import ReloadingChannelTls, open_channel
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc

CHUNK_BYTES = 1 << 20
TLS_REFRESH_S = 1.0
STALE_CHANNEL_S = 60.0
"""How long channels opened with replaced TLS files stay open for the calls still on them."""
"""How often the TLS files' stamps are looked at (when a peer is called)."""


class GrpcPeers:
    """One channel per peer, opened on first use and closed when the peer leaves; over TLS when
    ``tls`` is given, all reopened when its files change (a renewed certificate)."""

    name = "grpc"

    def __init__(self, tls: ReloadingChannelTls | None = None, token: str = "") -> None:
        self.tls = tls
        self.token = token
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.KVStoreStub]] = {}
        self._stale: list[grpc.aio.Channel] = []
        self._next_refresh = 0.0

    def stub(self, peer: str) -> pb_grpc.KVStoreStub:
        if self.tls is not None and time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + TLS_REFRESH_S
            if self.tls.refresh():
                # Calls in flight finish on the old channels; they are closed a while later.
                stale = [channel for channel, _ in self._channels.values()]
                self._channels.clear()
                self._stale += stale
                asyncio.get_running_loop().call_later(STALE_CHANNEL_S, self._close_later, stale)
        entry = self._channels.get(peer)
        if entry is None:
            channel = open_channel(peer, self.tls.current if self.tls is not None else None, self.token)
            entry = self._channels[peer] = (channel, pb_grpc.KVStoreStub(channel))
        return entry[1]

    def _close_later(self, channels: list) -> None:
        for channel in channels:
            if channel in self._stale:
                self._stale.remove(channel)
                task = asyncio.ensure_future(channel.close())
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def forget(self, peers: Sequence[str]) -> None:
        for peer in peers:
            entry = self._channels.pop(peer, None)
            if entry is not None:
                await entry[0].close()

    async def close(self) -> None:
        await self.forget(list(self._channels))
        stale, self._stale = self._stale, []
        for channel in stale:
            await channel.close()

    async def probe(self, peer: str, keys: Sequence[bytes], namespace: bytes, timeout_s: float) -> pb.ProbeResponse:
        request = pb.ProbeRequest(namespace=namespace, packed_keys=b"".join(keys), key_bytes=len(keys[0]))
        try:
            response = await self.stub(peer).Probe(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"probe: {exc.code().name}: {exc.details()}") from None
        held = sum(1 for b in response.present if b)
        if len(response.present) != len(keys) or len(response.sizes) != held or len(response.checksums) != held:
            raise UnavailableError("probe: a malformed answer")
        return response

    async def fetch(self, peer: str, key: bytes, namespace: bytes, out: memoryview, timeout_s: float) -> int:
        """Read one block from ``peer`` into ``out`` (its size exactly); returns the bytes read."""
        call = self.stub(peer).Get(pb.GetRequest(keys=[key], namespace=namespace, local_only=True), timeout=timeout_s)
        try:
            stream = aiter(call)
            first = await anext(stream, None)
            header = first.header if first is not None else None
            if header is None or header.count != 1 or len(header.sizes) != 1:
                raise UnavailableError(f"the peer no longer holds block {key[:8].hex()}")
            if header.sizes[0] != out.nbytes:
                raise IntegrityError(f"the peer holds {header.sizes[0]} bytes for a block of {out.nbytes}")
            unpacker = Unpacker(header.sizes)
            async for message in stream:
                for _, offset, piece in unpacker.feed(message.data):
                    out[offset : offset + piece.nbytes] = piece
            unpacker.check_complete()
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"get: {exc.code().name}: {exc.details()}") from None
        except InvalidArgumentError as exc:   # the stream's framing did not add up
            raise IntegrityError(f"the peer's stream: {exc}") from None
        finally:
            call.cancel()
        return out.nbytes

    async def send(
        self, peer: str, keys: Sequence[bytes], namespace: bytes, views: Sequence[memoryview],
        checksums: Sequence[int], timeout_s: float,
    ) -> pb.PutResponse:
        """Put ``views`` under ``keys`` at ``peer`` with their ``checksums``, which the peer verifies."""
        header = pb.PutHeader(namespace=namespace, keys=keys, sizes=[v.nbytes for v in views], checksums=checksums)

        def messages():
            yield pb.PutRequest(header=header)
            for chunk in pack(views, CHUNK_BYTES):
                yield pb.PutRequest(data=chunk)

        try:
            return await self.stub(peer).Put(messages(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"put: {exc.code().name}: {exc.details()}") from None

    async def delete(self, peer: str, keys: Sequence[bytes], namespace: bytes, timeout_s: float) -> None:
        try:
            await self.stub(peer).Delete(pb.DeleteRequest(keys=keys, namespace=namespace, local_only=True), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"delete: {exc.code().name}: {exc.details()}") from None
