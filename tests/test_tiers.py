"""One contract for every tier: a new tier inherits the whole behaviour spec by joining CASES.

Each case is a tier built by name (``create_tier("nvme", config)``, or ``module:Class`` for a
plugin) against a real medium: a memfd arena, a file with and without O_DIRECT, a bucket on a
loopback S3-compatible server (moto), a GPU pool, and the tests' own plugin tier
(:mod:`slow_memory_tier`). Tests that hold for every tier run over all of them and branch only on what
the tier declares in ``capabilities``; tests of one capability (ranged I/O, probing by key,
recovery from an index, sharing) run over the cases whose class declares it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvstore.allocator import Extent
from kvstore.block import BlockRecord
from kvstore.checksum import checksum
from kvstore.config import BUILTIN_TIERS, DramConfig, HbmConfig, NvmeConfig, S3Config
from kvstore.errors import ConfigError, IntegrityError
from kvstore.keys import scoped
from kvstore.layout import Addressing, Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers import ExtentTier, KeyedTier, Location, MemoryTier, ObjectRef, ProbeInfo, Tier, create_tier, tier_class

from slow_memory_tier import SlowMemoryConfig

MiB = 1 << 20
CAPACITY = 8 * MiB
BUCKET = "kvstore-tiers"
NS = b"tenant-a"


@dataclass(frozen=True, slots=True)
class Where:
    """What a case's config may point at: the test's directory, the S3-compatible server."""

    dir: Path
    s3_url: str | None


async def corrupt_s3_object(tier: Tier, location: ObjectRef) -> None:
    """Flip the first byte of the object behind ``location``, keeping its kvstore metadata."""
    from aiobotocore.session import get_session

    name = tier.object_name(location.key, location.namespace)
    async with get_session().create_client("s3", endpoint_url=tier.config.endpoint_url, region_name="us-east-1") as raw:
        got = await raw.get_object(Bucket=BUCKET, Key=name)
        async with got["Body"] as body:
            data = await body.read()
        await raw.put_object(Bucket=BUCKET, Key=name, Body=bytes([data[0] ^ 1]) + data[1:], Metadata=got["Metadata"])


@dataclass(frozen=True, slots=True)
class Case:
    """One tier of the suite: the name it is built by, and its config for one test."""

    id: str
    path: str                                  # what create_tier is given: a built-in's name or module:Class
    config: Callable[[Where], Any]
    needs_s3: bool = False                     # the config points at the S3-compatible server
    corrupt: Callable[[Tier, Location], Awaitable[None]] | None = None  # damage stored bytes behind the tier's back
    marks: tuple = ()

    @property
    def capabilities(self) -> Capabilities:
        return tier_class(self.path).capabilities


CASES = (
    Case("dram", "dram", lambda at: DramConfig(capacity_bytes=CAPACITY)),
    Case("nvme", "nvme", lambda at: NvmeConfig(dir=str(at.dir / "nvme"), capacity_bytes=CAPACITY)),
    Case(
        "nvme-buffered", "nvme",
        lambda at: NvmeConfig(dir=str(at.dir / "nvme"), capacity_bytes=CAPACITY, direct_io=False),
    ),
    Case(
        "s3", "s3",
        # A prefix of its own per test; parts at S3's 5 MiB minimum so a 5 MiB block is multipart.
        lambda at: S3Config(
            bucket=BUCKET, endpoint_url=at.s3_url, prefix=f"{uuid.uuid4().hex[:12]}/", part_bytes=5 * MiB,
            multipart_threshold_bytes=5 * MiB, connect_timeout_s=1, read_timeout_s=3, max_attempts=2,
        ),
        needs_s3=True, corrupt=corrupt_s3_object,
    ),
    Case("hbm", "hbm", lambda at: HbmConfig(capacity_bytes=CAPACITY), marks=(pytest.mark.gpu,)),
    # A plugin tier, defined only in the tests, holds to the same contract.
    Case("slowmem", "slow_memory_tier:SlowMemoryTier", lambda at: SlowMemoryConfig(capacity_bytes=CAPACITY)),
)


def cases(where: Callable[[Capabilities], bool] = lambda caps: True, path: str | None = None) -> list:
    """The cases whose tier class declares capabilities ``where`` accepts (and, given ``path``,
    that are built from it), as pytest params."""
    return [
        pytest.param(c, id=c.id, marks=c.marks) for c in CASES if where(c.capabilities) and path in (None, c.path)
    ]


def extent(caps: Capabilities) -> bool:
    return caps.addressing is Addressing.EXTENT


def keyed(caps: Capabilities) -> bool:
    return caps.addressing is Addressing.KEY


def indexed(caps: Capabilities) -> bool:
    """Persistent in an address space of its own: the tier keeps an index to find blocks again."""
    return caps.persistent and caps.addressing is Addressing.EXTENT


@dataclass(slots=True)
class Tiers:
    """Builds one case's tier (again, for a restart or a second daemon) and closes what it built."""

    case: Case
    config: Any
    _open: list[Tier] = field(default_factory=list)

    async def build(self) -> Tier:
        tier = create_tier(self.case.path, self.config)
        self._open.append(tier)
        await tier.open()
        return tier

    async def close(self, tier: Tier) -> None:
        self._open.remove(tier)
        await tier.close()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1])


