"""The mover: carries out placement plans, moving bytes between the tiers of the stack.

It knows tiers only through the :class:`~kvstore.tiers.Tier` contract and levels only through
the :class:`~kvstore.layout.Layout`; every state change goes through the catalog. A copy that is
being read or copied elsewhere is *held* (the one way to hold a copy): it is never chosen as a
victim, and if it is dropped meanwhile its location is freed when the last hold goes.

- :meth:`Mover.make_room` reserves a location in a level, evicting its coldest copies first
  (:func:`kvstore.placement.room_victims`, then :meth:`Mover.execute`).
- :meth:`Mover.execute` runs one eviction plan: demote, upload, then drop.
- :meth:`Mover.promote` gives a block a readable copy in the landing level for a reader, verified
  against its checksum: a copy that fails is dropped and the read is a miss.
- :meth:`Mover.replicate` gives a block a copy in another level now (write-through, uploads).
- :meth:`Mover.drop` takes copies out; persistent index entries are durably forgotten before
  their extents can be reused.

A move that has started runs to its end even when the call that asked for it is cancelled (a
client gone, a get that stopped early): its I/O may be in a thread that cannot be stopped, so its
locations are adopted or given back only once that I/O is over, never while a thread still writes
them. :meth:`Mover.settle` waits for such moves before the tiers close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from kvstore import placement
from kvstore.block import BlockRecord, BlockState, Copy, CopyState
from kvstore.catalog import Catalog
from kvstore.checksum import checksum
from kvstore.errors import IntegrityError, UnavailableError
from kvstore.keys import key_label, unscoped
from kvstore.stats import Counters
from kvstore.tiers.base import Location, MemoryTier
from kvstore.tiers.stack import TierStack
from kvstore.server.health import TierHealth
from kvstore.server.quotas import Quotas
from kvstore.server.shared import SharedLevels

log = logging.getLogger("kvstore.mover")

BUSY_WAIT_S = 2.0
ROOM_ROUNDS = 8
"""Evictions :meth:`Mover.make_room` tries before giving up (concurrent moves may take the room
one eviction freed while it waited for a disk)."""
EVICT_ROUNDS = 2
"""Batch evictions :meth:`Mover.make_room_many` tries before the blocks left go one by one."""
NO_ROOM = object()
"""What :meth:`Mover.promote` returns when the landing level has no room (everything in use)."""


QUOTA_SLACK = 20
"""A tenant over its quota gives up at least 1/20 of it at once."""


class Mover:
    def __init__(
        self,
        stack: TierStack,
        catalog: Catalog,
        counters: Counters,
        health: dict[int, TierHealth],
        shared: SharedLevels | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.layout = stack.layout
        self.quotas = quotas
        self.tiers = stack.tiers
        self.catalog = catalog
        self.counters = counters
        self.health = health
        self.shared = shared
        self._names = [level.name for level in self.layout.levels]
        self._promoting: dict[bytes, asyncio.Future] = {}
        self._running: set[asyncio.Task] = set()
        self.busy = 0  # moves in flight that hold copies they will let go of

    async def _finish(self, coro):
        """Run ``coro`` to its end even if the caller is cancelled (see the module docstring)."""
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_failure)  # nobody is left to see its outcome
            raise

    async def settle(self) -> None:
        """Wait for every move in flight (before the tiers close)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def available(self, level: int) -> bool:
        health = self.health.get(level)
        return health is None or health.available()

    # -- room ------------------------------------------------------------------------------------

    async def fit_quota(self, level: int, namespace: bytes, nbytes: int) -> int | None:
        """Bytes the owner of ``namespace`` may still place at ``level`` once its own coldest
        blocks there made room for ``nbytes``; None when no quota applies."""
        bound = self.quotas.bound(level, namespace) if self.quotas is not None else None
        if bound is None:
            return None
        limit, namespaces = bound
        used = self.catalog.namespace_bytes(level, namespaces)
        over = used + nbytes - limit
        if over > 0:
            # A little more than needed, so the walk for the owner's blocks is paid less often.
            victims = self.catalog.victims_of(level, namespaces, max(over, limit // QUOTA_SLACK))
            if victims:
                await self.execute(placement.evict(self.layout, victims, self.available))
            used = self.catalog.namespace_bytes(level, namespaces)
        return max(limit - used, 0)

    async def _within_quotas(self, sources: Sequence[Copy], to: int) -> set[int]:
        """The sources a move into ``to`` may take, owner by owner: each owner's leading blocks
        that fit its quota there once its own coldest made room for all of them."""
        owners: dict[int, list[int]] = {}
        admitted = set()
        for i, source in enumerate(sources):
            bound = self.quotas.bound(to, source.record.namespace)
            if bound is None:
                admitted.add(i)
            else:
                owners.setdefault(id(bound[1]), []).append(i)
        for indices in owners.values():
            sizes = [sources[i].record.size for i in indices]
            room = await self.fit_quota(to, sources[indices[0]].record.namespace, sum(sizes))
            for i, size in zip(indices, sizes):
                if room is None or size <= room:
                    admitted.add(i)
                    room = None if room is None else room - size
                else:
                    break
        return admitted

    async def make_room(self, level: int, record: BlockRecord) -> Location | None:
        """Reserve a location for ``record`` in ``level``, evicting its coldest copies as needed
        (first its owner's own, when the owner has a quota there)."""
        tier = self.tiers[level]
        room = await self.fit_quota(level, record.namespace, record.size) if self.quotas is not None else None
        if room is not None and room < record.size:
            return None
        if not self.layout.levels[level].capabilities.bounded:
            return tier.reserve(record)   # nothing to evict there: it has room or it does not take this block
        waited = 0.0
        for _ in range(ROOM_ROUNDS):  # others may take freed room while evictions wait for a disk
            location = tier.reserve(record)
            if location is not None:
                return location
            length = tier.footprint(record.size)

            def choose() -> list[Copy]:
                return placement.room_victims(self.catalog, level, length, tier.free_bytes, tier.largest_free_after)

            victims = choose()
            # Copies held by moves in flight come free in a moment: wait (briefly) rather than drop.
            while not victims and self.busy and waited < BUSY_WAIT_S:
                await asyncio.sleep(0.01)
                waited += 0.01
                location = tier.reserve(record)
                if location is not None:
                    return location
                victims = choose()
            if not victims:
                return None
            await self.execute(placement.evict(self.layout, victims, self.available))
        return tier.reserve(record)

    async def make_room_many(
        self, level: int, records: Sequence[BlockRecord], *, leading: bool = False
    ) -> list[Location | None]:
        """:meth:`make_room` for a batch, in order (None: no room for that one). The room the whole
        batch lacks is freed by one eviction (one index commit for a persistent level, one demotion
        batch) rather than one per block; what still does not fit goes one by one. With
        ``leading``, only the leading blocks that get room (the list stops before the first that
        does not)."""
        tier = self.tiers[level]
        reserve_many = getattr(tier, "reserve_many", None)
        # Room now needs nothing awaited (a batch into free space: one search, no coroutine per block).
        placed: list[Location | None] = reserve_many([r.size for r in records]) if reserve_many is not None else []
        try:
            if reserve_many is not None and self.quotas is None and self.layout.levels[level].capabilities.bounded:
                for _ in range(EVICT_ROUNDS):
                    rest = records[len(placed):]
                    if not rest:
                        break
                    lengths = [tier.footprint(r.size) for r in rest]
                    largest = max(lengths)
                    victims = self.catalog.victim_slots(
                        level, max(sum(lengths) - tier.free_bytes, 1),
                        fits=lambda locations: tier.largest_free_after(locations) >= largest,
                    )
                    if not victims:
                        break
                    await self._evict(level, victims)
                    placed += reserve_many([r.size for r in rest])
            for record in records[len(placed):]:
                location = await self.make_room(level, record)
                if location is None and leading:
                    break
                placed.append(location)
        except BaseException:   # cancelled (a client gone) or failed while evicting: nothing stays reserved
            for location in placed:
                if location is not None:
                    tier.release(location)
            raise
        return placed

    async def free_room(self, level: int, nbytes: int) -> None:
        """Evict at once what leaves ``nbytes`` free at ``level``: the room a stream of blocks is
        about to need, one eviction rather than one per block (nothing where a quota applies:
        :meth:`make_room` evicts a tenant's own blocks first)."""
        tier = self.tiers[level]
        need = nbytes - tier.free_bytes
        if need <= 0 or self.quotas is not None or not self.layout.levels[level].capabilities.bounded:
            return
        victims = self.catalog.victim_slots(level, need)
        if victims:
            await self._evict(level, victims)

    async def _evict(self, level: int, victims: list[int]) -> None:
        """Evict the copies at ``level`` of the slots just chosen, nothing awaited since: in one
        pass where that moves nothing (:meth:`Catalog.evict_slots`), else through views and an
        eviction plan (a demotion or upload to make first, a copy held)."""
        forget = (self.catalog.evict_slots(level, victims)
                  if placement.drops_only(self.layout, self.catalog, level, victims, self.available) else None)
        if forget is None:
            await self.execute(placement.evict(self.layout, self.catalog.views_at(level, victims), self.available))
        elif forget:
            await self._finish(self._forget_evicted(level, forget))

    async def execute(self, plan: placement.Plan) -> None:
        """Evict ``plan.victims``: demote or upload what the plan says, then drop them. A victim
        whose demotion failed (bad bytes aside: a write error) is kept: no acknowledged block is
        lost to a failing disk; the room it would have freed is not freed."""
        if plan.victims:
            await self._execute(plan)

    async def _execute(self, plan: placement.Plan) -> None:
        moving = plan.demote or [c for c in plan.victims if c.record in plan.upload]
        for copy in moving:
            self.catalog.hold(copy)
        self.busy += 1
        kept: set[int] = set()
        try:
            if plan.demote:
                kept = await self._demote(plan.demote, plan.to)
            if plan.upload:
                await self.replicate_many(list(plan.upload), plan.share)
        finally:
            self.busy -= 1
            for copy in moving:
                self.catalog.unhold(copy)
        await self._drop([c for c in plan.victims if id(c) not in kept], evicted=True)

    async def rebalance(self) -> int:
        """One background step: demote from every level past its high watermark."""
        fills = [placement.Fill(t.used_bytes, t.capacity_bytes) for t in self.tiers]
        moved = 0
        for plan in placement.rebalance(self.layout, fills, self.catalog, self.available):
            await self.execute(plan)
            moved += len(plan.victims)
        return moved

    # -- moves -----------------------------------------------------------------------------------

    async def _demote(self, copies: Sequence[Copy], to: int) -> set[int]:
        """Copy ``copies`` into level ``to``; returns the ids of those that must be kept where they
        are (no room below right now, or their copy could not be written)."""
        candidates = [c for c in copies if c.record.state is BlockState.READY and c.readable]
        kept: set[int] = set()
        for copy, result in zip(candidates, await self._copy_into(candidates, to)):
            if result is True:
                self.counters.tier(self._names[copy.level]).demotions += 1
            elif result is None:
                kept.add(id(copy))
            elif isinstance(result, BaseException):
                log.warning("cannot demote block %s to %s: %s", key_label(copy.record.key), self._names[to], result)
                if not isinstance(result, IntegrityError):  # bad bytes: not worth keeping (dropped)
                    self.counters.tier(self._names[to]).errors += 1
                    kept.add(id(copy))
        return kept

    async def replicate(self, record: BlockRecord, to: int) -> bool:
        """Give ``record`` a copy in level ``to`` now, from its fastest copy; False when that cannot
        be done (no room, the medium unreachable, the block gone)."""
        return (await self.replicate_many([record], to))[0]

    async def replicate_many(self, records: Sequence[BlockRecord], to: int) -> list[bool]:
        """:meth:`replicate` for several blocks at once: their bytes go to the tier in one batch
        (one flush and one index commit for a persistent tier)."""
        results = [False] * len(records)
        todo: list[tuple[int, Copy]] = []
        for i, record in enumerate(records):
            if record.has_copy(to):
                results[i] = True
                continue
            source = record.primary()
            if source is not None and record.state is BlockState.READY and self.available(to):
                self.catalog.hold(source)
                todo.append((i, source))
        health = self.health.get(to)
        self.busy += 1
        try:
            copied = await self._copy_into([source for _, source in todo], to)
        finally:
            self.busy -= 1
            for _, source in todo:
                self.catalog.unhold(source)
        for (i, source), result in zip(todo, copied):
            if isinstance(result, UnavailableError):
                if health is not None:
                    health.failed(result)
            elif isinstance(result, BaseException):
                log.warning("cannot copy block %s to %s: %s", key_label(source.record.key), self._names[to], result)
                self.counters.tier(self._names[to]).errors += 1
            elif result is True:
                if health is not None:
                    health.succeeded()
                results[i] = True
                if self.layout.levels[to].shared:
                    self.counters.tier(self._names[to]).uploads += 1
        return results

    async def _copy_into(self, sources: Sequence[Copy], to: int) -> list[bool | BaseException | None]:
        """Give each source's block a copy in level ``to``: room, bytes (in one batch), persistence,
        adoption. Per source: True (adopted), False (the block went away meanwhile), None (no room
        there now), or the error that stopped it (its location is given back). Any other error, a
        bug, is raised once the copies that were written are adopted."""
        results: list[bool | BaseException | None] = [None] * len(sources)
        placed: list[tuple[int, Copy, Location]] = []
        admitted = await self._within_quotas(sources, to) if self.quotas is not None else None
        todo = [i for i in range(len(sources)) if admitted is None or i in admitted]   # others: over quota
        if todo:
            rooms = await self.make_room_many(to, [sources[i].record for i in todo])
            placed.extend((i, sources[i], location) for i, location in zip(todo, rooms) if location is not None)
        live = []
        for i, source, location in placed:
            if source.record.state is BlockState.READY:
                live.append((i, source, location))
            else:
                self.tiers[to].release(location)  # deleted while room was being made
                results[i] = False
        outcomes = await self._write([(source, location) for _, source, location in live], to)
        unexpected = None
        # The copies of blocks still READY and without one there are adopted together; others one by one.
        plain, seen = [], set()
        for j, ((_, source, _), outcome) in enumerate(zip(live, outcomes)):
            record = source.record
            if outcome is None and record.state is BlockState.READY and not record.has_copy(to) and record.slot not in seen:
                seen.add(record.slot)
                plain.append(j)
        self.catalog.attach_filled([live[j][1].record for j in plain], to, [live[j][2] for j in plain])
        queue = self.shared is not None and placement.after_adopt(self.layout, to)
        for j in plain:
            results[live[j][0]] = True
            if queue:
                self.shared.queue_adopted(live[j][1].record)
        adopted = set(plain)
        for j, ((i, source, location), outcome) in enumerate(zip(live, outcomes)):
            if j in adopted:
                continue
            if outcome is None:
                results[i] = await self._adopt(source.record, to, location)
                continue
            self.tiers[to].release(location)  # not written, not indexed
            if isinstance(outcome, (OSError, IntegrityError, UnavailableError)):
                results[i] = outcome
            else:
                unexpected = unexpected or outcome
        if unexpected is not None:
            raise unexpected
        return results

    async def _write(self, pairs: Sequence[tuple[Copy, Location]], to: int) -> list[BaseException | None]:
        """Copy each source into its location in level ``to``, then persist those written: the
        outcome of each (None, or what went wrong). Cancelled, it stops waiting but not the I/O,
        which may be in a thread: once that is over, what it persisted is forgotten again and its
        locations are released, never before."""
        io = asyncio.ensure_future(self._write_io(pairs, to))
        self._running.add(io)   # settle waits for it, cancelled caller or not
        io.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(io)
        except asyncio.CancelledError:
            io.add_done_callback(lambda done: self._abandon(done, pairs, to))
            raise

    async def _write_io(self, pairs: Sequence[tuple[Copy, Location]], to: int) -> list[BaseException | None]:
        # Sources in memory are viewed where they are, without a task each; others are read.
        sources: list = [None] * len(pairs)
        reads = []
        for i, (source, location) in enumerate(pairs):
            tier = self.tiers[source.level]
            if isinstance(tier, MemoryTier):
                try:
                    sources[i] = self._checked(source, to, tier.view(source.location, min(source.nbytes, location.length)))
                except IntegrityError as exc:
                    sources[i] = exc
            else:
                reads.append(i)
        read = await asyncio.gather(*(self._source_bytes(*pairs[i], to) for i in reads), return_exceptions=True)
        for i, data in zip(reads, read):
            sources[i] = data
        ready = [(c.record, loc, data) for (c, loc), data in zip(pairs, sources) if not isinstance(data, BaseException)]
        wrote = iter(await self.tiers[to].write_persisted(ready))
        return [data if isinstance(data, BaseException) else next(wrote) for data in sources]

    def _abandon(self, io: asyncio.Task, pairs: Sequence[tuple[Copy, Location]], to: int) -> None:
        persisted = []
        if not io.cancelled() and io.exception() is None:
            persisted = [(c.record.key, loc) for (c, loc), outcome in zip(pairs, io.result()) if outcome is None]

        async def undo() -> None:
            if persisted:
                try:
                    await self.tiers[to].forget(persisted)
                except Exception as exc:
                    log.error("cannot forget %d abandoned copies in %s (%s): their space is kept until restart",
                              len(persisted), self._names[to], exc)
                    kept = {id(loc) for _, loc in persisted}
                    for _, location in pairs:
                        if id(location) not in kept:
                            self.tiers[to].release(location)
                    return
            for _, location in pairs:
                self.tiers[to].release(location)

        task = asyncio.ensure_future(undo())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _source_bytes(self, source: Copy, location: Location, to: int) -> memoryview:
        """``source``'s bytes, to be copied into ``location`` of level ``to``. Bytes read from a
        persistent level, and bytes going to a shared one (other daemons trust what they find
        there), are verified first, so bad bytes never travel on, except to a level that verifies
        what arrives against the checksum sent with it (peers: the home checks the bytes against
        the block's own checksum); blocks put without a checksum get theirs here (every copy below
        the landing level carries one)."""
        n = min(source.nbytes, location.length)
        return self._checked(source, to, await self.tiers[source.level].read(source.location, 0, n))

    def _checked(self, source: Copy, to: int, data: memoryview) -> memoryview:
        """``data`` (``source``'s bytes), verified or given its checksum (see :meth:`_source_bytes`)."""
        record = source.record
        levels = self.layout.levels
        if record.checksum is None:
            record.checksum = checksum(data[: record.size])
        elif (
            levels[source.level].capabilities.persistent
            or (levels[to].shared and not levels[to].capabilities.verifies_arrivals)
        ) and checksum(data[: record.size]) != record.checksum:
            raise IntegrityError(f"the {self._names[source.level]} copy failed verification")
        return data

    async def _adopt(self, record: BlockRecord, level: int, location: Location) -> bool:
        """Attach a freshly written (and persisted) copy, unless the block went away meanwhile."""
        if record.state is not BlockState.READY or record.has_copy(level):
            if record.state is not BlockState.READY and self.layout.levels[level].shared:
                await self._unpublish(record, level)
            await self._drop([self.catalog.orphan(record, level, location)])  # un-index exactly this copy
            return False
        self.catalog.fill(self.catalog.attach(record, level, location))
        if self.shared is not None and placement.after_adopt(self.layout, level):
            self.shared.queue_adopted(record)
        return True

    async def _unpublish(self, record: BlockRecord, level: int) -> None:
        """A block deleted while it was uploaded: its object must not outlive the delete."""
        try:
            await self.tiers[level].remove([unscoped(record.key)], record.namespace)
        except UnavailableError as exc:
            log.warning("cannot remove block %s from %s after its delete: %s", key_label(record.key), self._names[level], exc)

    # -- reads -----------------------------------------------------------------------------------

    async def promote(self, record: BlockRecord) -> Copy | object | None:
        """A readable landing-level copy of ``record``, read up from its fastest copy; None if the
        block is gone, failed verification or is only in a medium that does not answer now;
        :data:`NO_ROOM` if the landing level is full of blocks in use. Concurrent readers of one
        block share one promotion. Cancelled while it makes room, it stops; once its read has
        begun, the read and its verification run to their end."""
        waiting = self._promoting.get(record.key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        self._promoting[record.key] = future
        copy = None
        try:
            copy = await self._promote(record)
            return copy
        finally:
            del self._promoting[record.key]
            future.set_result(copy)

    async def _promote(self, record: BlockRecord) -> Copy | object | None:
        landing = self.layout.landing
        source = record.primary()
        if source is None or source.level == landing:
            return source
        if not self.available(source.level):
            return None  # a miss now, without evicting anything for it
        self.catalog.hold(source)
        handed_over = False
        try:
            location = await self.make_room(landing, record)
            if location is None:
                return NO_ROOM
            if record.state is not BlockState.READY or record.has_copy(landing):
                self.tiers[landing].release(location)
                return record.readable_at(landing)
            copy = self.catalog.attach(record, landing, location)
            handed_over = True  # _fill lets go of the source
            return await self._finish(self._fill(source, copy))
        finally:
            if not handed_over:
                self.catalog.unhold(source)

    async def _fill(self, source: Copy, copy: Copy) -> Copy | None:
        """Read ``source`` into the new landing ``copy``, verify it, make it readable."""
        record, landing = copy.record, copy.level
        try:
            self.catalog.hold(copy)  # a delete meanwhile must not free what the read fills
            try:
                fetched = await self._fetch(source, copy)
            finally:
                self.catalog.unhold(copy)
            if copy.state is not CopyState.FILLING:
                return None  # dropped meanwhile (deleted)
            if fetched is None or record.state is not BlockState.READY:
                self.catalog.discard(copy)  # unreachable (a miss this time), or deleted meanwhile
                return None
            view = self.tiers[landing].view(copy.location, record.size)
            if not fetched or checksum(view) != record.checksum:
                name = self._names[source.level]
                log.warning("block %s failed verification on %s: dropped", key_label(record.key), name)
                self.counters.integrity_failures += 1
                self.counters.tier(name).integrity_failures += 1
                self.catalog.discard(copy)
                if self.shared is not None:
                    self.shared.missed(source.level, [record.key])
                await self._drop([source])
                return None
            self.catalog.fill(copy)
            self.counters.tier(self._names[source.level]).promotions += 1
            return copy
        except BaseException:
            if copy.state is CopyState.FILLING:
                self.catalog.discard(copy)
            raise
        finally:
            self.catalog.unhold(source)

    async def _fetch(self, source: Copy, copy: Copy) -> bool | None:
        """Read ``source``'s bytes into the new copy: True, False (they are bad or gone), or None
        (the medium is unreachable right now)."""
        if not self.available(source.level):
            return None
        health = self.health.get(source.level)
        n = min(source.nbytes, copy.location.length)
        out = self.tiers[copy.level].view(copy.location, copy.location.length)[:n]
        try:
            await self.tiers[source.level].read_into(source.location, 0, out)
        except UnavailableError as exc:
            if health is not None:
                health.failed(exc)
            return None
        except IntegrityError as exc:
            log.warning("block %s: %s", key_label(copy.record.key), exc)
            return False
        except OSError as exc:
            name = self._names[source.level]
            log.warning("reading block %s from %s failed: %s", key_label(copy.record.key), name, exc)
            self.counters.tier(name).errors += 1
            return False
        if health is not None:
            health.succeeded()
        return True

    # -- drops -----------------------------------------------------------------------------------

    async def drop(self, copies: Sequence[Copy], *, evicted: bool = False) -> None:
        """Take copies out of their levels (see :meth:`Catalog.drop`), forgetting persistent index
        entries durably before their locations can be reused."""
        await self._finish(self._drop(copies, evicted=evicted))

    async def _forget_evicted(self, level: int, forget: list[tuple[bytes, Location]]) -> None:
        """Forget the index entries of copies :meth:`Catalog.evict_slots` took out (one commit),
        then give their extents back (see :meth:`_forget`)."""
        if await self._forget(level, forget):
            self.catalog.release_forgotten(level, [extent for _, extent in forget])

    async def _drop(self, copies: Sequence[Copy], *, evicted: bool = False) -> None:
        forget = self.catalog.drop(copies, evicted=evicted)
        by_level: dict[int, list[Copy]] = {}
        for copy in forget:
            by_level.setdefault(copy.level, []).append(copy)
        for level, held in by_level.items():
            if await self._forget(level, [(c.record.key, c.location) for c in held]):
                for copy in held:
                    self.catalog.unhold(copy)

    async def _forget(self, level: int, entries: list[tuple[bytes, Location]]) -> bool:
        """Forget the index entries of dropped copies at ``level`` before their locations are
        reused; False (logged, counted) where that failed: the entries may still be there, so
        their locations stay held (unused) until a restart, rather than be reused under a key that
        names them."""
        try:
            await self.tiers[level].forget(entries)
        except Exception as exc:
            log.error("cannot forget %d blocks from %s (%s): their space is kept until restart",
                      len(entries), self._names[level], exc)
            self.counters.tier(self._names[level]).errors += 1
            return False
        return True


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a move whose caller was cancelled failed", exc_info=task.exception())
