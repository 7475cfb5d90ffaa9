from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HBM: _ClassVar[Tier]
    TIER_DRAM: _ClassVar[Tier]
    TIER_NVME: _ClassVar[Tier]
    TIER_S3: _ClassVar[Tier]
    TIER_PEER: _ClassVar[Tier]

class SlotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_RESERVED: _ClassVar[SlotState]
    SLOT_PRESENT: _ClassVar[SlotState]
    SLOT_DROPPED: _ClassVar[SlotState]
TIER_UNSPECIFIED: Tier
TIER_HBM: Tier
TIER_DRAM: Tier
TIER_NVME: Tier
TIER_S3: Tier
TIER_PEER: Tier
SLOT_RESERVED: SlotState
SLOT_PRESENT: SlotState
SLOT_DROPPED: SlotState

class LookupRequest(_message.Message):
    __slots__ = ("keys", "namespace", "packed_keys", "key_bytes")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    namespace: bytes
    packed_keys: bytes
    key_bytes: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., namespace: _Optional[bytes] = ..., packed_keys: _Optional[bytes] = ..., key_bytes: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("count", "tiers", "packed_tiers")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PACKED_TIERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    packed_tiers: bytes
    def __init__(self, count: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., packed_tiers: _Optional[bytes] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "keys", "sizes", "checksums")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "present", "dropped", "persisted")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    present: int
    dropped: int
    persisted: int
    def __init__(self, stored: _Optional[int] = ..., present: _Optional[int] = ..., dropped: _Optional[int] = ..., persisted: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "namespace", "local_only")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    namespace: bytes
    local_only: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., namespace: _Optional[bytes] = ..., local_only: _Optional[bool] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("count", "sizes", "checksums", "tiers", "partial")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    count: int
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    partial: bool
    def __init__(self, count: _Optional[int] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., partial: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "keys", "if_checksums", "local_only")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    IF_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    if_checksums: _containers.RepeatedScalarFieldContainer[int]
    local_only: bool
    def __init__(self, namespace: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., if_checksums: _Optional[_Iterable[int]] = ..., local_only: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "hits", "evictions", "evicted_bytes", "promotions", "demotions", "integrity_failures", "errors", "uploads", "dropped_uploads", "name")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    evictions: int
    evicted_bytes: int
    promotions: int
    demotions: int
    integrity_failures: int
    errors: int
    uploads: int
    dropped_uploads: int
    name: str
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., integrity_failures: _Optional[int] = ..., errors: _Optional[int] = ..., uploads: _Optional[int] = ..., dropped_uploads: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "tiers", "lookup_hit_blocks", "lookup_miss_blocks", "get_hit_blocks", "get_miss_blocks", "put_stored_blocks", "put_present_blocks", "put_dropped_blocks", "deleted_blocks", "bytes_in", "bytes_out", "integrity_failures", "peer_members", "peer_live", "peer_asked_blocks", "peer_found_blocks", "peer_probed_blocks", "peer_errors", "peer_bytes_in_grpc", "peer_bytes_out_grpc", "peer_bytes_in_nixl", "peer_bytes_out_nixl", "unauthenticated_calls", "denied_calls", "rate_limited_calls", "local_refused", "tls_reloads")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GET_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GET_MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PUT_STORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PUT_PRESENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PUT_DROPPED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DELETED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    PEER_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PEER_LIVE_FIELD_NUMBER: _ClassVar[int]
    PEER_ASKED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEER_FOUND_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEER_PROBED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEER_ERRORS_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_IN_GRPC_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_OUT_GRPC_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_IN_NIXL_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_OUT_NIXL_FIELD_NUMBER: _ClassVar[int]
    UNAUTHENTICATED_CALLS_FIELD_NUMBER: _ClassVar[int]
    DENIED_CALLS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITED_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_REFUSED_FIELD_NUMBER: _ClassVar[int]
    TLS_RELOADS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    get_hit_blocks: int
    get_miss_blocks: int
    put_stored_blocks: int
    put_present_blocks: int
    put_dropped_blocks: int
    deleted_blocks: int
    bytes_in: int
    bytes_out: int
    integrity_failures: int
    peer_members: int
    peer_live: int
    peer_asked_blocks: int
    peer_found_blocks: int
    peer_probed_blocks: int
    peer_errors: int
    peer_bytes_in_grpc: int
    peer_bytes_out_grpc: int
    peer_bytes_in_nixl: int
    peer_bytes_out_nixl: int
    unauthenticated_calls: int
    denied_calls: int
    rate_limited_calls: int
    local_refused: int
    tls_reloads: int
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., lookup_hit_blocks: _Optional[int] = ..., lookup_miss_blocks: _Optional[int] = ..., get_hit_blocks: _Optional[int] = ..., get_miss_blocks: _Optional[int] = ..., put_stored_blocks: _Optional[int] = ..., put_present_blocks: _Optional[int] = ..., put_dropped_blocks: _Optional[int] = ..., deleted_blocks: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., integrity_failures: _Optional[int] = ..., peer_members: _Optional[int] = ..., peer_live: _Optional[int] = ..., peer_asked_blocks: _Optional[int] = ..., peer_found_blocks: _Optional[int] = ..., peer_probed_blocks: _Optional[int] = ..., peer_errors: _Optional[int] = ..., peer_bytes_in_grpc: _Optional[int] = ..., peer_bytes_out_grpc: _Optional[int] = ..., peer_bytes_in_nixl: _Optional[int] = ..., peer_bytes_out_nixl: _Optional[int] = ..., unauthenticated_calls: _Optional[int] = ..., denied_calls: _Optional[int] = ..., rate_limited_calls: _Optional[int] = ..., local_refused: _Optional[int] = ..., tls_reloads: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("arena_id", "socket_path", "arena_bytes", "lease_ttl_s", "max_block_bytes", "max_block_reason", "put_round_bytes", "ticket", "daemon_uid")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_REASON_FIELD_NUMBER: _ClassVar[int]
    PUT_ROUND_BYTES_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    DAEMON_UID_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    socket_path: str
    arena_bytes: int
    lease_ttl_s: float
    max_block_bytes: int
    max_block_reason: str
    put_round_bytes: int
    ticket: str
    daemon_uid: int
    def __init__(self, arena_id: _Optional[str] = ..., socket_path: _Optional[str] = ..., arena_bytes: _Optional[int] = ..., lease_ttl_s: _Optional[float] = ..., max_block_bytes: _Optional[int] = ..., max_block_reason: _Optional[str] = ..., put_round_bytes: _Optional[int] = ..., ticket: _Optional[str] = ..., daemon_uid: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("namespace", "session", "keys", "sizes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    session: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[bytes] = ..., session: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("lease", "states", "offsets")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    lease: int
    states: _containers.RepeatedScalarFieldContainer[SlotState]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease: _Optional[int] = ..., states: _Optional[_Iterable[_Union[SlotState, str]]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("session", "lease", "abort", "checksums")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    session: str
    lease: int
    abort: bool
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[str] = ..., lease: _Optional[int] = ..., abort: _Optional[bool] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("namespace", "session", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    session: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[bytes] = ..., session: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease", "count", "offsets", "sizes", "tiers", "partial")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    lease: int
    count: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    partial: bool
    def __init__(self, lease: _Optional[int] = ..., count: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., partial: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session", "leases")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    session: str
    leases: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[str] = ..., leases: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("namespace", "packed_keys", "key_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    packed_keys: bytes
    key_bytes: int
    def __init__(self, namespace: _Optional[bytes] = ..., packed_keys: _Optional[bytes] = ..., key_bytes: _Optional[int] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("present", "sizes", "checksums")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    present: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, present: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class PeerHelloRequest(_message.Message):
    __slots__ = ("agent", "metadata")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    agent: str
    metadata: bytes
    def __init__(self, agent: _Optional[str] = ..., metadata: _Optional[bytes] = ...) -> None: ...

class PeerHelloResponse(_message.Message):
    __slots__ = ("session", "agent", "metadata", "arena_address", "arena_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ARENA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    agent: str
    metadata: bytes
    arena_address: int
    arena_bytes: int
    def __init__(self, session: _Optional[str] = ..., agent: _Optional[str] = ..., metadata: _Optional[bytes] = ..., arena_address: _Optional[int] = ..., arena_bytes: _Optional[int] = ...) -> None: ...
