"""A second memory tier that exists only in the tests: a plugin tier, as a user would write one.

``SlowMemoryTier`` is a plain bytearray under an extent allocator, optionally slowed down by a
fixed delay per copy to stand in for a slower medium (CXL memory, a remote pool). Nothing outside
this file and the tests that name it knows it exists; a daemon places it in its stack with::

    [[plugin_tiers]]
    name = "slowmem"
    class = "slow_memory_tier:SlowMemoryTier"
    after = "dram"
    options = { capacity_bytes = "4MiB", delay_s = 0.001 }
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from kvstore.allocator import Extent, ExtentAllocator
from kvstore.config import format_bytes
from kvstore.errors import ConfigError
from kvstore.layout import Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers import ExtentTier


@dataclass(frozen=True, kw_only=True, slots=True)
class SlowMemoryConfig:
    capacity_bytes: int = 4 << 20
    alignment_bytes: int = 4096
    high_watermark: float = 0.9   # above this fill its coldest blocks are demoted...
    low_watermark: float = 0.8    # ...until below this
    delay_s: float = 0.0          # added to every read and write

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ConfigError(f"slowmem.capacity_bytes must be > 0, got {self.capacity_bytes}")
        if self.alignment_bytes <= 0 or self.alignment_bytes & (self.alignment_bytes - 1):
            raise ConfigError(f"slowmem.alignment_bytes must be a power of two, got {self.alignment_bytes}")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ConfigError(
                f"slowmem.low_watermark ({self.low_watermark}) and high_watermark ({self.high_watermark}) "
                "must satisfy 0 < low < high <= 1"
            )
        if not 0 <= self.delay_s < math.inf:
            raise ConfigError(f"slowmem.delay_s must be finite and >= 0, got {self.delay_s}")


class SlowMemoryTier(ExtentTier):
    name = "slowmem"
    kind = TierKind.DRAM          # the wire has no kind of its own for it
    capabilities = Capabilities()  # bounded host memory, not mappable by clients, gone on restart
    config_class = SlowMemoryConfig

    def __init__(self, config: SlowMemoryConfig) -> None:
        self.config = config
        self._allocator = ExtentAllocator(config.capacity_bytes, config.alignment_bytes)
        self._view = memoryview(bytearray(self._allocator.capacity_bytes))

    @classmethod
    def from_config(cls, config: SlowMemoryConfig) -> SlowMemoryTier:
        return cls(config)

    @property
    def description(self) -> str:
        return f"slowmem {format_bytes(self.capacity_bytes)} (+{self.config.delay_s * 1e3:g} ms per copy)"

    async def write(self, extent: Extent, offset: int, data: memoryview) -> None:
        self._check_range(extent, offset, data.nbytes)
        await self._wait()
        start = extent.offset + offset
        self._view[start : start + data.nbytes] = data.cast("B")

    async def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        self._check_range(extent, offset, out.nbytes)
        await self._wait()
        start = extent.offset + offset
        out.cast("B")[:] = self._view[start : start + out.nbytes]

    async def _wait(self) -> None:
        if self.config.delay_s:
            await asyncio.sleep(self.config.delay_s)

    async def close(self) -> None:
        self._view.release()
