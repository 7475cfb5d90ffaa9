"""ClientConfig and LocalMode: the client's settings, checked once, the same from config= or keywords.

No daemon: constructing a client opens nothing until it is entered.
"""

from __future__ import annotations

import dataclasses

import pytest

from kvstore import InvalidArgumentError, Namespace
from kvstore.client import ClientConfig, KVClient, LocalMode, SyncKVClient

NS = Namespace(model_id="test/config", dtype="float16", num_layers=1, num_kv_heads=1, head_dim=8, block_size=16)


@pytest.mark.parametrize(
    "field, value",
    [
        ("local", "sometimes"),
        ("local", None),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("timeout_s", float("inf")),
        ("connect_timeout_s", "5"),
        ("chunk_bytes", 0),
        ("chunk_bytes", (16 << 20) + 1),
        ("chunk_bytes", True),
        ("max_put_stream_bytes", 0),
        ("max_keys_per_call", -1),
        ("max_keys_per_call", 2.5),
        ("namespace", b"n" * 65),
        ("namespace", "a string"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_field(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        ClientConfig(**{field: value})
    with pytest.raises(InvalidArgumentError, match=field):
        KVClient("127.0.0.1:7070", **{field: value})


def test_a_bad_local_mode_lists_the_allowed_values():
    with pytest.raises(InvalidArgumentError, match="'auto', 'off', 'require'"):
        ClientConfig(local="never")


@pytest.mark.parametrize("mode", list(LocalMode))
def test_local_takes_the_enum_or_its_string_and_stores_the_enum(mode):
    assert ClientConfig(local=mode).local is mode
    assert ClientConfig(local=mode.value).local is mode
    assert KVClient("127.0.0.1:7070", local=mode.value).config.local is mode


def test_a_namespace_is_stored_as_its_digest():
    assert ClientConfig(namespace=NS).namespace == NS.digest
    assert ClientConfig(namespace=bytearray(b"tenant")).namespace == b"tenant"
    assert KVClient("127.0.0.1:7070", namespace=NS).namespace == NS.digest


def test_config_and_keywords_give_the_same_client():
    options = dict(namespace=b"tenant", local="off", timeout_s=3.0, connect_timeout_s=1.0, chunk_bytes=4096,
                   max_put_stream_bytes=1 << 20, max_keys_per_call=128)
    config = ClientConfig(**options)
    assert KVClient("127.0.0.1:7070", **options).config == config
    assert KVClient("127.0.0.1:7070", config=config).config is config
    assert SyncKVClient("127.0.0.1:7070", **options).config == config
    assert SyncKVClient("127.0.0.1:7070", config=config).config is config


def test_defaults_are_the_same_either_way():
    assert KVClient("127.0.0.1:7070").config == ClientConfig()
    assert ClientConfig().local is LocalMode.AUTO


def test_config_and_keywords_together_are_refused():
    with pytest.raises(InvalidArgumentError, match="not both"):
        KVClient("127.0.0.1:7070", config=ClientConfig(), timeout_s=1.0)
    with pytest.raises(InvalidArgumentError, match="not both"):
        SyncKVClient("127.0.0.1:7070", config=ClientConfig(), local="off")


def test_an_unknown_keyword_is_a_type_error_listing_the_settings():
    with pytest.raises(TypeError, match="timeout.*the settings are: namespace, local"):
        KVClient("127.0.0.1:7070", timeout=1.0)


def test_the_config_is_frozen_keyword_only_and_slotted():
    config = ClientConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout_s = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        ClientConfig(b"tenant")  # type: ignore[misc]
    assert not hasattr(config, "__dict__")
    assert dataclasses.replace(config, local="require").local is LocalMode.REQUIRE


def test_an_unconnected_client_reports_the_remote_path():
    assert KVClient("127.0.0.1:7070", local=LocalMode.REQUIRE).path == "remote"
