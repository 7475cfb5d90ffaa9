"""Where a block lives in a cluster: its home among the live members, by rendezvous hashing.

Each (key, member) pair gets a pseudo-random weight; a key's home is the member of highest
weight. Every daemon that sees the same members computes the same homes without talking to the
others, and when a member joins or leaves only the keys whose highest weight was (or becomes)
that member move: about 1/N of them, never a reshuffle of the rest.

The weight mixes a fold of the key's words with a per-member seed through a murmur-style
finaliser, in numpy for a whole batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

_FMIX1, _FMIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def member_seed(member: str) -> int:
    """A member's seed: a stable 64-bit digest of its advertised address."""
    return xxhash.xxh3_64_intdigest(member.encode())


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _FMIX1
    h = h ^ (h >> _S33)
    h = h * _FMIX2
    return h ^ (h >> _S33)


def key_words(keys: Sequence[bytes]) -> np.ndarray:
    """One well-mixed uint64 per key, from all of its bytes (engines' opaque keys need not be
    digests): the key's 8-byte words, zero-padded, folded through the finaliser."""
    if not keys:
        return np.zeros(0, dtype=np.uint64)
    width = -(-max(map(len, keys)) // 8) * 8
    rows = np.frombuffer(b"".join(key.ljust(width, b"\0") for key in keys), dtype="<u8").reshape(len(keys), -1)
    h = np.array([len(key) for key in keys], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = _mix(h ^ rows[:, j].astype(np.uint64))
    return h


def homes(keys: Sequence[bytes], members: Sequence[str]) -> np.ndarray:
    """The index in ``members`` of each key's home (an int array; empty members: all -1)."""
    if not members:
        return np.full(len(keys), -1, dtype=np.int64)
    words = key_words(keys)
    seeds = np.array([member_seed(m) for m in members], dtype=np.uint64)
    with np.errstate(over="ignore"):
        weights = _mix(words[:, None] ^ seeds[None, :])
    return np.argmax(weights, axis=1).astype(np.int64)


def home_of(key: bytes, members: Sequence[str]) -> str | None:
    """The home member of one key, or None without members."""
    if not members:
        return None
    return members[int(homes([key], members)[0])]
