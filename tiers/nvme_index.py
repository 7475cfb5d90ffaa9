"""The NVMe tier's persistent index in LMDB: where each block is and how to verify it.

One entry per persisted block, keyed by the offset of its extent in the data file (8 bytes, big
endian, so a batch of back-to-back extents touches a few B-tree pages, not one per block: a
synchronous commit of 256 entries is about 0.5 ms here against 2.4 ms keyed by block key).
Entries are committed in one synchronous transaction per batch, while the bytes are written and
flushed, and deleted *before* an extent can be reused. Every read from the tier is verified, so
an entry committed just before a crash that its bytes did not survive is a miss, never wrong
data; a restart rebuilds the tier from this index alone, without reading the data.

Format 2 (this one): key ``>Q`` offset; value ``<QQQdH`` (length, size, XXH3-64, last use, index
key length), the index key, the namespace; plus one :data:`_FORMAT_KEY` entry. Format 1 (before
this one) keyed by index key, value ``<QQQQd`` (offset, length, size, XXH3-64, last use) + namespace;
an index in it is converted once, in one transaction, when it is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb
import numpy as np

from kvstore.block import StoredBlocks

log = logging.getLogger("kvstore.tiers.nvme")

FORMAT = 2
_FORMAT_KEY = b"\xff" * 8 + b"kvstore-format"   # sorts after every offset
_OFFSET = struct.Struct(">Q")
_VALUE = struct.Struct("<QQQdH")    # length, size, checksum, last use (unix time), key length
_FIELDS = np.dtype([("length", "<u8"), ("size", "<u8"), ("checksum", "<u8"), ("last_use", "<f8"), ("key_len", "<u2")])
_V1_VALUE = struct.Struct("<QQQQd")  # format 1: offset, length, size, checksum, last use; then the namespace


@dataclass(frozen=True, slots=True)
class IndexEntry:
    key: bytes
    offset: int
    length: int
    size: int
    checksum: int
    last_use: float
    namespace: bytes = b""

    def value(self) -> bytes:
        return _VALUE.pack(self.length, self.size, self.checksum, self.last_use, len(self.key)) + self.key + self.namespace


class NvmeIndex:
    def __init__(self, path: str, map_bytes: int) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        # mode: LMDB's data and lock files, 0600 (its default is 0644: every key and namespace).
        self._env = lmdb.open(path, map_size=map_bytes, subdir=True, sync=True, metasync=True, max_dbs=0, mode=0o600)
        # Write transactions in flight (in worker threads): close waits for them. LMDB's binding
        # closing the environment under one never returns (the transaction, invalidated, cannot
        # end), so none may start once closing has begun.
        self._writes = threading.Condition()
        self._writing = 0
        self._closed = False
        try:
            self._upgrade()
        except BaseException:
            self._env.close()
            raise

    def _upgrade(self) -> None:
        """Mark a new index with its format; convert one of format 1, in one transaction (a crash
        midway leaves it as it was)."""
        with self._env.begin() as txn:
            version = txn.get(_FORMAT_KEY)
        if version is not None:
            if int(version) != FORMAT:
                raise lmdb.Error(f"the index is in format {int(version)}; this version reads format {FORMAT}")
            return
        # The old entries and the new ones live side by side until the commit: room for both.
        info, page = self._env.info(), self._env.stat()["psize"]
        need = 3 * (info["last_pgno"] + 1) * page + (1 << 20)
        if info["map_size"] < need:
            self._env.set_mapsize(need)
        with self._env.begin(write=True) as txn:
            old = list(txn.cursor().iternext())
            for key, value in old:
                txn.delete(key)
            for key, value in old:
                offset, length, size, checksum, last_use = _V1_VALUE.unpack_from(value)
                entry = IndexEntry(key, offset, length, size, checksum, last_use, value[_V1_VALUE.size :])
                txn.put(_OFFSET.pack(offset), entry.value())
            txn.put(_FORMAT_KEY, str(FORMAT).encode())
        if old:
            log.info("converted an NVMe index of %d entries to format %d", len(old), FORMAT)

    def scan(self) -> StoredBlocks:
        """Every entry, as columns (a restart's one read of the index), by offset: parsed in bulk
        when the values have one length (one key and one namespace length), entry by entry
        otherwise."""
        with self._env.begin() as txn:
            cursor = txn.cursor()
            offsets = list(cursor.iternext(keys=True, values=False))
            cursor.first()
            values = list(cursor.iternext(keys=False, values=True))
        if offsets and offsets[-1] == _FORMAT_KEY:
            offsets.pop()
            values.pop()
        if any(len(k) != _OFFSET.size for k in offsets):   # written by an older version after the conversion
            pairs = [(k, v) for k, v in zip(offsets, values) if len(k) == _OFFSET.size]
            log.warning("%d index entries not in format %d (an older kvstore ran on this directory) were ignored",
                        len(offsets) - len(pairs), FORMAT)
            offsets, values = [k for k, _ in pairs], [v for _, v in pairs]
        n = len(values)
        if not n or n != len(offsets):
            return StoredBlocks.empty()
        at = np.frombuffer(b"".join(offsets), dtype=">u8").astype(np.int64)
        widths = set(map(len, values))
        width = widths.pop() if len(widths) == 1 else 0
        raw = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, width) if width >= _VALUE.size else None
        fixed = np.ascontiguousarray(raw[:, : _VALUE.size]).view(_FIELDS).ravel() if raw is not None else None
        if fixed is not None and (fixed["key_len"] == fixed["key_len"][0]).all():
            key_end = _VALUE.size + int(fixed["key_len"][0])
            blob = np.ascontiguousarray(raw[:, _VALUE.size : key_end]).tobytes()
            step = key_end - _VALUE.size
            keys = [blob[i : i + step] for i in range(0, n * step, step)]
            if width == key_end:
                namespaces, ids = [b""], np.zeros(n, dtype=np.int64)
            else:
                tails = np.ascontiguousarray(raw[:, key_end:]).view(np.dtype((np.void, width - key_end)))
                distinct, ids = np.unique(tails.ravel(), return_inverse=True)
                namespaces = [bytes(d) for d in distinct]
        else:
            fixed = np.array([_VALUE.unpack_from(v) for v in values], dtype=_FIELDS)
            ends = [_VALUE.size + int(k) for k in fixed["key_len"].tolist()]
            keys = [v[_VALUE.size : end] for v, end in zip(values, ends)]
            ids_of: dict[bytes, int] = {}
            ids = np.array([ids_of.setdefault(v[end:], len(ids_of)) for v, end in zip(values, ends)], dtype=np.int64)
            namespaces = list(ids_of)
        return StoredBlocks(
            keys, offsets=at, lengths=fixed["length"].astype(np.int64),
            sizes=fixed["size"].astype(np.int64), checksums=fixed["checksum"], last_use=fixed["last_use"],
            namespaces=namespaces, namespace_ids=ids.astype(np.int64).ravel(),
        )

    @contextlib.contextmanager
    def _write(self):
        """A write transaction, counted for :meth:`close`."""
        with self._writes:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, "the NVMe index is closed")
            self._writing += 1
        try:
            with self._env.begin(write=True) as txn:
                yield txn
        finally:
            with self._writes:
                self._writing -= 1
                self._writes.notify_all()

    def _put(self, entries: Sequence[IndexEntry]) -> None:
        with self._write() as txn:
            for e in entries:
                txn.put(_OFFSET.pack(e.offset), e.value())

    def _delete(self, entries: Sequence[tuple[bytes, int]]) -> None:
        with self._write() as txn:
            for key, offset in entries:
                at = _OFFSET.pack(offset)
                value = txn.get(at)
                if value is not None and value[_VALUE.size : _VALUE.size + len(key)] == key and (
                    _VALUE.unpack_from(value)[4] == len(key)
                ):
                    txn.delete(at)

    async def put(self, entries: Sequence[IndexEntry]) -> None:
        """Record persisted blocks (an entry replaces whatever named its offset); durable when
        this returns."""
        if entries:
            await asyncio.to_thread(self._put, entries)

    async def delete(self, entries: Sequence[tuple[bytes, int]]) -> None:
        """Forget ``(key, offset)`` entries, each only while it still names that block; durable
        when this returns."""
        if entries:
            await asyncio.to_thread(self._delete, entries)

    def close(self) -> None:
        """Close once the write transactions in flight have ended (a move cancelled at shutdown may
        still be committing in a thread); later ones fail with ESHUTDOWN."""
        with self._writes:
            self._closed = True
            self._writes.wait_for(lambda: self._writing == 0)
        self._env.close()
