"""Extent allocator over one linear address space (a memory arena, a file, a GPU pool).

Best-fit over free extents with immediate coalescing of neighbours. Every extent starts at a
multiple of ``alignment_bytes`` and has a length that is one, so the same allocator serves host
memory (page alignment) and direct I/O files (sector alignment). The allocator only does
arithmetic; the tier that owns the bytes decides what an offset means.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Extent:
    """A reserved region: ``length`` bytes (a multiple of the alignment) at ``offset``."""

    offset: int
    length: int


class ExtentAllocator:
    """Variable-size allocation in ``[0, capacity_bytes)`` with O(log n) best-fit search."""

    def __init__(self, capacity_bytes: int, alignment_bytes: int = 4096) -> None:
        if alignment_bytes <= 0 or alignment_bytes & (alignment_bytes - 1):
            raise ConfigError(f"alignment_bytes must be a power of two, got {alignment_bytes}")
        capacity = capacity_bytes - capacity_bytes % alignment_bytes
        if capacity <= 0:
            raise ConfigError(
                f"capacity_bytes={capacity_bytes} holds no {alignment_bytes}-byte aligned extent"
            )
        self.capacity_bytes = capacity
        self.alignment_bytes = alignment_bytes
        self.used_bytes = 0
        # Free space is recorded as runs (a few when full); of allocated extents only where each
        # starts, one bit per alignment unit, so a million blocks cost the allocator no object.
        # A free must name exactly one allocated extent: it starts where one starts, ends where the
        # next extent or free run starts, and overlaps no free run.
        self._starts: list[int] = []          # sorted starts of the free runs
        self._marks = np.zeros(capacity // alignment_bytes // 8 + 1, dtype=np.uint8)   # bit: an extent starts there
        self._by_start: dict[int, int] = {}   # start -> length of each free extent
        self._by_end: dict[int, int] = {}     # end -> start, to coalesce with a left neighbour
        self._by_size: list[tuple[int, int]] = []  # sorted (length, start): best fit by bisect
        self._add_free(0, capacity)

    def round_up(self, nbytes: int) -> int:
        """The length an allocation of ``nbytes`` occupies."""
        a = self.alignment_bytes
        return (nbytes + a - 1) // a * a

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def allocate(self, nbytes: int) -> Extent | None:
        """Reserve ``nbytes`` (rounded up); None when no free extent is large enough."""
        length = self.round_up(max(nbytes, 1))
        start = self._take(length)
        if start is None:
            return None
        unit = start // self.alignment_bytes
        self._marks[unit >> 3] |= 1 << (unit & 7)
        return Extent(start, length)

    def _take(self, length: int) -> int | None:
        """The start of ``length`` bytes cut from the best-fitting free run (no marks set), or None."""
        i = bisect.bisect_left(self._by_size, (length, -1))
        if i == len(self._by_size):
            return None
        free_len, start = self._by_size[i]
        self._remove_free(start, free_len)
        if free_len > length:
            self._add_free(start + length, free_len - length)
        self.used_bytes += length
        return start

    def allocate_many(self, sizes: Sequence[int]) -> list[Extent]:
        """Extents for the leading ``sizes`` that fit now, in order: back to back in one free run
        where a run holds them all (one search for a batch, whose blocks then lie together for
        vectored I/O), else one by one (best fit each)."""
        lengths = [self.round_up(max(n, 1)) for n in sizes]
        start = self._take(sum(lengths)) if len(lengths) > 1 else None
        if start is None:
            extents = []
            for n in sizes:
                extent = self.allocate(n)
                if extent is None:
                    break
                extents.append(extent)
            return extents
        offsets, at = [], start
        for length in lengths:
            offsets.append(at)
            at += length
        units = np.asarray(offsets, dtype=np.int64) // self.alignment_bytes
        np.bitwise_or.at(self._marks, units >> 3, (1 << (units & 7)).astype(np.uint8))
        return [Extent(offset, length) for offset, length in zip(offsets, lengths)]

    def rebuild(self, extents: list[Extent]) -> None:
        """Start over with exactly ``extents`` allocated (sorted by offset, disjoint, aligned):
        how a persistent tier restores its state after a restart, in one pass."""
        self.rebuild_sorted([e.offset for e in extents], [e.length for e in extents])

    def rebuild_sorted(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """:meth:`rebuild` from the extents' offsets and lengths (numpy arrays welcome): only the
        free runs between them become objects."""
        starts = np.asarray(offsets, dtype=np.int64)
        ends = starts + lengths
        self.used_bytes = int(np.sum(lengths, dtype=np.int64))
        units = np.zeros(len(self._marks) * 8, dtype=bool)
        units[starts // self.alignment_bytes] = True
        self._marks = np.packbits(units, bitorder="little")
        gap_starts = np.concatenate([[0], ends]).astype(np.int64)
        gap_ends = np.concatenate([starts, [self.capacity_bytes]]).astype(np.int64)
        runs = np.flatnonzero(gap_ends > gap_starts)
        free_starts, free_lengths = gap_starts[runs].tolist(), (gap_ends[runs] - gap_starts[runs]).tolist()
        self._starts = free_starts
        self._by_start = dict(zip(free_starts, free_lengths))
        self._by_end = {start + length: start for start, length in zip(free_starts, free_lengths)}
        self._by_size = sorted(zip(free_lengths, free_starts))

    def free(self, extent: Extent) -> None:
        """Return an extent; it merges with free neighbours on both sides."""
        start, length = extent.offset, extent.length
        end = start + length
        if not self._allocated(start, end):
            raise ValueError(f"free of an extent that is not allocated: {extent}")
        unit = start // self.alignment_bytes
        self._marks[unit >> 3] &= ~(1 << (unit & 7)) & 0xFF
        self.used_bytes -= length
        left = self._by_end.get(start)
        if left is not None:
            self._remove_free(left, start - left)
            start = left
        right_len = self._by_start.get(end)
        if right_len is not None:
            self._remove_free(end, right_len)
            end += right_len
        self._add_free(start, end - start)

    def largest_free_after(self, extents: list[Extent]) -> int:
        """The largest contiguous free run there would be if ``extents`` were freed (no change)."""
        spans = sorted([(e.offset, e.length) for e in extents] + list(self._by_start.items()))
        best = run_start = run_end = 0
        for start, length in spans:
            if start != run_end:
                run_start = start
            run_end = start + length
            best = max(best, run_end - run_start)
        return best

    def _allocated(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is exactly one allocated extent: aligned, in range, starting where
        an extent starts, ending where the next extent or free run starts, over no free run."""
        a = self.alignment_bytes
        if start < 0 or end > self.capacity_bytes or start % a or end % a or end <= start:
            return False
        first, last = start // a, end // a
        if not self._marked(first, first + 1) or self._marked(first + 1, last):
            return False   # not where an extent starts, or more than one extent
        if end != self.capacity_bytes and not self._marked(last, last + 1) and end not in self._by_start:
            return False   # a part of an extent
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._starts[i] + self._by_start[self._starts[i]] > start:
            return False
        return i + 1 >= len(self._starts) or self._starts[i + 1] >= end

    def _marked(self, lo: int, hi: int) -> bool:
        """Whether an extent starts at any unit in ``[lo, hi)``."""
        if hi <= lo:
            return False
        if hi == lo + 1:
            return bool(self._marks[lo >> 3] >> (lo & 7) & 1)
        base = lo >> 3
        bits = np.unpackbits(self._marks[base : ((hi - 1) >> 3) + 1], bitorder="little")
        return bool(bits[lo - 8 * base : hi - 8 * base].any())

    def _add_free(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._by_start[start] = length
        self._by_end[start + length] = start
        bisect.insort(self._by_size, (length, start))

    def _remove_free(self, start: int, length: int) -> None:
        del self._starts[bisect.bisect_left(self._starts, start)]
        del self._by_start[start]
        del self._by_end[start + length]
        i = bisect.bisect_left(self._by_size, (length, start))
        del self._by_size[i]
