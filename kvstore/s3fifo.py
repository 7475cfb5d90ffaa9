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
from collections.abc import Callable, Iterator

import numpy as np

from kvstore.columns import as_numpy
from kvstore.lru import SlotList
from kvstore.policy import EvictionPolicy, LevelView

SMALL, MAIN = 1, 2
MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1, ghost_entries: int = 1 << 16) -> None:
        self._small_target = int(capacity_bytes * small_fraction)
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._ghost_entries = ghost_entries

    def bind(self, view: LevelView) -> None:
        super().bind(view)
        self._small = SlotList(view)
        self._main = SlotList(view)

    def __len__(self) -> int:
        return self._small.count + self._main.count

    def insert(self, slot: int) -> None:
        view = self.view
        if view.queue[slot]:
            raise RuntimeError("the copy is already in a policy queue")
        view.freq[slot] = 0
        key = view.ghost_key(slot)
        if key in self._ghost:
            del self._ghost[key]
            self._enter(slot, MAIN)
        else:
            self._enter(slot, SMALL)

    def insert_many(self, slots) -> None:
        if self._ghost:   # some may be returning: each decides its queue
            super().insert_many(slots)
            return
        as_numpy(self.view.freq)[np.asarray(slots, dtype=np.int64)] = 0
        self._small.extend(slots, queue=SMALL)

    def touch(self, slot: int) -> None:
        freq = self.view.freq
        if self.view.queue[slot] and freq[slot] < MAX_FREQ:
            freq[slot] += 1

    def remove(self, slot: int, *, evicted: bool = False) -> None:
        view = self.view
        queue = view.queue[slot]
        if not queue:
            return
        if evicted and queue == SMALL and view.freq[slot] == 0:
            self._ghost[view.ghost_key(slot)] = None
            if len(self._ghost) > self._ghost_entries:
                self._ghost.popitem(last=False)
        self._queue(queue).unlink(slot)
        view.queue[slot] = 0

    def victims(self, nbytes: int, fits: Callable[[list[int]], bool] | None = None) -> list[int]:
        view = self.view
        queue, freq, length = view.queue, view.freq, view.length
        chosen: list[int] = []
        chosen_set: set[int] = set()
        total = 0
        small_bytes = self._small.nbytes
        # Each pass either chooses a copy, promotes one out of the small queue, or spends one of
        # a main-queue copy's extra rounds, so this bound is never the reason for stopping early
        # unless nothing is evictable.
        budget = 2 * (MAX_FREQ + 2) * (len(self) + 1)
        while budget and not (total >= nbytes and (fits is None or fits(chosen))):
            budget -= 1
            from_small = small_bytes > self._small_target or not self._has_candidate(self._main, chosen_set)
            slot = self._oldest_candidate(self._small if from_small else self._main, chosen_set)
            if slot is None:
                slot = self._oldest_candidate(self._main if from_small else self._small, chosen_set)
                if slot is None:
                    return []
            if queue[slot] == SMALL and freq[slot] > 0:
                self._small.unlink(slot)   # read again while small: it earned the main queue
                freq[slot] = 0
                self._enter(slot, MAIN)
                small_bytes -= length[slot]
                continue
            if queue[slot] == MAIN and freq[slot] > 0:
                freq[slot] -= 1            # one more round in the main queue
                self._main.unlink(slot)
                self._main.push(slot)
                continue
            chosen.append(slot)
            chosen_set.add(slot)
            total += length[slot]
            if queue[slot] == SMALL:
                small_bytes -= length[slot]
        return chosen if total >= nbytes and (fits is None or fits(chosen)) else []

    def oldest_first(self) -> Iterator[int]:
        yield from self._small.oldest_first()
        yield from self._main.oldest_first()

    def _enter(self, slot: int, queue: int) -> None:
        self.view.queue[slot] = queue
        self._queue(queue).push(slot)

    def _queue(self, queue: int) -> SlotList:
        return self._small if queue == SMALL else self._main

    def _oldest_candidate(self, queue: SlotList, chosen: set[int]) -> int | None:
        evictable = self.view.evictable
        for slot in queue.oldest_first():
            if evictable(slot) and slot not in chosen:
                return slot
        return None

    def _has_candidate(self, queue: SlotList, chosen: set[int]) -> bool:
        return self._oldest_candidate(queue, chosen) is not None
