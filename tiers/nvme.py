"""NVMe tier: one large preallocated file under a directory, an extent allocator over it, and a
persistent LMDB index beside it.

Layout of ``nvme.dir``::

    blocks.dat   the data file, ``capacity_bytes`` long, preallocated; extents 4 KiB aligned
    index/       LMDB: extent offset -> (length, size, checksum, last use, key, namespace)

Durability protocol: a write-through or demotion batch writes and flushes (``fdatasync``) the
blocks' bytes while their index entries are committed (a synchronous LMDB transaction); the
caller hears of a block once both are done. An entry is deleted before its extent can be reused,
and the entry of a block whose write failed is deleted before its extent is given back. After a
crash an entry may name bytes that did not reach the disk: every read is verified against the
stored checksum, so such a block (like one whose bytes rotted on disk) is a miss, never wrong
data. A restart rebuilds the allocator and the daemon's index from LMDB alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import stat
import time
from collections.abc import Sequence

import lmdb
import numpy as np

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.block import BlockRecord, StoredBlocks
from kvstore.checksum import checksum
from kvstore.config import NvmeConfig, format_bytes
from kvstore.errors import ConfigError, IntegrityError
from kvstore.layout import Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import ExtentTier
from kvstore.tiers.file_io import open_file_io
from kvstore.tiers.nvme_index import IndexEntry, NvmeIndex
from kvstore.tiers.seal import FRAME_BYTES, NVME_SECRET_ENV, Sealer, load_secrets

log = logging.getLogger("kvstore.tiers.nvme")

DATA_FILE = "blocks.dat"
INDEX_DIR = "index"


class NvmeTier(ExtentTier):
    name = "nvme"
    kind = TierKind.NVME
    capabilities = Capabilities(persistent=True)
    config_class = NvmeConfig

    def __init__(self, config: NvmeConfig) -> None:
        self.config = config
        self._sealer = _sealer(config)   # before anything opens: a bad secret leaves nothing behind
        self._overhead = FRAME_BYTES if self._sealer is not None else 0
        directory = config.resolved_dir()
        self._lock_fd = -1
        self._io = None
        try:
            private_directory(directory)
            self._lock_fd = _lock(directory)
            self._allocator = ExtentAllocator(config.capacity_bytes, config.alignment_bytes)
            self._io = open_file_io(
                os.path.join(directory, DATA_FILE), threads=config.io_threads, direct=config.direct_io,
                engine=config.io_engine,
            )
            _check_space(directory, os.path.join(directory, DATA_FILE), self._allocator.capacity_bytes)
            self._io.preallocate(self._allocator.capacity_bytes)
            self._index = NvmeIndex(os.path.join(directory, INDEX_DIR), config.index_map_bytes)
        except (OSError, lmdb.Error) as exc:
            self._close_partial()
            detail = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"nvme.dir={directory}: cannot set up the NVMe tier ({detail})") from None
        except BaseException:
            self._close_partial()
            raise
        self.directory = directory
        self._indexing = GroupCommit(self._index.put)            # index commits, shared by concurrent calls
        self._flushes = GroupCommit(lambda _: self._io.sync())   # data flushes, likewise
        self._pinned: set[int] = set()   # extents an index entry names that could not be forgotten
        self._recovered = self._recover()

    @classmethod
    def from_config(cls, config: NvmeConfig) -> NvmeTier:
        return cls(config)

    @property
    def io_description(self) -> str:
        return self._io.description

    @property
    def description(self) -> str:
        return f"nvme {format_bytes(self.capacity_bytes)} at {self.directory} via {self.io_description}"

    def recover(self) -> StoredBlocks:
        kept, self._recovered = self._recovered, StoredBlocks.empty()
        return kept

    def _recover(self) -> StoredBlocks:
        """Entries of a previous run whose extents fit this tier; their extents are re-reserved.
        One bulk read of the index and array checks; an entry is dropped when its extent is
        misaligned, outside the file, or overlaps one kept before it (by offset)."""
        found = self._one_per_key(self._index.scan())
        order = np.argsort(found.offsets)
        offsets, lengths = found.offsets[order], found.lengths[order]
        align, capacity = self._allocator.alignment_bytes, self._allocator.capacity_bytes
        fits = (offsets % align == 0) & (lengths % align == 0) & (lengths > 0) & (offsets + lengths <= capacity)
        if fits.all() and (offsets[1:] >= offsets[:-1] + lengths[:-1]).all():
            self._allocator.rebuild_sorted(offsets, lengths)
            return found
        keep, end = [], 0
        for i, ok in zip(order.tolist(), fits.tolist()):   # the greedy pass, for a damaged index
            offset = int(found.offsets[i])
            if ok and offset >= end:
                keep.append(i)
                end = offset + int(found.lengths[i])
        dropped = np.setdiff1d(order, keep)
        log.warning("%d index entries outside this tier's capacity or overlapping were dropped", len(dropped))
        self._index._delete([(found.keys[i], int(found.offsets[i])) for i in dropped.tolist()])
        kept = found.subset(np.array(keep, dtype=np.int64))
        self._allocator.rebuild_sorted(kept.offsets, kept.lengths)
        return kept

    def _one_per_key(self, found: StoredBlocks) -> StoredBlocks:
        """Entries with one key each. A crash between a block's new entry and the forgetting of an
        older one can leave two (rare: read at start): the newest whose bytes verify is kept (the
        newest may be one whose bytes never reached the disk), the others are deleted."""
        if len(set(found.keys)) == len(found):
            return found
        by_key: dict[bytes, list[int]] = {}
        for i in np.argsort(-found.last_use, kind="stable").tolist():
            by_key.setdefault(found.keys[i], []).append(i)
        keep = []
        for entries in by_key.values():
            if len(entries) == 1:
                keep.append(entries[0])
                continue
            good = next((i for i in entries if self._verifies(found, i)), None)
            if good is not None:
                keep.append(good)
        keep_at = np.array(sorted(keep), dtype=np.int64)
        dropped = np.setdiff1d(np.arange(len(found)), keep_at)
        log.warning("%d index entries named a block another entry names too: all but the newest that verifies "
                    "were dropped", len(dropped))
        self._index._delete([(found.keys[i], int(found.offsets[i])) for i in dropped.tolist()])
        return found.subset(keep_at)

    def _verifies(self, found: StoredBlocks, i: int) -> bool:
        """Whether entry ``i``'s extent holds its block (read through the page cache, at start)."""
        offset, length, size = int(found.offsets[i]), int(found.lengths[i]), int(found.sizes[i])
        with open(os.path.join(self.directory, DATA_FILE), "rb") as data:
            data.seek(offset)
            stored = data.read(length)
        if self._sealer is not None:
            stored = self._sealer.open_frame(_label(Extent(offset, length)), stored, length - self._overhead)
            if stored is None:
                return False
        return len(stored) >= size and checksum(memoryview(stored)[:size]) == int(found.checksums[i])

    # With nvme.encrypt an extent holds a sealed frame (secret id, nonce, ciphertext, tag) bound
    # to its offset and length: blocks are written and read whole, through a buffer.

    def footprint(self, nbytes: int) -> int:
        return self._allocator.round_up(nbytes + self._overhead)

    def reserve(self, record: BlockRecord) -> Extent | None:
        return self._allocator.allocate(record.size + self._overhead)

    def reserve_many(self, sizes: Sequence[int]) -> list[Extent]:
        return super().reserve_many([size + self._overhead for size in sizes])

    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        if self._sealer is not None:
            if offset != 0:
                raise ValueError("an encrypted NVMe block is written whole, in one call")
            failure = (await self.write_many([(extent, data)]))[0]
            if failure is not None:
                raise failure
            return
        self._check_range(extent, offset, data.nbytes)
        await self._io.write(extent.offset + offset, data)

    async def write_many(self, items: Sequence[tuple[Extent, memoryview]]) -> list[BaseException | None]:
        if self._sealer is None:
            for extent, data in items:
                self._check_range(extent, 0, data.nbytes)
            return await self._io.write_many([(extent.offset, data) for extent, data in items])
        staging = mmap.mmap(-1, max(sum(extent.length for extent, _ in items), 1))   # page aligned: O_DIRECT
        view = memoryview(staging)
        frames, at = [], 0
        for extent, _ in items:
            frames.append(view[at : at + extent.length])
            at += extent.length

        def seal() -> None:
            for (extent, data), frame in zip(items, frames):
                # The frame fills the extent: its plaintext is the block and the extent's padding
                # (callers may pass either), so a reader needs only the extent to open it.
                room = extent.length - self._overhead
                plain = data[:room] if data.nbytes >= room else bytes(data) + bytes(room - data.nbytes)
                frame[:] = self._sealer.seal_frame(_label(extent), plain)

        try:
            await asyncio.to_thread(seal)
            return await self._io.write_many([(extent.offset, frame) for (extent, _), frame in zip(items, frames)])
        finally:
            del frames
            _let_go(view, staging)

    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        if self._sealer is None:
            self._check_range(extent, offset, out.nbytes)
            await self._io.read_into(extent.offset + offset, out)
            return
        if offset != 0:
            raise ValueError("an encrypted NVMe block is read whole")
        room = extent.length - self._overhead   # the block and padding: callers may ask for either
        self._check_range(extent, 0, out.nbytes)
        staging = mmap.mmap(-1, extent.length)
        view = memoryview(staging)
        try:
            await self._io.read_into(extent.offset, view)
            plain = await asyncio.to_thread(self._sealer.open_frame, _label(extent), view, room)
            if plain is None:
                raise IntegrityError(
                    f"the NVMe block at {extent.offset} does not decrypt (damaged, or sealed with a secret not listed)"
                )
            n = min(out.nbytes, room)
            out[:n] = memoryview(plain)[:n]
        finally:
            _let_go(view, staging)

    async def persist(self, written: Sequence[tuple[BlockRecord, Extent]]) -> None:
        """Make written blocks durable: flush the data, then commit their index entries. Concurrent
        calls share one flush and one index transaction (group commit); each returns once its
        own blocks are durable."""
        if not written:
            return
        await self._flushes.add([None])
        await self._indexing.add(_entries(written))

    async def write_persisted(
        self, items: Sequence[tuple[BlockRecord, Extent, memoryview]]
    ) -> list[BaseException | None]:
        """Write, flush and index blocks, the index commit running while the data is written
        (concurrent calls share one flush and one index transaction). An entry may thus be durable
        before its bytes: safe, because every read from this tier is verified (a block whose bytes
        did not reach the disk before a crash is a miss, and dropped), and a block whose write or
        flush failed has its entry forgotten before its extent is reused (where even that fails,
        the extent stays reserved until a restart)."""
        if not items:
            return []
        indexing = asyncio.ensure_future(self._indexing.add(_entries([(r, e) for r, e, _ in items])))
        raised: BaseException | None = None
        try:
            outcomes = await self.write_many([(extent, data) for _, extent, data in items])
            if any(outcome is None for outcome in outcomes):
                try:
                    await self._flushes.add([None])
                except Exception as exc:
                    outcomes = [exc if outcome is None else outcome for outcome in outcomes]
        except BaseException as exc:   # a bug, or cancelled: none of the batch counts as written
            raised = exc
            outcomes = [exc] * len(items)
        indexed = (await asyncio.gather(indexing, return_exceptions=True))[0]
        if not isinstance(indexed, BaseException):
            await self._unindex([(record.key, extent) for (record, extent, _), outcome in zip(items, outcomes)
                                 if outcome is not None])
        if raised is not None:
            raise raised
        if isinstance(indexed, BaseException):   # nothing of the batch is indexed: all of it failed
            return [outcome if outcome is not None else indexed for outcome in outcomes]
        return outcomes

    async def _unindex(self, failed: Sequence[tuple[bytes, Extent]]) -> None:
        """Forget the entries of blocks that were not written; where that fails, keep their
        extents reserved until a restart (a reused extent would be named by a stale entry)."""
        if not failed:
            return
        try:
            await asyncio.shield(self.forget(failed))
        except BaseException as exc:
            log.error("cannot forget %d index entries of blocks not written (%s): their space is kept until restart",
                      len(failed), exc)
            self._pinned.update(extent.offset for _, extent in failed)
            if not isinstance(exc, Exception):
                raise

    def release(self, location: Extent) -> None:
        if location.offset in self._pinned:
            return   # an index entry still names it: reused, a restart would find two blocks there
        super().release(location)

    async def forget(self, dropped: Sequence[tuple[bytes, Extent]]) -> None:
        await self._index.delete([(key, extent.offset) for key, extent in dropped])

    async def close(self) -> None:
        await asyncio.to_thread(self._io.close)  # waits for in-flight I/O
        await asyncio.to_thread(self._index.close)   # and for index commits in flight
        os.close(self._lock_fd)

    def _close_partial(self) -> None:
        if self._io is not None:
            self._io.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)


