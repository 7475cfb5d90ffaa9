"""One contract for every tier: a new tier inherits the whole behaviour spec by joining the list."""

from __future__ import annotations

import os

import pytest

from kvstore.config import DramConfig, NvmeConfig
from kvstore.tier_kind import TierKind
from kvstore.tiers import PersistentTier, create_tier
from kvstore.tiers.nvme_index import IndexEntry

MiB = 1 << 20


def make(kind: str, tmp_path, capacity: int = 8 * MiB):
    if kind == "dram":
        return create_tier(TierKind.DRAM, DramConfig(capacity_bytes=capacity))
    if kind == "nvme":
        return create_tier(TierKind.NVME, NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=capacity))
    if kind == "nvme-buffered":
        return create_tier(TierKind.NVME, NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=capacity, direct_io=False))
    if kind == "hbm":
        from kvstore.tiers.hbm import HbmConfig

        return create_tier(TierKind.HBM, HbmConfig(capacity_bytes=capacity))
    raise AssertionError(kind)


TIERS = ["dram", "nvme", "nvme-buffered", pytest.param("hbm", marks=pytest.mark.gpu)]


@pytest.fixture(params=TIERS)
async def tier(request, tmp_path):
    t = make(request.param, tmp_path)
    yield t
    await t.close()


async def test_reserve_accounts_in_aligned_extents_and_refuses_when_full(tier):
    assert tier.used_bytes == 0 and tier.capacity_bytes == 8 * MiB
    a = tier.reserve(1)
    b = tier.reserve(MiB + 1)
    assert a.length == tier.footprint(1) and b.length == tier.footprint(MiB + 1) >= MiB + 1
    assert tier.used_bytes == a.length + b.length
    assert tier.reserve(8 * MiB) is None
    tier.release(b)
    assert tier.used_bytes == a.length
    assert tier.largest_free_after([a]) == tier.capacity_bytes  # a dry run: nothing changes
    assert tier.used_bytes == a.length


async def test_bytes_round_trip_at_any_offset(tier):
    extent = tier.reserve(3 * MiB)
    payload = os.urandom(3 * MiB)
    await tier.write(extent, 0, memoryview(payload))
    out = bytearray(3 * MiB)
    await tier.read_into(extent, 0, memoryview(out))
    assert out == payload
    # Unaligned pieces (O_DIRECT tiers go through an aligned bounce buffer for these).
    await tier.write(extent, 4097, memoryview(b"x" * 5000))
    expected = payload[:4097] + b"x" * 5000 + payload[4097 + 5000 :]
    piece = bytearray(10_000)
    await tier.read_into(extent, 3000, memoryview(piece))
    assert piece == expected[3000:13_000]
    assert bytes(await tier.read(extent, 0, 3 * MiB)) == expected


async def test_ranges_outside_an_extent_are_refused(tier):
    extent = tier.reserve(4096)
    with pytest.raises(ValueError):
        await tier.write(extent, 4000, memoryview(b"y" * 200))
    with pytest.raises(ValueError):
        await tier.read_into(extent, -1, memoryview(bytearray(10)))


@pytest.mark.parametrize("kind", ["nvme", "nvme-buffered"])
async def test_persistent_tiers_recover_exactly_what_was_indexed(kind, tmp_path):
    tier = make(kind, tmp_path)
    assert isinstance(tier, PersistentTier) and tier.recovered == []
    kept, forgotten, unindexed = tier.reserve(MiB), tier.reserve(MiB), tier.reserve(MiB)
    for extent in (kept, forgotten, unindexed):
        await tier.write(extent, 0, memoryview(os.urandom(MiB)))
    await tier.persist([
        IndexEntry(b"kept", kept.offset, kept.length, MiB - 10, 111, 1.0),
        IndexEntry(b"forgotten", forgotten.offset, forgotten.length, MiB, 222, 2.0),
    ])
    await tier.forget([(b"forgotten", forgotten.offset), (b"kept", kept.offset + 4096)])  # 2nd: stale offset
    await tier.close()

    again = make(kind, tmp_path)
    try:
        assert [(e.key, e.offset, e.size, e.checksum) for e in again.recovered] == [(b"kept", kept.offset, MiB - 10, 111)]
        assert again.used_bytes == kept.length  # the unindexed and forgotten extents are free again
        assert again.reserve(7 * MiB) is not None
    finally:
        await again.close()


async def test_one_nvme_directory_serves_one_daemon(tmp_path):
    from kvstore import ConfigError

    first = make("nvme", tmp_path)
    try:
        with pytest.raises(ConfigError, match="in use by another kvstore daemon"):
            make("nvme", tmp_path)
    finally:
        await first.close()
    again = make("nvme", tmp_path)  # the lock went with the first
    await again.close()
