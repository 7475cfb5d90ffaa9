"""Eviction policies over tier copies: LRU and the scan-resistant S3-FIFO."""

from __future__ import annotations

import pytest

from kvstore.columns import LevelColumns
from kvstore.lru import LRUPolicy
from kvstore.policies import make_policy
from kvstore.policy import EvictionPolicy, LevelView, PolicyKind
from kvstore.s3fifo import S3FIFOPolicy

PAGE = 4096


class Level:
    """One level's columns for a policy under test: named blocks are slots, each a readable copy
    of ``PAGE`` bytes; ``holds`` marks copies being read or moved."""

    def __init__(self) -> None:
        self.columns = LevelColumns()
        self.columns.grow(1 << 14)
        self.names: list[str] = []
        self.holds: set[int] = set()

    def view(self) -> LevelView:
        c = self.columns
        return LevelView(prev=c.prev, next=c.next, freq=c.freq, queue=c.queue, length=c.length,
                         evictable=lambda slot: slot not in self.holds,
                         ghost_key=lambda slot: hash(self.names[slot]))

    def bound(self, policy: EvictionPolicy) -> EvictionPolicy:
        policy.bind(self.view())
        return policy

    def copy(self, name: str, length: int = PAGE) -> int:
        slot = len(self.names)
        self.names.append(name)
        self.columns.length[slot] = length
        return slot


_levels: list[Level] = []


def copy_of(name: str, length: int = PAGE) -> int:
    return _levels[-1].copy(name, length)


def bound(policy: EvictionPolicy) -> EvictionPolicy:
    """``policy`` over a fresh level; :func:`copy_of` then makes copies in that level."""
    _levels.append(Level())
    return _levels[-1].bound(policy)


def name(slot: int) -> bytes:
    return _levels[-1].names[slot].encode()


def test_lru_victims_are_coldest_first_and_touch_refreshes():
    lru = bound(LRUPolicy())
    a, b, c = copy_of("a"), copy_of("b"), copy_of("c")
    for x in (a, b, c):
        lru.insert(x)
    lru.touch(a)
    assert lru.victims(PAGE) == [b]
    assert lru.victims(2 * PAGE) == [b, c]
    assert [name(x) for x in lru.coldest_first()] == [b"b", b"c", b"a"]


def test_lru_victims_decide_without_side_effects():
    lru = bound(LRUPolicy())
    copies = [copy_of(str(i)) for i in range(4)]
    for x in copies:
        lru.insert(x)
    lru.victims(3 * PAGE)
    assert len(lru) == 4 and lru.coldest_first() == copies


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_held_copies_are_never_victims_and_shortfall_returns_nothing(kind):
    policy = bound(make_policy(kind, 100 * PAGE))
    a, b, c = copy_of("a"), copy_of("b"), copy_of("c")
    for x in (a, b, c):
        policy.insert(x)
    _levels[-1].holds |= {a, c}   # a reader, and a move copying it elsewhere
    assert policy.victims(PAGE) == [b]
    assert policy.victims(2 * PAGE) == []


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_remove_from_the_middle_is_idempotent(kind):
    policy = bound(make_policy(kind, 100 * PAGE))
    copies = [copy_of(str(i)) for i in range(5)]
    for x in copies:
        policy.insert(x)
    policy.remove(copies[2])
    policy.remove(copies[2])
    assert len(policy) == 4
    assert copies[2] not in policy.victims(4 * PAGE)


def churn(policy: EvictionPolicy, capacity: int, hot: list[int], scan: int) -> set[bytes]:
    """Fill a tier of ``capacity`` pages: hot copies read over and over, interleaved with a scan of
    one-off copies; evict as a tier would. Returns the keys still resident."""
    resident: dict[bytes, int] = {}

    def admit(copy: int) -> None:
        if len(resident) >= capacity:
            for victim in policy.victims(PAGE):
                policy.remove(victim, evicted=True)
                del resident[name(victim)]
        policy.insert(copy)
        resident[name(copy)] = copy

    for copy in hot:
        admit(copy)
    for i in range(scan):
        for copy in hot:
            if name(copy) in resident:
                policy.touch(copy)
        admit(copy_of(f"scan-{i}"))
    return set(resident)


def test_s3fifo_keeps_a_hot_prefix_through_a_long_scan_where_lru_loses_it():
    capacity, hot_n, scan = 64, 16, 1000
    hot_keys = {f"hot-{i}".encode() for i in range(hot_n)}
    lru = bound(LRUPolicy())
    lru_left = churn(lru, capacity, [copy_of(k.decode()) for k in hot_keys], scan)
    s3 = bound(S3FIFOPolicy(capacity * PAGE))
    s3_left = churn(s3, capacity, [copy_of(k.decode()) for k in hot_keys], scan)
    assert hot_keys <= s3_left
    # LRU keeps the hot blocks too while they are touched between scan steps...
    assert hot_keys <= lru_left
    # ...but a scan burst longer than the tier, with no reads in between, flushes them from LRU only.
    for make in (LRUPolicy, lambda: S3FIFOPolicy(capacity * PAGE)):
        policy = bound(make())
        hot = [copy_of(k.decode()) for k in sorted(hot_keys)]
        churn(policy, capacity, hot, 5)                     # hot copies warm up (read 5 times)
        left_after = _burst(policy, capacity, 3 * capacity)  # then a one-off scan of 3x the tier
        if isinstance(policy, LRUPolicy):
            assert not hot_keys & left_after
        else:
            assert hot_keys <= left_after


def _burst(policy: EvictionPolicy, capacity: int, n: int) -> set[bytes]:
    """Insert ``n`` one-off copies with no reads in between; returns the keys still resident."""
    copies = {name(c): c for c in _all_copies(policy)}
    for i in range(n):
        if len(copies) >= capacity:
            for victim in policy.victims(PAGE):
                policy.remove(victim, evicted=True)
                copies.pop(name(victim))
        copy = copy_of(f"burst-{i}")
        policy.insert(copy)
        copies[name(copy)] = copy
    return set(copies)


def _all_copies(policy: EvictionPolicy) -> list[int]:
    if isinstance(policy, LRUPolicy):
        return policy.coldest_first()
    return list(policy._small.oldest_first()) + list(policy._main.oldest_first())


def test_s3fifo_remembers_evicted_one_offs_and_readmits_them_to_main():
    policy = bound(S3FIFOPolicy(10 * PAGE))
    first = copy_of("again")
    policy.insert(first)
    for i in range(12):
        policy.insert(copy_of(f"x{i}"))
    (victim,) = policy.victims(PAGE)
    assert victim is first  # never read: out of the small queue first
    policy.remove(victim, evicted=True)
    returning = copy_of("again")
    policy.insert(returning)
    assert _levels[-1].columns.queue[returning] == 2  # main queue: it was seen before
