"""The gRPC face of the daemon: protobuf in, domain calls, protobuf out.

Requests arrive as raw bytes and are parsed here, so a message that does not decode is answered
with INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). Every kvstore error maps
to its status code in one place (:mod:`kvstore.proto.status`); anything else is a bug, logged and
answered with INTERNAL. No policy lives here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from contextlib import asynccontextmanager

import grpc
from google.protobuf.message import DecodeError, Message

from kvstore.errors import (
    DeadlineExceededError, IntegrityError, InvalidArgumentError, KVStoreError, PermissionDeniedError, RateLimitedError,
    UnauthenticatedError,
)
from kvstore.proto.status import code_for
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.stats import stats_to_proto
from kvstore.tenants import Tenant
from kvstore.server.daemon import Daemon
from kvstore.server.gate import Gate
from kvstore.server.leasing import Leasing, slot_state
from kvstore.server.window import WindowedCalls
from kvstore.server.metrics import Metrics
from kvstore.framing import pack
from kvstore.server.transfer import PutReceiver, block_views

log = logging.getLogger("kvstore.servicer")

SERVICE = "kvstore.v1.KVStore"


async def _result(value: Any) -> Any:
    """Unary handlers are plain functions, or coroutines where they wait for a disk."""
    return await value if inspect.isawaitable(value) else value


def _parse(cls: type[Message], raw: bytes) -> Message:
    message = cls()
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidArgumentError(f"cannot decode the {cls.DESCRIPTOR.name} message: {exc}") from None
    return message


DRAIN_LIMIT_BYTES = 256 << 20
DRAIN_IDLE_S = 0.2
"""How much of a rejected put stream the daemon reads and discards before answering."""


async def _drain(stream: AsyncIterator[bytes], limit_bytes: int, timeout_s: float) -> None:
    seen = 0
    try:
        while seen < limit_bytes and (raw := await asyncio.wait_for(anext(stream, None), timeout_s)) is not None:
            seen += len(raw)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass


async def _next_within(stream: AsyncIterator[bytes], timeout_s: float) -> bytes | None:
    """The next message of a client stream, None at its end; DeadlineExceeded if it stalls."""
    try:
        return await asyncio.wait_for(anext(stream, None), timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceededError(f"the put stream sent nothing for {timeout_s:g}s; its reservations were released") from None


class KVStoreServicer:
    def __init__(
        self, daemon: Daemon, leasing: Leasing, metrics: Metrics, local_socket_path: str | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.daemon = daemon
        self.gate = gate or Gate(None)
        self.leasing = leasing
        self.metrics = metrics
        self.local_socket_path = local_socket_path
        self.local: Any = None   # the LocalSocket, when there is one (it issues same-host tickets)
        self._methods = self.unary_methods()

    def handler(self) -> grpc.GenericRpcHandler:
        def out(cls: type[Message]) -> dict:
            return {"response_serializer": cls.SerializeToString}

        methods = {
            name: grpc.unary_unary_rpc_method_handler(self._unary(name, request_cls, fn), **out(response_cls))
            for name, (request_cls, response_cls, fn) in self._methods.items()
        }
        methods["Put"] = grpc.stream_unary_rpc_method_handler(self.put, **out(pb.PutResponse))
        methods["Get"] = grpc.unary_stream_rpc_method_handler(self.get, **out(pb.GetResponse))
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def unary_methods(self) -> dict[str, tuple[type[Message], type[Message], Callable[[Any], Message]]]:
        """Every unary call: request type, response type, and the function answering it."""
        return {
            "Lookup": (pb.LookupRequest, pb.LookupResponse, self.lookup),
            "Delete": (pb.DeleteRequest, pb.DeleteResponse, self.delete),
            "Stats": (pb.StatsRequest, pb.StatsResponse, self.stats),
            "Attach": (pb.AttachRequest, pb.AttachResponse, self.attach),
            "Reserve": (pb.ReserveRequest, pb.ReserveResponse, self.reserve),
            "Commit": (pb.CommitRequest, pb.PutResponse, self.commit),
            "Acquire": (pb.AcquireRequest, pb.AcquireResponse, self.acquire),
            "Release": (pb.ReleaseRequest, pb.ReleaseResponse, self.release),
            "Probe": (pb.ProbeRequest, pb.ProbeResponse, self.probe),
            "PeerHello": (pb.PeerHelloRequest, pb.PeerHelloResponse, self.peer_hello),
        }

    def _unary(self, method: str, request_cls: type[Message], fn: Callable[[Any], Any]):
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            async with self._rpc(method, context):
                request = _parse(request_cls, raw)
                tenant = self._admit(method, request, context)
                if method == "Attach":   # a tenant's same-host session is bound to it by a ticket
                    return self.attach(request, tenant)
                return await _result(fn(request))

        return handle

    async def call_local(
        self, method: str, raw: bytes, session: str, tenant: Tenant | None = None, window: WindowedCalls | None = None
    ) -> tuple[int, bytes]:
        """Answer one call from the local socket: (0, response) or (status code, error text).

        A session of a tenant (with tenants, every session) has its namespaces scoped to the
        tenant and its lease calls answered through its window.
        """
        request_cls, _, fn = self._methods[method]
        start = time.perf_counter()
        try:
            request = _parse(request_cls, raw)
            fields = request.DESCRIPTOR.fields_by_name
            if "session" in fields:
                request.session = session  # the socket is the session
            if tenant is not None:
                scoped = self.gate.local(tenant, method, request.namespace if "namespace" in fields else b"")
                if "namespace" in fields:
                    request.namespace = scoped
            if window is not None:
                fn = {"Reserve": window.reserve, "Commit": self._windowed_commit(window),
                      "Acquire": window.acquire, "Release": window.release}.get(method, fn)
            return 0, (await _result(fn(request))).SerializeToString()
        except KVStoreError as exc:
            code = code_for(exc)
            self.metrics.rpc_errors.labels(method, code.name).inc()
            self._count_refusal(exc)
            return code.value[0], str(exc).encode()
        except Exception as exc:
            log.exception("%s failed", method)
            self.metrics.rpc_errors.labels(method, "INTERNAL").inc()
            return grpc.StatusCode.INTERNAL.value[0], f"{method} failed inside the daemon ({type(exc).__name__})".encode()
        finally:
            self.metrics.rpc_latency.labels(method).observe(time.perf_counter() - start)

    def _count_refusal(self, exc: KVStoreError) -> None:
        counters = self.daemon.counters
        if isinstance(exc, UnauthenticatedError):
            counters.unauthenticated_calls += 1
        elif isinstance(exc, PermissionDeniedError):
            counters.denied_calls += 1
        elif isinstance(exc, RateLimitedError):
            counters.rate_limited_calls += 1

    def _admit(self, method: str, request: Message, context: grpc.aio.ServicerContext) -> Tenant | None:
        """Check the caller against the gate; scope the request's namespace to its tenant."""
        if self.gate.open:
            return None
        fields = request.DESCRIPTOR.fields_by_name
        local_only = "local_only" in fields and request.local_only
        tenant = self.gate.caller(method, context.invocation_metadata(), local_only=local_only)
        if "namespace" in fields:
            request.namespace = self.gate.namespace(tenant, method, request.namespace)
        return tenant

    @asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        except KVStoreError as exc:
            code = code_for(exc)
            self.metrics.rpc_errors.labels(method, code.name).inc()
            self._count_refusal(exc)
            await context.abort(code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("%s failed", method)
            self.metrics.rpc_errors.labels(method, "INTERNAL").inc()
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{method} failed inside the daemon ({type(exc).__name__}); see its log"
            )
        finally:
            self.metrics.rpc_latency.labels(method).observe(time.perf_counter() - start)

    async def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        if request.packed_keys or request.key_bytes:
            if request.keys:
                raise InvalidArgumentError("a lookup sends keys or packed_keys, not both")
            tiers = await self.daemon.lookup_packed(request.packed_keys, request.key_bytes, request.namespace)
            return pb.LookupResponse(count=len(tiers), packed_tiers=tiers)
        tiers = await self.daemon.lookup(request.keys, request.namespace)
        return pb.LookupResponse(count=len(tiers), tiers=tiers)

    async def put(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> pb.PutResponse:
        async with self._rpc("Put", context):
            stream = aiter(requests)
            try:
                tenant = None if self.gate.open else self.gate.caller("Put", context.invocation_metadata())
                return await self._put(stream, tenant)
            except (InvalidArgumentError, IntegrityError, UnauthenticatedError, PermissionDeniedError):
                # Answering while the client still writes makes grpc report a bare INTERNAL to it
                # instead of this status: read what it is sending (bounded) before answering, but
                # a client that keeps the stream open and sends nothing is answered at once.
                await _drain(stream, DRAIN_LIMIT_BYTES, DRAIN_IDLE_S)
                raise

    async def _put(self, stream: AsyncIterator[bytes], tenant: Tenant | None) -> pb.PutResponse:
        idle_s = self.daemon.config.stream_idle_timeout_s
        first = await _next_within(stream, idle_s)
        header = _parse(pb.PutRequest, first) if first is not None else None
        if header is None or header.WhichOneof("part") != "header":
            raise InvalidArgumentError("a put stream must start with a header message")
        h = header.header
        self.daemon.check_put(h.keys, h.sizes, h.checksums)
        namespace = self.gate.namespace(tenant, "Put", h.namespace)
        fit = await self.daemon.quota_fit(h.sizes, namespace) if tenant is not None else None
        receiver = PutReceiver(self.daemon, h.keys, h.sizes, h.checksums, namespace, fit)
        try:
            # A stream that stalls must not hold its reservation for ever.
            while (raw := await _next_within(stream, idle_s)) is not None:
                message = _parse(pb.PutRequest, raw)
                if message.WhichOneof("part") != "data":
                    raise InvalidArgumentError("only the first message of a put stream may be a header")
                await receiver.feed(message.data)
            await receiver.close()
        finally:
            receiver.abort()
        return _put_response(receiver.stored, receiver.slots)

    async def get(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetResponse]:
        async with self._rpc("Get", context):
            request = _parse(pb.GetRequest, raw)
            self._admit("Get", request, context)
            copies, partial = await self.daemon.acquire(request.keys, request.namespace, local_only=request.local_only)
            try:
                records = [c.record for c in copies]
                yield pb.GetResponse(
                    header=pb.GetHeader(
                        count=len(records),
                        sizes=[r.size for r in records],
                        checksums=[self.daemon.checksum_of(r) for r in records],
                        tiers=[self.daemon.layout.levels[c.level].kind for c in copies],
                        partial=partial,
                    )
                )
                for chunk in pack(block_views(self.daemon, copies), self.daemon.config.stream_chunk_bytes):
                    yield pb.GetResponse(data=chunk)
                self.daemon.counters.bytes_out += sum(r.size for r in records)
            finally:
                self.daemon.release(copies)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        return pb.DeleteResponse(
            deleted=await self.daemon.delete(
                request.keys, request.if_checksums, request.namespace, local_only=request.local_only
            )
        )

    async def peer_hello(self, request: pb.PeerHelloRequest) -> pb.PeerHelloResponse:
        answer = await self.daemon.peer_hello(request.agent, request.metadata)
        if answer is None:   # no NIXL here: an empty answer, and the peer uses the gRPC stream
            return pb.PeerHelloResponse()
        agent, metadata, address, size = answer
        return pb.PeerHelloResponse(session=self.leasing.open_peer_session(request.agent), agent=agent,
                                    metadata=metadata, arena_address=address, arena_bytes=size)

    def probe(self, request: pb.ProbeRequest) -> pb.ProbeResponse:
        present, sizes, checksums = self.daemon.probe(request.packed_keys, request.key_bytes, request.namespace)
        return pb.ProbeResponse(present=present, sizes=sizes, checksums=checksums)

    def stats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        d = self.daemon
        return stats_to_proto(version=d.version, uptime_s=d.uptime_s, counters=d.counters, usage=d.usage())

    def attach(self, request: pb.AttachRequest, tenant: Tenant | None = None) -> pb.AttachResponse:
        d = self.daemon
        limit, reason = d.block_limit()
        response = pb.AttachResponse(
            arena_id=d.arena_id, socket_path=self.local_socket_path or "",
            arena_bytes=d.arena.capacity_bytes, lease_ttl_s=self.leasing.table.ttl_s,
            max_block_bytes=limit, max_block_reason=reason, put_round_bytes=d.put_round_bytes(),
            daemon_uid=os.geteuid(),
        )
        if tenant is not None and self.local is not None:
            # The client maps a window of its own, not the arena: sizes are the window's.
            window = self.local.window_bytes
            response.ticket = self.local.ticket_for(tenant)
            response.arena_bytes, response.put_round_bytes = window, window // 2
            if window < limit:
                response.max_block_bytes, response.max_block_reason = window, "the size of a same-host window"
        return response

    async def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        lease, slots = await self.leasing.reserve(
            request.session, request.keys, request.sizes, time.monotonic(), request.namespace
        )
        return pb.ReserveResponse(
            lease=lease.id,
            states=[slot_state(slot) for slot in slots],
            offsets=[slot.copy.location.offset if slot.copy else 0 for slot in slots],
        )

    async def commit(self, request: pb.CommitRequest) -> pb.PutResponse:
        stored, slots = await self.leasing.commit(request.session, request.lease, request.checksums, request.abort)
        return self._committed(stored, slots)

    def _windowed_commit(self, window: WindowedCalls):
        async def commit(request: pb.CommitRequest) -> pb.PutResponse:
            return self._committed(*await window.commit(request))

        return commit

    def _committed(self, stored: int, slots) -> pb.PutResponse:
        self.daemon.counters.bytes_in += sum(slot.size for slot in slots if slot.copy is not None)
        return _put_response(stored, slots)

    async def acquire(self, request: pb.AcquireRequest) -> pb.AcquireResponse:
        lease, partial = await self.leasing.acquire(
            request.session, request.keys, time.monotonic(), request.namespace
        )
        if lease is None:
            return pb.AcquireResponse()
        copies = lease.records
        self.daemon.counters.bytes_out += sum(c.record.size for c in copies)
        return pb.AcquireResponse(
            lease=lease.id, count=len(copies),
            offsets=[c.location.offset for c in copies], sizes=[c.record.size for c in copies],
            tiers=[self.daemon.layout.levels[c.level].kind for c in copies], partial=partial,
        )

    def release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self.leasing.release(request.session, request.leases))


def _put_response(stored: int, slots) -> pb.PutResponse:
    present = sum(slot.present for slot in slots)
    dropped = sum(slot.copy is None and not slot.present for slot in slots)
    persisted = sum(slot.persisted for slot in slots)
    return pb.PutResponse(stored=stored, present=present, dropped=dropped, persisted=persisted)