@pytest.fixture(params=cases())
async def tiers(request, tmp_path):
    case: Case = request.param
    url = None
    if case.needs_s3:  # the server starts only for the cases that use it
        url = request.getfixturevalue("moto").url
    built = Tiers(case, case.config(Where(tmp_path, url)))
    yield built
    await built.close_all()


@pytest.fixture
async def tier(tiers):
    return await tiers.build()


def only(where: Callable[[Capabilities], bool], path: str | None = None):
    """Run a test over the cases whose tier declares ``where`` (see :func:`cases`)."""
    return pytest.mark.parametrize("tiers", cases(where, path), indirect=True)


def record(size: int, key: bytes = b"block", namespace: bytes = NS, data: bytes | None = None) -> BlockRecord:
    """What the daemon reserves with: the index key (namespace tag + block key), size, checksum."""
    return BlockRecord(
        key=scoped([key], namespace)[0], size=size, namespace=namespace,
        checksum=checksum(data) if data is not None else None,
    )


async def store(tier: Tier, key: bytes, data: bytes, namespace: bytes = NS) -> Location:
    """Reserve a location for ``data`` and write it whole."""
    location = tier.reserve(record(len(data), key, namespace, data))
    assert location is not None
    await tier.write(location, 0, memoryview(data))
    return location


async def read_back(tier: Tier, location: Location, size: int) -> bytes:
    out = bytearray(size)
    await tier.read_into(location, 0, memoryview(out))
    return bytes(out)


async def test_every_tier_declares_what_it_is_and_is_built_by_name(tiers, tier):
    cls = type(tier)
    path = f"{cls.__module__}:{cls.__name__}"
    assert cls is tier_class(tiers.case.path) is tier_class(path)
    assert BUILTIN_TIERS.get(cls.name, path) == path  # a built-in tier is also built by its name
    assert isinstance(cls.kind, TierKind) and isinstance(cls.capabilities, Capabilities)
    assert isinstance(tiers.config, cls.config_class) and cls.unavailable(tiers.config) is None
    caps = cls.capabilities
    assert isinstance(tier, KeyedTier) == (caps.addressing is Addressing.KEY)
    assert isinstance(tier, ExtentTier) == (caps.addressing is Addressing.EXTENT)
    assert not caps.mappable or isinstance(tier, MemoryTier)
    assert caps.bounded == (tier.capacity_bytes > 0)
    assert tier.description.startswith(cls.name)


async def test_reserve_accounts_footprints_and_release_gives_them_back(tier):
    assert tier.used_bytes == 0
    a, b = tier.reserve(record(1, b"a")), tier.reserve(record(MiB + 1, b"b"))
    assert tier.footprint(1) >= 1 and tier.footprint(MiB + 1) >= MiB + 1
    assert (a.length, b.length) == (tier.footprint(1), tier.footprint(MiB + 1))
    assert tier.used_bytes == a.length + b.length
    tier.release(b)
    assert tier.used_bytes == a.length
    tier.release(a)
    assert tier.used_bytes == 0


