"""Moving block bytes between daemons with NIXL: one-sided transfers between the DRAM arenas.

Each daemon registers its whole arena with one NIXL agent (UCX underneath: RDMA where there is a
NIC, TCP or shared memory otherwise) once. The first time it talks to a peer it calls
``PeerHello`` over gRPC: both sides add the other's agent metadata, and the caller gets a peer
session on the other daemon and the address of its arena. From then on the control calls are
the same-host protocol's, over gRPC, and only the bytes take NIXL:

- a fetch ``Acquire``\\ s the block at its home (a read lease: the home will not evict or reuse
  those bytes meanwhile), READs the leased extent straight into this daemon's landing copy, and
  ``Release``\\ s the lease;
- a send ``Reserve``\\ s room at the home (a write lease), WRITEs the bytes from this daemon's arena
  into it, and ``Commit``\\ s with the checksums, which the home verifies before anything is visible.

Bytes go arena to arena only: a buffer outside this daemon's arena is refused (the caller then
uses the gRPC stream). Completion is polled from the event loop (NIXL's progress thread moves the
bytes), under the caller's deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kvstore.errors import UnavailableError
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.tiers.base import address_of
from kvstore.tiers.peer_grpc import GrpcPeers


def nixl_module():
    """The NIXL Python API, or None where it is not installed (``pip install nixl-cu12``)."""
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            module = __import__(name, fromlist=["nixl_agent"])
        except ImportError:
            continue
        if hasattr(module, "nixl_agent"):
            return module
    return None


PROGRESS_DELAY_US = 500
"""Pause of NIXL's progress thread between rounds. Its Python API starts the thread with none, and
then it spins a whole core while the daemon is idle (measured: 100% of a core; with 100-1000 us
about nothing idle, and 16 MiB transfers between two processes went from 2.1-2.3 to 3.8-4.5 GB/s
here, the spinning thread no longer taking a core from the transfer)."""


def make_agent(api, name: str, backends: Sequence[str], progress_delay_us: int = PROGRESS_DELAY_US):
    """A ``nixl_agent`` whose progress thread pauses ``progress_delay_us`` between rounds.

    The API builds its native config inside the constructor with a fixed delay of 0, so the
    binding is swapped for the constructor's duration with one that sets the delay; everything
    else passes through. Called from one thread (the event loop's), once per process.
    """
    real = api.nixlBind

    class _Binding:
        def __getattr__(self, attr):
            return getattr(real, attr)

        def nixlAgentConfig(self):
            return types.SimpleNamespace()

        def nixlAgent(self, agent_name, settings):
            config = real.nixlAgentConfig()
            for key, value in vars(settings).items():
                setattr(config, key, value)
            config.pthrDelay = progress_delay_us
            return real.nixlAgent(agent_name, config)

    api.nixlBind = _Binding()
    try:
        return api.nixl_agent(name, api.nixl_agent_config(backends=list(backends)))
    finally:
        api.nixlBind = real


@dataclass(slots=True)
class _Remote:
    agent: str
    session: str
    base: int
    size: int


class NixlAgent:
    """This daemon's NIXL agent, with its arena registered."""

    def __init__(self, me: str, base: int, size: int) -> None:
        api = nixl_module()
        if api is None:
            raise UnavailableError("NIXL is not installed (pip install 'kvstore[rdma]')")
        self.name = f"kvstore-{me}-{secrets.token_hex(4)}"
        self.agent = make_agent(api, self.name, ["UCX"])
        if "UCX" not in self.agent.backends:
            raise UnavailableError("NIXL has no UCX backend here")
        self.base, self.size = base, size
        self._registered = self.agent.register_memory([(base, size, 0, "")], "DRAM")
        self.known: set[str] = set()

    def close(self) -> None:
        """Deregister the arena (before it is unmapped) and let the agent go."""
        if self._registered is not None:
            self.agent.deregister_memory(self._registered)
            self._registered = None
        self.agent = None

    @property
    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def add(self, metadata: bytes) -> str:
        name = self.agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self.known.add(name)
        return name

    def inside(self, view: memoryview) -> int | None:
        """The address of ``view`` if it lies in the registered arena, else None."""
        at = address_of(view)
        return at if self.base <= at and at + view.nbytes <= self.base + self.size else None

    async def move(self, op: str, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
                   agent: str, deadline: float) -> None:
        """READ (or WRITE) each remote (address, length) into (or from) the local one."""
        descs = lambda pairs: self.agent.get_xfer_descs([(a, n, 0) for a, n in pairs], "DRAM")  # noqa: E731
        handle = self.agent.initialize_xfer(op, descs(local), descs(remote), agent)
        try:
            state = self.agent.transfer(handle)
            pause = 20e-6
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise UnavailableError(f"a NIXL {op} did not finish within its deadline")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1e-3)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise UnavailableError(f"a NIXL {op} failed")
        finally:
            self.agent.release_xfer_handle(handle)


