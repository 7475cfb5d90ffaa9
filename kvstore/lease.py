"""Leases: regions of a tier handed to a same-host client for a while.

A read lease pins blocks (they cannot be evicted or overwritten while it is held); a write lease
holds the reservations of a put whose bytes the client is copying in. Every lease belongs to a
session, the client's connection to the daemon's local socket: when the connection closes (the
client exited or died) all of its leases end at once. A lease that outlives ``ttl_s`` is taken
back too, so a client that hangs cannot hold memory for ever.

This module only keeps the books (pure, clock passed in); the daemon acts on what it returns.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import StaleSessionError


@dataclass(slots=True)
class Lease:
    id: int
    session: str
    expires_at: float
    records: Sequence[Any] = ()   # read lease: pinned BlockRecords
    slots: Sequence[Any] = ()     # write lease: PutSlots of one Reserve
    writing: bool = False


@dataclass(slots=True)
class _Session:
    leases: dict[int, Lease] = field(default_factory=dict)


class LeaseTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sessions: dict[str, _Session] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return sum(len(s.leases) for s in self._sessions.values())

    def open_session(self) -> str:
        token = secrets.token_hex(16)
        self._sessions[token] = _Session()
        return token

    def close_session(self, token: str) -> list[Lease]:
        """Forget a session; returns the leases it still held, for the caller to end."""
        session = self._sessions.pop(token, None)
        return list(session.leases.values()) if session else []

    def check(self, token: str) -> None:
        if token not in self._sessions:
            raise StaleSessionError(
                "unknown same-host session (the daemon restarted or the session closed); attach again"
            )

    def grant(self, token: str, now: float, *, records: Sequence[Any] = (), slots: Sequence[Any] = (), writing: bool) -> Lease:
        self.check(token)
        lease = Lease(
            id=self._next_id, session=token, expires_at=now + self.ttl_s,
            records=records, slots=slots, writing=writing,
        )
        self._next_id += 1
        self._sessions[token].leases[lease.id] = lease
        return lease

    def take(self, token: str, lease_id: int, *, writing: bool) -> Lease | None:
        """Remove and return a lease of this session and kind; None if there is none (it expired,
        or the id names a lease of the other kind, which is left alone)."""
        self.check(token)
        leases = self._sessions[token].leases
        lease = leases.get(lease_id)
        if lease is None or lease.writing != writing:
            return None
        return leases.pop(lease_id)

    def expired(self, now: float) -> list[Lease]:
        """Remove and return every lease past its expiry."""
        out = []
        for session in self._sessions.values():
            for lease_id in [i for i, lease in session.leases.items() if lease.expires_at <= now]:
                out.append(session.leases.pop(lease_id))
        return out
