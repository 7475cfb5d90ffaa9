"""The columnar catalog: bulk recovery, views that outlive what they show, slots reused safely."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from kvstore.allocator import Extent
from kvstore.block import BlockState, CopyState, StoredBlock, StoredBlocks
from kvstore.keytable import KeyTable
from kvstore.policies import make_policy
from kvstore.policy import LevelView, PolicyKind
from test_placement import DISK, MEMORY, PAGE, Books, layout


def stored(n: int, *, namespaces=(b"", b"ns-a", b"ns-b")) -> StoredBlocks:
    rng = random.Random(3)
    last_use = np.array([rng.random() * 1000 for _ in range(n)])
    return StoredBlocks(
        [os.urandom(40) for _ in range(n)],
        offsets=np.arange(n, dtype=np.int64) * 2 * PAGE, lengths=np.full(n, PAGE, dtype=np.int64),
        sizes=np.array([rng.randrange(1, PAGE) for _ in range(n)], dtype=np.int64),
        checksums=np.array([rng.getrandbits(64) for _ in range(n)], dtype=np.uint64), last_use=last_use,
        namespaces=list(namespaces), namespace_ids=np.array([i % len(namespaces) for i in range(n)], dtype=np.int64),
    )


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_bulk_recovery_indexes_every_block_as_the_one_by_one_path_does(kind):
    blocks = stored(3000)
    books = Books(layout(MEMORY, DISK))
    catalog = books.catalog
    policy = make_policy(kind, 1 << 30)   # the policy under test, bound to the level's columns
    c = catalog.columns[1]
    policy.bind(LevelView(prev=c.prev, next=c.next, freq=c.freq, queue=c.queue, length=c.length,
                          evictable=catalog._evictable_at(1), ghost_key=catalog._ghost_key))
    catalog.policies[1] = policy
    catalog.recover(1, blocks)
    assert len(catalog) == 3000 and catalog.blocks_at(1) == 3000
    for block in list(blocks)[::97]:
        record = catalog.get(block.key)
        assert (record.size, record.checksum, record.namespace, record.state) == (
            block.size, block.checksum, block.namespace, BlockState.READY)
        assert record.primary().level == 1 and record.primary().location == block.location
    # coldest first: the one used longest ago is the first victim
    order = np.argsort(blocks.last_use)
    victims = catalog.victims(1, 3 * PAGE)
    assert [v.record.key for v in victims] == [blocks.keys[i] for i in order[:3]]


def test_a_second_persistent_level_recovers_block_by_block_and_refuses_duplicates():
    books = Books(layout(MEMORY, DISK, DISK))
    first = stored(10)
    books.catalog.recover(1, first)
    more = [StoredBlock(os.urandom(40), 10, 7, b"x", Extent(0, PAGE), 1.0)]
    books.catalog.recover(2, more)
    assert books.catalog.get(more[0].key).primary().level == 2
    with pytest.raises(RuntimeError, match="already indexed"):
        books.catalog.recover(2, [StoredBlock(first.keys[0], 10, 7, b"", Extent(PAGE, PAGE), 1.0)])


def test_a_retired_record_reads_as_gone_with_its_identity_while_its_slot_is_reused():
    books = Books(layout(MEMORY))
    catalog = books.catalog
    copy = books.put(b"first-key")
    record = copy.record
    catalog.hold(copy)                              # a reader
    assert catalog.drop(list(record.copies.values())) == []
    assert record.state is BlockState.GONE and record.key == b"first-key" and record.copies == {}
    assert copy.state is CopyState.DROPPED and books.released == []   # still read: not given back
    other = books.put(b"second-key")               # takes the freed slot
    assert other.slot == copy.slot
    assert record.key == b"first-key" and other.record.key == b"second-key"
    catalog.unhold(copy)
    assert copy.state is CopyState.FREED and len(books.released) == 1
    assert other.state is CopyState.READY and other.holds == 0


def test_one_view_per_block_while_anyone_keeps_it():
    books = Books(layout(MEMORY))
    copy = books.put(b"k")
    assert books.catalog.get(b"k") is copy.record
    assert copy.record.copies[0] is copy
    assert books.catalog.prefix([b"k"])[0] is copy.record


def test_a_crowded_rebuild_wraps_around_the_bucket_array_and_loses_nothing():
    table = KeyTable()
    keys = [os.urandom(24) for _ in range(4000)]
    slots = table.add_many(keys)
    table._rehash(len(table) + 1)     # nearly full: clusters run off the end and wrap
    assert np.array_equal(table.find_many(keys), slots)
    assert [table.find(k) for k in keys[:200]] == slots[:200].tolist()


def test_a_bulk_recovery_that_names_a_block_twice_is_refused():
    blocks = stored(100)
    blocks.keys[7] = blocks.keys[3]
    with pytest.raises(RuntimeError, match="twice"):
        Books(layout(MEMORY, DISK)).catalog.recover(1, blocks)


def test_letting_go_more_often_than_held_is_a_transition_error():
    from kvstore.block import TransitionError

    books = Books(layout(MEMORY))
    copy = books.put(b"k")
    books.catalog.hold(copy)
    books.catalog.unhold(copy)
    with pytest.raises(TransitionError):
        books.catalog.unhold(copy)


def test_bytes_by_namespace_follow_every_copy_in_and_out():
    """What a tenant's quota is measured with: recovered, begun, attached, dropped and deleted
    copies all counted, per level, per namespace."""
    books = Books(layout(MEMORY, DISK))
    catalog = books.catalog
    blocks = stored(300)
    catalog.recover(1, blocks)

    def expected(level: int, namespace: bytes) -> int:
        return sum(r.size for r in catalog if r.namespace == namespace and level in r.copies)

    for ns in (b"", b"ns-a", b"ns-b"):
        assert catalog.namespace_bytes(1, [ns]) == expected(1, ns) > 0
    keys = [os.urandom(40) for _ in range(20)]
    copies = catalog.begin_many(keys, [100] * 20, b"ns-a", 0, [Extent(i * PAGE, PAGE) for i in range(20)])
    assert catalog.namespace_bytes(0, [b"ns-a"]) == 2000           # filling copies count: room is taken
    catalog.commit_many(copies, [None] * 20)
    for record in list(catalog)[:50]:
        catalog.delete(record)
    victims = catalog.victims_of(1, [b"ns-b"], 3 * PAGE)
    assert victims and all(v.record.namespace == b"ns-b" for v in victims)
    catalog.drop(victims, evicted=True)
    for level in (0, 1):
        for ns in (b"", b"ns-a", b"ns-b"):
            assert catalog.namespace_bytes(level, [ns]) == expected(level, ns)
    assert catalog.namespace_bytes(1, [b"ns-a", b"ns-b"]) == expected(1, b"ns-a") + expected(1, b"ns-b")


def test_copies_attached_filled_in_a_batch_are_what_attach_then_fill_makes():
    """The mover adopts a batch written to a level with attach_filled: the same readable,
    evictable, counted copies as attach + fill one by one."""
    one, batch = Books(layout(MEMORY, DISK)), Books(layout(MEMORY, DISK))
    keys = [os.urandom(40) for _ in range(50)]
    for books in (one, batch):
        for i, key in enumerate(keys):
            books.catalog.known(key, 100 + i, i, b"ns" if i % 2 else b"")
    extents = [Extent(i * PAGE, PAGE) for i in range(50)]
    for key, extent in zip(keys, extents):
        record = one.catalog.get(key)
        one.catalog.fill(one.catalog.attach(record, 1, extent))
    batch.catalog.attach_filled([batch.catalog.get(k) for k in keys], 1, extents)
    for books in (one, batch):
        catalog = books.catalog
        assert catalog.blocks_at(1) == 50
        assert [catalog.get(k).readable_at(1).location for k in keys] == extents
        assert catalog.namespace_bytes(1, [b"ns"]) == one.catalog.namespace_bytes(1, [b"ns"]) > 0
        assert catalog.namespace_bytes(1, [b""]) == one.catalog.namespace_bytes(1, [b""]) > 0
    assert [v.record.key for v in batch.catalog.victims(1, 5 * PAGE)] == [
        v.record.key for v in one.catalog.victims(1, 5 * PAGE)]
    with pytest.raises(RuntimeError):   # a second copy at the level is refused
        batch.catalog.attach_filled([batch.catalog.get(keys[0])], 1, [Extent(60 * PAGE, PAGE)])


def test_evicting_slots_in_one_pass_leaves_what_dropping_their_views_leaves():
    """make_room_many evicts DRAM victims with evict_slots: the same records gone, copies left
    below, counts, released locations and policy order as drop(victims, evicted=True)."""
    views, slots = Books(layout(MEMORY, DISK)), Books(layout(MEMORY, DISK))
    keys = [os.urandom(40) for _ in range(40)]
    held = {}
    for books in (views, slots):
        for i, key in enumerate(keys):
            copy = books.put(key)
            if i % 3 == 0:   # a copy below too: it stays, the record with it
                books.copy_at(copy.record, 1)
        held[id(books)] = books.catalog.get(keys[4]).readable_at(0)   # a view someone keeps
    victims = views.catalog.victims(0, 20 * PAGE)
    views.catalog.drop(victims, evicted=True)
    chosen = slots.catalog.victim_slots(0, 20 * PAGE)
    assert chosen == [v.slot for v in victims]
    assert slots.catalog.evict_slots(0, chosen) == []   # all given back: nothing to forget first
    for books in (views, slots):
        catalog = books.catalog
        assert [catalog.get(k) is not None for k in keys] == [i % 3 == 0 or i >= 20 for i in range(40)]
        assert [catalog.get(k).has_copy(0) for k in keys if catalog.get(k) is not None] == [
            i >= 20 for i in range(40) if i % 3 == 0 or i >= 20]
        assert catalog.blocks_at(0) == 20 and catalog.blocks_at(1) == 14 and len(catalog) == 27
        assert catalog.namespace_bytes(0, [b""]) == 20 * PAGE
        tier = books.counters.tier("mem")
        assert (tier.evictions, tier.evicted_bytes) == (13, 13 * PAGE)   # 7 of the 20 live on below
        assert held[id(books)].state is CopyState.FREED and held[id(books)].record.key == keys[4]
        assert held[id(books)].record.state is BlockState.GONE
    def by_offset(released):
        return sorted((level, e.offset, e.length) for level, e in released)

    assert by_offset(views.released) == by_offset(slots.released) and len(slots.released) == 20
    assert slots.catalog.victim_slots(0, 5 * PAGE) == views.catalog.victim_slots(0, 5 * PAGE)


def test_evicting_slots_refuses_a_held_copy_and_changes_nothing():
    books = Books(layout(MEMORY, DISK))
    keys = [os.urandom(40) for _ in range(8)]
    for key in keys:
        books.copy_at(books.put(key).record, 1)
    catalog = books.catalog
    chosen = catalog.victim_slots(0, 4 * PAGE)
    catalog.hold(catalog.get(keys[1]).readable_at(0))
    assert catalog.evict_slots(0, chosen) is None
    assert catalog.blocks_at(0) == 8 and catalog.blocks_at(1) == 8 and books.released == []


def test_evicting_slots_where_entries_are_forgotten_first_gives_their_extents_back_only_when_told():
    books = Books(layout(MEMORY, DISK))
    keys = [os.urandom(40) for _ in range(8)]
    for key in keys:
        books.put(key, level=1)
    catalog = books.catalog
    locations = [catalog.get(k).readable_at(1).location for k in keys[:3]]
    kept = catalog.get(keys[0]).readable_at(1)   # a view someone keeps
    forget = catalog.evict_slots(1, catalog.victim_slots(1, 3 * PAGE))
    assert kept.state is CopyState.FREED
    catalog.hold(kept)
    catalog.unhold(kept)   # gives nothing back through the view: the entry is not forgotten yet
    assert forget == list(zip(keys[:3], locations))   # index keys and extents, for the tier to forget
    assert [catalog.get(k) is None for k in keys] == [True] * 3 + [False] * 5
    assert books.released == [] and books.counters.tier(catalog.layout.levels[1].name).evictions == 3
    catalog.release_forgotten(1, [extent for _, extent in forget])
    assert books.released == [(1, e) for e in locations]
