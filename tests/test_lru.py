"""LRU policy: order, touch, pins, and all-or-nothing victim selection."""

from __future__ import annotations

from kvstore.allocator import Extent
from kvstore.block import BlockRecord, BlockState
from kvstore.lru import LRUPolicy


def ready(name: str, length: int = 4096) -> BlockRecord:
    r = BlockRecord(key=name.encode(), size=length, extent=Extent(0, length))
    r.advance(BlockState.READY)
    return r


def test_victims_are_coldest_first_and_touch_refreshes():
    lru = LRUPolicy()
    a, b, c = ready("a"), ready("b"), ready("c")
    for r in (a, b, c):
        lru.insert(r)
    lru.touch(a)
    assert lru.victims(4096) == [b]
    assert lru.victims(2 * 4096) == [b, c]
    assert [r.key for r in lru.coldest_first()] == [b"b", b"c", b"a"]


def test_victims_decide_without_side_effects():
    lru = LRUPolicy()
    records = [ready(str(i)) for i in range(4)]
    for r in records:
        lru.insert(r)
    lru.victims(3 * 4096)
    assert len(lru) == 4 and lru.coldest_first() == records


def test_pinned_blocks_are_never_victims_and_shortfall_returns_nothing():
    lru = LRUPolicy()
    a, b = ready("a"), ready("b")
    lru.insert(a)
    lru.insert(b)
    a.pins = 1
    assert lru.victims(4096) == [b]
    assert lru.victims(2 * 4096) == []


def test_remove_from_the_middle():
    lru = LRUPolicy()
    records = [ready(str(i)) for i in range(5)]
    for r in records:
        lru.insert(r)
    lru.remove(records[2])
    lru.remove(records[2])  # idempotent
    assert lru.coldest_first() == records[:2] + records[3:]
    assert len(lru) == 4
