"""Eviction policies over tier copies: LRU and the scan-resistant S3-FIFO."""

from __future__ import annotations

import pytest

from kvstore.allocator import Extent
from kvstore.block import BlockRecord, BlockState, Copy, CopyState
from kvstore.lru import LRUPolicy
from kvstore.policies import make_policy
from kvstore.policy import EvictionPolicy, PolicyKind
from kvstore.s3fifo import S3FIFOPolicy

PAGE = 4096


def copy_of(name: str, length: int = PAGE) -> Copy:
    record = BlockRecord(key=name.encode(), size=length)
    record.advance(BlockState.READY)
    copy = Copy(record=record, level=0, location=Extent(0, length), state=CopyState.READY)
    record.copies[0] = copy
    return copy


def test_lru_victims_are_coldest_first_and_touch_refreshes():
    lru = LRUPolicy()
    a, b, c = copy_of("a"), copy_of("b"), copy_of("c")
    for x in (a, b, c):
        lru.insert(x)
    lru.touch(a)
    assert lru.victims(PAGE) == [b]
    assert lru.victims(2 * PAGE) == [b, c]
    assert [x.record.key for x in lru.coldest_first()] == [b"b", b"c", b"a"]


def test_lru_victims_decide_without_side_effects():
    lru = LRUPolicy()
    copies = [copy_of(str(i)) for i in range(4)]
    for x in copies:
        lru.insert(x)
    lru.victims(3 * PAGE)
    assert len(lru) == 4 and lru.coldest_first() == copies


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_held_copies_are_never_victims_and_shortfall_returns_nothing(kind):
    policy = make_policy(kind, 100 * PAGE)
    a, b, c = copy_of("a"), copy_of("b"), copy_of("c")
    for x in (a, b, c):
        policy.insert(x)
    a.holds = 1   # a reader
    c.holds = 1   # a move copying it elsewhere
    assert policy.victims(PAGE) == [b]
    assert policy.victims(2 * PAGE) == []


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_remove_from_the_middle_is_idempotent(kind):
    policy = make_policy(kind, 100 * PAGE)
    copies = [copy_of(str(i)) for i in range(5)]
    for x in copies:
        policy.insert(x)
    policy.remove(copies[2])
    policy.remove(copies[2])
    assert len(policy) == 4
    assert copies[2] not in policy.victims(4 * PAGE)


def churn(policy: EvictionPolicy, capacity: int, hot: list[Copy], scan: int) -> set[bytes]:
    """Fill a tier of ``capacity`` pages: hot copies read over and over, interleaved with a scan of
    one-off copies; evict as a tier would. Returns the keys still resident."""
    resident: dict[bytes, Copy] = {}

    def admit(copy: Copy) -> None:
        if len(resident) >= capacity:
            for victim in policy.victims(PAGE):
                policy.remove(victim, evicted=True)
                del resident[victim.record.key]
        policy.insert(copy)
        resident[copy.record.key] = copy

    for copy in hot:
        admit(copy)
    for i in range(scan):
        for copy in hot:
            if copy.record.key in resident:
                policy.touch(copy)
        admit(copy_of(f"scan-{i}"))
    return set(resident)


def test_s3fifo_keeps_a_hot_prefix_through_a_long_scan_where_lru_loses_it():
    capacity, hot_n, scan = 64, 16, 1000
    hot_keys = {f"hot-{i}".encode() for i in range(hot_n)}
    lru_left = churn(LRUPolicy(), capacity, [copy_of(k.decode()) for k in hot_keys], scan)
    s3_left = churn(S3FIFOPolicy(capacity * PAGE), capacity, [copy_of(k.decode()) for k in hot_keys], scan)
    assert hot_keys <= s3_left
    # LRU keeps the hot blocks too while they are touched between scan steps...
    assert hot_keys <= lru_left
    # ...but a scan burst longer than the tier, with no reads in between, flushes them from LRU only.
    lru, s3 = LRUPolicy(), S3FIFOPolicy(capacity * PAGE)
    for policy in (lru, s3):
        hot = [copy_of(k.decode()) for k in sorted(hot_keys)]
        churn(policy, capacity, hot, 5)                     # hot copies warm up (read 5 times)
        left_after = _burst(policy, capacity, 3 * capacity)  # then a one-off scan of 3x the tier
        if policy is lru:
            assert not hot_keys & left_after
        else:
            assert hot_keys <= left_after


def _burst(policy: EvictionPolicy, capacity: int, n: int) -> set[bytes]:
    """Insert ``n`` one-off copies with no reads in between; returns the keys still resident."""
    copies = {c.record.key: c for c in _all_copies(policy)}
    for i in range(n):
        if len(copies) >= capacity:
            for victim in policy.victims(PAGE):
                policy.remove(victim, evicted=True)
                copies.pop(victim.record.key)
        copy = copy_of(f"burst-{i}")
        policy.insert(copy)
        copies[copy.record.key] = copy
    return set(copies)


def _all_copies(policy: EvictionPolicy) -> list[Copy]:
    if isinstance(policy, LRUPolicy):
        return policy.coldest_first()
    return list(policy._small.oldest_first()) + list(policy._main.oldest_first())


def test_s3fifo_remembers_evicted_one_offs_and_readmits_them_to_main():
    policy = S3FIFOPolicy(10 * PAGE)
    first = copy_of("again")
    policy.insert(first)
    for i in range(12):
        policy.insert(copy_of(f"x{i}"))
    (victim,) = policy.victims(PAGE)
    assert victim is first  # never read: out of the small queue first
    policy.remove(victim, evicted=True)
    returning = copy_of("again")
    policy.insert(returning)
    assert returning.queue == 2  # main queue: it was seen before
