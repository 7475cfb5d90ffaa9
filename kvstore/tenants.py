"""Tenants: who a bearer token is, and which blocks that caller may see.

A tenants file (``kvstore serve --tenants PATH``, TOML) lists the tenants::

    [[tenant]]
    name = "team-a"
    token_sha256 = ["5e884898da28..."]      # SHA-256 (hex) of each token it may present
    read = ["9f2c...", ]                     # shared namespaces (hex) it may read
    write = ["9f2c..."]                      # shared namespaces it may write (and read)
    requests_per_s = 2000                    # optional: calls per second, with a burst of 1 s
    quota = { dram = "8GiB", nvme = "100GiB" }  # optional: most bytes of its own blocks per tier

    [[tenant]]
    name = "cluster"
    token_sha256 = ["..."]
    peer = true                              # the daemons of the cluster calling each other

Tokens are never stored, only their hashes (``kvstore token`` makes a token and prints its hash).
The tenant is part of every block's identity: a namespace a tenant names that is not one of its
shared namespaces is scoped to the tenant (:func:`tenant_namespace`), so two tenants using the same
keys hold two different blocks and can neither read nor overwrite nor poison each other's. A
shared namespace is the same for every tenant allowed to use it; writing it needs ``write``.

A quota bounds the bytes of a tenant's own blocks (its private namespaces; shared ones are no
one's) in a tier: when a put or a move would take it over, the tenant's own coldest blocks there
make room first (demoted or evicted, as for a full tier), and what still does not fit is dropped,
counted like any dropped block.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.config import parse_bytes
from kvstore.errors import ConfigError, PermissionDeniedError, RateLimitedError, UnauthenticatedError
from kvstore.keys import MAX_NAMESPACE_BYTES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN = re.compile(r"^[\x21-\x7e]{1,4096}$")
"""What a bearer token may hold: printable ASCII, no spaces (it travels in gRPC metadata)."""


def valid_tenant_name(name: str) -> bool:
    return bool(_NAME.match(name))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "Bearer "


def hash_token(token: str) -> str:
    """The hex SHA-256 of a bearer token: what a tenants file stores."""
    return hashlib.sha256(token.encode()).hexdigest()


def tenant_namespace(tenant: str, namespace: bytes) -> bytes:
    """The namespace a tenant's private ``namespace`` is stored under (32 bytes)."""
    return hashlib.sha256(b"kvstore tenant\0" + tenant.encode() + b"\0" + namespace).digest()


class RateLimit:
    """A token bucket: ``rate`` calls per second, bursts up to one second's worth (at least one call)."""

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.level = self.burst
        self.stamp = 0.0

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token_hashes: frozenset[str]
    read: frozenset[bytes] = frozenset()
    write: frozenset[bytes] = frozenset()
    peer: bool = False
    requests_per_s: float = 0.0   # 0: unlimited
    quota: Mapping[str, int] = field(default_factory=dict)   # tier name -> bytes
    limit: RateLimit | None = field(default=None, compare=False)
    namespaces: set[bytes] = field(default_factory=set, compare=False)   # its private ones, as stored

    def scope(self, namespace: bytes, *, write: bool) -> bytes:
        """The stored namespace this tenant's ``namespace`` means.

        Raises:
            PermissionDeniedError: writing a shared namespace the tenant may only read.
        """
        if self.peer:
            return namespace      # a daemon of the cluster forwards namespaces already scoped
        if namespace in self.write:
            return namespace
        if namespace in self.read:
            if write:
                raise PermissionDeniedError(
                    f"tenant {self.name!r} may read the shared namespace {namespace.hex()[:16]}... but not write it"
                )
            return namespace
        return tenant_namespace(self.name, namespace)


