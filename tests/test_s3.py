"""The S3 tier against a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from kvstore import TierKind, UnavailableError
from kvstore.checksum import checksum
from kvstore.config import S3Config
from kvstore.tiers.s3 import S3Tier

from s3server import MotoServer, use_test_credentials

MiB = 1 << 20
BUCKET = "kvstore-test"


async def make_bucket(url: str) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=url, region_name="us-east-1") as client:
        try:
            await client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


@pytest.fixture
async def tier(moto):
    await make_bucket(moto.url)
    t = S3Tier(S3Config(bucket=BUCKET, endpoint_url=moto.url, prefix="t/", part_bytes=5 * MiB,
                        multipart_threshold_bytes=8 * MiB, connect_timeout_s=1, read_timeout_s=3, max_attempts=2))
    await t.open()
    yield t
    await t.close()


async def round_trip(tier: S3Tier, key: bytes, data: bytes, namespace: bytes = b"") -> bytes | None:
    await tier.put(key, memoryview(data), checksum(data), namespace)
    out = bytearray(len(data) + 100)
    size = await tier.get_into(key, memoryview(out), namespace)
    return None if size is None else bytes(out[:size])


async def test_small_and_multipart_blocks_round_trip_byte_exact(tier):
    small, large = os.urandom(300_000), os.urandom(20 * MiB + 123)  # large: 5 parts, 5 ranged reads
    assert await round_trip(tier, b"small", small) == small
    assert await round_trip(tier, b"large", large) == large
    infos = await tier.head_many([b"small", b"large", b"absent"])
    assert [i.size if i else None for i in infos] == [len(small), len(large), None]
    await tier.delete([b"small", b"large"])
    assert await tier.head_many([b"small", b"large"]) == [None, None]


async def test_namespaces_never_collide(tier):
    a, b = os.urandom(10_000), os.urandom(10_000)
    assert await round_trip(tier, b"same-key", a, namespace=b"tenant-a") == a
    assert await round_trip(tier, b"same-key", b, namespace=b"tenant-b") == b
    out = bytearray(10_000)
    assert await tier.get_into(b"same-key", memoryview(out), b"tenant-c") is None
    assert tier.object_name(b"\x01\x02", b"ns") == "t/6e73/0102"


async def test_corrupt_and_foreign_objects_are_misses(tier):
    from aiobotocore.session import get_session

    data = os.urandom(50_000)
    await tier.put(b"victim", memoryview(data), checksum(data), b"ns")
    name = tier.object_name(b"victim", b"ns")
    async with get_session().create_client("s3", endpoint_url=tier.config.endpoint_url, region_name="us-east-1") as raw:
        head = await raw.head_object(Bucket=BUCKET, Key=name)
        flipped = bytes([data[0] ^ 1]) + data[1:]
        await raw.put_object(Bucket=BUCKET, Key=name, Body=flipped, Metadata=head["Metadata"])
        await raw.put_object(Bucket=BUCKET, Key=tier.object_name(b"plain", b"ns"), Body=b"not from kvstore")
        meta = dict(head["Metadata"], **{"kvstore-namespace": b"other".hex()})
        await raw.put_object(Bucket=BUCKET, Key=tier.object_name(b"moved", b"ns"), Body=data, Metadata=meta)
    out = memoryview(bytearray(60_000))
    assert await tier.get_into(b"victim", out, b"ns") is None   # bytes do not match the checksum
    assert await tier.get_into(b"plain", out, b"ns") is None    # no kvstore metadata
    assert await tier.get_into(b"moved", out, b"ns") is None    # another namespace's block


async def test_s3_down_is_a_prompt_unavailable_error_and_back_up_works_again():
    use_test_credentials()
    server = MotoServer().start()
    try:
        await make_bucket(server.url)
        tier = S3Tier(S3Config(bucket=BUCKET, endpoint_url=server.url, connect_timeout_s=0.5,
                               read_timeout_s=1, max_attempts=2))
        await tier.open()
        try:
            data = os.urandom(4096)
            await tier.put(b"k", memoryview(data), checksum(data))
            server.stop()
            started = time.monotonic()
            with pytest.raises(UnavailableError, match="S3 get"):
                await tier.get_into(b"k", memoryview(bytearray(4096)))
            with pytest.raises(UnavailableError, match="S3 put"):
                await tier.put(b"k2", memoryview(data), checksum(data))
            assert time.monotonic() - started < 10
            server.start()                        # back (moto keeps nothing: a fresh bucket)
            await make_bucket(server.url)
            await tier.put(b"k3", memoryview(data), checksum(data))
            out = bytearray(4096)
            assert await tier.get_into(b"k3", memoryview(out)) == 4096 and bytes(out) == data
        finally:
            await tier.close()
    finally:
        server.stop()


def s3_settings(url: str, **overrides) -> S3Config:
    base = dict(bucket=BUCKET, endpoint_url=url, prefix=f"run-{os.urandom(4).hex()}/", connect_timeout_s=0.5,
                read_timeout_s=2, max_attempts=2, negative_ttl_s=0.5, backoff_s=0.1)
    base.update(overrides)
    return S3Config(**base)


async def until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def until_reachable(daemon) -> None:
    for _ in range(200):
        if all(health.available() for health in daemon.health.values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("S3 stayed in backoff")


async def test_two_daemons_share_blocks_through_the_bucket(moto, tmp_path):
    from kvstore import TierKind
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    await make_bucket(moto.url)
    s3 = s3_settings(moto.url)
    keys, blocks = chain(12, seed=200), random_blocks(12, 1 << 20)
    async with KVStoreServer(make_config(dram_bytes=8 << 20, s3=s3)) as first:
        async with KVClient(f"127.0.0.1:{first.port}", namespace=b"model-x") as kv:
            assert (await kv.put(keys, blocks)).stored == 12   # 12 MiB through 8 MiB of DRAM

            async def all_uploaded() -> bool:
                return (await kv.stats()).tier(TierKind.S3).blocks == 12
            await until(all_uploaded)
            hit = await kv.lookup(keys)
            assert hit.count == 12 and TierKind.S3 in hit.tiers   # the early ones only in S3 now
            assert [bytes(b) for b in await kv.get(keys)] == blocks

    async with KVStoreServer(make_config(dram_bytes=8 << 20, s3=s3)) as second:
        async with KVClient(f"127.0.0.1:{second.port}", namespace=b"model-x") as kv:
            hit = await kv.lookup(keys)
            assert hit.count == 12 and set(hit.tiers) == {TierKind.S3}
            for key, block in zip(keys, blocks):
                assert [bytes(b) for b in await kv.get([key])] == [block]
            stats = await kv.stats()
            assert stats.tier(TierKind.S3).promotions == 12 and stats.integrity_failures == 0
        async with KVClient(f"127.0.0.1:{second.port}", namespace=b"model-y") as other:
            assert (await other.lookup(keys)).count == 0   # another namespace: not these blocks


async def test_a_daemon_restarted_with_an_empty_nvme_directory_serves_from_s3(moto, tmp_path):
    import shutil

    from kvstore import TierKind
    from kvstore.client import KVClient
    from kvstore.config import NvmeConfig
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    await make_bucket(moto.url)
    s3 = s3_settings(moto.url, write_through=True)
    nvme = NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=32 << 20)
    keys, blocks = chain(6, seed=201), random_blocks(6, 300_000)
    async with KVStoreServer(make_config(nvme=nvme, s3=s3, write_through=True)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert (await kv.put(keys, blocks)).persisted == 6
    shutil.rmtree(tmp_path / "nvme")
    async with KVStoreServer(make_config(nvme=nvme, s3=s3)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert (await kv.lookup(keys)).tiers == [TierKind.S3] * 6
            assert [bytes(b) for b in await kv.get(keys)] == blocks
            assert (await kv.lookup(keys)).tiers == [TierKind.DRAM] * 6


async def test_s3_stopped_mid_run_degrades_to_misses_and_recovers_without_a_restart(tmp_path):
    from kvstore import TierKind
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    use_test_credentials()
    server = MotoServer().start()
    try:
        await make_bucket(server.url)
        s3 = s3_settings(server.url, write_through=True)
        async with KVStoreServer(make_config(dram_bytes=4 << 20, s3=s3)) as srv:
            async with KVClient(f"127.0.0.1:{srv.port}", timeout_s=15) as kv:
                early, early_blocks = chain(4, seed=202), random_blocks(4, 1 << 20)
                await kv.put(early, early_blocks)
                late, late_blocks = chain(2, seed=203), random_blocks(2, 1 << 20)
                await kv.put(late, late_blocks)            # pushes the early ones out of DRAM...
                assert TierKind.S3 in (await kv.lookup(early)).tiers   # ...into S3 only

                server.stop()
                started = time.monotonic()
                got = await kv.get(early)                  # S3-only blocks: misses, promptly
                assert got == [] or all(bytes(g) == b for g, b in zip(got, early_blocks))
                assert [bytes(b) for b in await kv.get(late)] == late_blocks   # local ones intact
                more = chain(2, seed=204)
                assert (await kv.put(more, random_blocks(2, 4096))).stored == 2   # puts still work
                assert time.monotonic() - started < 20
                stats = await kv.stats()
                assert stats.tier(TierKind.S3).errors > 0

                server.start()                             # back, and empty (moto keeps nothing)
                await make_bucket(server.url)
                await until_reachable(srv.daemon)  # the end of the backoff
                fresh, fresh_blocks = chain(3, seed=205), random_blocks(3, 100_000)
                assert (await kv.put(fresh, fresh_blocks)).persisted == 3   # uploaded again
        async with KVStoreServer(make_config(dram_bytes=4 << 20, s3=s3)) as other:
            async with KVClient(f"127.0.0.1:{other.port}") as kv:
                assert [bytes(b) for b in await kv.get(fresh)] == fresh_blocks
    finally:
        server.stop()


async def test_the_daemon_starts_while_s3_is_down_and_uses_it_once_it_is_up():
    from kvstore import TierKind
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    use_test_credentials()
    server = MotoServer()                           # a port nobody listens on yet
    s3 = s3_settings(server.url, write_through=True)
    async with KVStoreServer(make_config(s3=s3)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", timeout_s=15) as kv:
            first, first_blocks = chain(2, seed=210), random_blocks(2, 50_000)
            result = await kv.put(first, first_blocks)
            assert (result.stored, result.persisted) == (2, 0)   # stored locally, not in S3
            assert (await kv.lookup(chain(1, seed=211))).count == 0   # a miss, not an error
            server.start()
            try:
                await make_bucket(server.url)
                await until_reachable(srv.daemon)
                later, later_blocks = chain(2, seed=212), random_blocks(2, 50_000)
                assert (await kv.put(later, later_blocks)).persisted == 2
                assert (await kv.stats()).tier(TierKind.S3).errors >= 1
            finally:
                server.stop()


async def test_an_endpoint_that_never_answers_cannot_hold_a_call():
    async def silent(reader, writer):        # accepts, reads, never answers
        await reader.read(1 << 20)
        await asyncio.sleep(60)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    use_test_credentials()
    tier = S3Tier(S3Config(bucket=BUCKET, endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.3,
                           read_timeout_s=0.5, max_attempts=1))
    await tier.open()
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await tier.put(b"k", memoryview(b"x" * 4096), 1)
        with pytest.raises(UnavailableError):
            await tier.get_into(b"k", memoryview(bytearray(4096)))
        assert time.monotonic() - started < 2 * tier.request_timeout_s + 1
    finally:
        await tier.close()
        server.close()


async def test_a_delete_reaches_the_bucket_even_for_blocks_this_daemon_never_saw(moto):
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    await make_bucket(moto.url)
    s3 = s3_settings(moto.url, write_through=True)
    keys = chain(3, seed=220)
    async with KVStoreServer(make_config(s3=s3)) as first:
        async with KVClient(f"127.0.0.1:{first.port}") as kv:
            assert (await kv.put(keys, random_blocks(3, 10_000))).persisted == 3
    async with KVStoreServer(make_config(s3=s3)) as second:
        async with KVClient(f"127.0.0.1:{second.port}") as kv:
            assert await kv.delete(keys) == 0            # nothing local here...
    async with KVStoreServer(make_config(s3=s3)) as third:
        async with KVClient(f"127.0.0.1:{third.port}") as kv:
            assert (await kv.lookup(keys)).count == 0    # ...but gone from the bucket too


async def test_the_empty_namespace_cannot_forge_keys_of_another():
    from kvstore.client import KVClient
    from kvstore.keys import scoped
    from kvstore.server import KVStoreServer

    from conftest import make_config

    async with KVStoreServer(make_config()) as srv:
        target = f"127.0.0.1:{srv.port}"
        async with KVClient(target) as plain, KVClient(target, namespace=b"tenant-x") as tenant:
            key = b"k" * 32
            forged = scoped([key], b"tenant-x")[0]      # what tenant-x's block is indexed under
            await plain.put([forged], [b"EVIL" * 100])
            assert (await tenant.lookup([key])).count == 0
            assert (await tenant.put([key], [b"good" * 100])).stored == 1
            assert [bytes(b) for b in await tenant.get([key])] == [b"good" * 100]


async def test_the_index_forgets_the_oldest_s3_only_blocks_beyond_its_bound(moto):
    from kvstore import TierKind
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    await make_bucket(moto.url)
    s3 = s3_settings(moto.url, write_through=True)
    keys, blocks = chain(6, seed=230), random_blocks(6, 20_000)
    async with KVStoreServer(make_config(s3=s3)) as first:
        async with KVClient(f"127.0.0.1:{first.port}") as kv:
            await kv.put(keys, blocks)
    async with KVStoreServer(make_config(s3=s3_settings(moto.url, prefix=s3.prefix, max_remembered_blocks=4))) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            assert (await kv.lookup(keys)).tiers == [TierKind.S3] * 6   # all found within one call
            await until(lambda: _len_is(srv.daemon.catalog, 4))           # then the two oldest forgotten
            assert [bytes(b) for b in await kv.get(keys)] == blocks      # and found again when needed


async def _len_is(index, n: int) -> bool:
    return len(index) == n


async def test_objects_laid_out_as_version_0_1_wrote_them_are_served(moto):
    """The bucket layout, written here with plain aiobotocore as 0.1 wrote it (no tier code):
    ``<prefix><namespace hex, or _>/<key hex>``, with ``kvstore-size``, ``kvstore-xxh3`` (16 hex
    digits) and ``kvstore-namespace`` metadata. This version finds and serves those objects."""
    from aiobotocore.session import get_session

    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import NS, chain, make_config, random_blocks

    await make_bucket(moto.url)
    s3 = s3_settings(moto.url, prefix="v01/")
    keys, blocks = chain(3, seed=230), random_blocks(3, 30_000)
    async with get_session().create_client("s3", endpoint_url=moto.url, region_name="us-east-1") as raw:
        for key, block in zip(keys, blocks):
            await raw.put_object(
                Bucket=BUCKET, Key=f"v01/{NS.digest.hex()}/{key.hex()}", Body=block,
                Metadata={"kvstore-size": str(len(block)), "kvstore-xxh3": f"{checksum(block):016x}",
                          "kvstore-namespace": NS.digest.hex()},
            )
    async with KVStoreServer(make_config(s3=s3)) as srv:
        async with KVClient(f"127.0.0.1:{srv.port}", namespace=NS) as kv:
            assert (await kv.lookup(keys)).tiers == [TierKind.S3] * 3
            assert [bytes(b) for b in await kv.get(keys)] == blocks


# -- sealed objects: a keyed MAC or AES-GCM, with a deployment secret ---------------------------


def sealed_tier(url: str, secrets: list, tmp_path, **overrides) -> S3Tier:
    files = []
    for i, secret in enumerate(secrets):
        path = tmp_path / f"secret-{secret[:4].hex()}-{i}"
        path.write_bytes(secret)
        files.append(str(path))
    base = dict(bucket=BUCKET, endpoint_url=url, prefix="sealed/", part_bytes=5 * MiB, multipart_threshold_bytes=8 * MiB,
                connect_timeout_s=1, read_timeout_s=3, max_attempts=2, secret_files=tuple(files))
    base.update(overrides)
    return S3Tier(S3Config(**base))


async def raw_client(url: str):
    from aiobotocore.session import get_session

    return get_session().create_client("s3", endpoint_url=url, region_name="us-east-1")


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aes-gcm"])
async def test_sealed_objects_round_trip_and_their_names_hide_the_namespace(moto, tmp_path, encrypt):
    await make_bucket(moto.url)
    tier = sealed_tier(moto.url, [os.urandom(32)], tmp_path, encrypt=encrypt)
    await tier.open()
    try:
        small, large = os.urandom(300_000), os.urandom(12 * MiB + 7)   # large: multipart
        namespace = b"model-x" * 4
        assert await round_trip(tier, b"small", small, namespace) == small
        assert await round_trip(tier, b"large", large, namespace) == large
        name = tier.object_name(b"small", namespace)
        assert namespace.hex() not in name
        async with await raw_client(moto.url) as raw:
            obj = await raw.get_object(Bucket=BUCKET, Key=name)
            body = await obj["Body"].read()
            assert namespace.hex() not in str(obj["Metadata"])
        if encrypt:
            assert small[:64] not in body and len(body) == len(small) + 28   # nonce and tag
        else:
            assert body == small and obj["Metadata"]["kvstore-mac"]
    finally:
        await tier.close()


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aes-gcm"])
async def test_a_forged_object_with_a_recomputed_checksum_is_a_miss_and_counted(moto, tmp_path, encrypt):
    await make_bucket(moto.url)
    tier = sealed_tier(moto.url, [os.urandom(32)], tmp_path, encrypt=encrypt, prefix=f"forge-{encrypt}/")
    await tier.open()
    try:
        data = os.urandom(50_000)
        await tier.put(b"victim", memoryview(data), checksum(data), b"ns")
        name = tier.object_name(b"victim", b"ns")
        evil = os.urandom(50_000)
        async with await raw_client(moto.url) as raw:
            head = await raw.head_object(Bucket=BUCKET, Key=name)
            meta = dict(head["Metadata"], **{"kvstore-xxh3": f"{checksum(evil):016x}"})   # what an attacker can do
            body = evil if not encrypt else os.urandom(16) + evil + os.urandom(12)
            meta["kvstore-size"] = str(len(evil))
            await raw.put_object(Bucket=BUCKET, Key=name, Body=body, Metadata=meta)
            # ...and a valid object of another key moved under this name is refused the same way.
            await tier.put(b"other", memoryview(data), checksum(data), b"ns")
            await raw.copy_object(Bucket=BUCKET, Key=tier.object_name(b"moved", b"ns"),
                                  CopySource={"Bucket": BUCKET, "Key": tier.object_name(b"other", b"ns")})
        out = memoryview(bytearray(60_000))
        assert await tier.get_into(b"victim", out, b"ns") is None
        assert await tier.get_into(b"moved", out, b"ns") is None
        assert tier.forged == 2
        assert await tier.get_into(b"other", out, b"ns") == len(data) and bytes(out[: len(data)]) == data
    finally:
        await tier.close()


async def test_a_forged_object_is_a_miss_for_the_daemon_and_shows_in_its_stats(moto, tmp_path):
    from kvstore.client import KVClient
    from kvstore.server import KVStoreServer

    from conftest import chain, make_config, random_blocks

    await make_bucket(moto.url)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    s3 = s3_settings(moto.url, write_through=True, secret_files=(str(secret),))
    keys, blocks = chain(3, seed=240), random_blocks(3, 20_000)
    async with KVStoreServer(make_config(s3=s3)) as first:
        async with KVClient(f"127.0.0.1:{first.port}") as kv:
            await kv.put(keys, blocks)
        name = next(t for t in first.daemon.stack.tiers if t.name == "s3").object_name(keys[1], b"")
    evil = os.urandom(20_000)
    async with await raw_client(moto.url) as raw:
        head = await raw.head_object(Bucket=BUCKET, Key=name)
        await raw.put_object(Bucket=BUCKET, Key=name, Body=evil,
                             Metadata=dict(head["Metadata"], **{"kvstore-xxh3": f"{checksum(evil):016x}"}))
    async with KVStoreServer(make_config(s3=s3)) as second:   # nothing local: everything from the bucket
        async with KVClient(f"127.0.0.1:{second.port}", local="off") as kv:
            got = await kv.get(keys)
            stats = await kv.stats()
    assert [bytes(b) for b in got] == blocks[:1]   # the forged block is a miss, and so what follows
    assert next(t for t in stats.tiers if t.name == "s3").integrity_failures == 1


async def test_secrets_rotate_new_first_old_still_opened_then_dropped(moto, tmp_path):
    await make_bucket(moto.url)
    old, new = os.urandom(32), os.urandom(32)
    data = os.urandom(30_000)
    tiers = [sealed_tier(moto.url, secrets, tmp_path, prefix="rotate/") for secrets in ([old], [new, old], [new])]
    for t in tiers:
        await t.open()
    try:
        await tiers[0].put(b"k", memoryview(data), checksum(data), b"ns")    # sealed with the old secret
        out = memoryview(bytearray(30_000))
        assert await tiers[1].get_into(b"k", out, b"ns") == 30_000 and bytes(out) == data
        assert await tiers[2].get_into(b"k", out, b"ns") is None             # the old secret dropped
        await tiers[1].put(b"k2", memoryview(data), checksum(data), b"ns")   # sealed with the new one
        assert await tiers[2].get_into(b"k2", out, b"ns") == 30_000
    finally:
        for t in tiers:
            await t.close()


def test_secret_settings_are_checked(tmp_path, monkeypatch):
    from kvstore.errors import ConfigError

    monkeypatch.delenv("KVSTORE_S3_SECRET", raising=False)
    with pytest.raises(ConfigError, match="s3.encrypt needs a secret"):
        S3Tier(S3Config(bucket=BUCKET, encrypt=True))
    short = tmp_path / "short"
    short.write_bytes(b"hunter2")
    with pytest.raises(ConfigError, match="too short"):
        S3Tier(S3Config(bucket=BUCKET, secret_files=(str(short),)))
    with pytest.raises(ConfigError, match="cannot read"):
        S3Tier(S3Config(bucket=BUCKET, secret_files=(str(tmp_path / "missing"),)))
    monkeypatch.setenv("KVSTORE_S3_SECRET", "x" * 32)
    assert S3Tier(S3Config(bucket=BUCKET, encrypt=True)).sealer.encrypt


async def test_a_seal_that_is_not_even_hex_is_a_miss_not_a_crash(moto, tmp_path):
    await make_bucket(moto.url)
    tier = sealed_tier(moto.url, [os.urandom(32)], tmp_path, prefix="odd-seal/")
    await tier.open()
    try:
        data = os.urandom(10_000)
        await tier.put(b"k", memoryview(data), checksum(data), b"ns")
        name = tier.object_name(b"k", b"ns")
        async with await raw_client(moto.url) as raw:
            head = await raw.head_object(Bucket=BUCKET, Key=name)
            await raw.copy_object(Bucket=BUCKET, Key=name, CopySource={"Bucket": BUCKET, "Key": name},
                                  Metadata=dict(head["Metadata"], **{"kvstore-mac": "zz-not-hex"}),
                                  MetadataDirective="REPLACE")
        assert await tier.get_into(b"k", memoryview(bytearray(10_000)), b"ns") is None
    finally:
        await tier.close()


def test_a_non_ascii_seal_does_not_raise():
    from kvstore.tiers.seal import Sealer, Secret

    sealer = Sealer([Secret.derive(b"s" * 32)], encrypt=False)
    assert sealer.verify(sealer.current.id, "ümlaut", b"label", b"data") is False
    assert sealer.verify(sealer.current.id, None, b"label", b"data") is False
