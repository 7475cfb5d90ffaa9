"""Framing of block bytes on a stream: blocks back to back, cut into bounded chunks.

:func:`pack` turns a batch of block views into chunks of at most ``chunk_bytes`` (small blocks
share a chunk, large ones span several); :class:`Unpacker` turns received chunks back into
``(block index, offset, piece)`` triples given the block sizes announced up front. The same
framing is used in both directions (client put, daemon get), so each side has one loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvstore.errors import InvalidArgumentError


def pack(views: Iterable[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of the concatenated byte ``views``, each at most ``chunk_bytes`` (one copy per byte)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    pieces: list[memoryview] = []
    pending = 0
    for view in views:
        offset, size = 0, view.nbytes
        while offset < size:
            take = min(size - offset, chunk_bytes - pending)
            pieces.append(view[offset : offset + take])
            offset += take
            pending += take
            if pending == chunk_bytes:
                yield b"".join(pieces)
                pieces.clear()
                pending = 0
    if pieces:
        yield b"".join(pieces)


class Unpacker:
    """Splits a stream of chunks into the blocks whose ``sizes`` were announced."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        self.received = 0
        self._block = 0
        self._offset = 0

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
        """``(block, offset within block, piece)`` for every piece of ``data``, in order.

        Raises InvalidArgumentError if the stream carries more bytes than announced.
        """
        view = memoryview(data)
        if self.received + view.nbytes > self.total:
            raise InvalidArgumentError(
                f"the stream carries more bytes than the {self.total} its header announced"
            )
        self.received += view.nbytes
        while view.nbytes:
            size = self.sizes[self._block]
            take = min(view.nbytes, size - self._offset)
            yield self._block, self._offset, view[:take]
            view = view[take:]
            self._offset += take
            if self._offset == size:
                self._block += 1
                self._offset = 0

    def check_complete(self) -> None:
        if not self.complete:
            raise InvalidArgumentError(
                f"the stream ended after {self.received} of the {self.total} bytes its header announced"
            )
