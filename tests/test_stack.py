"""The tier stack is configuration: four tiers end to end, one of them a plugin the tests define.

A real daemon stacks DRAM over ``slowmem`` (:mod:`slow_memory_tier`, placed by a
``[[plugin_tiers]]`` entry) over NVMe (a real file) over S3 (moto on loopback). Blocks put
through a real client flow down level by level as each fills, come back up when read, and the
stats say so per tier by name.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest

from kvstore import ConfigError, ServerConfig, TierKind
from kvstore.client import KVClient, Stats
from kvstore.config import HbmConfig, NvmeConfig, PluginTierConfig, S3Config, build_section
from kvstore.server import KVStoreServer
from kvstore.tiers.stack import build_stack

from conftest import chain, make_config, random_blocks
from slow_memory_tier import SlowMemoryConfig, SlowMemoryTier

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "kvstore-stack"
SLOWMEM = "slow_memory_tier:SlowMemoryTier"
NAMES = ["dram", "slowmem", "nvme", "s3"]


def four_tiers(tmp_path, s3_url: str) -> ServerConfig:
    """DRAM 4 MiB over slowmem 4 MiB over NVMe 8 MiB over a bucket prefix of this test's own."""
    slowmem = PluginTierConfig(
        name="slowmem", cls=SLOWMEM, after="dram", options={"capacity_bytes": "4MiB", "delay_s": 0.0005},
    )
    return make_config(
        dram_bytes=4 * MiB,
        nvme=NvmeConfig(dir=str(tmp_path / "nvme"), capacity_bytes=8 * MiB),
        s3=S3Config(
            bucket=BUCKET, endpoint_url=s3_url, prefix=f"{uuid.uuid4().hex[:12]}/", connect_timeout_s=0.5,
            read_timeout_s=2, max_attempts=2, negative_ttl_s=0.5, backoff_s=0.1,
        ),
        plugin_tiers=(slowmem,),
    )


async def settled(kv: KVClient, condition, timeout_s: float = 20.0) -> Stats:
    """The daemon's stats once ``condition(stats)`` holds and background demotion and uploads
    have stopped (the per-tier rows stayed the same for a few polls)."""
    last, same = None, 0
    for _ in range(int(timeout_s / 0.05)):
        stats = await kv.stats()
        same = same + 1 if rows(stats) == last else 0
        if same >= 3 and condition(stats):
            return stats
        last = rows(stats)
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled in {timeout_s}s: {last}")


def rows(stats: Stats) -> dict[str, tuple[int, ...]]:
    """Per tier: (blocks, demotions, promotions, evictions, uploads), for failure messages."""
    return {t.name: (t.blocks, t.demotions, t.promotions, t.evictions, t.uploads) for t in stats.tiers}


