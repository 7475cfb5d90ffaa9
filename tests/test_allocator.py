"""The extent allocator: alignment, best fit, coalescing, and a randomized model check."""

from __future__ import annotations

import random

import pytest

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.errors import ConfigError


def test_extents_are_aligned_and_rounded_up():
    a = ExtentAllocator(1 << 20, 4096)
    e1 = a.allocate(1)
    e2 = a.allocate(4097)
    assert (e1.offset, e1.length) == (0, 4096)
    assert (e2.offset % 4096, e2.length) == (0, 8192)
    assert a.used_bytes == 3 * 4096


def test_full_arena_returns_none_and_free_makes_room():
    a = ExtentAllocator(4 * 4096, 4096)
    extents = [a.allocate(4096) for _ in range(4)]
    assert a.allocate(1) is None
    a.free(extents[2])
    assert a.allocate(4096) == extents[2]


def test_neighbours_coalesce_into_one_extent():
    a = ExtentAllocator(8 * 4096, 4096)
    extents = [a.allocate(4096) for _ in range(8)]
    for e in extents[2:6]:
        a.free(e)
    assert a.largest_free == 4 * 4096
    for e in (extents[0], extents[1], extents[6], extents[7]):
        a.free(e)
    assert a.largest_free == a.capacity_bytes and a.used_bytes == 0


def test_best_fit_keeps_large_holes_whole():
    a = ExtentAllocator(16 * 4096, 4096)
    small = a.allocate(4096)
    sep1 = a.allocate(4096)
    big = a.allocate(8 * 4096)
    a.allocate(4096)
    a.free(small)  # a one-page hole
    a.free(big)    # an eight-page hole
    assert a.allocate(4096).offset == small.offset
    assert a.allocate(8 * 4096).offset == big.offset
    assert sep1 is not None


def test_double_free_and_foreign_extents_are_refused():
    a = ExtentAllocator(4 * 4096, 4096)
    e = a.allocate(4096)
    a.free(e)
    with pytest.raises(ValueError):
        a.free(e)
    with pytest.raises(ValueError):
        a.free(Extent(100, 4096))


def test_bad_geometry_is_a_config_error():
    with pytest.raises(ConfigError):
        ExtentAllocator(1 << 20, 3000)
    with pytest.raises(ConfigError):
        ExtentAllocator(100, 4096)


def test_random_workload_never_overlaps_and_accounts_exactly():
    rng = random.Random(7)
    a = ExtentAllocator(256 * 4096, 4096)
    live: list[Extent] = []
    for _ in range(5000):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            e = a.allocate(rng.randrange(1, 9 * 4096))
            if e is not None:
                live.append(e)
        spans = sorted((e.offset, e.offset + e.length) for e in live)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
        assert a.used_bytes == sum(e.length for e in live)
    for e in live:
        a.free(e)
    assert a.largest_free == a.capacity_bytes


def test_a_double_free_after_coalescing_is_still_refused():
    a = ExtentAllocator(8 * 4096, 4096)
    first, second = a.allocate(4096), a.allocate(4096)
    a.free(second)
    a.free(first)  # merges with the hole `second` left
    with pytest.raises(ValueError):
        a.free(second)
    with pytest.raises(ValueError):
        a.free(Extent(8192, 4096))  # inside a free run, never allocated
    assert a.used_bytes == 0 and a.largest_free == a.capacity_bytes


def test_largest_free_after_is_a_dry_run():
    a = ExtentAllocator(4 * 4096, 4096)
    e = [a.allocate(4096) for _ in range(4)]
    a.free(e[0])
    assert a.largest_free_after([e[2]]) == 4096           # holes at 0 and 2 are not adjacent
    assert a.largest_free_after([e[1]]) == 2 * 4096       # 0 and 1 merge
    assert a.largest_free_after([e[1], e[2], e[3]]) == 4 * 4096
    assert a.used_bytes == 3 * 4096 and a.largest_free == 4096  # nothing changed


def test_rebuild_restores_exactly_the_given_extents():
    a = ExtentAllocator(16 * 4096, 4096)
    a.allocate(4096)
    kept = [Extent(4096, 8192), Extent(8 * 4096, 4096)]
    a.rebuild(kept)
    assert a.used_bytes == 3 * 4096
    for e in kept:
        a.free(e)
    assert a.largest_free == a.capacity_bytes
    with pytest.raises(ValueError):
        a.free(Extent(0, 4096))  # not among the rebuilt extents


def test_a_part_of_an_extent_or_a_span_of_two_is_refused_and_nothing_is_handed_out_twice():
    a = ExtentAllocator(16 * 4096, 4096)
    big, nxt = a.allocate(4 * 4096), a.allocate(4096)
    with pytest.raises(ValueError):
        a.free(Extent(big.offset, 4096))                    # its first page only
    with pytest.raises(ValueError):
        a.free(Extent(big.offset + 4096, 4096))             # a page inside it
    with pytest.raises(ValueError):
        a.free(Extent(big.offset, big.length + nxt.length))  # it and its neighbour
    assert a.used_bytes == 5 * 4096
    a.free(big)
    a.free(nxt)
    assert a.used_bytes == 0 and a.largest_free == a.capacity_bytes


def test_a_batch_lies_back_to_back_in_one_run_and_its_extents_free_one_by_one():
    a = ExtentAllocator(64 * 4096, 4096)
    hole = a.allocate(4096)
    a.allocate(4096)
    a.free(hole)                      # a one-page hole first, then 62 free pages
    batch = a.allocate_many([4096, 5000, 1, 8192])
    assert [e.length for e in batch] == [4096, 8192, 4096, 8192]
    assert all(x.offset + x.length == y.offset for x, y in zip(batch, batch[1:]))   # together, past the hole
    assert a.used_bytes == 4096 + 24 * 1024
    for e in (batch[2], batch[0], batch[3], batch[1]):
        a.free(e)
    with pytest.raises(ValueError):
        a.free(batch[0])
    assert a.used_bytes == 4096


def test_a_batch_no_run_can_hold_is_placed_block_by_block_as_far_as_it_fits():
    a = ExtentAllocator(8 * 4096, 4096)
    kept = [a.allocate(4096) for _ in range(8)]
    for e in kept[::2]:
        a.free(e)                     # four separate one-page holes
    got = a.allocate_many([4096] * 6)
    assert len(got) == 4 and sorted(e.offset for e in got) == [e.offset for e in kept[::2]]
    assert a.free_bytes == 0


def test_batches_and_frees_in_any_order_keep_the_books_right():
    rng = random.Random(7)
    a = ExtentAllocator(512 * 4096, 4096)
    live: list[Extent] = []
    for _ in range(2000):
        if rng.random() < 0.5 or not live:
            live += a.allocate_many([rng.randint(1, 6 * 4096) for _ in range(rng.randint(1, 20))])
        else:
            rng.shuffle(live)
            for e in live[: rng.randint(1, len(live))]:
                a.free(e)
                live.remove(e)
        spans = sorted((e.offset, e.offset + e.length) for e in live)
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))
        assert a.used_bytes == sum(e.length for e in live)
    for e in live:
        a.free(e)
    assert a.used_bytes == 0 and a.largest_free == a.capacity_bytes
