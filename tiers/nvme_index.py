"""The NVMe tier's persistent index in LMDB: key -> where the block is and how to verify it.

One entry per persisted block, written in one synchronous transaction per batch *after* the
block's bytes were written and flushed (``fdatasync``), and deleted *before* its extent can be
reused. So after a crash every entry points at bytes that reached the disk, and a restart rebuilds
the tier from this index alone, without reading the data.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lmdb

_VALUE = struct.Struct("<QQQQd")  # offset, length, size, checksum, last use (unix time); then the namespace


@dataclass(frozen=True, slots=True)
class IndexEntry:
    key: bytes
    offset: int
    length: int
    size: int
    checksum: int
    last_use: float
    namespace: bytes = b""


class NvmeIndex:
    def __init__(self, path: str, map_bytes: int) -> None:
        self._env = lmdb.open(path, map_size=map_bytes, subdir=True, sync=True, metasync=True, max_dbs=0)

    def entries(self) -> Iterator[IndexEntry]:
        with self._env.begin() as txn:
            for key, value in txn.cursor():
                offset, length, size, checksum, last_use = _VALUE.unpack_from(value)
                yield IndexEntry(bytes(key), offset, length, size, checksum, last_use, bytes(value[_VALUE.size :]))

    def _put(self, entries: Sequence[IndexEntry]) -> None:
        with self._env.begin(write=True) as txn:
            for e in entries:
                txn.put(e.key, _VALUE.pack(e.offset, e.length, e.size, e.checksum, e.last_use) + e.namespace)

    def _delete(self, entries: Sequence[tuple[bytes, int | None]]) -> None:
        with self._env.begin(write=True) as txn:
            for key, offset in entries:
                value = txn.get(key)
                if value is not None and (offset is None or _VALUE.unpack_from(value)[0] == offset):
                    txn.delete(key)

    async def put(self, entries: Sequence[IndexEntry]) -> None:
        """Record persisted blocks; durable when this returns."""
        if entries:
            await asyncio.to_thread(self._put, entries)

    async def delete(self, entries: Sequence[tuple[bytes, int | None]]) -> None:
        """Forget ``(key, offset)`` entries (offset None: whatever the key names); durable when
        this returns."""
        if entries:
            await asyncio.to_thread(self._delete, entries)

    def close(self) -> None:
        self._env.close()