class GroupCommit:
    """Batches of work that callers join while one is in flight: a caller's entries go into the
    batch that starts after it arrived, so one flush covers every byte written before it."""

    def __init__(self, run) -> None:
        self._run_batch = run
        self._pending: list = []
        self._done: asyncio.Future | None = None
        self._runner: asyncio.Task | None = None

    async def add(self, entries: list) -> None:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            self._done.add_done_callback(_retrieve)
        self._pending.extend(entries)
        done = self._done
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._drain())
        await asyncio.shield(done)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, done = self._pending, self._done
                self._pending, self._done = [], None
                try:
                    await self._run_batch(batch)
                except BaseException as exc:
                    done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    done.set_result(None)
        finally:
            self._runner = None


def _entries(written: Sequence[tuple[BlockRecord, Extent]]) -> list[IndexEntry]:
    """The index entries of blocks written to their extents, last used now."""
    now = time.time()
    return [IndexEntry(r.key, e.offset, e.length, r.size, r.checksum, now, r.namespace) for r, e in written]


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # seen by its callers; never "never retrieved" when they all went away


INDEX_RESERVE_BYTES = 8 << 20
"""Free space the LMDB index needs beside the data file to open and grow a little (on a full
filesystem LMDB dies of SIGBUS instead of failing)."""


