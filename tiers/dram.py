"""DRAM tier: one preallocated host-memory arena with an extent allocator.

The arena is a single shared mapping of a memfd (anonymous shared memory on systems without
memfd), sized once at start-up. Blocks are extents inside it: no per-block Python objects hold
data, and a block's bytes can be handed out as a zero-copy memoryview. ``fd`` is the memfd, which
the daemon hands to same-host clients so they map the same pages.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import logging
import mmap
import os
import threading

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.config import DramConfig, format_bytes
from kvstore.errors import ConfigError
from kvstore.layout import Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import MemoryTier, address_of

log = logging.getLogger("kvstore.tiers.dram")

POPULATE_CHUNK_BYTES = 64 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def _libc_madvise():
    """libc's ``madvise``, called without the GIL (ctypes releases it); None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def map_shared_memory(size: int, flags: int) -> tuple[mmap.mmap, int]:
    """A shared mapping of ``size`` bytes, and the memfd behind it (-1 where the system has no
    memfd): the arena, and the windows of same-host sessions."""
    if not hasattr(os, "memfd_create"):
        return mmap.mmap(-1, size, flags=flags), -1
    fd = os.memfd_create("kvstore-dram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Clients get this fd: sealed, none of them can shrink the arena under everyone (SIGBUS).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return mmap.mmap(fd, size, flags=flags), fd
    except BaseException:
        os.close(fd)
        raise


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the machine's, or its cgroup's limit if lower (None when
    neither can be read)."""
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:  # "max", or v1's "no limit" near 2**63
            limits.append(int(value))
    return min(limits) if limits else None


class DramTier(MemoryTier):
    name = "dram"
    kind = TierKind.DRAM
    capabilities = Capabilities(mappable=True)
    config_class = DramConfig

    def __init__(self, config: DramConfig) -> None:
        self.config = config
        self._allocator = ExtentAllocator(config.capacity_bytes, config.alignment_bytes)
        size = self._allocator.capacity_bytes
        limit = memory_limit_bytes()
        if limit is not None and size > limit:
            raise ConfigError(
                f"dram.capacity_bytes={format_bytes(size)} is more than this machine can hold "
                f"({format_bytes(limit)} of memory for this process); lower --dram-bytes"
            )
        flags = mmap.MAP_SHARED
        if config.prefault and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE
        try:
            self._mmap, self.fd = map_shared_memory(size, flags)
        except OSError as exc:
            raise ConfigError(
                f"dram.capacity_bytes={size}: cannot map a host-memory arena that large ({exc.strerror})"
            ) from None
        self._view = memoryview(self._mmap)
        self.prefaulted = config.prefault
        self._populating = threading.Lock()
        self._unmapped = False

    @classmethod
    def from_config(cls, config: DramConfig) -> DramTier:
        return cls(config)

    def warm(self) -> None:
        """Fault the whole arena in, writable, a chunk at a time (``MADV_POPULATE_WRITE``: pages
        are allocated, never written, so blocks already stored keep their bytes). Then clients
        that attach map it populated too."""
        if self.prefaulted or not self.config.populate:
            return
        size = self._allocator.capacity_bytes
        try:
            for start in range(0, size, POPULATE_CHUNK_BYTES):
                with self._populating:
                    if self._unmapped:
                        return
                    self._populate(start, min(POPULATE_CHUNK_BYTES, size - start))
        except (OSError, ValueError) as exc:
            log.info("the DRAM arena is not populated ahead of use (%s): first writes fault pages in", exc)
            return
        self.prefaulted = True
        log.info("DRAM arena populated (%s)", format_bytes(size))

    def _populate(self, start: int, length: int) -> None:
        """``MADV_POPULATE_WRITE`` of a range, through libc where it can be called: Python's
        ``mmap.madvise`` holds the GIL for the whole call, which would stall the daemon's event
        loop for every chunk (the first put into a fresh daemon waited 0.4-1 s for 1 GiB)."""
        if _madvise is None:
            self._mmap.madvise(_MADV_POPULATE_WRITE, start, length)
            return
        if _madvise(ctypes.c_void_p(self.base_address + start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    @property
    def description(self) -> str:
        return f"dram {format_bytes(self.capacity_bytes)}" + (" (prefaulted)" if self.config.prefault else "")

    def view(self, extent: Extent, nbytes: int) -> memoryview:
        return self._view[extent.offset : extent.offset + nbytes]

    @property
    def base_address(self) -> int:
        """Where the arena starts in this process (for registering it with a transfer library)."""
        return address_of(self._view)

    async def close(self) -> None:
        self.unmap()

    def unmap(self) -> None:
        with self._populating:   # a populate in progress stops at its chunk: never on unmapped memory
            self._unmapped = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            # A cancelled reader's views may outlive its call until the collector runs.
            gc.collect()
            try:
                self._mmap.close()
            except BufferError:
                log.warning("DRAM arena still has views alive; it is unmapped when the last one goes")
