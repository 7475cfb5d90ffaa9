"""The key index against a dict: the same answers for adds, finds and removes, one key or many."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvstore.keytable import MAX_ROW_BYTES, KeyTable, _hash_one, _hash_rows, _rows_of


SEED = 0x1234_5678_9ABC_DEF0


def test_the_scalar_and_vectorised_hashes_agree_for_every_length():
    keys = [bytes(random.getrandbits(8) for _ in range(n)) for n in range(1, MAX_ROW_BYTES + 1)]
    rows, lengths = _rows_of(keys, b"", MAX_ROW_BYTES // 8)   # mixed lengths in one batch
    assert _hash_rows(rows, lengths, SEED).tolist() == [_hash_one(k, SEED) for k in keys]
    for key in keys:
        rows, lengths = _rows_of([key], b"", MAX_ROW_BYTES // 8)
        assert int(_hash_rows(rows, lengths, SEED)[0]) == _hash_one(key, SEED)
    # a key and the same key with a zero byte appended differ
    assert _hash_one(b"ab", SEED) != _hash_one(b"ab\0", SEED)


def test_structured_and_crafted_keys_do_not_collide():
    tag = b"T" * 8
    # the pairs a linear hash (sum of word * constant) maps together
    assert _hash_one(tag + b"\0" * 8, SEED) != _hash_one(tag + b"\x03", SEED)
    crafted = {_hash_one(tag + (9 * t).to_bytes(8, "little") + (-7 * t % (1 << 64)).to_bytes(8, "little"), SEED)
               for t in range(2000)}
    assert len(crafted) == 2000
    # (sequence, block) counters, as an engine might number its blocks
    structured = {_hash_one(tag + seq.to_bytes(8, "little") + blk.to_bytes(8, "little"), SEED)
                  for seq in range(300) for blk in range(100)}
    assert len(structured) == 30000
    # the seed is the table's own: the same key hashes differently in another table
    assert _hash_one(b"key", SEED) != _hash_one(b"key", SEED + 1)


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError):
        KeyTable().add(b"")


def test_matches_a_dict_through_random_adds_and_removes():
    rng = random.Random(7)
    table, model = KeyTable(), {}
    pool = [rng.randbytes(rng.choice([8, 16, 40, 40, 40, 72, 100])) for _ in range(6000)]
    for step in range(20000):
        key = rng.choice(pool)
        if key in model and rng.random() < 0.5:
            table.remove(model.pop(key))
        elif key not in model:
            model[key] = table.add(key)
        if step % 2000 == 0:
            probe = rng.sample(pool, 500)
            want = [model.get(k, -1) for k in probe]
            assert table.find_many(probe).tolist() == want
            assert [table.find(k) for k in probe] == want
    assert len(table) == len(model)
    for key, slot in model.items():
        assert table.key(slot) == key and table.find(key) == slot
    assert len(set(model.values())) == len(model)   # no slot handed out twice


def test_find_many_with_a_prefix_is_find_of_the_concatenation():
    table = KeyTable()
    tag = b"T" * 8
    keys = [random.randbytes(32) for _ in range(3000)]
    slots = [table.add(tag + k) for k in keys]
    others = [random.randbytes(32) for _ in range(100)]
    assert table.find_many(keys + others, prefix=tag).tolist() == slots + [-1] * 100
    assert (table.find_many(keys, prefix=b"U" * 8) == -1).all()
    mixed = [keys[0], keys[1][:20], keys[2] + b"x"]
    assert table.find_many(mixed, prefix=tag).tolist() == [slots[0], -1, -1]


def test_bulk_add_then_grow_keeps_every_key():
    table = KeyTable()
    keys = [random.randbytes(40) for _ in range(50000)]
    slots = table.add_many(keys)
    assert len(set(slots.tolist())) == len(keys)
    more = [table.add(random.randbytes(40)) for _ in range(10000)]
    assert np.array_equal(table.find_many(keys), slots)
    assert len(table) == 60000 and len(set(more)) == 10000
    for slot in slots[:5000].tolist():
        table.remove(slot)
    assert (table.find_many(keys[:5000]) == -1).all()
    assert np.array_equal(table.find_many(keys[5000:]), slots[5000:])


def test_slot_space_growth_is_reported():
    seen = []
    table = KeyTable(on_grow=seen.append)
    for _ in range(5000):
        table.add(random.randbytes(16))
    assert seen[-1] == table.capacity >= 5000 and seen == sorted(seen)


def test_packed_finds_agree_with_single_finds_for_any_key_width():
    table = KeyTable()
    tag = b"T" * 8
    by_width = {w: [random.randbytes(w) for _ in range(200)] for w in (3, 8, 13, 32, 64, 90)}
    slots = {w: [table.add(tag + k) for k in keys] for w, keys in by_width.items()}
    for w, keys in by_width.items():
        absent = [random.randbytes(w) for _ in range(50)]
        got = table.find_packed(b"".join(keys + absent), w, tag)
        assert got.tolist() == slots[w] + [-1] * 50
        assert table.find_packed(b"".join(keys), w, b"odd").tolist() == [-1] * len(keys)
    assert table.find_packed(b"", 8, tag).tolist() == []


def test_a_chain_stored_in_runs_of_slots_is_found_as_the_single_finds_find_it():
    # A prefix lookup follows runs of consecutive slots: the chain here is split over several put
    # batches with other keys between them, has keys removed (their slots reused by other keys)
    # and keys added again elsewhere, and more runs than a lookup follows before hashing the rest.
    rng = random.Random(3)
    table, tag = KeyTable(), b"T" * 8
    chain = [rng.randbytes(32) for _ in range(4000)]
    for start in range(0, len(chain), 200):
        for key in chain[start : start + 200]:
            table.add(tag + key)
        for _ in range(rng.randrange(3)):
            table.add(tag + rng.randbytes(32))
    for i in rng.sample(range(len(chain)), 300):
        table.remove(table.find(tag + chain[i]))
    for i in rng.sample(range(len(chain)), 100):
        if table.find(tag + chain[i]) < 0:
            table.add(tag + chain[i])
    for _ in range(150):
        table.add(tag + rng.randbytes(32))   # into the freed slots, beside the chain's runs
    want = [table.find(tag + key) for key in chain]
    assert 0 < want.count(-1) < 300
    assert table.find_packed(b"".join(chain), 32, tag).tolist() == want
    assert table.find_many(chain[::-1], tag).tolist() == want[::-1]
    assert table.find_packed(b"".join(chain), 32, b"U" * 8).tolist() == [-1] * len(chain)


def test_a_primed_batch_takes_freed_slots_in_ascending_order():
    table = KeyTable()
    slots = [table.add(random.randbytes(32)) for _ in range(100)]
    for slot in slots[10:60]:   # freed oldest first, as an LRU evicts a batch
        table.remove(slot)
    batch = [random.randbytes(32) for _ in range(30)]
    table.prime(batch)
    got = [table.add(key) for key in batch]
    assert got == sorted(got) and set(got) <= set(slots[10:60])
    assert table.find_packed(b"".join(batch), 32).tolist() == got


def test_primed_hashes_are_the_hashes():
    table = KeyTable()
    keys = [random.randbytes(n) for n in (8, 13, 40, 40, 72)]
    table.prime(keys)
    assert [table._hash(k) for k in keys] == [_hash_one(k, table._seed) for k in keys]
    slots = [table.add(k) for k in keys]
    table.prime([])
    assert [table.find(k) for k in keys] == slots
