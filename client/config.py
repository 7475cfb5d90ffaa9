"""The client's configuration: one frozen dataclass, validated on construction.

    config = ClientConfig(namespace=ns, local=LocalMode.REQUIRE, timeout_s=10.0)
    async with KVClient("127.0.0.1:7070", config=config) as kv: ...

``KVClient(target, **fields)`` builds the same object from keyword arguments. Strings work
wherever a :class:`LocalMode` is expected (``local="off"``); the config stores the Enum.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.errors import ConfigError
from kvstore.keys import MAX_NAMESPACE_BYTES, Namespace
from kvstore.tenants import TOKEN

if TYPE_CHECKING:
    from kvstore.proto.channel import ChannelTls

MiB = 1 << 20
MAX_CHUNK_BYTES = 16 * MiB


class LocalMode(enum.Enum):
    """Whether the client uses the same-host (shared-memory) data path."""

    AUTO = "auto"        # the same-host path when the daemon's arena can be mapped, else gRPC streams
    OFF = "off"          # always gRPC streams
    REQUIRE = "require"  # connecting fails unless the same-host path works


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """Everything a :class:`~kvstore.client.KVClient` needs besides the daemon's address.

    Args:
        namespace: scopes every key of this client (a :class:`~kvstore.Namespace`, stored as its
            digest, or up to 64 bytes): blocks of different namespaces never meet, in the daemon or
            in a shared S3 bucket. Keys from :func:`kvstore.block_keys` already depend on their
            namespace; this also scopes engines' own block hashes.
        local: see :class:`LocalMode` (``"auto"``, ``"off"``, ``"require"`` are accepted too).
        timeout_s: deadline of each call.
        connect_timeout_s: how long entering the client's context waits for the daemon to answer.
        chunk_bytes: size of the data messages a remote put sends (at most 16 MiB).
        max_put_stream_bytes: a remote put of more bytes is split into several streams.
        max_keys_per_call: longer batches are split into several calls (the daemon's
            ``max_keys_per_request``).
        token: the bearer token of this client's tenant, for a daemon with tenants (sent with
            every call).
        tls: connect with TLS, checking the daemon's certificate against the system's roots;
            implied by ``tls_ca`` or ``tls_cert``.
        tls_ca: PEM file of the CA that signed the daemon's certificate (turns TLS on).
        tls_cert, tls_key: PEM files of this client's certificate and key, for a daemon that
            requires client certificates (mTLS).
        tls_server_name: the name to expect in the daemon's certificate when the target address
            is not one it names.

    Raises:
        ConfigError: (an :class:`~kvstore.errors.InvalidArgumentError`) naming the bad field.
    """

    namespace: bytes = b""
    local: LocalMode = LocalMode.AUTO
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    chunk_bytes: int = 1 * MiB
    max_put_stream_bytes: int = 256 * MiB
    max_keys_per_call: int = 65536
    token: str = field(default="", repr=False)   # a secret: kept out of logs
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        # Normalize the edge forms (a Namespace, a string mode) so readers only see one type.
        object.__setattr__(self, "namespace", _namespace_bytes(self.namespace))
        object.__setattr__(self, "local", _local_mode(self.local))
        for name in ("timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            _check(
                _is_number(value) and 0 < value < math.inf, f"{name} must be a positive number of seconds, got {value!r}"
            )
        _check(
            _is_int(self.chunk_bytes) and 0 < self.chunk_bytes <= MAX_CHUNK_BYTES,
            f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {self.chunk_bytes!r}",
        )
        for name in ("max_put_stream_bytes", "max_keys_per_call"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _check(
            isinstance(self.token, str) and (not self.token or TOKEN.match(self.token) is not None),
            "token must be printable ASCII without spaces (as kvstore token makes them)",
        )
        _check(isinstance(self.tls, bool), f"tls must be True or False, got {self.tls!r}")
        for name in TLS_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            _check(isinstance(getattr(self, name), str), f"{name} must be a path (a string), got {value!r}")
        _check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert and tls_key go together: give both or neither")
        if self.tls_ca or self.tls_cert or self.tls_server_name:
            object.__setattr__(self, "tls", True)

    def channel_tls(self) -> ChannelTls | None:
        """The TLS settings read from their files (a :class:`ConfigError` naming a bad one), or
        None for a plaintext channel."""
        if not self.tls:
            return None
        from kvstore.proto.channel import ChannelTls

        return ChannelTls.load(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, server_name=self.tls_server_name)


TLS_FIELDS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")


def security_options(source: object, *, token_setting: str, token_env: str | None = None) -> dict[str, str]:
    """The :class:`ClientConfig` fields for TLS and the token from ``source``'s ``tls_*`` paths and
    ``token_file`` (the CLI's flags, an engine connector's options): the token read from the file,
    else from ``$token_env`` when given and set."""
    options = {name: getattr(source, name) for name in TLS_FIELDS if getattr(source, name, "")}
    token_file = getattr(source, "token_file", "")
    if token_file:
        from kvstore.proto.channel import read_token

        options["token"] = read_token(token_file, token_setting)
    elif token_env and os.environ.get(token_env):
        options["token"] = os.environ[token_env].strip()
    return options


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _namespace_bytes(value: object) -> bytes:
    if isinstance(value, Namespace):
        return value.digest
    _check(
        isinstance(value, (bytes, bytearray, memoryview)),
        f"namespace must be a kvstore.Namespace or bytes, got {type(value).__name__}",
    )
    digest = bytes(value)
    _check(len(digest) <= MAX_NAMESPACE_BYTES, f"namespace is {len(digest)} bytes; at most {MAX_NAMESPACE_BYTES}")
    return digest


def _local_mode(value: object) -> LocalMode:
    if isinstance(value, LocalMode):
        return value
    try:
        return LocalMode(value)
    except ValueError:
        allowed = ", ".join(repr(mode.value) for mode in LocalMode)
        raise ConfigError(f"local must be one of {allowed} (or a LocalMode), got {value!r}") from None