@pytest.mark.parametrize("path", ["local", "remote"])
async def test_blocks_flow_down_four_tiers_and_come_back_up(moto, tmp_path, path):
    n, size = 80, 256 * KiB   # 20 MiB through 4 + 4 + 8 MiB of local tiers
    keys, blocks = chain(n, seed=300), random_blocks(n, size)
    async with KVStoreServer(four_tiers(tmp_path, moto.url)) as srv:
        assert [level.name for level in srv.daemon.layout.levels] == NAMES
        assert isinstance(srv.daemon.stack.tiers[1], SlowMemoryTier)
        async with KVClient(f"127.0.0.1:{srv.port}", local="require" if path == "local" else "off") as kv:
            assert kv.path == path
            for start in range(0, n, 8):
                assert (await kv.put(keys[start : start + 8], blocks[start : start + 8])).stored == 8

            def flowed_down(stats: Stats) -> bool:
                t = stats.tier_named
                local = sum(t(name).blocks for name in NAMES[:3])
                return (
                    t("dram").demotions > 0 and t("slowmem").blocks > 0 and t("slowmem").demotions > 0
                    and t("nvme").blocks > 0 and t("s3").uploads > 0 and t("s3").blocks > 0
                    and local < n  # the oldest blocks left NVMe once uploaded: only S3 has them
                )

            stats = await settled(kv, flowed_down)
            assert [t.name for t in stats.tiers] == NAMES
            assert [t.tier for t in stats.tiers] == [TierKind.DRAM, TierKind.DRAM, TierKind.NVME, TierKind.S3]
            assert stats.tier_named("slowmem").capacity_bytes == 4 * MiB, rows(stats)

            # Each block is looked up at its fastest copy: the oldest only in S3, then NVMe, the
            # newest in host memory (slowmem reports DRAM: the wire has no kind of its own for it).
            hit = await kv.lookup(keys)
            t = stats.tier_named
            local = t("dram").blocks + t("slowmem").blocks + t("nvme").blocks
            assert hit.count == n and (hit.tiers[0], hit.tiers[-1]) == (TierKind.S3, TierKind.DRAM)
            assert Counter(hit.tiers) == {
                TierKind.DRAM: t("dram").blocks + t("slowmem").blocks, TierKind.NVME: t("nvme").blocks,
                TierKind.S3: n - local,
            }, rows(stats)

            # Newest first: slowmem's blocks are read before the promotions push them further down.
            newest_first = list(reversed(range(n)))
            got = await kv.get([keys[i] for i in newest_first])
            assert [bytes(b) for b in got] == [blocks[i] for i in newest_first]
            stats = await kv.stats()
            for name in ("slowmem", "nvme", "s3"):
                assert stats.tier_named(name).promotions > 0, rows(stats)
            assert stats.get_hit_blocks == n and stats.integrity_failures == 0, rows(stats)


TOML = """
host = "127.0.0.1"
port = 0
metrics_port = 0

[dram]
capacity_bytes = "4MiB"

[nvme]
dir = "{nvme_dir}"
capacity_bytes = "8MiB"

[s3]
bucket = "kvstore-stack"
endpoint_url = "http://127.0.0.1:9"   # never reached: the stack is built, not opened

[[plugin_tiers]]
name = "slowmem"
class = "slow_memory_tier:SlowMemoryTier"
after = "dram"
options = { capacity_bytes = "4MiB", delay_s = 0 }
"""


def toml(tmp_path, **plugin) -> dict:
    """The config file above, parsed, with its plugin entry changed by ``plugin``."""
    data = tomllib.loads(TOML.replace("{nvme_dir}", str(tmp_path / "nvme")))
    data["plugin_tiers"][0].update(plugin)
    return data


async def test_a_toml_config_with_a_plugin_tier_builds_the_four_tier_stack(tmp_path):
    config = ServerConfig.from_mapping(toml(tmp_path))
    assert config.plugin_tiers == (
        PluginTierConfig(name="slowmem", cls=SLOWMEM, after="dram", options={"capacity_bytes": "4MiB", "delay_s": 0}),
    )
    assert [spec.name for spec in config.tier_specs()] == NAMES
    stack = build_stack(config)
    try:
        assert [level.name for level in stack.layout.levels] == NAMES
        slowmem = stack.tiers[1]
        assert isinstance(slowmem, SlowMemoryTier)
        assert slowmem.config == SlowMemoryConfig(capacity_bytes=4 * MiB, delay_s=0.0)
        level = stack.layout.levels[1]
        assert (level.kind, level.capabilities, level.watermarks.high) == (TierKind.DRAM, SlowMemoryTier.capabilities, 0.9)
        assert (stack.layout.landing, stack.layout.bottom, stack.layout.shared) == (0, 2, (3,))
        assert stack.layout.below(0) == 1 and stack.layout.below(1) == 2
    finally:
        await stack.close()


