"""Configuration: one frozen dataclass per component, validated on construction.

Values are loaded once at the edge (flags, a TOML file) and passed down explicitly. Sizes may be
given as ints or as strings with binary or decimal units (``"4GiB"``, ``"512MiB"``, ``"1.5GB"``).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import ConfigError
from kvstore.keys import MAX_KEY_BYTES
from kvstore.policy import PolicyKind
from kvstore.tls import TlsConfig

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": KiB, "kib": KiB, "mi": MiB, "mib": MiB, "gi": GiB, "gib": GiB, "ti": TiB, "tib": TiB,
}
MAX_HEADER_BYTES = 48 * MiB
"""Room for the keys of one request inside one gRPC message (64 MiB, with margin)."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, name: str = "size") -> int:
    """``4096``, ``"4KiB"``, ``"1.5GB"`` -> bytes. Raises :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ConfigError(f"{name}: cannot read {value!r} as a size (try 4GiB, 512MiB or 1048576)")
    return int(float(match.group(1)) * unit)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class IoEngine(enum.Enum):
    """How the NVMe tier does file I/O."""

    AUTO = "auto"       # kvikio when a CUDA driver answers, POSIX otherwise
    KVIKIO = "kvikio"
    POSIX = "posix"


def coerce_enum(owner: object, name: str, enum_cls: type[enum.Enum], where: str) -> None:
    """Accept a closed set's string at the edge: replace ``owner.name`` with its Enum member."""
    value = getattr(owner, name)
    if isinstance(value, enum_cls):
        return
    try:
        member = enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{where} must be one of {allowed}, got {value!r}") from None
    object.__setattr__(owner, name, member)


