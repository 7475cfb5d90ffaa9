"""The peer tier: the other kvstore daemons of the cluster, as one shared, pooled level.

Every block has a *home*: the live member (this daemon included) of highest rendezvous weight for
its key (:mod:`kvstore.rendezvous`). A put lands locally as always and is queued to travel to its
home in the background; the local copy then acts as a near cache, and evicting it loses nothing.
A lookup or get that misses locally asks the homes of the keys past the local prefix
(:meth:`PeerTier.probe`), and a get fetches their bytes from there, verified against the
checksum the home announced before they are used or stored. So N daemons hold about N times the
distinct blocks one holds, and a block put on any node is found from every other.

Failures are misses: every call has a deadline (``timeout_s`` for questions, ``transfer_timeout_s``
for bytes), a peer that failed is skipped for a backoff period (:class:`Membership`), and this
tier raises only :class:`~kvstore.errors.UnavailableError` or
:class:`~kvstore.errors.IntegrityError`, which the daemon turns into misses. Blocks whose home is
this daemon are not sent anywhere: this node's capacity is their capacity.

Bytes move through a transport: NIXL (:mod:`kvstore.tiers.peer_nixl`: one-sided transfers
between the daemons' registered arenas, RDMA where there is a NIC) when it is installed and the
peer offers it, else the gRPC stream (:mod:`kvstore.tiers.peer_grpc`), which works wherever the
control plane does (``peer.transfer``: auto, nixl, grpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.block import BlockRecord
from kvstore.checksum import checksum
from kvstore.config import PeerConfig, Transfer
from kvstore.errors import ConfigError, UnavailableError
from kvstore.keys import unscoped
from kvstore.layout import Addressing, Capabilities
from kvstore.proto.channel import ReloadingChannelTls, read_token
from kvstore.rendezvous import homes
from kvstore.tier_kind import TierKind
from kvstore.tls import TlsConfig
from kvstore.tiers.base import KeyedTier, MemoryTier, ObjectRef, ProbeInfo
from kvstore.tiers.membership import DnsMembers, Membership, StaticMembers, join_address
from kvstore.tiers.peer_grpc import GrpcPeers
from kvstore.tiers.peer_nixl import NixlAgent, NixlPeers, nixl_module

log = logging.getLogger("kvstore.peers")


class PeerTier(KeyedTier):
    name = "peer"
    kind = TierKind.PEER
    capabilities = Capabilities(shared=True, addressing=Addressing.KEY, bounded=False, pooled=True,
                                verifies_arrivals=True)
    config_class = PeerConfig

    def __init__(self, config: PeerConfig) -> None:
        if not config.enabled:
            raise ConfigError("peer.peers or peer.dns must be set for the peer tier")
        if config.transfer is Transfer.NIXL and nixl_module() is None:
            raise ConfigError("peer.transfer = nixl, but NIXL is not installed (pip install 'kvstore[rdma]')")
        self.config = config
        source = StaticMembers(config.peers) if config.peers else DnsMembers(config.dns)
        self.members = Membership(source, backoff_s=config.backoff_s)
        token = read_token(config.token_file, "peer.token_file") if config.token_file else ""
        self.transport = GrpcPeers(_peer_tls(config.tls), token)
        self.nixl: NixlPeers | None = None
        self._grpc_only: set[str] = set()   # peers that said they have no NIXL
        self._landing: MemoryTier | None = None
        self.counters: Any = None
        self._refreshing: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: PeerConfig) -> PeerTier:
        return cls(config)

    @property
    def description(self) -> str:
        return f"peers ({self.members.source.description}, advertised as {self.members.me or 'not yet'})"

    def bind(self, counters: Any, landing: MemoryTier) -> None:
        self.counters = counters
        self._landing = landing

    def serving_at(self, host: str, port: int) -> None:
        me = self.config.advertise
        if not me:
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostbyname(socket.gethostname())
            me = join_address(host, port)
        self.members.advertise(me)
        if self.config.transfer is Transfer.NIXL or (self.config.transfer is Transfer.AUTO and not self.config.tls.enabled):
            self._start_nixl(me)
        elif self.config.transfer is Transfer.AUTO:
            # UCX moves bytes unencrypted: with TLS on, NIXL only when asked for by name.
            log.info("peer transfers use the gRPC stream over TLS (peer.transfer = nixl would send block bytes unencrypted)")
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_loop(), name="kvstore-peers")

    def _start_nixl(self, me: str) -> None:
        landing = self._landing
        try:
            if landing is None or not landing.base_address:
                raise UnavailableError("the landing tier has no address to register")
            self.nixl = NixlPeers(NixlAgent(me, landing.base_address, landing.capacity_bytes), self.transport)
        except Exception as exc:   # NIXL missing, no UCX, registration refused: all mean the same here
            if self.config.transfer is Transfer.NIXL:
                raise ConfigError(f"peer.transfer = nixl: NIXL cannot start ({exc})") from None
            log.info("peer transfers use the gRPC stream (NIXL: %s)", exc)
            return
        log.info("peer transfers use NIXL (agent %s), the gRPC stream where a peer has no NIXL", self.nixl.agent.name)

    async def hello(self, agent: str, metadata: bytes) -> tuple[str, bytes, int, int] | None:
        """A peer's ``PeerHello``: add its agent; (our agent, metadata, arena address, size), or
        None without NIXL."""
        if self.nixl is None:
            return None
        await self.nixl.agent.add(metadata)
        landing = self._landing
        return self.nixl.agent.name, self.nixl.agent.metadata, landing.base_address, landing.capacity_bytes

    async def _channel(self, peer: str, views: Sequence[memoryview]):
        """The transport for moving ``views`` to or from ``peer``: NIXL when both sides have it and
        every view lies in the registered arena (NIXL reaches no other memory), else the gRPC stream."""
        if self.nixl is None or peer in self._grpc_only:
            return self.transport
        if any(self.nixl.agent.inside(v) is None for v in views):
            return self.transport
        remote = await self.nixl.remote(peer, self.config.timeout_s)
        if not remote.agent:
            self._grpc_only.add(peer)
            self.nixl.forget([peer])
            if self.config.transfer is Transfer.NIXL:
                raise UnavailableError(f"peer {peer} has no NIXL (peer.transfer = nixl)")
            return self.transport
        return self.nixl

    def _count_bytes(self, transport, direction: str, n: int) -> None:
        if self.counters is not None:
            name = f"peer_bytes_{direction}_{transport.name}"
            setattr(self.counters, name, getattr(self.counters, name) + n)

    async def _refresh_loop(self) -> None:
        while True:
            before = set(self.members.peers)
            await self.members.refresh()
            gone = sorted(before - set(self.members.peers))
            await self.transport.forget(gone)
            if self.nixl is not None:
                self.nixl.forget(gone)
            self._grpc_only -= set(gone)
            self._count_members()
            await asyncio.sleep(self.config.refresh_s)

    def _count_members(self) -> None:
        if self.counters is not None:
            self.counters.peer_members = len(self.members.peers)
            self.counters.peer_live = len(self.members.live()) - 1

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await self.transport.close()
        if self.nixl is not None:
            await asyncio.to_thread(self.nixl.agent.close)
            self.nixl = None

    # -- where blocks live -----------------------------------------------------------------------

    def _homes(self, keys: Sequence[bytes]) -> list[str]:
        """The home of each key among the live members (this daemon's address for its own)."""
        live = self.members.live()
        return [live[i] for i in homes(keys, live).tolist()]

    def reserve(self, record: BlockRecord) -> ObjectRef | None:
        """A place for the block at its home; None when that is this daemon (nothing to send)."""
        if not self.members.me or self._homes([unscoped(record.key)])[0] == self.members.me:
            return None
        return self.locate(unscoped(record.key), record.namespace, record.size)

    def _failed(self, peer: str, exc: BaseException) -> None:
        self.members.failed(peer, exc)
        if self.counters is not None:
            self.counters.peer_errors += 1
        self._count_members()

    def _succeeded(self, peer: str) -> None:
        self.members.succeeded(peer)

    # -- questions -------------------------------------------------------------------------------

    async def probe(self, keys: Sequence[bytes], namespace: bytes) -> list[ProbeInfo | None]:
        """Ask each key's home whether it holds the block; None for keys homed here, at a peer that
        does not answer in time, or that the home does not have."""
        out: list[ProbeInfo | None] = [None] * len(keys)
        if not keys or not self.members.me:
            return out
        by_home: dict[str, list[int]] = defaultdict(list)
        for i, home in enumerate(self._homes(keys)):
            if home != self.members.me:
                by_home[home].append(i)
        if len({len(k) for k in keys}) != 1:
            return out   # probes travel packed: keys of one length (block digests always are)

        async def ask(peer: str, which: list[int]) -> None:
            try:
                response = await self.transport.probe(peer, [keys[i] for i in which], namespace, self.config.timeout_s)
            except UnavailableError as exc:
                self._failed(peer, exc)
                return
            self._succeeded(peer)
            held = np.flatnonzero(np.frombuffer(response.present, dtype=np.uint8)).tolist()
            for j, size, value in zip(held, response.sizes, response.checksums):
                out[which[j]] = ProbeInfo(size=size, checksum=value, namespace=namespace)

        await asyncio.gather(*(ask(peer, which) for peer, which in by_home.items()))
        if self.counters is not None:
            self.counters.peer_asked_blocks += sum(map(len, by_home.values()))
            self.counters.peer_found_blocks += sum(info is not None for info in out)
        return out

    # -- bytes -----------------------------------------------------------------------------------

    async def read_into(self, location: ObjectRef, offset: int, out: memoryview) -> None:
        self._check_range(location, offset, out.nbytes)
        home = self._homes([location.key])[0]
        if home == self.members.me:
            raise UnavailableError("the block's home is this daemon now (a member left or joined)")
        whole = out if offset == 0 and out.nbytes == location.length else memoryview(bytearray(location.length))
        try:
            transport = await self._channel(home, [whole])
            await transport.fetch(home, location.key, location.namespace, whole, self.config.transfer_timeout_s)
        except UnavailableError as exc:
            self._failed(home, exc)
            raise
        self._succeeded(home)
        if whole is not out:
            out[:] = whole[offset : offset + out.nbytes]
        self._count_bytes(transport, "in", location.length)

    async def write(self, location: ObjectRef, offset: int, data: memoryview) -> None:
        if offset:
            raise ValueError("a peer block is sent whole")
        (outcome,) = await self.write_many([(location, data)])
        if outcome is not None:
            raise outcome

    async def write_persisted(
        self, items: Sequence[tuple[BlockRecord, ObjectRef, memoryview]]
    ) -> list[BaseException | None]:
        """Send each block home with the checksum it was committed with (the home verifies the bytes
        against it before anything is visible there: nothing to persist here)."""
        sums = [record.checksum for record, _, _ in items]
        return await self.write_many([(location, data) for _, location, data in items],
                                     None if None in sums else sums)

    async def write_many(
        self, items: Sequence[tuple[ObjectRef, memoryview]], checksums: Sequence[int] | None = None
    ) -> list[BaseException | None]:
        """Send each block to its home, one put stream per (home, namespace), with ``checksums``
        (computed from the bytes where not given), which the home verifies."""
        outcomes: list[BaseException | None] = [None] * len(items)
        groups: dict[tuple[str, bytes], list[int]] = defaultdict(list)
        for i, home in enumerate(self._homes([loc.key for loc, _ in items])):
            if home == self.members.me:
                outcomes[i] = UnavailableError("the block's home is this daemon now")
            else:
                groups[home, items[i][0].namespace].append(i)

        async def send(peer: str, namespace: bytes, which: list[int]) -> None:
            views = [items[i][1][: items[i][0].length] for i in which]
            sums = [checksum(v) for v in views] if checksums is None else [checksums[i] for i in which]
            try:
                transport = await self._channel(peer, views)
                response = await transport.send(
                    peer, [items[i][0].key for i in which], namespace, views, sums, self.config.transfer_timeout_s
                )
            except UnavailableError as exc:
                self._failed(peer, exc)
                for i in which:
                    outcomes[i] = exc
                return
            self._succeeded(peer)
            self._count_bytes(transport, "out", sum(v.nbytes for v in views))
            if response.dropped:   # the home had no room for some: which ones is not said, so none count
                for i in which:
                    outcomes[i] = UnavailableError(f"peer {peer} had no room for {response.dropped} blocks")

        await asyncio.gather(*(send(peer, ns, which) for (peer, ns), which in groups.items()))
        return outcomes

    async def remove(self, keys: Sequence[bytes], namespace: bytes) -> None:
        """Delete ``keys`` at every live peer (their homes, and the near copies others hold). A peer
        that does not answer keeps its copies until they are evicted: logged, not raised."""
        peers = [p for p in self.members.peers if self.members.up(p)]

        async def delete(peer: str) -> None:
            try:
                await self.transport.delete(peer, keys, namespace, self.config.timeout_s)
            except UnavailableError as exc:
                self._failed(peer, exc)

        await asyncio.gather(*(delete(peer) for peer in peers))


def _peer_tls(tls: TlsConfig) -> ReloadingChannelTls | None:
    """The daemon calls its peers with its own certificate and the peers' CA, or in plaintext."""
    if not tls.enabled:
        return None
    ca_setting = "tls.peer_ca" if tls.peer_ca else "tls.client_ca"
    return ReloadingChannelTls(ca=tls.peer_roots, cert=tls.cert, key=tls.key, server_name=tls.peer_server_name,
                               settings=(ca_setting, "tls.cert", "tls.key"))

