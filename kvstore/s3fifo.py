"""S3-FIFO eviction: scan-resistant, with FIFO queues only (Yang et al., SOSP 2023).

New copies enter a small FIFO (about a tenth of the tier). A copy read again before it reaches the
small queue's end moves to the main FIFO; one that was never read again is evicted from the
small queue and its key remembered in a ghost set, so if it comes back it goes straight to the
main queue. The main queue gives each copy one more round per read (up to 3). A long scan of
one-off blocks therefore churns through the small queue and never pushes the hot, repeatedly read
blocks out of the main queue, where LRU would lose them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvstore.block import Copy
from kvstore.lru import CopyList
from kvstore.policy import EvictionPolicy

SMALL, MAIN = 1, 2
MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1, ghost_entries: int = 1 << 16) -> None:
        self._small = CopyList()
        self._main = CopyList()
        self._small_target = int(capacity_bytes * small_fraction)
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._ghost_entries = ghost_entries

    def __len__(self) -> int:
        return self._small.count + self._main.count

    def insert(self, copy: Copy) -> None:
        if copy.queue:
            raise RuntimeError("the copy is already in a policy queue")
        copy.freq = 0
        key = copy.record.key
        if key in self._ghost:
            del self._ghost[key]
            self._enter(copy, MAIN)
        else:
            self._enter(copy, SMALL)

    def touch(self, copy: Copy) -> None:
        if copy.queue and copy.freq < MAX_FREQ:
            copy.freq += 1

    def remove(self, copy: Copy, *, evicted: bool = False) -> None:
        if not copy.queue:
            return
        if evicted and copy.queue == SMALL and copy.freq == 0:
            self._ghost[copy.record.key] = None
            if len(self._ghost) > self._ghost_entries:
                self._ghost.popitem(last=False)
        self._queue(copy).unlink(copy)
        copy.queue = 0

    def victims(self, nbytes: int, fits: Callable[[list[Copy]], bool] | None = None) -> list[Copy]:
        chosen: list[Copy] = []
        chosen_ids: set[int] = set()
        total = 0
        small_bytes = self._small.nbytes
        # Each pass either chooses a copy, promotes one out of the small queue, or spends one of
        # a main-queue copy's extra rounds, so this bound is never the reason for stopping early
        # unless nothing is evictable.
        budget = 2 * (MAX_FREQ + 2) * (len(self) + 1)
        while budget and not (total >= nbytes and (fits is None or fits(chosen))):
            budget -= 1
            from_small = small_bytes > self._small_target or not self._has_candidate(self._main, chosen_ids)
            copy = self._oldest_candidate(self._small if from_small else self._main, chosen_ids)
            if copy is None:
                copy = self._oldest_candidate(self._main if from_small else self._small, chosen_ids)
                if copy is None:
                    return []
            if copy.queue == SMALL and copy.freq > 0:
                self._small.unlink(copy)   # read again while small: it earned the main queue
                copy.freq = 0
                self._enter(copy, MAIN)
                small_bytes -= copy.nbytes
                continue
            if copy.queue == MAIN and copy.freq > 0:
                copy.freq -= 1             # one more round in the main queue
                self._main.unlink(copy)
                self._main.push(copy)
                continue
            chosen.append(copy)
            chosen_ids.add(id(copy))
            total += copy.nbytes
            if copy.queue == SMALL:
                small_bytes -= copy.nbytes
        return chosen if total >= nbytes and (fits is None or fits(chosen)) else []

    def _enter(self, copy: Copy, queue: int) -> None:
        copy.queue = queue
        self._queue(copy).push(copy)

    def _queue(self, copy: Copy) -> CopyList:
        return self._small if copy.queue == SMALL else self._main

    @staticmethod
    def _oldest_candidate(queue: CopyList, chosen_ids: set[int]) -> Copy | None:
        for copy in queue.oldest_first():
            if copy.evictable and id(copy) not in chosen_ids:
                return copy
        return None

    def _has_candidate(self, queue: CopyList, chosen_ids: set[int]) -> bool:
        return self._oldest_candidate(queue, chosen_ids) is not None
