"""Configuration: sizes, validation that names the field, TOML, and flag precedence."""

from __future__ import annotations

import pytest

from kvstore import ConfigError, ServerConfig, parse_bytes
from kvstore.config import GiB, MiB
from kvstore.policy import PolicyKind
from kvstore.server.cli import build_parser, load_config


@pytest.mark.parametrize(
    "text, expected",
    [(4096, 4096), ("4096", 4096), ("4KiB", 4096), ("1.5GiB", 3 * GiB // 2), ("2GB", 2_000_000_000), ("64 MiB", 64 * MiB)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "4XB", "", "-1GiB", True])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="dram"):
        parse_bytes(text, name="dram")


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="metrics_port"):
        ServerConfig(metrics_port=-1)
    with pytest.raises(ConfigError, match="log_level"):
        ServerConfig(log_level="loud")


def test_from_mapping_reads_nested_tables_and_refuses_unknown_keys():
    cfg = ServerConfig.from_mapping({"port": 9000, "dram": {"capacity_bytes": "1GiB"}})
    assert cfg.port == 9000 and cfg.dram.capacity_bytes == GiB
    with pytest.raises(ConfigError, match="'dram.capacity'"):
        ServerConfig.from_mapping({"dram": {"capacity": 1}})
    with pytest.raises(ConfigError, match="port must be a int"):
        ServerConfig.from_mapping({"port": "9000"})
    with pytest.raises(ConfigError, match="dram: expected a table"):
        ServerConfig.from_mapping({"dram": 5})


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "kvstore.toml"
    path.write_text('port = 9001\nmetrics_port = 9002\n[dram]\ncapacity_bytes = "256MiB"\n')
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9100"])
    cfg = load_config(args, environ={})
    assert (cfg.port, cfg.metrics_port, cfg.dram.capacity_bytes) == (9100, 9002, 256 * MiB)
    args = build_parser().parse_args(["serve", "--dram-bytes", "2GiB"])
    cfg = load_config(args, environ={})
    assert cfg.dram.capacity_bytes == 2 * GiB and cfg.port == ServerConfig().port


def test_environment_sits_between_the_file_and_the_flags(tmp_path):
    env = {"KVSTORE_NVME_DIR": str(tmp_path), "KVSTORE_NVME_BYTES": "1GiB", "KVSTORE_PORT": "9300",
           "KVSTORE_POLICY": "s3fifo", "KVSTORE_WRITE_THROUGH": "1"}
    cfg = load_config(build_parser().parse_args(["serve", "--port", "9400"]), environ=env)
    assert (cfg.port, cfg.nvme.dir, cfg.nvme.capacity_bytes, cfg.policy, cfg.write_through) == (
        9400, str(tmp_path), GiB, PolicyKind.S3FIFO, True
    )
    with pytest.raises(ConfigError, match="KVSTORE_PORT: cannot read 'many'"):
        load_config(build_parser().parse_args(["serve"]), environ={"KVSTORE_PORT": "many"})
    with pytest.raises(ConfigError, match="policy must be"):
        load_config(build_parser().parse_args(["serve", "--policy", "mru"]), environ={})
    with pytest.raises(ConfigError, match="write_through needs an NVMe tier"):
        load_config(build_parser().parse_args(["serve", "--nvme-dir", "off", "--write-through"]), environ={})
