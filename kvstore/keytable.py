"""The key index: block key -> slot, for millions of keys at a few dozen bytes each.

A Python ``dict`` of ``bytes`` costs about 150 bytes per key (the key object, the table entry,
the value) and touches three cache lines per probe; at a million blocks that is most of the
daemon's memory and most of a lookup's time. This table keeps keys as fixed-width rows of one
numpy array instead, hashes them with a seeded mix of their 64-bit words, and resolves them by
linear probing in a power-of-two bucket array that is at most a quarter full. A batch of keys (a
prefix lookup of 8,192 blocks) is hashed, probed and compared with a handful of vectorised
operations, whose cost does not grow with the number of keys indexed.

Slots are small integers handed out by the table (freed slots are reused); the catalog keeps each
block's other fields in columns indexed by slot. Keys longer than :data:`MAX_ROW_BYTES` (opaque
keys some engines send) live in an ordinary dict beside the rows.

Not thread-safe: used from the event-loop thread only, like the catalog that owns it.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Sequence

import numpy as np

MAX_ROW_BYTES = 72
"""Longest key (namespace tag included) kept in the rows; longer ones go to the overflow dict."""
_MASK = (1 << 64) - 1
_WORDS = MAX_ROW_BYTES // 8
_K0, _K1 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9
_FMIX1, _FMIX2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53
_OVERFLOW = 0xFF  # length code of a slot whose key is in the overflow dict
_MIN_CAPACITY = 1024
_MAX_LOAD = 4   # buckets per key at least: short probes (linear probing clusters past half full)
_ROUNDS = 8   # buckets a batch probe reads one round at a time before going key by key
_RUNS = 4   # runs of consecutive slots a batch lookup follows before hashing the keys left
_LOW = 0xFFFFFFFF
_LOW_NP = np.uint64(_LOW)
_32 = np.uint64(32)

_UNPACK = [struct.Struct(f"<{n}Q").unpack for n in range(_WORDS + 1)]

# The hash: a secret per-table seed, then per 8-byte word of the key (zero-padded) one round
# ``h ^= w; h *= K1; h ^= h >> 29`` (a bijection of h for each word, non-linear across words), then
# a murmur finaliser. Keys that differ in one word never collide; choosing keys that collide needs
# the seed. Only the words the key covers are mixed, so widening the rows changes no hash.


def _start(length: int, seed: int) -> int:
    return (seed ^ (length * _K0)) & _MASK


def _rounds(h: int, words: Sequence[int]) -> int:
    for w in words:
        h = ((h ^ w) * _K1) & _MASK
        h ^= h >> 29
    return h


def _finish(h: int) -> int:
    h ^= h >> 33
    h = (h * _FMIX1) & _MASK
    h ^= h >> 33
    h = (h * _FMIX2) & _MASK
    return h ^ (h >> 33)


def _hash_one(key: bytes, seed: int) -> int:
    """The hash of one key (equal to what :func:`_hash_rows` computes for its padded row)."""
    padded = key + b"\0" * (-len(key) % 8)
    n = len(padded) // 8
    words = _UNPACK[n](padded) if n <= _WORDS else struct.unpack(f"<{n}Q", padded)   # overflow keys
    return _finish(_rounds(_start(len(key), seed), words))


def _rounds_np(h: np.ndarray, column: np.ndarray) -> np.ndarray:
    h ^= column
    h *= np.uint64(_K1)
    h ^= h >> np.uint64(29)
    return h


def _mix_np(h: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """:func:`_rounds` then :func:`_finish` for every row: ``h`` (one start per row) mixed with
    each column of ``columns`` (n x words, uint64) in turn, in place."""
    with np.errstate(over="ignore"):
        for i in range(columns.shape[1]):   # column by column: no n x words temporary
            _rounds_np(h, columns[:, i])
        return _finish_np(h)


def _finish_np(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX2)
    h ^= h >> np.uint64(33)
    return h


def _hash_rows(rows: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """Hashes of ``rows`` (n x words, uint64, zero-padded) of keys ``lengths`` bytes long."""
    with np.errstate(over="ignore"):
        h = (np.uint64(seed) ^ (lengths.astype(np.uint64) * np.uint64(_K0))).astype(np.uint64)
        words = (lengths + 7) // 8
        if len(lengths) and int(words.min()) == int(words.max()):   # one length: the words it covers
            return _mix_np(h, rows[:, : int(words[0])])
        for i in range(rows.shape[1]):   # mixed lengths: each row only over its own words
            h = np.where(i < words, _rounds_np(h.copy(), rows[:, i]), h)
        return _finish_np(h)


def _rows_of(keys: Sequence[bytes], prefix: bytes, words: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``prefix + key`` of every key as zero-padded uint64 rows ``words`` wide, with their lengths;
    None when some key is too long for the rows (the caller takes the slow path)."""
    n, p = len(keys), len(prefix)
    if n == 0:
        return np.zeros((0, words), dtype=np.uint64), np.zeros(0, dtype=np.int64)
    sizes = list(map(len, keys))
    shortest, longest = min(sizes), max(sizes)
    if longest + p > words * 8:
        return None
    raw = np.zeros((n, words * 8), dtype=np.uint8)
    if p:
        raw[:, :p] = np.frombuffer(prefix, dtype=np.uint8)
    if shortest == longest:   # the usual batch: keys of one length, copied in one go
        raw[:, p : p + longest] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, longest)
        lengths = np.full(n, p + longest, dtype=np.int64)
    else:
        for i, key in enumerate(keys):
            raw[i, p : p + len(key)] = np.frombuffer(key, dtype=np.uint8)
        lengths = np.array(sizes, dtype=np.int64) + p
    return raw.view(np.uint64), lengths