class TenantTable:
    """Every tenant of a tenants file, found by the hash of the token it presents."""

    def __init__(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants
        self._by_hash = {h: t for t in tenants for h in t.token_hashes}
        self._owners: dict[bytes, Tenant] = {}

    def scope(self, tenant: Tenant, namespace: bytes, *, write: bool) -> bytes:
        """:meth:`Tenant.scope`, remembering whose private namespaces are whose (for quotas)."""
        stored = tenant.scope(namespace, write=write)
        if tenant.quota and stored not in self._owners and not tenant.peer and stored != namespace:
            self._owners[stored] = tenant
            tenant.namespaces.add(stored)
        return stored

    def owner(self, namespace: bytes) -> Tenant | None:
        """The tenant with a quota whose private (stored) ``namespace`` this is, once it has used it."""
        return self._owners.get(namespace)

    def check_tiers(self, tiers: Sequence[str]) -> None:
        """Refuse quotas naming a tier this daemon does not have (or one without a capacity)."""
        for tenant in self.tenants:
            for name in tenant.quota:
                if name not in tiers:
                    raise ConfigError(
                        f"tenants: tenant {tenant.name!r}: quota names tier {name!r}, which this daemon does not "
                        f"bound (it has: {', '.join(tiers)})"
                    )

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``authorization`` metadata value (``Bearer <token>``).

        Raises:
            UnauthenticatedError: no token, or one no tenant has.
        """
        if not authorization:
            raise UnauthenticatedError(
                "this daemon has tenants: send a bearer token (KVClient(..., token=...), or --token-file on the command line)"
            )
        token = authorization[len(TOKEN_PREFIX):] if authorization.startswith(TOKEN_PREFIX) else authorization
        tenant = self._by_hash.get(hash_token(token))
        if tenant is None:
            raise UnauthenticatedError("unknown bearer token")
        return tenant

    @staticmethod
    def admit(tenant: Tenant, now: float) -> None:
        """Count one call against the tenant's request rate.

        Raises:
            RateLimitedError: the tenant is over ``requests_per_s`` (a ResourceExhaustedError).
        """
        if tenant.limit is not None and not tenant.limit.take(now):
            raise RateLimitedError(f"tenant {tenant.name!r} is over its {tenant.requests_per_s:g} requests/s")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "tenants") -> TenantTable:
        """Build from a parsed tenants file; every mistake is a :class:`ConfigError` naming it."""
        unknown = set(data) - {"tenant"}
        if unknown:
            raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r} (a tenants file holds [[tenant]] tables)")
        entries = data.get("tenant", [])
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise ConfigError(f"{source}: 'tenant' must be an array of tables ([[tenant]])")
        if not entries:
            raise ConfigError(f"{source}: no [[tenant]] in the file (without tenants, leave --tenants out)")
        tenants, seen_hashes = [], {}
        for i, entry in enumerate(entries):
            tenant = _tenant(entry, f"{source}: tenant[{i}]")
            if any(t.name == tenant.name for t in tenants):
                raise ConfigError(f"{source}: tenant[{i}]: the name {tenant.name!r} is used twice")
            for h in tenant.token_hashes:
                if h in seen_hashes:
                    raise ConfigError(f"{source}: tenant {tenant.name!r} has a token of tenant {seen_hashes[h]!r}")
                seen_hashes[h] = tenant.name
            tenants.append(tenant)
        return cls(tenants)


_KEYS = {"name", "token_sha256", "read", "write", "peer", "requests_per_s", "quota"}


def _tenant(entry: Mapping[str, Any], where: str) -> Tenant:
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    where = f"{where.rsplit(':', 1)[0]}: tenant {name!r}"
    hashes = entry.get("token_sha256", [])
    if isinstance(hashes, str):
        hashes = [hashes]
    if not isinstance(hashes, list) or not hashes:
        raise ConfigError(f"{where}: token_sha256 must list at least one SHA-256 (hex) of a token")
    for h in hashes:
        if not isinstance(h, str) or not _SHA256.match(h.lower()):
            raise ConfigError(f"{where}: token_sha256 entries are 64 hex digits (kvstore token prints one), got {h!r}")
    peer = entry.get("peer", False)
    if not isinstance(peer, bool):
        raise ConfigError(f"{where}: peer must be true or false, got {peer!r}")
    rate = entry.get("requests_per_s", 0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
        raise ConfigError(f"{where}: requests_per_s must be a number >= 0 (0: unlimited), got {rate!r}")
    quota = entry.get("quota", {})
    if not isinstance(quota, Mapping):
        raise ConfigError(f"{where}: quota must be a table of tier = size, e.g. {{ dram = \"8GiB\" }}")
    quota = {str(tier): parse_bytes(size, name=f"{where}: quota.{tier}") for tier, size in quota.items()}
    if any(size <= 0 for size in quota.values()):
        raise ConfigError(f"{where}: quota sizes must be > 0")
    write = _namespaces(entry.get("write", []), f"{where}: write")
    read = _namespaces(entry.get("read", []), f"{where}: read") | write
    return Tenant(
        name=name, token_hashes=frozenset(h.lower() for h in hashes), read=read, write=write, peer=peer,
        requests_per_s=float(rate), quota=quota, limit=RateLimit(float(rate)) if rate else None,
    )


def _namespaces(value: Any, where: str) -> frozenset[bytes]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of namespaces in hex (Namespace(...).digest.hex())")
    out = set()
    for item in value:
        try:
            namespace = bytes.fromhex(item) if isinstance(item, str) else None
        except ValueError:
            namespace = None
        if namespace is None or not 0 < len(namespace) <= MAX_NAMESPACE_BYTES:
            raise ConfigError(f"{where}: {item!r} is not a namespace in hex (1-{MAX_NAMESPACE_BYTES} bytes)")
        out.add(namespace)
    return frozenset(out)
