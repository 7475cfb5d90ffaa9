"""Placement: where blocks go, decided as pure functions of the stack's state.

Each function reads the :class:`~kvstore.layout.Layout`, the catalog and the levels' fill and
returns what to do; :class:`~kvstore.server.mover.Mover` does it. Nothing here moves a byte or
waits for anything, so every rule is tested without I/O (``tests/test_placement.py``).

- **Admission**: the largest block a put may carry (:func:`block_limit`) and how much one
  same-host put round reserves at a time (:func:`put_round_bytes`).
- **Making room** (:func:`room_victims`): which copies of a level to evict so one block fits.
- **Eviction** (:func:`evict`): a victim is demoted one level down unless the block already has a
  copy there; at the bottom local level it is uploaded to the shared level first (upload before
  evict) when that is reachable; then it is dropped.
- **Watermarks** (:func:`rebalance`): every level with a level below that is filled past its high
  watermark is brought under its low one, a batch at a time, so puts rarely wait for a disk. The
  bottom level is never emptied ahead of need; it evicts when a reservation needs the room.
- **Reads** (:func:`read_ahead`): a get promotes the blocks it is about to pin into the landing
  level, a window at a time, so their reads overlap.
- **After a put** (:func:`after_put`): write-through to the first persistent level, upload to the
  shared level before the answer, or queue for write-behind when the landing level is the bottom.
- **After a move** (:func:`after_adopt`): a block reaching the bottom local level is queued for
  write-behind to the shared level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.block import BlockRecord, Copy
from kvstore.catalog import Catalog
from kvstore.layout import Layout

REBALANCE_BATCH_BYTES = 32 << 20
PROMOTE_AHEAD = 8
"""Blocks a get reads up from slower levels concurrently."""


@dataclass(frozen=True, slots=True)
class Fill:
    """How full one level is."""

    used_bytes: int
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Evict ``victims`` (all of one level): copy ``demote`` to level ``to``, give ``upload`` a copy
    in the shared level ``share``, then drop every victim."""

    victims: tuple[Copy, ...]
    to: int | None = None
    demote: tuple[Copy, ...] = ()
    share: int | None = None
    upload: tuple[BlockRecord, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class WritePolicy:
    """What a put does before it is answered."""

    persist: bool = False   # write through to the first persistent level
    share: bool = False     # upload to the shared level


@dataclass(frozen=True, slots=True)
class AfterPut:
    persist_to: int | None = None    # copy now to this level (write-through)
    share_to: int | None = None      # copy now to this shared level
    queue: bool = False              # queue for write-behind


def block_limit(layout: Layout, max_block_bytes: int, landing_capacity: int) -> tuple[int, str]:
    """The largest block a put may carry, and why it is that."""
    name = layout.levels[layout.landing].name
    limit = min(max_block_bytes, landing_capacity)
    return limit, f"max_block_bytes={max_block_bytes}, {name} capacity={landing_capacity}"


def put_round_bytes(landing_capacity: int) -> int:
    """A same-host put reserves at most this much at a time, so one round's reservations never
    crowd each other out (earlier rounds are committed and can be demoted to make room)."""
    return max(landing_capacity // 4, 1)


def room_victims(
    catalog: Catalog, level: int, length: int, free_bytes: int, largest_free_after: Callable[[list], int]
) -> list[Copy]:
    """Copies of ``level`` whose eviction leaves one free run of ``length`` bytes; [] if none does."""
    return catalog.victims(
        level,
        max(length - free_bytes, 1),
        fits=lambda locations: largest_free_after(locations) >= length,
    )


def evict(layout: Layout, victims: Sequence[Copy], shared_available: Callable[[int], bool]) -> Plan:
    """What evicting ``victims`` (all of one level) takes."""
    if not victims:
        return Plan(victims=())
    below, share = _eviction_target(layout, victims[0].level, shared_available)
    if below is not None:
        demote = tuple(c for c in victims if not c.record.has_copy(below))
        return Plan(victims=tuple(victims), to=below, demote=demote)
    if share is not None:
        upload = tuple(c.record for c in victims if not c.record.has_copy(share))
        return Plan(victims=tuple(victims), share=share, upload=upload)
    return Plan(victims=tuple(victims))


def _eviction_target(layout: Layout, level: int, shared_available: Callable[[int], bool]) -> tuple[int | None, int | None]:
    """Where evicting from ``level`` copies blocks first: ``(the level below, None)``, else
    ``(None, the shared level to upload to)``, else ``(None, None)`` (nowhere: a plain drop)."""
    below = layout.below(level)
    if below is not None:
        return below, None
    # A durable shared level (a bucket) first: a pooled one (the peers) got the block at its put.
    for share in sorted(layout.shared, key=lambda i: not layout.levels[i].capabilities.persistent):
        if shared_available(share):
            return None, share
    return None, None


def drops_only(layout: Layout, catalog: Catalog, level: int, slots: Sequence[int],
               shared_available: Callable[[int], bool]) -> bool:
    """Whether :func:`evict` of the copies at ``level`` of ``slots`` moves nothing (every block
    already has its copy where the plan would demote or upload it): a plain drop."""
    below, share = _eviction_target(layout, level, shared_available)
    target = below if below is not None else share
    return target is None or bool(catalog.has_copies(target, np.asarray(slots, dtype=np.int64)).all())


def rebalance(
    layout: Layout, fills: Sequence[Fill], catalog: Catalog, shared_available: Callable[[int], bool]
) -> list[Plan]:
    """One background step: a plan for every over-full level that has a level below it."""
    plans = []
    for level in layout.levels:
        i, marks = level.index, level.watermarks
        if layout.below(i) is None or marks is None:
            continue
        fill = fills[i]
        if fill.used_bytes <= marks.high * fill.capacity_bytes:
            continue
        excess = min(fill.used_bytes - int(marks.low * fill.capacity_bytes), REBALANCE_BATCH_BYTES)
        victims = catalog.victims(i, excess) or catalog.victims(i, excess // 2 or 1)
        if victims:
            plans.append(evict(layout, victims, shared_available))
    return plans


PROMOTE_AHEAD_POOLED = 64
"""Blocks a get reads ahead from peers: their fetches from one peer travel together, so a wider
window is fewer, larger transfers."""


def read_window(landing_capacity: int, block_bytes: int, ahead: int = PROMOTE_AHEAD) -> int:
    """How many blocks a get reads ahead: :data:`PROMOTE_AHEAD`, but at most a quarter of what the
    landing level holds, so read-ahead never crowds out the block the get needs now."""
    return max(1, min(ahead, landing_capacity // (4 * max(block_bytes, 1))))


def read_ahead(records: Sequence[BlockRecord], start: int, landing: int, window: int = PROMOTE_AHEAD) -> list[int]:
    """Indexes in ``records[start:start+window]`` with no readable copy in the landing level."""
    stop = min(start + window, len(records))
    return [j for j in range(start, stop) if records[j].readable_at(landing) is None]


def after_put(layout: Layout, policy: WritePolicy) -> AfterPut:
    persist_to = layout.first_persistent() if policy.persist else None
    durable = [i for i in layout.shared if layout.levels[i].capabilities.persistent]
    share_to = durable[0] if policy.share and durable else None
    queue = share_to is None and bool(layout.shared) and layout.landing == layout.bottom
    return AfterPut(persist_to=persist_to, share_to=share_to, queue=queue)


def after_adopt(layout: Layout, level: int) -> bool:
    """Whether a copy newly placed at ``level`` should be queued for write-behind."""
    return bool(layout.shared) and level == layout.bottom