async def test_a_bounded_tier_refuses_past_its_capacity_and_an_unbounded_one_never_does(tier):
    if not tier.capabilities.bounded:
        assert tier.capacity_bytes == 0
        huge = tier.reserve(record(1 << 40, b"huge"))
        assert huge is not None and tier.used_bytes == 1 << 40 and tier.largest_free_after([]) >= 1 << 40
        tier.release(huge)
        assert tier.used_bytes == 0
        return
    assert tier.capacity_bytes == CAPACITY and tier.free_bytes == CAPACITY
    a = tier.reserve(record(1, b"a"))
    assert tier.reserve(record(CAPACITY, b"too-big")) is None
    assert tier.largest_free_after([a]) == CAPACITY  # a dry run: nothing changes
    assert tier.used_bytes == a.length
    held = [a]
    while (location := tier.reserve(record(MiB, f"fill-{len(held)}".encode()))) is not None:
        held.append(location)
    assert tier.free_bytes < tier.footprint(MiB) and tier.largest_free_after([]) < MiB
    assert tier.largest_free_after(held[1:3]) >= 2 * MiB
    for location in held:
        tier.release(location)
    assert tier.used_bytes == 0 and tier.reserve(record(CAPACITY, b"all")) is not None


@pytest.mark.parametrize("size", [1, 3 * MiB, 5 * MiB + 12_345], ids=["1B", "3MiB", "past-a-part"])
async def test_whole_blocks_round_trip_byte_exact(tier, size):
    data = os.urandom(size)
    location = await store(tier, b"blob", data)
    assert await read_back(tier, location, size) == data
    assert bytes(await tier.read(location, 0, size)) == data


async def test_ranges_outside_a_location_are_refused(tier):
    data = os.urandom(4096)
    location = await store(tier, b"whole", data)
    if tier.capabilities.addressing is Addressing.EXTENT:
        with pytest.raises(ValueError):
            await tier.write(location, location.length - 96, memoryview(b"y" * 200))
        with pytest.raises(ValueError):
            await tier.read_into(location, -1, memoryview(bytearray(10)))
        with pytest.raises(ValueError):
            await tier.read(location, location.length, 1)
    else:  # objects move whole: no offset, no partial write
        with pytest.raises(ValueError):
            await tier.write(location, 1, memoryview(data)[1:])
        with pytest.raises(ValueError):
            await tier.write(location, 0, memoryview(data)[:100])
        with pytest.raises(ValueError):
            await tier.read_into(location, 100, memoryview(bytearray(100)))
        with pytest.raises(ValueError):
            await tier.read(location, 1, 10)
    assert await read_back(tier, location, 4096) == data  # the refused calls changed nothing


@only(extent)
async def test_extent_tiers_read_and_write_ranges_at_unaligned_offsets(tier):
    location = tier.reserve(record(3 * MiB))
    payload = os.urandom(3 * MiB)
    await tier.write(location, 0, memoryview(payload))
    # Unaligned pieces (O_DIRECT tiers go through an aligned bounce buffer for these).
    await tier.write(location, 4097, memoryview(b"x" * 5000))
    expected = payload[:4097] + b"x" * 5000 + payload[4097 + 5000 :]
    piece = bytearray(10_000)
    await tier.read_into(location, 3000, memoryview(piece))
    assert piece == expected[3000:13_000]
    assert bytes(await tier.read(location, 1, 3 * MiB - 1)) == expected[1:]


