"""The remote data path: block bytes in chunked gRPC streams.

Works wherever gRPC does (other hosts included). A put is one client stream (header, then the
blocks back to back in chunks), a get one server stream; memory stays bounded on both sides and
gRPC's flow control paces the sender. Every block carries its XXH3-64 checksum both ways.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from kvstore.checksum import checksum
from kvstore.errors import InternalError
from kvstore.framing import Unpacker, pack
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.client.buffers import Targets
from kvstore.client.gpu import DeviceBuffer, host_views, staged_targets
from kvstore.client.path import DataPath, lookup_request, lookup_result
from kvstore.client.results import LookupResult, PutResult

log = logging.getLogger("kvstore.client")


class RemotePath(DataPath):
    name = "remote"

    def __init__(self, stub: pb_grpc.KVStoreStub, *, chunk_bytes: int, timeout_s: float, namespace: bytes) -> None:
        self.stub = stub
        self.namespace = namespace
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        request = lookup_request(keys, self.namespace)
        return lookup_result(await self.stub.Lookup(request, timeout=self.timeout_s))

    async def put(self, keys: Sequence[bytes], sources: Sequence[memoryview | DeviceBuffer]) -> PutResult:
        views = host_views(sources)
        header = pb.PutHeader(
            namespace=self.namespace, keys=keys, sizes=[v.nbytes for v in views], checksums=[checksum(v) for v in views]
        )

        def messages():
            yield pb.PutRequest(header=header)
            for chunk in pack(views, self.chunk_bytes):
                yield pb.PutRequest(data=chunk)

        response = await self.stub.Put(messages(), timeout=self.timeout_s)
        return PutResult.from_proto(response)

    async def get_into(self, keys: Sequence[bytes], targets: Targets) -> int:
        """Stream the leading blocks into ``targets(start, sizes)``; returns how many verified."""
        done = 0
        while done < len(keys):
            finish = None

            def host_targets(sizes: Sequence[int], start: int = done) -> list[memoryview]:
                nonlocal finish
                views, finish = staged_targets(targets(start, sizes))
                return views

            count, partial = await self._receive(keys[done:], host_targets)
            if finish is not None:
                finish(count)
            done += count
            if not partial or count == 0:
                break
        return done

    async def _receive(self, keys: Sequence[bytes], targets: Callable[[Sequence[int]], list[memoryview]]) -> tuple[int, bool]:
        """One Get call: (blocks that verified, whether the daemon stopped for lack of room)."""
        call = self.stub.Get(pb.GetRequest(keys=keys, namespace=self.namespace), timeout=self.timeout_s)
        try:
            stream = aiter(call)
            first = await anext(stream, None)
            header = first.header if first is not None else None
            if header is None or not header.count == len(header.sizes) == len(header.checksums) <= len(keys):
                raise InternalError("the daemon answered a get with a malformed header")
            if header.count == 0:
                return 0, False
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
                # Drop the bad copy (only if it is still the one we read) so a put can repair it:
                # best effort (a tenant that may only read a shared namespace may not), the miss stands.
                try:
                    await self.stub.Delete(
                        pb.DeleteRequest(keys=[keys[i]], if_checksums=[header.checksums[i]], namespace=self.namespace),
                        timeout=self.timeout_s,
                    )
                except grpc.RpcError as exc:
                    log.info("could not drop the bad copy of block %d (%s)", i, exc.code().name)
                return i, False
        return header.count, header.partial

    async def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        out: list[bytearray] = []

        def targets(start: int, sizes: Sequence[int]) -> list[memoryview]:
            del out[start:]
            out.extend(bytearray(size) for size in sizes)
            return [memoryview(b) for b in out[start:]]

        count = await self.get_into(keys, targets)
        del out[count:]
        return out

    async def close(self) -> None:
        pass
