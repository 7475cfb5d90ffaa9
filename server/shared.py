"""Finding blocks in the shared level that this daemon does not hold (yet).

Past the last key held locally, a lookup or get asks the shared tier (a bucket every daemon
writes to) about the next keys, a window at a time, until the first key it does not have. Keys
it has become records whose only copy is shared (reported with that tier; a get promotes them);
keys it does not have are remembered as misses for a while, so a cold prefix does not send a
request per call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.block import BlockRecord, BlockState
from kvstore.catalog import Catalog
from kvstore.errors import UnavailableError
from kvstore.tiers.base import KeyedTier
from kvstore.server.health import TierHealth

MISS_ENTRIES = 1 << 17


class MissCache:
    """Keys a shared tier said it does not have, believed for ``ttl_s``."""

    def __init__(self, ttl_s: float, max_entries: int = MISS_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self._until: OrderedDict[bytes, float] = OrderedDict()
        self._max = max_entries

    def __contains__(self, key: bytes) -> bool:
        return self._until.get(key, 0.0) > time.monotonic()

    def remember(self, keys: Sequence[bytes]) -> None:
        until = time.monotonic() + self.ttl_s
        for key in keys:
            self._until[key] = until
            self._until.move_to_end(key)
        while len(self._until) > self._max:
            self._until.popitem(last=False)


class SharedLookup:
    def __init__(
        self, level: int, tier: KeyedTier, catalog: Catalog, health: TierHealth, *,
        window: int, misses: MissCache, max_block_bytes: int,
    ) -> None:
        self.level = level
        self.tier = tier
        self.catalog = catalog
        self.health = health
        self.window = window
        self.misses = misses
        self.max_block_bytes = max_block_bytes

    async def extend(
        self, index_keys: Sequence[bytes], keys: Sequence[bytes], namespace: bytes, start: int
    ) -> list[BlockRecord]:
        """Records of the keys from ``start`` on that the shared tier has, in order, up to the first
        it has not (each found one indexed, with its shared copy)."""
        found: list[BlockRecord] = []
        if not self.health.available():
            return found
        i = start
        while i < len(keys):
            batch = []
            for j in range(i, min(i + self.window, len(keys))):
                if index_keys[j] in self.misses:
                    break
                batch.append(j)
            if not batch:
                return found
            try:
                infos = await self.tier.probe([keys[j] for j in batch], namespace)
            except UnavailableError as exc:
                self.health.failed(exc)
                return found
            self.health.succeeded()
            for j, info in zip(batch, infos):
                index_key = index_keys[j]
                if info is None or info.namespace != namespace or info.size > self.max_block_bytes:
                    self.misses.remember([index_key])
                    return found
                record = self.catalog.get(index_key)
                if record is None:
                    record = self.catalog.known(index_key, info.size, info.checksum, namespace)
                    location = self.tier.locate(keys[j], namespace, info.size)
                    self.catalog.fill(self.catalog.attach(record, self.level, location))
                elif record.state is not BlockState.READY:
                    return found
                found.append(record)
            i = batch[-1] + 1
        return found