def _check_space(directory: str, data_path: str, capacity: int) -> None:
    """Refuse, naming the setting, a data file the filesystem cannot hold."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    try:
        allocated = os.stat(data_path).st_blocks * 512
    except FileNotFoundError:
        allocated = 0
    need = max(capacity - allocated, 0) + INDEX_RESERVE_BYTES
    if need > free:
        raise ConfigError(
            f"nvme.capacity_bytes={format_bytes(capacity)} does not fit in nvme.dir={directory}: "
            f"{format_bytes(free)} free there, {format_bytes(need)} needed (lower --nvme-bytes or move --nvme-dir)"
        )


def _let_go(view: memoryview, staging: mmap.mmap) -> None:
    """Unmap a staging buffer now, or, while the I/O engine still holds views of it (a numpy
    array of an alignment check, say), when the last of them goes."""
    try:
        view.release()
        staging.close()
    except BufferError:
        pass


def _label(extent: Extent) -> bytes:
    """What an extent's frame is bound to: where it is and how long (moved elsewhere, it does not open)."""
    return b"kvstore nvme\0" + extent.offset.to_bytes(8, "little") + extent.length.to_bytes(8, "little")


def _sealer(config: NvmeConfig) -> Sealer | None:
    secrets = load_secrets(config.secret_files, setting="nvme.secret_files", env=NVME_SECRET_ENV)
    if not config.encrypt:
        return None
    if not secrets:
        raise ConfigError(f"nvme.encrypt needs a secret: nvme.secret_files or ${NVME_SECRET_ENV}")
    return Sealer(secrets, encrypt=True)


def private_directory(directory: str) -> None:
    """Create ``directory`` (and missing parents) readable by this user only, or make an existing
    one so, with every file in it 0600: blocks and the index that names every key and namespace
    are for the daemon's eyes only, whatever the umask."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"nvme.dir={directory} belongs to another user (uid {st.st_uid}); the daemon needs its own")
    if st.st_mode & 0o077:
        log.info("nvme.dir=%s was readable by others (mode %o): now 0700", directory, st.st_mode & 0o777)
        os.chmod(directory, 0o700)
    for root, dirs, files in os.walk(directory):   # symlinks are left alone: never chmod outside
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                os.chmod(path, 0o600)


def _lock(directory: str) -> int:
    """An exclusive lock on the directory for this daemon's life: two daemons on one NVMe
    directory would overwrite each other's blocks."""
    fd = os.open(os.path.join(directory, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"nvme.dir={directory} is in use by another kvstore daemon") from None
    return fd
