"""Least-recently-used eviction over an intrusive doubly linked list.

Sentinel head and tail records make every link operation branch-free; the links live on the
:class:`BlockRecord` itself, so insert, touch and remove are O(1) and allocate nothing. The head
side is the coldest block.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.block import BlockRecord
from kvstore.policy import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._head = BlockRecord(key=b"<head>")
        self._tail = BlockRecord(key=b"<tail>")
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def insert(self, record: BlockRecord) -> None:
        if record.prev is not None:
            raise RuntimeError(f"block {record.key.hex()[:16]} is already in the LRU list")
        self._link_before_tail(record)
        self._len += 1

    def touch(self, record: BlockRecord) -> None:
        if record.prev is None:
            return
        self._unlink(record)
        self._link_before_tail(record)

    def remove(self, record: BlockRecord) -> None:
        if record.prev is None:
            return
        self._unlink(record)
        self._len -= 1

    def victims(
        self, nbytes: int, fits: Callable[[list[BlockRecord]], bool] | None = None
    ) -> list[BlockRecord]:
        chosen: list[BlockRecord] = []
        total = 0
        node = self._head.next
        while node is not self._tail:
            if node.evictable:
                chosen.append(node)
                total += node.extent.length
                if total >= nbytes and (fits is None or fits(chosen)):
                    return chosen
            node = node.next
        return []

    def coldest_first(self) -> list[BlockRecord]:
        """Every block, coldest first (for stats and tests; O(n))."""
        out = []
        node = self._head.next
        while node is not self._tail:
            out.append(node)
            node = node.next
        return out

    def _link_before_tail(self, record: BlockRecord) -> None:
        last = self._tail.prev
        record.prev = last
        record.next = self._tail
        last.next = record
        self._tail.prev = record

    def _unlink(self, record: BlockRecord) -> None:
        record.prev.next = record.next
        record.next.prev = record.prev
        record.prev = record.next = None