def _check_watermarks(section: str, high: float, low: float) -> None:
    _check(
        0 < low < high <= 1,
        f"{section}.low_watermark ({low}) and high_watermark ({high}) must satisfy 0 < low < high <= 1",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class HbmConfig:
    """The GPU-memory tier above DRAM: one CuPy pool. Off unless ``capacity_bytes`` is set, and
    left out (with a log line) where no CUDA device answers."""

    capacity_bytes: int = 0         # 0: no HBM tier
    device: int = 0
    alignment_bytes: int = 4 * KiB
    high_watermark: float = 0.9     # above this fill the coldest blocks are demoted to DRAM...
    low_watermark: float = 0.8      # ...until below this

    def __post_init__(self) -> None:
        _check(self.capacity_bytes >= 0, f"hbm.capacity_bytes must be >= 0, got {self.capacity_bytes}")
        _check(self.device >= 0, f"hbm.device must be >= 0, got {self.device}")
        _check(
            self.alignment_bytes > 0 and self.alignment_bytes & (self.alignment_bytes - 1) == 0,
            f"hbm.alignment_bytes must be a power of two, got {self.alignment_bytes}",
        )
        _check_watermarks("hbm", self.high_watermark, self.low_watermark)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0


@dataclass(frozen=True, kw_only=True, slots=True)
class DramConfig:
    """The host-memory tier: one preallocated arena."""

    capacity_bytes: int = 4 * GiB
    alignment_bytes: int = 4 * KiB
    prefault: bool = False  # touch every page before serving (slower start, no first-touch stalls)
    populate: bool = True   # fault the arena in, in the background, once the daemon serves
    high_watermark: float = 0.9   # above this fill, the coldest blocks are demoted...
    low_watermark: float = 0.8    # ...until the fill is below this

    def __post_init__(self) -> None:
        _check_watermarks("dram", self.high_watermark, self.low_watermark)
        _check(self.capacity_bytes > 0, f"dram.capacity_bytes must be > 0, got {self.capacity_bytes}")
        _check(
            self.alignment_bytes > 0 and self.alignment_bytes & (self.alignment_bytes - 1) == 0,
            f"dram.alignment_bytes must be a power of two, got {self.alignment_bytes}",
        )
        _check(
            self.capacity_bytes >= self.alignment_bytes,
            f"dram.capacity_bytes={self.capacity_bytes} is smaller than one aligned page",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class NvmeConfig:
    """The NVMe tier: a preallocated data file and an LMDB index under ``dir``."""

    dir: str = "auto"               # "auto": $XDG_CACHE_HOME/kvstore/<port>; "off": no NVMe tier
    capacity_bytes: int = 8 * GiB
    alignment_bytes: int = 4 * KiB
    io_threads: int = 4
    io_engine: IoEngine = IoEngine.AUTO  # "auto" (kvikio when a CUDA driver is present), "kvikio", "posix"
    direct_io: bool = True          # O_DIRECT where the filesystem allows it
    index_map_bytes: int = 1 * GiB  # LMDB map size (address space; grows on disk as needed)
    encrypt: bool = False           # AES-256-GCM encrypt every block on disk (needs a secret)
    secret_files: tuple[str, ...] = ()  # secrets for encrypt: the first seals, all open ($KVSTORE_NVME_SECRET first)
    high_watermark: float = 0.95    # for a tier below NVMe: NVMe demotes its coldest blocks above this...
    low_watermark: float = 0.9      # ...until below this (the bottom tier only evicts on demand)
    port: int = 0                   # filled in by the server for "auto"

    def __post_init__(self) -> None:
        _check(bool(self.dir), 'nvme.dir must be "auto", "off" or a directory')
        _check(self.capacity_bytes > 0, f"nvme.capacity_bytes must be > 0, got {self.capacity_bytes}")
        _check(
            self.alignment_bytes >= 4096 and self.alignment_bytes & (self.alignment_bytes - 1) == 0,
            f"nvme.alignment_bytes must be a power of two >= 4096 (direct I/O sectors), got {self.alignment_bytes}",
        )
        _check(1 <= self.io_threads <= 256, f"nvme.io_threads must be in [1, 256], got {self.io_threads}")
        object.__setattr__(self, "secret_files", tuple(self.secret_files))
        coerce_enum(self, "io_engine", IoEngine, "nvme.io_engine")
        _check(self.index_map_bytes >= 1 * MiB, f"nvme.index_map_bytes must be >= 1MiB, got {self.index_map_bytes}")
        _check_watermarks("nvme", self.high_watermark, self.low_watermark)

    @property
    def enabled(self) -> bool:
        return self.dir != "off"

    def resolved_dir(self) -> str:
        if self.dir != "auto":
            return os.path.expanduser(self.dir)
        if self.port == 0:
            raise ConfigError(
                'nvme.dir "auto" is named after the port, and port 0 picks one at random: '
                "set nvme.dir (--nvme-dir DIR, or --nvme-dir off)"
            )
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(cache, "kvstore", str(self.port))


@dataclass(frozen=True, kw_only=True, slots=True)
class S3Config:
    """The object-storage tier: one bucket (any S3-compatible service), shared by every daemon
    that points at it. Credentials come from the standard AWS chain (environment, profile,
    instance role)."""

    bucket: str = ""                 # empty: no S3 tier
    endpoint_url: str = ""           # empty: AWS; else e.g. http://minio:9000
    region: str = "us-east-1"
    prefix: str = "kvstore/"
    max_concurrency: int = 32        # requests in flight at once
    max_attempts: int = 4            # per request, with backoff (throttling, 5xx, timeouts)
    connect_timeout_s: float = 2.0   # per attempt; each request also has a hard overall deadline
    read_timeout_s: float = 10.0
    multipart_threshold_bytes: int = 16 * MiB
    part_bytes: int = 8 * MiB        # multipart part size, and range size of parallel reads
    write_through: bool = False      # upload every put before acknowledging it
    queue_blocks: int = 4096         # write-behind queue bound
    negative_ttl_s: float = 5.0      # how long "S3 does not have this key" is believed
    lookup_window: int = 16          # keys asked of S3 at once past the local prefix
    backoff_s: float = 2.0           # after a failure S3 is left alone this long, doubling to 30x
    max_remembered_blocks: int = 1_000_000  # S3-only blocks kept in the index (oldest forgotten)
    secret_files: tuple[str, ...] = ()  # deployment secrets: the first seals (MAC) new objects, all open
    encrypt: bool = False            # AES-256-GCM encrypt objects (needs a secret)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret_files", tuple(self.secret_files))
        _check(1 <= self.max_concurrency <= 1024, f"s3.max_concurrency must be in [1, 1024], got {self.max_concurrency}")
        _check(1 <= self.max_attempts <= 20, f"s3.max_attempts must be in [1, 20], got {self.max_attempts}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            _check(0 < value < math.inf, f"s3.{name} must be finite and > 0, got {value}")
        _check(self.part_bytes >= 5 * MiB, f"s3.part_bytes must be >= 5MiB (S3's minimum part), got {self.part_bytes}")
        _check(
            self.multipart_threshold_bytes >= self.part_bytes,
            "s3.multipart_threshold_bytes must be >= s3.part_bytes",
        )
        _check(self.queue_blocks >= 1, f"s3.queue_blocks must be >= 1, got {self.queue_blocks}")
        _check(0 <= self.negative_ttl_s < math.inf, f"s3.negative_ttl_s must be finite, got {self.negative_ttl_s}")
        _check(1 <= self.lookup_window <= 1024, f"s3.lookup_window must be in [1, 1024], got {self.lookup_window}")
        _check(0 < self.backoff_s < math.inf, f"s3.backoff_s must be finite and > 0, got {self.backoff_s}")
        _check(self.max_remembered_blocks >= 1, f"s3.max_remembered_blocks must be >= 1, got {self.max_remembered_blocks}")
        _check(
            not self.endpoint_url or re.match(r"^https?://[^/\s]+", self.endpoint_url) is not None,
            f"s3.endpoint_url must be an http:// or https:// URL (e.g. http://minio:9000), got {self.endpoint_url!r}",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)


class Transfer(enum.Enum):
    """How block bytes move between daemons."""

    AUTO = "auto"   # NIXL when it is installed and the peer offers it, else the gRPC stream
    NIXL = "nixl"
    GRPC = "grpc"


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def check_address(value: str, setting: str) -> None:
    """Refuse anything but ``HOST:PORT`` (``[v6]:PORT`` too), naming ``setting``."""
    m = _ADDRESS.match(value)
    _check(m is not None and 0 < int(m.group(2)) <= 65535, f"{setting} must be HOST:PORT, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerConfig:
    """The peer tier: other kvstore daemons, found from a static list or a DNS name, whose
    capacities pool into one cache (each block has a home among the live members)."""

    peers: tuple[str, ...] = ()      # HOST:PORT of each daemon (this one may be listed too)
    dns: str = ""                    # NAME:PORT resolved every refresh_s (a headless Service)
    advertise: str = ""              # how the others reach this daemon; empty: host:port (see docs)
    refresh_s: float = 5.0           # how often the DNS name is resolved again
    timeout_s: float = 0.5           # deadline of every call to a peer
    transfer_timeout_s: float = 5.0  # deadline of moving one batch of block bytes
    backoff_s: float = 2.0           # after a failure a peer is skipped this long, doubling to 30x
    transfer: Transfer = Transfer.AUTO
    queue_blocks: int = 4096         # blocks waiting to travel to their home (beyond: dropped, counted)
    lookup_window: int = 8192        # keys asked of peers at once past the local prefix
    negative_ttl_s: float = 1.0      # how long "no peer has this key" is believed
    max_remembered_blocks: int = 1_000_000  # blocks known only at peers kept in the index
    token_file: str = ""             # the bearer token this daemon presents to its peers (with tenants)
    tls: TlsConfig = field(default_factory=TlsConfig)  # filled in by the server from its [tls]

    def __post_init__(self) -> None:
        if isinstance(self.peers, str):   # "a:1,b:2" from a flag or an environment variable
            object.__setattr__(self, "peers", tuple(p.strip() for p in self.peers.split(",") if p.strip()))
        object.__setattr__(self, "peers", tuple(self.peers))
        for peer in self.peers:
            check_address(peer, "peer.peers")
        if self.dns:
            check_address(self.dns, "peer.dns")
        if self.advertise:
            check_address(self.advertise, "peer.advertise")
        for name in ("refresh_s", "timeout_s", "transfer_timeout_s", "backoff_s"):
            value = getattr(self, name)
            _check(0 < value < math.inf, f"peer.{name} must be finite and > 0, got {value}")
        _check(0 <= self.negative_ttl_s < math.inf, f"peer.negative_ttl_s must be finite, got {self.negative_ttl_s}")
        _check(self.queue_blocks >= 1, f"peer.queue_blocks must be >= 1, got {self.queue_blocks}")
        _check(1 <= self.lookup_window <= 65536, f"peer.lookup_window must be in [1, 65536], got {self.lookup_window}")
        _check(self.max_remembered_blocks >= 1, f"peer.max_remembered_blocks must be >= 1, got {self.max_remembered_blocks}")
        coerce_enum(self, "transfer", Transfer, "peer.transfer")

    @property
    def enabled(self) -> bool:
        return bool(self.peers or self.dns)


BUILTIN_TIERS = {
    "hbm": "kvstore.tiers.hbm:HbmTier",
    "dram": "kvstore.tiers.dram:DramTier",
    "nvme": "kvstore.tiers.nvme:NvmeTier",
    "peer": "kvstore.tiers.peer:PeerTier",
    "s3": "kvstore.tiers.s3:S3Tier",
}
"""The built-in tiers, fastest first: config section -> the class implementing it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PluginTierConfig:
    """A tier implemented outside kvstore, placed in the stack by configuration::

        [[plugin_tiers]]
        name = "cxl"
        class = "mypackage.cxl:CxlTier"     # a kvstore.tiers.Tier subclass
        after = "dram"                      # the tier it sits below
        options = { capacity_bytes = "64GiB" }  # given to its config_class
    """

    name: str
    cls: str
    after: str = "dram"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[a-z][a-z0-9_]{0,31}", self.name)),
               f"plugin_tiers: name must be a short lower-case identifier, got {self.name!r}")
        _check(bool(re.fullmatch(r"[\w.]+:\w+", self.cls)),
               f"plugin_tiers.{self.name}.class must be 'module.path:ClassName', got {self.cls!r}")


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One entry of the stack to build: its name, the class (``module:Class``), its config."""

    name: str
    cls: str
    config: Any


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Everything ``kvstore serve`` needs. The defaults are the embedded configuration."""

    host: str = "127.0.0.1"
    port: int = 7070
    metrics_port: int = 7071
    max_block_bytes: int = 64 * MiB
    max_keys_per_request: int = 65536
    max_get_bytes: int = 4 * GiB  # bytes one get may announce; the rest is read in further rounds
    max_key_bytes: int = MAX_KEY_BYTES
    stream_chunk_bytes: int = 1 * MiB
    stream_idle_timeout_s: float = 30.0
    lease_ttl_s: float = 60.0
    local_socket: str = "auto"
    local_socket_uids: tuple[int, ...] = ()   # other users whose processes may map the arena
    local_socket_gids: tuple[int, ...] = ()   # groups whose members may (the first owns the socket's directory)
    local_window_bytes: int = 256 * MiB   # with tenants: each same-host session's own shared memory
    local_sessions_per_tenant: int = 16   # with tenants: same-host sessions (windows) a tenant may hold at once
    tenants: str = ""             # a tenants file (TOML): bearer tokens, shared namespaces; empty: one implicit tenant
    shutdown_grace_s: float = 5.0
    log_level: str = "info"
    policy: PolicyKind = PolicyKind.LRU  # eviction policy of every tier: "lru" or "s3fifo" (scan-resistant)
    write_through: bool = False   # persist every put on NVMe before acknowledging it
    demote_interval_s: float = 0.05
    hbm: HbmConfig = field(default_factory=HbmConfig)
    dram: DramConfig = field(default_factory=DramConfig)
    nvme: NvmeConfig = field(default_factory=NvmeConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    s3: S3Config = field(default_factory=S3Config)
    tls: TlsConfig = field(default_factory=TlsConfig)
    plugin_tiers: tuple[PluginTierConfig, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.host), "host must not be empty")
        _check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _check(
            0 <= self.metrics_port <= 65535,
            f"metrics_port must be in [0, 65535] (0 turns metrics off), got {self.metrics_port}",
        )
        _check(self.max_block_bytes > 0, f"max_block_bytes must be > 0, got {self.max_block_bytes}")
        _check(self.max_get_bytes > 0, f"max_get_bytes must be > 0, got {self.max_get_bytes}")
        _check(
            self.max_keys_per_request > 0,
            f"max_keys_per_request must be > 0, got {self.max_keys_per_request}",
        )
        _check(
            0 < self.max_key_bytes <= MAX_KEY_BYTES,
            f"max_key_bytes must be in [1, {MAX_KEY_BYTES}], got {self.max_key_bytes}",
        )
        _check(
            4 * KiB <= self.stream_chunk_bytes <= 16 * MiB,
            f"stream_chunk_bytes must be in [4KiB, 16MiB], got {self.stream_chunk_bytes}",
        )
        _check(
            0 <= self.shutdown_grace_s < math.inf,
            f"shutdown_grace_s must be finite and >= 0, got {self.shutdown_grace_s}",
        )
        _check(
            0 < self.stream_idle_timeout_s < math.inf,
            f"stream_idle_timeout_s must be finite and > 0, got {self.stream_idle_timeout_s}",
        )
        _check(
            0 < self.lease_ttl_s < math.inf,
            f"lease_ttl_s must be finite and > 0, got {self.lease_ttl_s}",
        )
        _check(bool(self.local_socket), 'local_socket must be "auto", "off" or a path')
        _check(self.local_window_bytes >= 1 * MiB, f"local_window_bytes must be >= 1MiB, got {self.local_window_bytes}")
        _check(self.local_sessions_per_tenant >= 1,
               f"local_sessions_per_tenant must be >= 1, got {self.local_sessions_per_tenant}")
        for name in ("local_socket_uids", "local_socket_gids"):
            ids = tuple(getattr(self, name))
            object.__setattr__(self, name, ids)
            _check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in ids),
                   f"{name} must be a list of numeric ids, got {list(ids)!r}")
        coerce_enum(self, "policy", PolicyKind, "policy")
        _check(
            0 < self.demote_interval_s < math.inf,
            f"demote_interval_s must be finite and > 0, got {self.demote_interval_s}",
        )
        _check(not self.write_through or self.nvme.enabled, "write_through needs an NVMe tier (nvme.dir)")
        _check(not self.peer.token_file or self.peer.enabled,
               "peer.token_file is set but there are no peers (peer.peers or peer.dns)")
        _check(
            self.max_keys_per_request * (self.max_key_bytes + 3) <= MAX_HEADER_BYTES,
            f"max_keys_per_request={self.max_keys_per_request} keys of up to {self.max_key_bytes} bytes "
            f"do not fit in one {MAX_HEADER_BYTES}-byte request",
        )
        _check(
            self.log_level.lower() in {"debug", "info", "warning", "error"},
            f"log_level must be debug, info, warning or error, got {self.log_level!r}",
        )
        names = [p.name for p in self.plugin_tiers]
        _check(len(set(names)) == len(names), f"plugin_tiers: names must be unique, got {names}")
        for plugin in self.plugin_tiers:
            _check(plugin.name not in BUILTIN_TIERS, f"plugin_tiers.{plugin.name}: the name of a built-in tier")
            _check(
                plugin.after in BUILTIN_TIERS or plugin.after in names,
                f"plugin_tiers.{plugin.name}.after={plugin.after!r} names no tier",
            )

    @property
    def loopback_only(self) -> bool:
        """The gRPC port is reachable from this host only."""
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def share_write_through(self) -> bool:
        """Upload every put to the shared tier before acknowledging it (``s3.write_through``)."""
        return self.s3.enabled and self.s3.write_through

    def tier_specs(self) -> list[TierSpec]:
        """The tier stack this configuration asks for, fastest first: the built-in tiers that are
        enabled (hbm, dram, nvme, s3), each plugin tier right after the one it names."""
        specs = [
            TierSpec(name=name, cls=BUILTIN_TIERS[name], config=getattr(self, name))
            for name in BUILTIN_TIERS
            if name == "dram" or getattr(self, name).enabled
        ]
        if self.nvme.enabled and self.nvme.dir == "auto" and self.nvme.port == 0:
            # "auto" is $XDG_CACHE_HOME/kvstore/<port>: named after the daemon's port.
            at = next(i for i, spec in enumerate(specs) if spec.name == "nvme")
            specs[at] = dataclasses.replace(specs[at], config=dataclasses.replace(self.nvme, port=self.port))
        if self.peer.enabled:
            # The peers are called with this daemon's own certificate and the cluster's CA.
            at = next(i for i, spec in enumerate(specs) if spec.name == "peer")
            specs[at] = dataclasses.replace(specs[at], config=dataclasses.replace(self.peer, tls=self.tls))
        pending = list(self.plugin_tiers)
        while pending:
            placed = [p for p in pending if any(s.name == p.after for s in specs)]
            if not placed:
                missing = ", ".join(f"{p.name} (after {p.after})" for p in pending)
                raise ConfigError(f"plugin_tiers: no enabled tier to place {missing} after")
            for plugin in placed:
                at = next(i for i, s in enumerate(specs) if s.name == plugin.after)
                specs.insert(at + 1, TierSpec(name=plugin.name, cls=plugin.cls, config=dict(plugin.options)))
                pending.remove(plugin)
        return specs

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ServerConfig:
        """Build from a parsed TOML document (or any nested mapping); unknown keys are errors."""
        return _build(cls, data, prefix="")

    def local_socket_path(self, port: int) -> str | None:
        """Where same-host clients get the arena: None when the same-host path is off."""
        if self.local_socket == "off":
            return None
        if self.local_socket == "auto":
            # A directory of this user's own, never a predictable name in a shared /tmp.
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            directory = os.path.join(runtime, "kvstore") if runtime else os.path.join(
                tempfile.gettempdir(), f"kvstore-{os.geteuid()}"
            )
            return os.path.join(directory, f"{port}.sock")
        return os.path.expanduser(self.local_socket)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with fields changed; ``dram_<field>=`` (and hbm_, nvme_, peer_, s3_, tls_) reach
        into those tables."""
        for section in (*BUILTIN_TIERS, "tls"):
            prefix = section + "_"
            sub = {name[len(prefix):]: changes.pop(name) for name in list(changes) if name.startswith(prefix)}
            if sub:
                changes[section] = dataclasses.replace(changes.get(section, getattr(self, section)), **sub)
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields.get(name)
        if f is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{name}' (known: {known})")
        if name == "plugin_tiers":
            kwargs[name] = _plugins(value)
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(section := type(f.default_factory())):
            kwargs[name] = _build(section, value, prefix=f"{prefix}{name}.")
        elif name.endswith("_bytes"):
            kwargs[name] = parse_bytes(value, name=f"{prefix}{name}")
        elif isinstance(f.default, enum.Enum):
            kwargs[name] = value  # coerced (and refused with the allowed values) by the dataclass
        elif f.default is dataclasses.MISSING or f.default is None:
            kwargs[name] = value  # no default to take the type from: the dataclass checks it
        else:
            expected = type(f.default)
            if expected is tuple and isinstance(value, list):
                value = tuple(value)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                raise ConfigError(
                    f"{prefix}{name} must be a {expected.__name__}, got {value!r}"
                )
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _plugins(value: Any) -> tuple[PluginTierConfig, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"plugin_tiers must be an array of tables ([[plugin_tiers]]), got {value!r}")
    out = []
    for i, table in enumerate(value):
        if not isinstance(table, Mapping):
            raise ConfigError(f"plugin_tiers[{i}]: expected a table, got {table!r}")
        unknown = set(table) - {"name", "class", "after", "options"}
        if unknown:
            raise ConfigError(f"unknown config key 'plugin_tiers[{i}].{sorted(unknown)[0]}' (known: after, class, name, options)")
        for required in ("name", "class"):
            if not isinstance(table.get(required), str):
                raise ConfigError(f"plugin_tiers[{i}].{required} must be a string")
        options = table.get("options", {})
        if not isinstance(options, Mapping):
            raise ConfigError(f"plugin_tiers[{i}].options must be a table")
        out.append(PluginTierConfig(
            name=table["name"], cls=table["class"], after=str(table.get("after", "dram")), options=dict(options),
        ))
    return tuple(out)


def build_section(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """A config dataclass from a mapping, by the same rules as the config file (for plugin tiers'
    ``options``): unknown keys and wrong types are errors naming ``prefix + key``."""
    return _build(cls, data, prefix)