class NixlPeers:
    """The NIXL transport: control calls through ``grpc`` (a :class:`GrpcPeers`), bytes by NIXL."""

    name = "nixl"

    def __init__(self, agent: NixlAgent, grpc_peers: GrpcPeers) -> None:
        self.agent = agent
        self.grpc = grpc_peers
        self._remotes: dict[str, _Remote] = {}
        self._hellos: dict[str, asyncio.Future] = {}
        self._pending: dict[tuple[str, bytes], list] = {}   # fetches waiting for this turn's batch
        self._flushing: set[asyncio.Task] = set()

    async def remote(self, peer: str, timeout_s: float) -> _Remote:
        """The peer's session and arena, saying hello the first time (one hello at a time)."""
        known = self._remotes.get(peer)
        if known is not None:
            return known
        pending = self._hellos.get(peer)
        if pending is None:
            pending = self._hellos[peer] = asyncio.ensure_future(self._hello(peer, timeout_s))
            pending.add_done_callback(lambda _: self._hellos.pop(peer, None))
        return await asyncio.shield(pending)

    async def _hello(self, peer: str, timeout_s: float) -> _Remote:
        request = pb.PeerHelloRequest(agent=self.agent.name, metadata=self.agent.metadata)
        try:
            answer = await self.grpc.stub(peer).PeerHello(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"hello: {exc.code().name}: {exc.details()}") from None
        if not answer.agent:   # the peer has no NIXL: the caller uses the gRPC stream
            return _Remote("", "", 0, 0)
        agent = self.agent.add(answer.metadata)
        remote = self._remotes[peer] = _Remote(agent, answer.session, answer.arena_address, answer.arena_bytes)
        return remote

    def forget(self, peers: Sequence[str]) -> None:
        for peer in peers:
            self._remotes.pop(peer, None)

    def _lost(self, peer: str) -> None:
        """A call failed: say hello again next time (the peer may have restarted)."""
        self._remotes.pop(peer, None)

    async def _leased(self, peer: str, call, timeout_s: float):
        """``call(stub, remote)`` (an Acquire or a Reserve), saying hello again once when the peer
        no longer knows our session (it restarted since): (remote, answer)."""
        for attempt in (0, 1):
            remote = await self.remote(peer, timeout_s)
            try:
                return remote, await call(self.grpc.stub(peer), remote)
            except grpc.aio.AioRpcError as exc:
                self._lost(peer)
                if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION or attempt:
                    raise UnavailableError(f"{exc.code().name}: {exc.details()}") from None
        raise AssertionError("unreachable")

    async def fetch(self, peer: str, key: bytes, namespace: bytes, out: memoryview, timeout_s: float) -> int:
        """Read one block from ``peer`` into ``out``. Fetches from one peer that are asked for in
        the same turn of the event loop (a get's read-ahead) travel together: one lease, one
        transfer of all their extents, one release."""
        at = self.agent.inside(out)
        if at is None:
            raise UnavailableError("the target is outside the registered arena")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        batch = self._pending.setdefault((peer, namespace), [])
        batch.append((key, at, out.nbytes, future))
        if len(batch) == 1:
            loop.call_soon(lambda: self._flushing.add(asyncio.ensure_future(self._flush(peer, namespace, timeout_s))))
        return await future

    async def _flush(self, peer: str, namespace: bytes, timeout_s: float) -> None:
        batch = self._pending.pop((peer, namespace), [])
        try:
            done = await self._fetch_many(peer, namespace, batch, timeout_s)
            for i, (key, _, _, future) in enumerate(batch):
                if future.done():
                    continue
                if i < done:
                    future.set_result(batch[i][2])
                else:
                    future.set_exception(UnavailableError(f"the peer no longer holds block {key[:8].hex()}"))
        except BaseException as exc:
            for _, _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else UnavailableError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._flushing.discard(asyncio.current_task())

    async def _fetch_many(self, peer: str, namespace: bytes, batch, timeout_s: float) -> int:
        """Lease the batch's leading blocks at ``peer``, READ them in one transfer, release: how
        many of the batch (in order) arrived."""
        deadline = time.monotonic() + timeout_s
        keys = [key for key, _, _, _ in batch]
        remote, lease = await self._leased(peer, lambda stub, remote: stub.Acquire(
            pb.AcquireRequest(session=remote.session, keys=keys, namespace=namespace), timeout=timeout_s
        ), timeout_s)
        if lease.count == 0:
            return 0
        try:
            count = lease.count
            for i in range(count):
                if lease.sizes[i] != batch[i][2] or lease.offsets[i] + batch[i][2] > remote.size:
                    count = i   # a block of another size under this key: not this one
                    break
            if count:
                await self.agent.move(
                    "READ", [(at, n) for _, at, n, _ in batch[:count]],
                    [(remote.base + lease.offsets[i], batch[i][2]) for i in range(count)], remote.agent, deadline,
                )
            return count
        finally:
            try:
                await self.grpc.stub(peer).Release(pb.ReleaseRequest(session=remote.session, leases=[lease.lease]),
                                                   timeout=timeout_s)
            except grpc.aio.AioRpcError:
                pass   # the lease expires on its own

    async def send(
        self, peer: str, keys: Sequence[bytes], namespace: bytes, views: Sequence[memoryview], timeout_s: float
    ) -> pb.PutResponse:
        from kvstore.checksum import checksum

        local = [self.agent.inside(v) for v in views]
        if any(at is None for at in local):
            raise UnavailableError("a block to send is outside the registered arena")
        deadline = time.monotonic() + timeout_s
        remote, reserved = await self._leased(peer, lambda stub, remote: stub.Reserve(
            pb.ReserveRequest(session=remote.session, keys=keys, sizes=[v.nbytes for v in views],
                              namespace=namespace), timeout=timeout_s,
        ), timeout_s)
        stub = self.grpc.stub(peer)
        todo = [i for i, state in enumerate(reserved.states) if state == pb.SLOT_RESERVED]
        abort = True
        try:
            if todo:
                await self.agent.move(
                    "WRITE", [(local[i], views[i].nbytes) for i in todo],
                    [(remote.base + reserved.offsets[i], views[i].nbytes) for i in todo], remote.agent, deadline,
                )
            abort = False
        finally:
            try:
                done = await stub.Commit(pb.CommitRequest(
                    session=remote.session, lease=reserved.lease, abort=abort,
                    checksums=[] if abort else [checksum(v) for v in views],
                ), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise UnavailableError(f"commit: {exc.code().name}: {exc.details()}") from None
        return done
