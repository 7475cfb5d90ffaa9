"""Who the other daemons are: a source of member addresses, and the live view built from it.

A :class:`MemberSource` answers "which daemons exist" (``HOST:PORT`` each); :class:`StaticMembers`
is a fixed list (``--peers``), :class:`DnsMembers` a DNS name resolved again and again
(``--peers-dns``, what a Kubernetes headless Service gives). Other sources (a service registry,
etcd) are one more subclass.

:class:`Membership` keeps the members (this daemon always among them) and a :class:`Backoff` per
peer: a peer whose call failed is left out of :meth:`Membership.live` until its backoff passes,
so blocks are neither looked for nor sent there meanwhile. Homes are chosen over the live
members, so a departure costs misses for the blocks that lived there, never errors.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence

from kvstore.backoff import Backoff

log = logging.getLogger("kvstore.peers")

LOG_EVERY_S = 5.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


class MemberSource(abc.ABC):
    """Where the member list comes from."""

    @abc.abstractmethod
    async def resolve(self) -> list[str]:
        """The members now (``HOST:PORT`` each). Raises OSError when the source cannot answer."""

    @property
    def description(self) -> str:
        return type(self).__name__


class StaticMembers(MemberSource):
    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(dict.fromkeys(addresses))

    async def resolve(self) -> list[str]:
        return list(self.addresses)

    @property
    def description(self) -> str:
        return f"{len(self.addresses)} listed"


class DnsMembers(MemberSource):
    """Every address ``NAME`` resolves to, each with ``PORT``."""

    def __init__(self, name_port: str) -> None:
        self.name, self.port = split_address(name_port)

    async def resolve(self) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        return sorted({join_address(info[4][0], self.port) for info in infos})

    @property
    def description(self) -> str:
        return f"DNS {self.name}:{self.port}"


class Membership:
    """The members as this daemon sees them. ``me`` is this daemon's advertised address."""

    def __init__(self, source: MemberSource, *, backoff_s: float) -> None:
        self.source = source
        self.me = ""
        self._backoff_s = backoff_s
        self._peers: list[str] = []
        self._health: dict[str, Backoff] = {}
        self._last_log: dict[str, float] = {}

    def advertise(self, me: str) -> None:
        self.me = me

    async def refresh(self) -> None:
        """Read the source again; on failure keep the members known so far (logged)."""
        try:
            found = await self.source.resolve()
        except OSError as exc:
            self._log("source", f"cannot read the members from {self.source.description}: {exc}")
            return
        peers = sorted(set(found) - {self.me})
        if peers != self._peers:
            joined, left = set(peers) - set(self._peers), set(self._peers) - set(peers)
            if joined or left:
                log.info("peers: %d (joined %s, left %s)", len(peers), sorted(joined) or "none", sorted(left) or "none")
            self._peers = peers
            self._health = {p: self._health.get(p) or Backoff(self._backoff_s) for p in peers}

    @property
    def peers(self) -> list[str]:
        """Every other member, up or not."""
        return list(self._peers)

    def live(self) -> list[str]:
        """The members homes are chosen among, sorted: this daemon and every peer not in backoff."""
        now = time.monotonic()
        return sorted([self.me, *(p for p in self._peers if self._health[p].available(now))])

    def up(self, peer: str) -> bool:
        health = self._health.get(peer)
        return health is not None and health.available(time.monotonic())

    def failed(self, peer: str, exc: BaseException) -> None:
        """A call to ``peer`` failed: skip it for its backoff (logged at most every few seconds)."""
        health = self._health.get(peer)
        if health is None:
            return
        pause = health.failed(time.monotonic())
        self._log(peer, f"peer {peer} failed ({exc}); skipped for {pause:.1f}s")

    def succeeded(self, peer: str) -> None:
        health = self._health.get(peer)
        if health is not None:
            health.succeeded()

    def _log(self, what: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(what, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[what] = now
            log.warning("%s", message)
