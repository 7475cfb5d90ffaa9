"""Finding blocks in the shared levels that this daemon does not hold (yet).

Past the last key held locally, a lookup or get asks the shared tiers (peer daemons, then a
bucket every daemon writes to) about the next keys, a window at a time, until the first key none
of them has. Keys one has become records whose only copy is shared (reported with that tier; a
get promotes them); keys it does not have are remembered as misses for a while, so a cold prefix
does not send a request per call.

:class:`SharedLevels` is everything the daemon keeps per shared level: its lookup, its health
(a bucket's backoff; the peer tier keeps one per peer itself), its misses and its write-behind
queue. A *pooled* level (the peers) gets every put queued, so blocks travel to their home in the
background; the others get blocks as they reach the bottom local level.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.backoff import Backoff
from kvstore.block import BlockRecord, BlockState
from kvstore.catalog import Catalog
from kvstore.errors import UnavailableError
from kvstore.layout import Layout
from kvstore.stats import Counters
from kvstore.tiers.base import KeyedTier, Tier
from kvstore.server.health import TierHealth
from kvstore.server.writeback import UploadQueue

DEFAULT_BACKOFF_S = 2.0
DEFAULT_MISS_TTL_S = 5.0
DEFAULT_LOOKUP_WINDOW = 16

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
        self, level: int, tier: KeyedTier, catalog: Catalog, health: TierHealth | None, *,
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
        if self.health is not None and not self.health.available():
            return found
        i = start
        while i < len(keys):
            batch, known = [], {}
            end = stop = min(i + self.window, len(keys))
            for j in range(i, end):
                record = self.catalog.get(index_keys[j])
                if record is not None and record.state is BlockState.READY and record.primary() is not None:
                    known[j] = record   # held here already (a later key of the chain)
                    continue
                if index_keys[j] in self.misses:
                    stop = j
                    break
                batch.append(j)
            infos = {}
            if batch:
                try:
                    infos = dict(zip(batch, await self.tier.probe([keys[j] for j in batch], namespace)))
                except UnavailableError as exc:
                    if self.health is not None:
                        self.health.failed(exc)
                    return found
                if self.health is not None:
                    self.health.succeeded()
            for j in range(i, stop):
                if j in known:
                    found.append(known[j])
                    continue
                index_key, info = index_keys[j], infos.get(j)
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
                elif not record.has_copy(self.level):
                    self.catalog.fill(self.catalog.attach(record, self.level, self.tier.locate(keys[j], namespace, info.size)))
                found.append(record)
            if stop < end:   # the window ended at a remembered miss
                return found
            i = stop
        return found


@dataclass(slots=True)
class SharedLevel:
    level: int
    name: str
    tier: KeyedTier
    lookup: SharedLookup
    health: TierHealth | None   # None: the tier keeps its own (the peers: one per peer)
    misses: MissCache
    uploads: UploadQueue
    pooled: bool                # every put is queued for it (blocks travel to their home)
    remembered_limit: int


class SharedLevels:
    """The shared levels of a stack, in stack order (peers before a bucket)."""

    def __init__(self, levels: list[SharedLevel]) -> None:
        self.levels = levels
        self._by_level = {shared.level: shared for shared in levels}

    @classmethod
    def build(
        cls, layout: Layout, tiers: Sequence[Tier], catalog: Catalog, counters: Counters, max_block_bytes: int
    ) -> SharedLevels | None:
        levels = []
        for level in layout.shared:
            tier, name = tiers[level], layout.levels[level].name
            config = getattr(tier, "config", None)
            pooled = layout.levels[level].capabilities.pooled
            health = None if pooled else TierHealth(
                name, Backoff(getattr(config, "backoff_s", DEFAULT_BACKOFF_S)), counters.tier(name)
            )
            misses = MissCache(getattr(config, "negative_ttl_s", DEFAULT_MISS_TTL_S))
            levels.append(SharedLevel(
                level=level, name=name, tier=tier, health=health, misses=misses, pooled=pooled,
                lookup=SharedLookup(level, tier, catalog, health, misses=misses, max_block_bytes=max_block_bytes,
                                    window=getattr(config, "lookup_window", DEFAULT_LOOKUP_WINDOW)),
                uploads=UploadQueue(level, getattr(config, "queue_blocks", 4096), counters.tier(name)),
                remembered_limit=getattr(config, "max_remembered_blocks", 1_000_000),
            ))
        return cls(levels) if levels else None

    @property
    def health(self) -> dict[int, TierHealth]:
        return {s.level: s.health for s in self.levels if s.health is not None}

    @property
    def remembered_limit(self) -> int:
        return max(s.remembered_limit for s in self.levels)

    async def extend(
        self, index_keys: Sequence[bytes], keys: Sequence[bytes], namespace: bytes, start: int
    ) -> list[BlockRecord]:
        """:meth:`SharedLookup.extend` through each level in turn: what the peers do not have, the
        bucket may."""
        found: list[BlockRecord] = []
        for shared in self.levels:
            if start + len(found) >= len(keys):
                break
            found += await shared.lookup.extend(index_keys, keys, namespace, start + len(found))
        return found

    def queue_put(self, records: Iterable[BlockRecord], *, bottom: bool) -> None:
        """Queue newly put blocks: for every pooled level, and for the others when the landing level
        is the bottom one (``bottom``)."""
        targets = [s.uploads for s in self.levels if s.pooled or bottom]
        for record in records:
            for uploads in targets:
                uploads.put(record)

    def queue_adopted(self, record: BlockRecord) -> None:
        """A block reached the bottom local level: queue it for the levels that are not pooled."""
        for shared in self.levels:
            if not shared.pooled:
                shared.uploads.put(record)

    def missed(self, level: int, keys: Sequence[bytes]) -> None:
        """``keys`` (index keys) turned out bad or absent in ``level``: believe so for a while."""
        shared = self._by_level.get(level)
        if shared is not None:
            shared.misses.remember(keys)

    async def delete(self, keys: list[bytes], index_keys: list[bytes], namespace: bytes) -> None:
        """Delete the objects of ``keys`` from every shared level; raises UnavailableError naming the
        levels that could not be reached, so the caller learns the delete is incomplete."""
        failed = []
        for shared in self.levels:
            shared.misses.remember(index_keys)
            try:
                await shared.tier.remove(keys, namespace)
            except UnavailableError as exc:
                if shared.health is not None:
                    shared.health.failed(exc)
                failed.append(f"{shared.name}: {exc}")
        if failed:
            raise UnavailableError(f"deleted locally, but not from {'; '.join(failed)}")
