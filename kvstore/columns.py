"""Per-block fields as columns: one array per field, indexed by the block's slot.

A million blocks as Python objects cost about 750 bytes each (a record, a copy, its extent, their
dicts and integers); as columns they cost the bytes of the fields. The catalog keeps one
:class:`LevelColumns` per level of the stack (a block's copy in that level: its state, holds,
location and the eviction policy's links) besides its own record columns, all grown together with
the key table's slot space. ``array.array`` is used for fields read one at a time on hot paths
(a Python ``int`` back, no numpy scalar); :func:`as_numpy` gives a vectorised view for batch work,
which must not outlive the call (a viewed array cannot grow).
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

from kvstore.allocator import Extent

NONE, FILLING, READY = 0, 1, 2   # a copy's state in the columns (a copy that left is a view's own)
NIL = -1


def grow(column: array, capacity: int, fill: int = 0) -> None:
    """Extend ``column`` to ``capacity`` entries of ``fill``."""
    extra = capacity - len(column)
    if extra > 0:
        column.extend(array(column.typecode, [fill]) * extra)


def as_numpy(column: array) -> np.ndarray:
    """A numpy view of ``column`` (no copy); drop it before the column grows."""
    return np.frombuffer(column, dtype=np.dtype(column.typecode)) if len(column) else np.zeros(0, column.typecode)


class LevelColumns:
    """The copies of one level: a slot's copy is there when ``state[slot]`` is not NONE."""

    __slots__ = ("state", "holds", "offset", "length", "prev", "next", "freq", "queue", "refs")

    def __init__(self) -> None:
        self.state = array("B")
        self.holds = array("I")
        self.offset = array("q")    # an Extent's offset; the location itself in ``refs`` otherwise
        self.length = array("Q")
        self.prev = array("i")      # the level's eviction policy's links and marks
        self.next = array("i")
        self.freq = array("B")
        self.queue = array("B")
        self.refs: dict[int, Any] = {}   # slot -> location, for locations that are not extents

    def grow(self, capacity: int) -> None:
        for column in (self.state, self.holds, self.offset, self.length, self.freq, self.queue):
            grow(column, capacity)
        grow(self.prev, capacity, NIL)
        grow(self.next, capacity, NIL)

    def place(self, slot: int, location: Any, state: int) -> None:
        self.state[slot] = state
        self.holds[slot] = 0
        self.length[slot] = location.length
        if type(location) is Extent:
            self.offset[slot] = location.offset
        else:
            self.offset[slot] = NIL
            self.refs[slot] = location

    def location(self, slot: int) -> Any:
        offset = self.offset[slot]
        if offset == NIL:
            return self.refs[slot]
        return Extent(offset, self.length[slot])

    def clear(self, slot: int) -> None:
        self.state[slot] = NONE
        self.holds[slot] = 0
        if self.offset[slot] == NIL:
            self.refs.pop(slot, None)