def _repeated(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indexes of the entries whose value occurs more than once (``order`` sorts ``values``)."""
    ranked = values[order]
    same = np.flatnonzero(ranked[1:] == ranked[:-1])
    return np.unique(np.concatenate([order[same], order[same + 1]]))


def _rows_hold(held: np.ndarray, lengths: np.ndarray, asked: np.ndarray, head: Sequence[int], length: int) -> np.ndarray:
    """Whether each of the rows ``held`` (with their ``lengths``) is the key ``head + asked[j]`` of
    ``length`` bytes: the constant prefix words, then the asked words."""
    same = lengths == length
    for k, word in enumerate(head):
        same &= held[:, k] == np.uint64(word)
    for j in range(asked.shape[1]):
        same &= held[:, len(head) + j] == asked[:, j]
    return same


class KeyTable:
    """Keys to slots. ``on_grow(capacity)`` is called when the slot space grows, so columns
    indexed by slot can grow with it."""

    def __init__(self, on_grow: Callable[[int], None] | None = None, *, seed: int | None = None) -> None:
        self._on_grow = on_grow
        self._seed = secrets.randbits(64) if seed is None else seed & _MASK   # see the hash above
        self._words = 0
        self._capacity = 0
        self._rows = np.zeros((0, 0), dtype=np.uint64)
        self._lengths = np.zeros(0, dtype=np.uint8)
        self._hashes = np.zeros(0, dtype=np.uint64)
        # A bucket is 0 (empty) or the key's hash's low 32 bits (a fingerprint) over slot + 1.
        self._buckets = np.zeros(_MAX_LOAD * _MIN_CAPACITY, dtype=np.uint64)
        self._mask = len(self._buckets) - 1
        self._shift = 64 - (len(self._buckets).bit_length() - 1)   # a key's home: its hash's top bits
        self._overflow: dict[bytes, int] = {}
        self._overflow_keys: dict[int, bytes] = {}
        self._free: list[int] = []
        self._last_key, self._last_hash = b"", 0
        self._primed: dict[bytes, int] = {}
        self._next = 0
        self._count = 0
        self._grow_slots(_MIN_CAPACITY)

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return self._capacity

    def hash_of(self, slot: int) -> int:
        """The hash of ``slot``'s key: a stable number for it while it is in the table."""
        return int(self._hashes[slot])

    # -- one key -----------------------------------------------------------------------------------

    def find(self, key: bytes) -> int:
        """The slot of ``key``, or -1."""
        if len(key) > MAX_ROW_BYTES:
            return self._overflow.get(key, -1)
        if len(key) > self._words * 8:
            return -1
        h = self._hash(key)
        return self._probe(h, key + b"\0" * (self._words * 8 - len(key)), len(key), h >> self._shift)

    def _probe(self, h: int, row: bytes, length: int, i: int) -> int:
        """The slot of the key with hash ``h``, padded ``row`` and ``length``, probing from bucket
        ``i`` on; -1 at the first empty bucket."""
        return self._walk(h, row, length, i)[0]

    def _walk(self, h: int, row: bytes, length: int, i: int) -> tuple[int, int]:
        """:meth:`_probe`, and the bucket it stopped at: the key's, or the first empty one."""
        buckets, rows, lengths, mask = self._buckets, self._rows, self._lengths, self._mask
        fp = h & _LOW
        while True:
            b = int(buckets[i])
            if b == 0:
                return -1, i
            if b >> 32 == fp:
                slot = (b & _LOW) - 1
                if lengths[slot] == length and rows[slot].tobytes() == row:
                    return slot, i
            i = (i + 1) & mask

    def key(self, slot: int) -> bytes:
        """The key held in ``slot``."""
        n = int(self._lengths[slot])
        if n == _OVERFLOW:
            return self._overflow_keys[slot]
        return self._rows[slot].tobytes()[:n]

    def add(self, key: bytes) -> int:
        """A new slot for ``key``; KeyError if it is in the table already (found on the way to the
        empty bucket the key takes: linear probing without tombstones passes it)."""
        if not key:
            raise ValueError("an empty key")
        if len(key) > MAX_ROW_BYTES:
            if key in self._overflow:
                raise KeyError(key)
            slot = self._take_slot()
            self._hashes[slot] = self._hash(key)   # a stable number for the key (S3-FIFO's ghosts)
            self._overflow[key] = slot
            self._overflow_keys[slot] = key
            self._lengths[slot] = _OVERFLOW
            self._count += 1
            return slot
        self._widen(len(key))
        padded = key + b"\0" * (self._words * 8 - len(key))
        h = self._hash(key)
        found, i = self._walk(h, padded, len(key), h >> self._shift)
        if found >= 0:
            raise KeyError(key)
        slot = self._take_slot()   # may grow the rows and hashes, not the buckets
        self._rows[slot] = np.frombuffer(padded, dtype=np.uint64)
        self._lengths[slot] = len(key)
        self._hashes[slot] = h
        self._count += 1
        if self._count * _MAX_LOAD > len(self._buckets):
            self._rehash(2 * len(self._buckets))   # the new slot is placed by the rehash
        else:
            self._buckets[i] = ((h & _LOW) << 32) | (slot + 1)
        return slot

    def remove(self, slot: int) -> None:
        """Take ``slot``'s key out; the slot may be handed out again."""
        n = int(self._lengths[slot])
        if n == _OVERFLOW:
            del self._overflow[self._overflow_keys.pop(slot)]
        else:
            self._unplace(slot)
        self._lengths[slot] = 0
        self._free.append(slot)
        self._count -= 1

    # -- many keys ---------------------------------------------------------------------------------

    def find_many(self, keys: Sequence[bytes], prefix: bytes = b"") -> np.ndarray:
        """Slots of ``prefix + key`` for every key (-1 where absent), as one int64 array."""
        n = len(keys)
        if self._count == 0 or n == 0:
            return np.full(n, -1, dtype=np.int64)
        sizes = set(map(len, keys))
        if len(sizes) == 1:   # the usual batch: keys of one length
            return self.find_packed(b"".join(keys), sizes.pop(), prefix)
        return np.array([self.find(prefix + key) for key in keys], dtype=np.int64)

    def find_packed(self, packed: bytes, key_bytes: int, prefix: bytes = b"") -> np.ndarray:
        """:meth:`find_many` of the keys of ``key_bytes`` each laid end to end in ``packed`` (how
        a lookup arrives on the wire): no Python object per key."""
        n = len(packed) // key_bytes
        length = len(prefix) + key_bytes
        if length > MAX_ROW_BYTES or len(prefix) % 8:   # overflow keys, odd prefixes: one by one
            return np.array([self.find(prefix + packed[i * key_bytes : (i + 1) * key_bytes]) for i in range(n)],
                            dtype=np.int64)
        if self._count == 0 or n == 0 or length > self._words * 8:   # no row is that long
            return np.full(n, -1, dtype=np.int64)
        # The rows are [prefix words][key words][zero words]: the prefix is compared and hashed
        # as constants, the keys straight from the request's bytes.
        head = _UNPACK[len(prefix) // 8](prefix)
        if key_bytes % 8:
            raw = np.zeros((n, -(-key_bytes // 8) * 8), dtype=np.uint8)
            raw[:, :key_bytes] = np.frombuffer(packed, dtype=np.uint8, count=n * key_bytes).reshape(n, key_bytes)
            body = raw.view(np.uint64)
        else:
            body = np.frombuffer(packed, dtype=np.uint64, count=n * key_bytes // 8).reshape(n, key_bytes // 8)
        found = self._follow_runs(packed, key_bytes, prefix, body, head, length)
        todo = np.flatnonzero(found < 0)
        if not len(todo):
            return found
        h = np.zeros(n, dtype=np.uint64)
        h[todo] = _mix_np(np.full(len(todo), _rounds(_start(length, self._seed), head), dtype=np.uint64), body[todo])
        # Round r reads bucket home + r of every key still unresolved: most keys sit at home (the
        # table is at most a quarter full), a few one or two along. The fingerprint picks the
        # candidate, the whole key (its length and words) decides; an empty bucket ends a probe.
        fp = h[todo] & _LOW_NP
        at = (h[todo] >> np.uint64(self._shift)).astype(np.int64)
        for _ in range(_ROUNDS):
            b = np.take(self._buckets, at)
            hit = np.flatnonzero((b >> _32) == fp)
            if len(hit):
                slots = ((b[hit] & _LOW_NP) - np.uint64(1)).astype(np.int64)
                same = self._same(slots, todo[hit], body, head, length)
                found[todo[hit[same]]] = slots[same]
                b[hit[same]] = 0   # resolved: this key's probe ends here too
            going = np.flatnonzero(b)
            if not len(going):
                return found
            todo, fp, at = todo[going], fp[going], (at[going] + 1) & self._mask
        pad = b"\0" * (self._words * 8 - length)
        for i in todo.tolist():   # the rare rest, in long clusters: one by one, from home
            row = prefix + packed[i * key_bytes : (i + 1) * key_bytes] + pad
            found[i] = self._probe(int(h[i]), row, length, int(h[i]) >> self._shift)
        return found

    def _follow_runs(
        self, packed: bytes, key_bytes: int, prefix: bytes, body: np.ndarray, head: Sequence[int], length: int
    ) -> np.ndarray:
        """Slots of the keys found where the keys before them suggest (-1 for the rest).

        A batch put takes consecutive slots, so the chain of a prefix sits in a few runs of slots:
        the first unresolved key is found alone, and the keys after it are compared with the rows
        after its slot, which are read in order (no hash, no bucket). A row holds a key only while
        its length is set (a freed slot's length is 0), so a matching row is that key's slot."""
        n = len(body)
        found = np.full(n, -1, dtype=np.int64)
        i = 0
        for _ in range(_RUNS):
            first = self.find(prefix + packed[i * key_bytes : (i + 1) * key_bytes])
            if first < 0:
                break
            m = min(n - i, self._next - first)
            same = self._same_run(first, m, body[i : i + m], head, length)
            found[i : i + m][same] = np.arange(first, first + m)[same]
            left = np.flatnonzero(found[i:] < 0)
            if not len(left):
                break
            i += int(left[0])
        return found

    def _same_run(self, first: int, m: int, asked: np.ndarray, head: Sequence[int], length: int) -> np.ndarray:
        """Whether slot ``first + j`` holds ``head + asked[j]`` of ``length`` bytes, for j < m."""
        return _rows_hold(self._rows[first : first + m], self._lengths[first : first + m], asked, head, length)

    def _same(
        self, slots: np.ndarray, which: np.ndarray, body: np.ndarray, head: Sequence[int], length: int
    ) -> np.ndarray:
        """Whether the key in each of ``slots`` is ``head + body[which]`` of ``length`` bytes."""
        return _rows_hold(np.take(self._rows, slots, axis=0), np.take(self._lengths, slots),
                          np.take(body, which, axis=0), head, length)

    def add_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """New slots for ``keys``, which must be distinct and absent (a recovery's bulk insert)."""
        n = len(keys)
        if not n:
            return np.zeros(0, dtype=np.int64)
        longest = max(map(len, keys))
        if longest > MAX_ROW_BYTES or self._free:
            return np.array([self.add(k) for k in keys], dtype=np.int64)
        self._widen(longest)
        start = self._next
        if start + n > self._capacity:
            self._grow_slots(start + n)
        rows, lengths = _rows_of(keys, b"", self._words)
        hashes = _hash_rows(rows, lengths, self._seed)
        order = np.argsort(hashes)
        twins = _repeated(hashes, order)
        if len(twins) and len({keys[i] for i in twins.tolist()}) < len(twins):
            raise KeyError("a key appears twice in one bulk add")
        slots = np.arange(start, start + n, dtype=np.int64)
        self._rows[start : start + n] = rows
        self._lengths[start : start + n] = lengths
        self._hashes[start : start + n] = hashes
        self._next += n
        self._count += n
        if self._count * _MAX_LOAD > len(self._buckets):   # only these keys: placed in hash order
            self._rehash(self._count * _MAX_LOAD, slots[order] if self._count == n and not self._overflow else None)
        else:
            self._place_many(slots)
        return slots

    # -- internals ---------------------------------------------------------------------------------

    def prime(self, keys: Sequence[bytes]) -> None:
        """Hash ``keys`` now, in one vectorised pass, for the finds and adds about to come one key at
        a time (a put batch); the previous batch's hashes are forgotten. The next ``len(keys)``
        freed slots are handed out in ascending order, so the batch's keys lie in runs of
        consecutive slots where the freed slots allow (what lookups follow)."""
        self._primed = {}
        if len(self._free) > 1:
            k = min(len(keys), len(self._free))
            self._free[-k:] = sorted(self._free[-k:], reverse=True)   # pop() takes from the end
        longest = max(map(len, keys), default=0)
        if 0 < longest <= MAX_ROW_BYTES:
            rows, lengths = _rows_of(keys, b"", -(-longest // 8))
            self._primed = dict(zip(keys, _hash_rows(rows, lengths, self._seed).tolist()))

    def _hash(self, key: bytes) -> int:
        """:func:`_hash_one`, from the primed batch or remembering the last key (a put finds, then
        adds, the same key)."""
        h = self._primed.get(key)
        if h is not None:
            return h
        if key != self._last_key:
            self._last_key, self._last_hash = key, _hash_one(key, self._seed)
        return self._last_hash

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next
        if slot >= self._capacity:
            self._grow_slots(2 * self._capacity)
        self._next += 1
        return slot

    def _grow_slots(self, capacity: int) -> None:
        capacity = max(capacity, _MIN_CAPACITY)
        extra = capacity - self._capacity
        self._rows = np.concatenate([self._rows, np.zeros((extra, self._words), dtype=np.uint64)])
        self._lengths = np.concatenate([self._lengths, np.zeros(extra, dtype=np.uint8)])
        self._hashes = np.concatenate([self._hashes, np.zeros(extra, dtype=np.uint64)])
        self._capacity = capacity
        if self._on_grow is not None:
            self._on_grow(capacity)

    def _widen(self, nbytes: int) -> None:
        words = -(-nbytes // 8)
        if words > self._words:   # zero words add nothing to a hash: only the rows change
            self._rows = np.concatenate(
                [self._rows, np.zeros((self._capacity, words - self._words), dtype=np.uint64)], axis=1
            )
            self._words = words

    def _place_many(self, slots: np.ndarray, presorted: bool = False) -> None:
        """Put ``slots`` into empty buckets, the earliest free one from each home (vectorised);
        ``presorted``: ``slots`` come in hash order."""
        if not self._buckets.any():
            slots = self._place_sorted(slots, presorted)   # an empty table (a rebuild): no rounds
        pending = slots
        pos = (self._hashes[slots] >> np.uint64(self._shift)).astype(np.int64)
        while len(pending):
            free = self._buckets[pos] == 0
            # among those that found an empty bucket, one per bucket wins this round
            cand_pos = pos[free]
            _, first = np.unique(cand_pos, return_index=True)
            winners = np.flatnonzero(free)[first]
            self._buckets[pos[winners]] = self._entries(pending[winners])
            keep = np.ones(len(pending), dtype=bool)
            keep[winners] = False
            pending, pos = pending[keep], (pos[keep] + 1) & self._mask

    def _place_sorted(self, slots: np.ndarray, presorted: bool = False) -> np.ndarray:
        """Place ``slots`` into an empty bucket array: sorted by home, each goes to its home or just
        past the one before it (``p_i = max(h_i, p_{i-1} + 1)``, a running maximum). Returns those
        that would wrap past the end, for the caller to place."""
        if not presorted:
            slots = slots[np.argsort(self._hashes[slots])]   # by hash is by home (its top bits)
        homes = (self._hashes[slots] >> np.uint64(self._shift)).astype(np.int64)
        steps = np.arange(len(slots), dtype=np.int64)
        pos = np.maximum.accumulate(homes - steps) + steps
        inside = pos < len(self._buckets)
        self._buckets[pos[inside]] = self._entries(slots[inside])
        return slots[~inside]

    def _entries(self, slots: np.ndarray) -> np.ndarray:
        """Bucket values of ``slots``: the hash's low half (a fingerprint) over slot + 1."""
        return ((self._hashes[slots] & _LOW_NP) << _32) | (slots.astype(np.uint64) + np.uint64(1))

    def _unplace(self, slot: int) -> None:
        """Take ``slot`` out of its bucket, shifting later members of its cluster back (linear
        probing needs no tombstones)."""
        buckets, mask = self._buckets, self._mask
        i = int(self._hashes[slot]) >> self._shift
        while int(buckets[i]) & _LOW != slot + 1:
            i = (i + 1) & mask
        buckets[i] = 0
        j = i
        while True:
            j = (j + 1) & mask
            b = int(buckets[j])
            if b == 0:
                return
            home = int(self._hashes[(b & _LOW) - 1]) >> self._shift
            # the entry at j may fill the hole at i unless its home lies cyclically in (i, j]
            between = i < home <= j if i <= j else (home > i or home <= j)
            if not between:
                buckets[i] = b
                buckets[j] = 0
                i = j

    def _rehash(self, nbuckets: int, live: np.ndarray | None = None) -> None:
        """Rebuild the buckets with at least ``nbuckets`` of them (a power of two); ``live``: every
        slot in the table, in hash order, when the caller has it."""
        size = 1 << max(nbuckets - 1, _MAX_LOAD * _MIN_CAPACITY - 1).bit_length()
        self._buckets = np.zeros(size, dtype=np.uint64)
        self._mask = size - 1
        self._shift = 64 - (size.bit_length() - 1)
        if live is not None:
            self._place_many(live, presorted=True)
            return
        live = np.flatnonzero((self._lengths[: self._next] != 0) & (self._lengths[: self._next] != _OVERFLOW))
        self._place_many(live.astype(np.int64))
