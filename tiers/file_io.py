"""Positional file I/O for the NVMe tier: kvikio when a CUDA driver is present, POSIX otherwise.

Both engines read and write whole extents at explicit offsets of one large file and run the
blocking calls in a bounded pool of threads of their own, so the event loop never waits on a disk.

- :class:`PosixFileIO`: ``os.pwritev`` / ``os.preadv`` on a file opened with ``O_DIRECT`` when the
  filesystem allows it (page cache bypassed; buffers and offsets 4 KiB aligned, with an aligned
  bounce buffer for the rare unaligned caller), buffered otherwise. Large transfers are split
  across the threads.
- :class:`KvikioFileIO`: ``kvikio.CuFile`` (GPUDirect Storage where the system has it, kvikio's
  POSIX compatibility mode otherwise). kvikio needs a CUDA driver even for host buffers, so it is
  chosen only when one answers.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.config import IoEngine
from kvstore.errors import ConfigError

DIRECT_ALIGN = 4096
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
SPLIT_BYTES = 4 << 20
RUN_BYTES = 8 << 20
"""The most bytes one vectored write of back-to-back blocks carries."""
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def _aligned(view: memoryview, offset: int) -> bool:
    """O_DIRECT wants the file offset, the length and the memory address all 4 KiB aligned."""
    if offset % DIRECT_ALIGN or view.nbytes % DIRECT_ALIGN:
        return False
    try:   # writable buffers (the arena's views): a sixth of numpy's cost, once per block
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    return address % DIRECT_ALIGN == 0


class PosixFileIO:
    name = "posix"

    def __init__(self, path: str, *, threads: int, direct: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError:
                self._fd = os.open(path, flags, 0o600)  # tmpfs and friends refuse O_DIRECT
        else:
            self._fd = os.open(path, flags, 0o600)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvstore-nvme")
        self.threads = threads

    @property
    def description(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered"
        return f"POSIX pread/pwrite ({mode}, {self.threads} threads)"

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def preallocate(self, nbytes: int) -> None:
        if self.size() >= nbytes:
            return
        try:
            os.posix_fallocate(self._fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise  # out of space: refused, not a sparse file that fails later
            os.ftruncate(self._fd, nbytes)  # filesystems without fallocate: sparse

    async def write(self, offset: int, data: memoryview) -> None:
        await self._run(os.pwritev, offset, data)

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self._run(os.preadv, offset, out)

    async def write_many(self, items: list[tuple[int, memoryview]]) -> list[BaseException | None]:
        """Many blocks in few system calls: blocks that lie back to back in the file (a batch's
        extents usually do) go out as one ``pwritev`` of up to :data:`RUN_BYTES`, and the runs
        are shared among the threads. Under ``O_DIRECT`` that is one large device write instead of
        one per block (256 blocks of 16 KiB: about 10x the blocks/s here). An error fails every
        block of its run; blocks that need the bounce buffer go their own way. Returns once every
        thread is done."""
        outcomes: list[BaseException | None] = [None] * len(items)
        direct = sorted((i for i, (offset, view) in enumerate(items) if not self.direct or _aligned(view, offset)),
                        key=lambda i: items[i][0])
        runs: list[list[int]] = []
        end = run_bytes = -1
        for i in direct:
            offset, view = items[i]
            if offset == end and run_bytes + view.nbytes <= RUN_BYTES and len(runs[-1]) < _IOV_MAX:
                runs[-1].append(i)
                run_bytes += view.nbytes
            else:
                runs.append([i])
                run_bytes = view.nbytes
            end = offset + view.nbytes

        def write_runs(group: list[list[int]]) -> None:
            for run in group:
                try:
                    _all_vectored(self._fd, [items[i][1] for i in run], items[run[0]][0])
                except OSError as exc:
                    for i in run:
                        outcomes[i] = exc

        loop = asyncio.get_running_loop()
        share = max(1, -(-len(runs) // self.threads))
        groups = [runs[start : start + share] for start in range(0, len(runs), share)]
        await _all_threads([loop.run_in_executor(self._pool, write_runs, g) for g in groups])
        in_pool = set(direct)
        rest = [i for i in range(len(items)) if i not in in_pool]
        for i, outcome in zip(rest, await asyncio.gather(*(self.write(*items[i]) for i in rest), return_exceptions=True)):
            outcomes[i] = outcome
        return outcomes

    async def _run(self, op, offset: int, view: memoryview) -> None:
        if not self.direct or _aligned(view, offset):
            await self._run_parts(op, offset, view)
            return
        bounce = _Bounce(view, offset)
        if op is os.pwritev:
            if bounce.needs_edges:  # keep the bytes around the caller's range
                await self._run_parts(os.preadv, bounce.offset, bounce.view)
            bounce.fill()
            await self._run_parts(os.pwritev, bounce.offset, bounce.view)
        else:
            await self._run_parts(os.preadv, bounce.offset, bounce.view)
            bounce.drain()

    async def _run_parts(self, op, offset: int, view: memoryview) -> None:
        """Every part in the pool; returns (or raises the first error) only once no thread touches
        ``view`` or the file range any more, even when cancelled."""
        loop = asyncio.get_running_loop()
        parts = [(offset + start, view[start : start + SPLIT_BYTES]) for start in range(0, view.nbytes, SPLIT_BYTES)]
        outcomes = await _all_threads([loop.run_in_executor(self._pool, _all, op, self._fd, part, at) for at, part in parts])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def sync(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, os.fdatasync, self._fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._fd)


async def _all_threads(jobs: list[asyncio.Future]) -> list:
    """The outcomes of pool jobs (results or exceptions), once every one has finished: a caller
    cancelled meanwhile waits for the threads too, so none still touches its buffers."""
    running = asyncio.gather(*jobs, return_exceptions=True)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


def _all(op, fd: int, view: memoryview, offset: int) -> None:
    """Repeat a positional read or write until every byte is done (they may return short)."""
    done = 0
    while done < view.nbytes:
        n = op(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{op.__name__} moved no bytes at offset {offset + done} (end of file?)")
        done += n


def _all_vectored(fd: int, views: list[memoryview], offset: int) -> None:
    """``pwritev`` of ``views`` back to back from ``offset``, repeated until every byte is out."""
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(f"pwritev moved no bytes at offset {offset}")
        offset += n
        while views and n >= views[0].nbytes:   # drop the buffers written whole
            n -= views[0].nbytes
            views = views[1:]
        if n:
            views = [views[0][n:], *views[1:]]


class _Bounce:
    """An aligned buffer standing in for an unaligned caller buffer under O_DIRECT."""

    def __init__(self, target: memoryview, offset: int) -> None:
        self.target = target
        self.offset = offset - offset % DIRECT_ALIGN
        self.lead = offset - self.offset
        end = offset + target.nbytes
        length = -(-(end - self.offset) // DIRECT_ALIGN) * DIRECT_ALIGN
        self.needs_edges = self.lead != 0 or length != self.lead + target.nbytes
        self._map = mmap.mmap(-1, length)
        self.view = memoryview(self._map)

    def fill(self) -> None:
        self.view[self.lead : self.lead + self.target.nbytes] = self.target

    def drain(self) -> None:
        self.target[:] = self.view[self.lead : self.lead + self.target.nbytes]


class KvikioFileIO:
    name = "kvikio"

    def __init__(self, path: str, *, threads: int) -> None:
        import kvikio
        import kvikio.defaults

        kvikio.defaults.set({"num_threads": threads})
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))   # created private, as on POSIX
        self._file = kvikio.CuFile(path, "r+")
        self._path = path
        self._compat = kvikio.defaults.get("compat_mode")
        self.threads = threads

    @property
    def description(self) -> str:
        return f"kvikio CuFile (compat mode {self._compat}, {self.threads} threads)"

    def size(self) -> int:
        return os.path.getsize(self._path)

    def preallocate(self, nbytes: int) -> None:
        if self.size() < nbytes:
            with open(self._path, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                except OSError as exc:
                    if exc.errno not in _NO_FALLOCATE:
                        raise
                    f.truncate(nbytes)

    async def write(self, offset: int, data: memoryview) -> None:
        future = self._file.pwrite(data, data.nbytes, offset)
        await asyncio.to_thread(future.get)

    async def write_many(self, items: list[tuple[int, memoryview]]) -> list[BaseException | None]:
        return list(await asyncio.gather(*(self.write(offset, view) for offset, view in items), return_exceptions=True))

    async def read_into(self, offset: int, out: memoryview) -> None:
        future = self._file.pread(out, out.nbytes, offset)
        await asyncio.to_thread(future.get)

    async def sync(self) -> None:
        def fsync() -> None:
            fd = os.open(self._path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(fsync)

    def close(self) -> None:
        self._file.close()


def cuda_driver_present() -> bool:
    """True when a CUDA driver answers (kvikio cannot do host I/O without one)."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def open_file_io(
    path: str, *, threads: int, direct: bool, engine: IoEngine = IoEngine.AUTO
) -> PosixFileIO | KvikioFileIO:
    """kvikio when asked for, or on ``auto`` when it is installed and a CUDA driver is present."""
    engine = IoEngine(engine)
    if engine is IoEngine.KVIKIO or (engine is IoEngine.AUTO and cuda_driver_present()):
        try:
            return KvikioFileIO(path, threads=threads)
        except ImportError:
            if engine is IoEngine.KVIKIO:
                raise ConfigError(
                    "nvme.io_engine=kvikio: kvikio is not installed (pip install -e '.[gpu]'), or use auto/posix"
                ) from None
    return PosixFileIO(path, threads=threads, direct=direct)
