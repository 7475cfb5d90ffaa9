"""The NVMe tier's persistent index in LMDB: key -> where the block is and how to verify it.

One entry per persisted block, written in one synchronous transaction per batch *after* the
block's bytes were written and flushed (``fdatasync``), and deleted *before* its extent can be
reused. So after a crash every entry points at bytes that reached the disk, and a restart rebuilds
the tier from this index alone, without reading the data.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb
import numpy as np

from kvstore.block import StoredBlocks

_VALUE = struct.Struct("<QQQQd")  # offset, length, size, checksum, last use (unix time); then the namespace
_FIELDS = np.dtype([("offset", "<u8"), ("length", "<u8"), ("size", "<u8"), ("checksum", "<u8"), ("last_use", "<f8")])


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
        os.makedirs(path, mode=0o700, exist_ok=True)
        # mode: LMDB's data and lock files, 0600 (its default is 0644: every key and namespace).
        self._env = lmdb.open(path, map_size=map_bytes, subdir=True, sync=True, metasync=True, max_dbs=0, mode=0o600)

    def scan(self) -> StoredBlocks:
        """Every entry, as columns (a restart's one read of the index): the values are parsed in
        bulk when they have one length (one namespace length), entry by entry otherwise."""
        with self._env.begin() as txn:
            cursor = txn.cursor()
            keys = list(cursor.iternext(keys=True, values=False))
            cursor.first()
            values = list(cursor.iternext(keys=False, values=True))
        n = len(values)
        if not n or n != len(keys):
            return StoredBlocks.empty()
        widths = set(map(len, values))
        if len(widths) == 1 and (width := widths.pop()) >= _VALUE.size:
            raw = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, width)
            fixed = np.ascontiguousarray(raw[:, : _VALUE.size]).view(_FIELDS).ravel()
            if width == _VALUE.size:
                namespaces, ids = [b""], np.zeros(n, dtype=np.int64)
            else:
                tails = np.ascontiguousarray(raw[:, _VALUE.size :]).view(np.dtype((np.void, width - _VALUE.size)))
                distinct, ids = np.unique(tails.ravel(), return_inverse=True)
                namespaces = [bytes(d) for d in distinct]
        else:
            fixed = np.array([_VALUE.unpack_from(v) for v in values], dtype=_FIELDS) if n else np.zeros(0, _FIELDS)
            ids_of: dict[bytes, int] = {}
            ids = np.array([ids_of.setdefault(v[_VALUE.size :], len(ids_of)) for v in values], dtype=np.int64)
            namespaces = list(ids_of)
        return StoredBlocks(
            keys, offsets=fixed["offset"].astype(np.int64), lengths=fixed["length"].astype(np.int64),
            sizes=fixed["size"].astype(np.int64), checksums=fixed["checksum"], last_use=fixed["last_use"],
            namespaces=namespaces, namespace_ids=ids.astype(np.int64),
        )

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
