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
uses the gRPC stream). Transfers run in a thread of the agent's own, never on the event loop
(UCX over TCP moves a whole transfer inside the call that starts it), under the caller's deadline;
a batched fetch moves in parts, each handed on as it lands.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
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


FETCH_PART_BLOCKS = 8
"""Blocks per part of a batched fetch's READ: the parts run one after another in the agent's
thread, and each part's blocks are handed on (verified, copied out) while the next is moving."""


@dataclass(slots=True)
class _Remote:
    agent: str
    session: str
    base: int
    size: int


class NixlAgent:
    """This daemon's NIXL agent, with its arena registered.

    Transfers run in a thread of the agent's own: UCX over TCP does a whole transfer inside
    NIXL's ``transfer()`` call (128 MiB: about 40 ms here), which on the event loop would stop the
    daemon for that long. One thread makes every agent call after registration (transfers, in
    order, and adding peers' metadata): the agent runs without NIXL's own locking (its default).
    A transfer queued behind a slow one past its deadline fails without beginning.
    """

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
        self.metadata: bytes = self.agent.get_agent_metadata()
        self.known: set[str] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-nixl")

    def close(self) -> None:
        """Drop the transfers not begun, wait for the one moving, deregister the arena (before it
        is unmapped), let the agent go. Blocks: callers on the event loop run it in a thread."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        if self._registered is not None:
            self.agent.deregister_memory(self._registered)
            self._registered = None
        self.agent = None

    async def add(self, metadata: bytes) -> str:
        """Add a peer's agent metadata (in the agent's thread, after the transfers queued before)."""
        name = await asyncio.get_running_loop().run_in_executor(self._thread, self._add, metadata)
        self.known.add(name)
        return name

    def _add(self, metadata: bytes) -> str:
        name = self.agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def inside(self, view: memoryview) -> int | None:
        """The address of ``view`` if it lies in the registered arena, else None."""
        at = address_of(view)
        return at if self.base <= at and at + view.nbytes <= self.base + self.size else None

    async def move(self, op: str, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
                   agent: str, deadline: float) -> None:
        """READ (or WRITE) each remote (address, length) into (or from) the local one."""
        await self.wait(self.post(op, local, remote, agent, deadline))

    def post(self, op: str, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
             agent: str, deadline: float, give_up: threading.Event | None = None) -> asyncio.Future:
        """Queue a transfer in the agent's thread (see :meth:`move`); :meth:`wait` for it. Once
        ``give_up`` is set, it fails without moving anything if it has not begun."""
        return asyncio.get_running_loop().run_in_executor(
            self._thread, self._move, op, local, remote, agent, deadline, give_up
        )

    @staticmethod
    async def wait(job: asyncio.Future) -> None:
        """The transfer's outcome. A caller cancelled meanwhile still waits for it: until it is over,
        NIXL may be moving bytes into or out of the caller's memory."""
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait([job])
            raise

    def _move(self, op: str, local, remote, agent: str, deadline: float, give_up: threading.Event | None) -> None:
        if give_up is not None and give_up.is_set():
            raise UnavailableError(f"a NIXL {op} was given up before it began")
        if time.monotonic() > deadline:   # queued behind a slow transfer: not begun at all
            raise UnavailableError(f"a NIXL {op} did not begin within its deadline")
        descs = lambda pairs: self.agent.get_xfer_descs([(a, n, 0) for a, n in pairs], "DRAM")  # noqa: E731
        handle = self.agent.initialize_xfer(op, descs(local), descs(remote), agent)
        try:
            state = self.agent.transfer(handle)
            pause = 20e-6
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise UnavailableError(f"a NIXL {op} did not finish within its deadline")
                time.sleep(pause)
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
        agent = await self.agent.add(answer.metadata)
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
            await self._fetch_many(peer, namespace, batch, timeout_s)
            for key, _, _, future in batch:
                if not future.done():
                    future.set_exception(UnavailableError(f"the peer no longer holds block {key[:8].hex()}"))
        except BaseException as exc:
            for _, _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else UnavailableError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._flushing.discard(asyncio.current_task())

    async def _fetch_many(self, peer: str, namespace: bytes, batch, timeout_s: float) -> None:
        """Lease the batch's leading blocks at ``peer``, READ them, release the lease; each block's
        future gets its result as soon as its part of the transfer is done (parts of
        :data:`FETCH_PART_BLOCKS`, one after another in the agent's thread)."""
        deadline = time.monotonic() + timeout_s
        keys = [key for key, _, _, _ in batch]
        remote, lease = await self._leased(peer, lambda stub, remote: stub.Acquire(
            pb.AcquireRequest(session=remote.session, keys=keys, namespace=namespace), timeout=timeout_s
        ), timeout_s)
        if lease.count == 0:
            return
        try:
            count = lease.count
            for i in range(count):
                if lease.sizes[i] != batch[i][2] or lease.offsets[i] + batch[i][2] > remote.size:
                    count = i   # a block of another size under this key: not this one
                    break
            parts = [range(at, min(at + FETCH_PART_BLOCKS, count)) for at in range(0, count, FETCH_PART_BLOCKS)]
            give_up = threading.Event()
            jobs = [
                self.agent.post("READ", [batch[i][1:3] for i in part],
                                [(remote.base + lease.offsets[i], batch[i][2]) for i in part], remote.agent, deadline,
                                give_up)
                for part in parts
            ]
            try:
                for part, job in zip(parts, jobs):
                    await self.agent.wait(job)
                    for i in part:
                        if not batch[i][3].done():
                            batch[i][3].set_result(batch[i][2])
            finally:   # the lease stays until no part is still moving
                give_up.set()   # parts not begun (after a failure) do not begin; the moving one ends
                if jobs:
                    await asyncio.wait(jobs)
        finally:   # no one waits for the release: the lease expires on its own if it is lost
            task = asyncio.ensure_future(self._release(peer, remote.session, lease.lease, timeout_s))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _release(self, peer: str, session: str, lease: int, timeout_s: float) -> None:
        try:
            await self.grpc.stub(peer).Release(pb.ReleaseRequest(session=session, leases=[lease]), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            pass

    async def send(
        self, peer: str, keys: Sequence[bytes], namespace: bytes, views: Sequence[memoryview],
        checksums: Sequence[int], timeout_s: float,
    ) -> pb.PutResponse:
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
                    checksums=[] if abort else checksums,
                ), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise UnavailableError(f"commit: {exc.code().name}: {exc.details()}") from None
        return done
