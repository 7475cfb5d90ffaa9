"""Leases of same-host clients: the daemon side of the shared-memory data path.

A read lease holds the landing copies a client is copying out of; a write lease holds the landing
reservations of a put the client is copying into. Leases belong to the client's session (its
local-socket connection) and end when it closes or when they outlive ``lease_ttl_s``
(:mod:`kvstore.lease` keeps the books).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvstore.block import BlockState, Copy
from kvstore.checksum import checksum
from kvstore.errors import IntegrityError, InvalidArgumentError, LeaseExpiredError
from kvstore.lease import Lease, LeaseTable
from kvstore.server.daemon import Daemon, PutSlot

log = logging.getLogger("kvstore.daemon")


class Leasing:
    def __init__(self, daemon: Daemon, table: LeaseTable) -> None:
        self.daemon = daemon
        self.table = table
        # Copies of expired write leases whose session is still alive: the client may still be
        # copying into them, so they stay held (their bytes unused) until that session ends.
        self._quarantine: dict[str, list[Copy]] = {}
        # Sessions of peer daemons (the NIXL transport), by their agent: their reads are answered
        # from this daemon's own tiers only.
        self._peers: dict[str, str] = {}

    def __len__(self) -> int:
        """Leases held right now."""
        return len(self.table)

    async def acquire(
        self, session: str, keys: Sequence[bytes], now: float, namespace: bytes = b"", max_bytes: int | None = None
    ) -> tuple[Lease | None, bool]:
        """Pin the leading present blocks for a same-host reader: (lease or None, partial)."""
        self.table.check(session)
        peer = session in self._peers.values()
        copies, partial = await self.daemon.acquire(keys, namespace, local_only=peer, max_bytes=max_bytes)
        if not copies:
            return None, False
        try:
            return self.table.grant(session, now, records=copies, writing=False), partial
        except BaseException:
            self.daemon.release(copies)
            raise

    def release(self, session: str, lease_ids: Sequence[int]) -> int:
        """End read leases; returns how many were still held."""
        released = 0
        for lease_id in lease_ids:
            lease = self.table.take(session, lease_id, writing=False)
            if lease is not None:
                self.daemon.release(lease.records)
                released += 1
        return released

    async def reserve(
        self, session: str, keys: Sequence[bytes], sizes: Sequence[int], now: float, namespace: bytes = b""
    ) -> tuple[Lease, list[PutSlot]]:
        """Put phase 1 for a same-host writer: reserve, and hold the reservations under a lease."""
        self.table.check(session)
        slots = await self.daemon.reserve(keys, sizes, (), namespace)
        return self.table.grant(session, now, slots=slots, writing=True), slots

    async def commit(self, session: str, lease_id: int, checksums: Sequence[int], abort: bool) -> tuple[int, list[PutSlot]]:
        """Put phase 2: commit (or abort) every reservation of a write lease; returns blocks stored."""
        daemon = self.daemon
        lease = self.table.take(session, lease_id, writing=True)
        if lease is None:
            raise LeaseExpiredError(f"write lease {lease_id} expired or is unknown; nothing of it was stored")
        slots = lease.slots
        if checksums and len(checksums) != len(slots):
            for slot in slots:
                if slot.copy is not None:
                    daemon.abort(slot)
            raise InvalidArgumentError(f"{len(slots)} reserved keys but {len(checksums)} checksums")
        corrupt = []
        good, sums = [], []
        try:
            for i, slot in enumerate(slots):
                if slot.copy is None:
                    continue
                if abort:
                    daemon.abort(slot)
                    continue
                actual = None
                if checksums or daemon.checksum_at_commit:
                    actual = checksum(daemon.arena.view(slot.copy.location, slot.size))
                    if checksums and actual != checksums[i]:
                        corrupt.append(i)
                        daemon.abort(slot)
                        continue
                good.append(slot)
                sums.append(actual)
            stored = daemon.commit_many(good, sums)
        except BaseException:
            for slot in slots:  # cut short: nothing may stay WRITING for ever
                if slot.copy is not None and slot.record.state is BlockState.WRITING:
                    daemon.abort(slot)
            raise
        await daemon.settle(slots)
        if corrupt:
            daemon.counters.integrity_failures += len(corrupt)
            raise IntegrityError(f"blocks {corrupt} did not match their checksums and were not stored")
        return stored, list(slots)

    def open_peer_session(self, agent: str) -> str:
        """A session for the peer daemon whose NIXL agent is ``agent`` (a second hello from the same
        agent ends its first session)."""
        old = self._peers.pop(agent, None)
        if old is not None:
            self.close_session(old)
        session = self._peers[agent] = self.table.open_session()
        return session

    def expire(self, now: float) -> int:
        """Take back every lease past its TTL; returns how many."""
        expired = self.table.expired(now)
        for lease in expired:
            log.warning("lease %d of a same-host client expired after %gs", lease.id, self.table.ttl_s)
            self._end(lease, session_alive=True)
        return len(expired)

    def close_session(self, session: str) -> None:
        """A same-host client went away: end all of its leases and free what it held."""
        for lease in self.table.close_session(session):
            self._end(lease, session_alive=False)
        for copy in self._quarantine.pop(session, ()):
            self.daemon.release([copy])

    def _end(self, lease: Lease, *, session_alive: bool) -> None:
        if not lease.writing:
            self.daemon.release(lease.records)
            return
        for slot in lease.slots:
            record = slot.record
            if record is None:
                continue
            if not session_alive:
                self.daemon.abort(slot)
                continue
            # The writer may still be copying: hide the block now, reuse its bytes later.
            self.daemon.catalog.hold(slot.copy)
            self.daemon.abort(slot)
            self._quarantine.setdefault(lease.session, []).append(slot.copy)


def slot_state(slot: PutSlot) -> int:
    """What a reserve answers for one block: write it, it is already there, or it was dropped."""
    from kvstore.proto.v1 import kvstore_pb2 as pb

    if slot.copy is not None:
        return pb.SLOT_RESERVED
    return pb.SLOT_PRESENT if slot.present else pb.SLOT_DROPPED