@pytest.mark.parametrize(
    ("plugin", "named"),
    [
        ({"class": "no_such_module:Tier"}, "tier class 'no_such_module:Tier' cannot be loaded"),
        ({"class": "slow_memory_tier:Nowhere"}, "tier class 'slow_memory_tier:Nowhere' cannot be loaded"),
        ({"class": "slow_memory_tier:SlowMemoryConfig"}, "is not a kvstore.tiers.Tier"),
        ({"class": "not a path"}, "plugin_tiers.slowmem.class must be 'module.path:ClassName'"),
        ({"after": "cxl"}, "plugin_tiers.slowmem.after='cxl' names no tier"),
        ({"options": {"capacity": "4MiB"}}, "unknown config key 'plugin_tiers.slowmem.options.capacity'"),
        ({"options": {"delay_s": "slow"}}, "plugin_tiers.slowmem.options.delay_s must be a float"),
        ({"options": {"capacity_bytes": "lots"}}, "plugin_tiers.slowmem.options.capacity_bytes: cannot read"),
        ({"options": {"delay_s": -1.0}}, "slowmem.delay_s must be finite and >= 0"),
        ({"after": "hbm"}, "plugin_tiers: no enabled tier to place slowmem (after hbm) after"),
        ({"after": "s3"}, "shared tiers must come below every local tier"),
        ({"name": "dram"}, "plugin_tiers.dram: the name of a built-in tier"),
        ({"colour": "red"}, "unknown config key 'plugin_tiers[0].colour'"),
    ],
    ids=[
        "unknown-module", "unknown-class", "not-a-tier", "not-a-path", "after-no-tier", "unknown-option",
        "option-type", "option-size", "option-value", "after-disabled-tier", "after-shared-tier", "builtin-name",
        "unknown-key",
    ],
)
async def test_a_bad_plugin_tier_is_a_one_line_config_error_naming_the_setting(tmp_path, plugin, named):
    with pytest.raises(ConfigError) as caught:
        build_stack(ServerConfig.from_mapping(toml(tmp_path, **plugin)))
    message = str(caught.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize("cls", ["no_such_module:Tier", "slow_memory_tier:Nowhere", "slow_memory_tier:SlowMemoryConfig"])
async def test_a_plugin_class_that_cannot_be_used_is_refused_naming_its_setting(tmp_path, cls):
    with pytest.raises(ConfigError, match=r"plugin_tiers\.slowmem\.class"):
        build_stack(ServerConfig.from_mapping(toml(tmp_path, **{"class": cls})))


async def test_an_hbm_tier_without_a_gpu_is_left_out_with_a_log_line(caplog):
    from conftest import _cuda_reason

    if _cuda_reason() is None:
        pytest.skip("a CUDA device answers here: the HBM tier is in the stack")
    caplog.set_level(logging.WARNING, logger="kvstore.tiers")
    async with KVStoreServer(make_config(dram_bytes=4 * MiB, hbm=HbmConfig(capacity_bytes=4 * MiB))) as srv:
        assert [level.name for level in srv.daemon.layout.levels] == ["dram"]
        async with KVClient(f"127.0.0.1:{srv.port}") as kv:
            keys, blocks = chain(2, seed=301), random_blocks(2, 4096)
            assert (await kv.put(keys, blocks)).stored == 2
            assert [t.name for t in (await kv.stats()).tiers] == ["dram"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "kvstore.tiers"]
    assert line.startswith("tier hbm is configured but left out: "), line


def test_a_plugin_tier_may_have_options_without_defaults():
    @dataclass(frozen=True, kw_only=True)
    class DeviceConfig:
        device: str                      # required: there is no sensible default
        capacity_bytes: int = 4 * MiB

    built = build_section(DeviceConfig, {"device": "/dev/dax0.0"}, "plugin_tiers.cxl.options.")
    assert built == DeviceConfig(device="/dev/dax0.0")
    with pytest.raises(ConfigError, match=r"^plugin_tiers\.cxl\.options: .*device"):
        build_section(DeviceConfig, {}, "plugin_tiers.cxl.options.")
