"""Least-recently-used eviction over an intrusive doubly linked list of slots.

A level's copies are slots of the catalog's columns (:class:`~kvstore.columns.LevelColumns`); the
list's links are two of those columns, so insert, touch and remove are O(1), allocate nothing and
cost no memory beyond eight bytes per block. The head is the coldest copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from kvstore.columns import as_numpy
from kvstore.policy import EvictionPolicy, LevelView

NIL = -1


class SlotList:
    """A doubly linked list threaded through ``prev``/``next`` columns; head is the oldest end."""

    def __init__(self, view: LevelView) -> None:
        self.view = view
        self.head = self.tail = NIL
        self.count = 0
        self.nbytes = 0

    def push(self, slot: int) -> None:
        """Append at the newest end."""
        prev, nxt = self.view.prev, self.view.next
        prev[slot], nxt[slot] = self.tail, NIL
        if self.tail == NIL:
            self.head = slot
        else:
            nxt[self.tail] = slot
        self.tail = slot
        self.count += 1
        self.nbytes += self.view.length[slot]

    def extend(self, slots, queue: int) -> None:
        """Append ``slots`` (distinct, in no queue of the policy) in order, linked in bulk, and
        mark them as in the policy's ``queue``."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return
        view = self.view
        marks = as_numpy(view.queue)
        if marks[slots].any():
            raise RuntimeError("a copy is already in a policy queue")
        marks[slots] = queue
        prev, nxt = as_numpy(view.prev), as_numpy(view.next)
        prev[slots[1:]] = slots[:-1]
        nxt[slots[:-1]] = slots[1:]
        prev[slots[0]], nxt[slots[-1]] = self.tail, NIL
        del marks, prev, nxt
        first, last = int(slots[0]), int(slots[-1])
        if self.tail == NIL:
            self.head = first
        else:
            view.next[self.tail] = first
        self.tail = last
        self.count += len(slots)
        self.nbytes += int(np.take(as_numpy(view.length), slots).sum())

    def unlink(self, slot: int) -> None:
        prev, nxt = self.view.prev, self.view.next
        p, n = prev[slot], nxt[slot]
        if p == NIL:
            self.head = n
        else:
            nxt[p] = n
        if n == NIL:
            self.tail = p
        else:
            prev[n] = p
        prev[slot] = nxt[slot] = NIL
        self.count -= 1
        self.nbytes -= self.view.length[slot]

    def oldest_first(self) -> Iterator[int]:
        nxt = self.view.next
        slot = self.head
        while slot != NIL:
            following = nxt[slot]  # the caller may move ``slot``
            yield slot
            slot = following


class LRUPolicy(EvictionPolicy):
    def bind(self, view: LevelView) -> None:
        super().bind(view)
        self._list = SlotList(view)

    def __len__(self) -> int:
        return self._list.count

    def insert(self, slot: int) -> None:
        if self.view.queue[slot]:
            raise RuntimeError("the copy is already in a policy list")
        self.view.queue[slot] = 1
        self._list.push(slot)

    def insert_many(self, slots) -> None:
        self._list.extend(slots, queue=1)

    def touch(self, slot: int) -> None:
        if self.view.queue[slot]:
            self._list.unlink(slot)
            self._list.push(slot)

    def remove(self, slot: int, *, evicted: bool = False) -> None:
        if self.view.queue[slot]:
            self._list.unlink(slot)
            self.view.queue[slot] = 0

    def victims(self, nbytes: int, fits: Callable[[list[int]], bool] | None = None) -> list[int]:
        chosen: list[int] = []
        total = 0
        evictable, length = self.view.evictable, self.view.length
        for slot in self._list.oldest_first():
            if evictable(slot):
                chosen.append(slot)
                total += length[slot]
                if total >= nbytes and (fits is None or fits(chosen)):
                    return chosen
        return []

    def oldest_first(self) -> Iterator[int]:
        return self._list.oldest_first()

    def coldest_first(self) -> list[int]:
        """Every copy, coldest first (for stats and tests; O(n))."""
        return list(self._list.oldest_first())