@only(indexed)
async def test_indexed_tiers_recover_exactly_what_was_persisted_and_not_forgotten(tiers):
    tier = await tiers.build()
    assert tier.recover() == []
    kept_data, forgotten_data = os.urandom(MiB - 10), os.urandom(MiB)
    kept_rec, forgotten_rec = record(MiB - 10, b"kept", data=kept_data), record(MiB, b"forgotten", data=forgotten_data)
    kept, forgotten, unindexed = tier.reserve(kept_rec), tier.reserve(forgotten_rec), tier.reserve(record(MiB, b"un"))
    await tier.write(kept, 0, memoryview(kept_data))
    await tier.write(forgotten, 0, memoryview(forgotten_data))
    await tier.write(unindexed, 0, memoryview(os.urandom(MiB)))
    await tier.persist([(kept_rec, kept), (forgotten_rec, forgotten)])
    stale = Extent(kept.offset + 4096, kept.length)  # the key names another extent now: left alone
    await tier.forget([(forgotten_rec.key, forgotten), (kept_rec.key, stale)])
    await tiers.close(tier)

    again = await tiers.build()
    blocks = again.recover()
    assert [(b.key, b.size, b.checksum, b.namespace, b.location) for b in blocks] == [
        (kept_rec.key, MiB - 10, kept_rec.checksum, NS, kept)
    ]
    assert again.recover() == []  # handed over once
    assert await read_back(again, blocks[0].location, MiB - 10) == kept_data
    assert again.used_bytes == kept.length  # the unindexed and forgotten extents are free again
    assert again.reserve(record(CAPACITY - kept.length, b"rest")) is not None


@only(lambda caps: not indexed(caps))
async def test_tiers_without_an_index_of_their_own_recover_nothing(tiers):
    tier = await tiers.build()
    data = os.urandom(10_000)
    rec = record(len(data), b"b", data=data)
    location = tier.reserve(rec)
    await tier.write(location, 0, memoryview(data))
    await tier.persist([(rec, location)])
    await tier.forget([(rec.key, location)])
    assert tier.recover() == []
    assert await read_back(tier, location, len(data)) == data  # forget moves no bytes
    await tiers.close(tier)
    assert (await tiers.build()).recover() == []


@only(indexed, path="nvme")
async def test_one_nvme_directory_serves_one_daemon(tiers):
    first = await tiers.build()
    with pytest.raises(ConfigError, match="in use by another kvstore daemon"):
        create_tier(tiers.case.path, tiers.config)
    await tiers.close(first)
    await tiers.build()  # the lock went with the first


@only(keyed)
async def test_probe_reports_what_was_written_and_remove_takes_it_away(tier):
    a, b = os.urandom(10_000), os.urandom(3)
    await store(tier, b"a", a)
    await store(tier, b"b", b)
    info_a = ProbeInfo(size=len(a), checksum=checksum(a), namespace=NS)
    info_b = ProbeInfo(size=3, checksum=checksum(b), namespace=NS)
    assert await tier.probe([b"a", b"b", b"absent"], NS) == [info_a, info_b, None]
    assert await tier.probe([b"a"], b"tenant-b") == [None]  # another namespace's block of that key
    await tier.remove([b"a", b"absent"], NS)
    assert await tier.probe([b"a", b"b"], NS) == [None, info_b]


@only(keyed)
async def test_reading_an_absent_or_corrupt_object_is_an_integrity_error(tiers, tier):
    absent = tier.locate(b"never-written", NS, 100)
    assert tier.used_bytes == 100  # located like a reservation
    with pytest.raises(IntegrityError):
        await tier.read_into(absent, 0, memoryview(bytearray(100)))
    tier.release(absent)

    data = os.urandom(50_000)
    location = await store(tier, b"victim", data)
    assert tiers.case.corrupt is not None, f"give case {tiers.case.id} a way to corrupt what it stores"
    await tiers.case.corrupt(tier, location)
    with pytest.raises(IntegrityError):
        await tier.read_into(location, 0, memoryview(bytearray(len(data))))
    assert await tier.probe([b"victim"], NS) == [None]  # removed, so a put can replace it
    again = await store(tier, b"victim", data)
    assert await read_back(tier, again, len(data)) == data


@only(lambda caps: caps.shared)
async def test_a_shared_tier_serves_what_another_daemon_wrote(tiers, tier):
    data = os.urandom(70_000)
    await store(tier, b"shared", data)
    other = await tiers.build()  # another daemon on the same medium
    [info] = await other.probe([b"shared"], NS)
    assert info == ProbeInfo(size=len(data), checksum=checksum(data), namespace=NS)
    assert await read_back(other, other.locate(b"shared", NS, info.size), info.size) == data
