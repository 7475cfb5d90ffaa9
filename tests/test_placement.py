"""Placement and the catalog as pure functions of state: no tier, no I/O, no event loop."""

from __future__ import annotations

import pytest

from kvstore import placement
from kvstore.allocator import Extent
from kvstore.block import BlockState, CopyState, TransitionError
from kvstore.catalog import Catalog
from kvstore.errors import ConfigError
from kvstore.layout import Addressing, Capabilities, Layout, Level, Watermarks
from kvstore.lru import LRUPolicy
from kvstore.stats import Counters
from kvstore.tier_kind import TierKind

PAGE = 4096
MEMORY = Capabilities(mappable=True)
SLOW_MEMORY = Capabilities()
DISK = Capabilities(persistent=True)
BUCKET = Capabilities(persistent=True, shared=True, addressing=Addressing.KEY, bounded=False)
MARKS = Watermarks(high=0.9, low=0.5)


def layout(*caps: Capabilities) -> Layout:
    names = ["mem", "slow", "disk", "bucket"]
    return Layout.of(tuple(
        Level(index=i, name=names[i], kind=TierKind.DRAM, capabilities=c, watermarks=None if c.shared else MARKS)
        for i, c in enumerate(caps)
    ))


class Books:
    """A catalog over ``shape``, with the locations it gave back recorded."""

    def __init__(self, shape: Layout) -> None:
        self.released: list[tuple[int, Extent]] = []
        self.counters = Counters()
        self.catalog = Catalog(
            shape, [LRUPolicy() if lv.capabilities.bounded else None for lv in shape.levels],
            release=lambda level, loc: self.released.append((level, loc)), counters=self.counters,
        )
        self._next = 0

    def put(self, key: bytes, level: int = 0, size: int = PAGE):
        copy = self.catalog.begin(key, size, b"", level, self._extent(size))
        self.catalog.commit(copy, 1)
        return copy

    def copy_at(self, record, level: int):
        copy = self.catalog.attach(record, level, self._extent(record.size))
        self.catalog.fill(copy)
        return copy

    def _extent(self, size: int) -> Extent:
        self._next += 1
        return Extent(self._next * PAGE, size)


def test_roles_come_from_capabilities_not_names():
    shape = layout(MEMORY, SLOW_MEMORY, DISK, BUCKET)
    assert (shape.landing, shape.bottom, shape.shared) == (0, 2, (3,))
    assert [shape.below(i) for i in range(4)] == [1, 2, None, None]
    assert shape.first_persistent() == 2
    assert shape.levels[2].forget_before_reuse and not shape.levels[3].forget_before_reuse


@pytest.mark.parametrize("caps, message", [
    ((DISK,), "no host-memory tier"),
    ((MEMORY, BUCKET, DISK), "shared tiers must come below"),
    ((MEMORY, Capabilities(bounded=False)), "must have a capacity"),
])
def test_a_stack_that_cannot_work_is_refused(caps, message):
    with pytest.raises(ConfigError, match=message):
        layout(*caps)


def test_eviction_demotes_what_has_no_copy_below_and_drops_every_victim():
    books = Books(layout(MEMORY, SLOW_MEMORY, DISK))
    a, b = books.put(b"a"), books.put(b"b")
    books.copy_at(b.record, 1)  # b already has a copy one level down
    plan = placement.evict(books.catalog.layout, [a, b], lambda level: True)
    assert (plan.to, plan.demote, plan.victims, plan.upload) == (1, (a,), (a, b), ())


def test_the_bottom_level_uploads_before_it_evicts_only_while_the_bucket_answers():
    books = Books(layout(MEMORY, DISK, BUCKET))
    a = books.copy_at(books.put(b"a").record, 1)
    b = books.copy_at(books.put(b"b").record, 1)
    books.copy_at(b.record, 2)  # already in the bucket
    plan = placement.evict(books.catalog.layout, [a, b], lambda level: True)
    assert (plan.share, plan.upload, plan.demote) == (2, (a.record,), ())
    down = placement.evict(books.catalog.layout, [a, b], lambda level: False)
    assert (down.share, down.upload, down.victims) == (None, (), (a, b))


def test_rebalance_plans_only_for_levels_past_their_high_watermark_with_a_level_below():
    books = Books(layout(MEMORY, DISK))
    copies = [books.put(bytes([i])) for i in range(10)]
    full = placement.Fill(used_bytes=10 * PAGE, capacity_bytes=10 * PAGE)
    calm = placement.Fill(used_bytes=8 * PAGE, capacity_bytes=10 * PAGE)
    (plan,) = placement.rebalance(books.catalog.layout, [full, full], books.catalog, lambda level: True)
    assert plan.victims == tuple(copies[:5]) and plan.to == 1  # down to the low watermark, coldest first
    assert placement.rebalance(books.catalog.layout, [calm, full], books.catalog, lambda level: True) == []


