"""Who is calling, and what they may touch: the servicer asks the gate before it answers a call.

Without a tenants file the gate is open: every caller is the one implicit tenant and namespaces
are taken as sent (the daemon as it always was). With one, every gRPC call must carry a bearer
token of a tenant (``UNAUTHENTICATED`` otherwise), the namespace it names is replaced by the one
its tenant stores it under (:meth:`kvstore.tenants.Tenant.scope`: ``PERMISSION_DENIED`` for a
write to a shared namespace the tenant may only read), and the calls the daemons of a cluster make
to each other (probes, ``local_only`` reads, the NIXL leases) are only for a tenant marked
``peer``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from pathlib import Path

from kvstore.errors import ConfigError, PermissionDeniedError
from kvstore.tenants import Tenant, TenantTable

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class Access(enum.Enum):
    READ = "read"
    WRITE = "write"
    PEER = "peer"     # only the cluster's daemons
    ANY = "any"       # any tenant (stats, attach)


ACCESS = {
    "Lookup": Access.READ, "Get": Access.READ, "Put": Access.WRITE, "Delete": Access.WRITE,
    "Stats": Access.ANY, "Attach": Access.ANY,
    "Probe": Access.PEER, "PeerHello": Access.PEER,
    "Reserve": Access.PEER, "Commit": Access.PEER, "Acquire": Access.PEER, "Release": Access.PEER,
}


LOCAL_ACCESS = {
    "Lookup": Access.READ, "Acquire": Access.READ, "Release": Access.READ,
    "Reserve": Access.WRITE, "Commit": Access.WRITE,
}
"""The same-host socket's calls: a tenant's session reads and writes its own (windowed) blocks."""


def load_tenants(path: str) -> TenantTable:
    """The tenants file at ``path``; a :class:`ConfigError` naming it on any mistake."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"tenants: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tenants: {path} is not valid TOML: {exc}") from None
    return TenantTable.from_mapping(data, source=f"tenants file {path}")


class Gate:
    def __init__(self, tenants: TenantTable | None) -> None:
        self.tenants = tenants

    @property
    def open(self) -> bool:
        return self.tenants is None

    def caller(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None, *, local_only: bool = False) -> Tenant | None:
        """The tenant making a call of ``method`` (None when the gate is open).

        Raises:
            UnauthenticatedError: no token, or an unknown one.
            PermissionDeniedError: a call only the cluster's daemons may make.
            ResourceExhaustedError: the tenant is over its request rate.
        """
        if self.tenants is None:
            return None
        authorization = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        tenant = self.tenants.authenticate(authorization)
        if (ACCESS[method] is Access.PEER or local_only) and not tenant.peer:
            raise PermissionDeniedError(f"{method}{' local_only' if local_only else ''} is for the cluster's daemons only")
        self.tenants.admit(tenant, time.monotonic())
        return tenant

    def namespace(self, tenant: Tenant | None, method: str, namespace: bytes) -> bytes:
        """The namespace ``tenant``'s call of ``method`` reaches."""
        if tenant is None:
            return namespace
        return self.tenants.scope(tenant, namespace, write=ACCESS[method] is Access.WRITE)

    def local(self, tenant: Tenant, method: str, namespace: bytes) -> bytes:
        """Admit one same-host call of ``tenant``'s session: its rate, and the namespace it reaches."""
        self.tenants.admit(tenant, time.monotonic())
        return self.tenants.scope(tenant, namespace, write=LOCAL_ACCESS[method] is Access.WRITE)
