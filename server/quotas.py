"""Tenants' quotas in terms of the daemon's levels: whose a namespace is, and their bound there.

The catalog counts the bytes of every level by namespace; a tenant's use of a level is the sum
over its private namespaces (:meth:`kvstore.tenants.TenantTable.scope` records them as the tenant
uses them). The mover asks :meth:`Quotas.bound` before it makes room for a block in a level.
"""

from __future__ import annotations

from kvstore.layout import Layout
from kvstore.tenants import TenantTable


class Quotas:
    def __init__(self, tenants: TenantTable, layout: Layout) -> None:
        self.tenants = tenants
        self._names = [level.name for level in layout.levels]
        bounded = [level.name for level in layout.levels if level.capabilities.bounded]
        tenants.check_tiers(bounded)

    def bound(self, level: int, namespace: bytes) -> tuple[int, set[bytes]] | None:
        """(bytes allowed, the owner's namespaces) for a block of ``namespace`` at ``level``, or
        None when no quota applies (no owner, or no quota of its owner there)."""
        tenant = self.tenants.owner(namespace)
        if tenant is None:
            return None
        limit = tenant.quota.get(self._names[level])
        return None if limit is None else (limit, tenant.namespaces)