def test_read_ahead_names_the_blocks_missing_from_the_landing_level_within_the_window():
    books = Books(layout(MEMORY, DISK))
    records = [books.put(bytes([i]), level=0 if i % 3 == 0 else 1).record for i in range(12)]
    assert placement.read_ahead(records, 0, landing=0, window=8) == [1, 2, 4, 5, 7]
    assert placement.read_ahead(records, 10, landing=0, window=8) == [10, 11]


def test_after_a_put_write_through_and_write_behind_follow_the_stack():
    two = layout(MEMORY, DISK, BUCKET)
    assert placement.after_put(two, placement.WritePolicy()) == placement.AfterPut()
    assert placement.after_put(two, placement.WritePolicy(persist=True, share=True)) == placement.AfterPut(2 - 1, 2)
    memory_only = layout(MEMORY, BUCKET)
    assert placement.after_put(memory_only, placement.WritePolicy()) == placement.AfterPut(queue=True)
    assert placement.after_adopt(two, 1) and not placement.after_adopt(two, 0)


def test_admission_limits():
    shape = layout(MEMORY, DISK)
    assert placement.block_limit(shape, 64 << 20, 16 << 20) == (16 << 20, "max_block_bytes=67108864, mem capacity=16777216")
    assert placement.put_round_bytes(16 << 20) == 4 << 20


def test_room_victims_free_one_contiguous_run_even_around_a_held_copy():
    from kvstore.allocator import ExtentAllocator

    space = ExtentAllocator(4 * PAGE, PAGE)
    books = Books(layout(MEMORY, DISK))
    copies = []
    for key in (b"a", b"b", b"c", b"d"):
        copy = books.catalog.begin(key, PAGE, b"", 0, space.allocate(PAGE))
        books.catalog.commit(copy, 1)
        copies.append(copy)
    a, b, c, d = copies
    assert placement.room_victims(books.catalog, 0, 2 * PAGE, space.free_bytes, space.largest_free_after) == [a, b]
    books.catalog.hold(b)  # a reader: a alone frees one page, a + c are not neighbours
    assert placement.room_victims(books.catalog, 0, 2 * PAGE, space.free_bytes, space.largest_free_after) == [a, c, d]
    books.catalog.hold(c)
    assert placement.room_victims(books.catalog, 0, 2 * PAGE, space.free_bytes, space.largest_free_after) == []


# -- the catalog -----------------------------------------------------------------------------------


def test_a_copy_is_freed_exactly_once_when_its_last_hold_goes():
    books = Books(layout(MEMORY, SLOW_MEMORY))
    copy = books.put(b"k")
    books.catalog.hold(copy)                       # a reader
    assert books.catalog.drop([copy]) == []        # not persistent: nothing to forget
    assert copy.state is CopyState.DROPPED and books.released == []
    assert books.catalog.get(b"k") is None and copy.record.state is BlockState.GONE  # retired
    books.catalog.drop([copy])                     # a second drop changes nothing
    books.catalog.unhold(copy)
    assert copy.state is CopyState.FREED and books.released == [(0, copy.location)]


def test_persistent_copies_are_held_until_their_index_entry_is_forgotten():
    books = Books(layout(MEMORY, DISK))
    record = books.put(b"k").record
    disk = books.copy_at(record, 1)
    (forget,) = books.catalog.drop([disk])
    assert forget is disk and disk.holds == 1 and books.released == []
    assert books.catalog.get(b"k") is record       # still readable from memory
    books.catalog.unhold(disk)
    assert books.released == [(1, disk.location)]


def test_transitions_the_lifecycle_forbids_raise():
    books = Books(layout(MEMORY, DISK))
    copy = books.put(b"k")
    with pytest.raises(TransitionError):
        books.catalog.fill(copy)                   # READY -> READY
    with pytest.raises(TransitionError):
        copy.record.advance(BlockState.WRITING)


def test_an_aborted_put_leaves_nothing_and_frees_its_reservation():
    books = Books(layout(MEMORY, DISK))
    copy = books.catalog.begin(b"k", PAGE, b"", 0, Extent(0, PAGE))
    assert books.catalog.prefix([b"k"]) == []      # WRITING: invisible
    books.catalog.abort(copy)
    assert books.catalog.get(b"k") is None and books.released == [(0, Extent(0, PAGE))]


def test_evicting_the_last_copy_counts_an_eviction_of_that_level():
    books = Books(layout(MEMORY, DISK))
    copy = books.put(b"k")
    books.catalog.drop([copy], evicted=True)
    assert books.counters.tier("mem").evictions == 1 and books.counters.tier("mem").evicted_bytes == PAGE


def test_records_only_in_the_bucket_are_forgotten_oldest_first_beyond_the_bound():
    books = Books(layout(MEMORY, BUCKET))
    for key in (b"a", b"b", b"c"):
        record = books.catalog.known(key, PAGE, 1, b"")
        books.copy_at(record, 1)
    local = books.put(b"d")
    books.copy_at(local.record, 1)                 # in memory too: not "only in the bucket"
    assert books.catalog.trim_remote(1) == 2
    assert [r.key for r in books.catalog] == [b"c", b"d"]
    assert books.catalog.blocks_at(1) == 2
