"""Least-recently-used eviction over an intrusive doubly linked list.

Sentinel head and tail copies make every link operation branch-free; the links live on the
:class:`Copy` itself, so insert, touch and remove are O(1) and allocate nothing. The head side is
the coldest copy.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.block import Copy
from kvstore.policy import EvictionPolicy


class CopyList:
    """An intrusive doubly linked list of copies with sentinels; head is the oldest end."""

    def __init__(self) -> None:
        self.head = Copy(record=None, level=-1, location=None)
        self.tail = Copy(record=None, level=-1, location=None)
        self.head.next = self.tail
        self.tail.prev = self.head
        self.count = 0
        self.nbytes = 0

    def push(self, copy: Copy) -> None:
        """Append at the newest end."""
        last = self.tail.prev
        copy.prev, copy.next = last, self.tail
        last.next = copy
        self.tail.prev = copy
        self.count += 1
        self.nbytes += copy.nbytes

    def unlink(self, copy: Copy) -> None:
        copy.prev.next = copy.next
        copy.next.prev = copy.prev
        copy.prev = copy.next = None
        self.count -= 1
        self.nbytes -= copy.nbytes

    def oldest_first(self):
        node = self.head.next
        while node is not self.tail:
            nxt = node.next  # the caller may move ``node``
            yield node
            node = nxt


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._list = CopyList()

    def __len__(self) -> int:
        return self._list.count

    def insert(self, copy: Copy) -> None:
        if copy.prev is not None:
            raise RuntimeError("the copy is already in a policy list")
        self._list.push(copy)

    def touch(self, copy: Copy) -> None:
        if copy.prev is None:
            return
        self._list.unlink(copy)
        self._list.push(copy)

    def remove(self, copy: Copy, *, evicted: bool = False) -> None:
        if copy.prev is not None:
            self._list.unlink(copy)

    def victims(self, nbytes: int, fits: Callable[[list[Copy]], bool] | None = None) -> list[Copy]:
        chosen: list[Copy] = []
        total = 0
        for copy in self._list.oldest_first():
            if copy.evictable:
                chosen.append(copy)
                total += copy.nbytes
                if total >= nbytes and (fits is None or fits(chosen)):
                    return chosen
        return []

    def coldest_first(self) -> list[Copy]:
        """Every copy, coldest first (for stats and tests; O(n))."""
        return list(self._list.oldest_first())
