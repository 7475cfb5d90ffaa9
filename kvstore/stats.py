"""The stats schema, declared once, and the counters the daemon keeps by it.

:data:`SCHEMA` lists every counter the daemon reports: its name, what it counts, whether the
daemon keeps one per daemon or one per tier, how Prometheus exports it and how ``kvstore stats``
shows it. Everything else is derived from it: the fields of :class:`Counters` and
:class:`TierCounters` here, the ``StatsResponse`` built by :func:`kvstore.proto.stats.stats_to_proto`,
the Prometheus collector, the ``kvstore stats`` table and the client's ``Stats``/``TierStats``.
The ``.proto`` stays hand-written (it is the wire contract) and a test holds it equal to the schema.

Counters are plain ints mutated on the event-loop thread: one source of truth, no locks, no double
bookkeeping. Readers on other threads (the Prometheus scrape) only read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, make_dataclass

from kvstore.tier_kind import TierKind


class Scope(enum.Enum):
    """How many values of a field the daemon keeps."""

    DAEMON = "daemon"  # one: a field of Counters and of StatsResponse
    TIER = "tier"      # one per tier, by the tier's name: a field of TierCounters and of TierStats


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"


class Unit(enum.Enum):
    """What a value counts, for display."""

    COUNT = "count"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class Metric:
    """A Prometheus metric family. Per-tier fields get a ``tier`` label (the tier's name) first.

    Several fields may share one family and tell their samples apart by ``labels``.
    """

    name: str
    help: str
    kind: MetricKind = MetricKind.COUNTER
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatField:
    """One counter of the schema."""

    name: str                 # attribute of Counters/TierCounters, field of the proto and the client's Stats
    help: str
    scope: Scope
    metric: Metric
    label_values: tuple[str, ...]  # this field's values of ``metric.labels``, in order
    title: str                # ``kvstore stats``: the column header (per tier) or the row label (per daemon)
    unit: Unit = Unit.COUNT

    def __post_init__(self) -> None:
        if len(self.label_values) != len(self.metric.labels):
            raise ValueError(
                f"stats field {self.name}: label_values {self.label_values} do not match "
                f"the labels {self.metric.labels} of metric {self.metric.name}"
            )


_BLOCKS = Metric("kvstore_blocks", "Blocks by operation and result", labels=("op", "result"))
_DATA = Metric("kvstore_data_bytes", "Block bytes moved", labels=("direction",))
_PEER_MEMBERS = Metric("kvstore_peer_members", "Other daemons this one knows of", MetricKind.GAUGE, ("state",))
_PEER_BLOCKS = Metric("kvstore_peer_blocks", "Keys asked of and answered by peer daemons", labels=("result",))
_PEER_DATA = Metric("kvstore_peer_bytes", "Block bytes moved between daemons", labels=("direction", "transport"))
_REFUSED = Metric("kvstore_refused_calls", "Calls and connections refused by the security controls", labels=("reason",))


def _daemon(name: str, help: str, title: str, metric: Metric, *label_values: str, unit: Unit = Unit.COUNT) -> StatField:
    return StatField(name, help, Scope.DAEMON, metric, label_values, title, unit)


def _tier(name: str, help: str, title: str, metric: str, unit: Unit = Unit.COUNT) -> StatField:
    return StatField(name, help, Scope.TIER, Metric(metric, help), (), title, unit)


SCHEMA: tuple[StatField, ...] = (
    _daemon("lookup_hit_blocks", "Leading blocks found by Lookup", "lookup blocks hit", _BLOCKS, "lookup", "hit"),
    _daemon(
        "lookup_miss_blocks", "Blocks asked for by Lookup past the first miss", "lookup blocks missed",
        _BLOCKS, "lookup", "miss",
    ),
    _daemon("get_hit_blocks", "Blocks served by Get", "get blocks hit", _BLOCKS, "get", "hit"),
    _daemon("get_miss_blocks", "Blocks asked for by Get and not served", "get blocks missed", _BLOCKS, "get", "miss"),
    _daemon("put_stored_blocks", "Blocks newly stored by Put", "put blocks stored", _BLOCKS, "put", "stored"),
    _daemon(
        "put_present_blocks", "Blocks a Put found already stored", "put blocks already present",
        _BLOCKS, "put", "present",
    ),
    _daemon(
        "put_dropped_blocks", "Blocks a Put could not store (no room)", "put blocks dropped (no room)",
        _BLOCKS, "put", "dropped",
    ),
    _daemon("deleted_blocks", "Blocks removed by Delete", "blocks deleted", _BLOCKS, "delete", "deleted"),
    _daemon("bytes_in", "Block bytes received", "bytes in", _DATA, "in", unit=Unit.BYTES),
    _daemon("bytes_out", "Block bytes sent", "bytes out", _DATA, "out", unit=Unit.BYTES),
    _daemon(
        "integrity_failures", "Blocks that failed checksum verification", "integrity failures",
        Metric("kvstore_integrity_failures", "Blocks that failed checksum verification"),
    ),
    _daemon("peer_members", "Other daemons this one knows of", "peers known",
            _PEER_MEMBERS, "known"),
    _daemon("peer_live", "Other daemons not in backoff after a failure", "peers live",
            _PEER_MEMBERS, "live"),
    _daemon("peer_asked_blocks", "Keys this daemon asked peers about", "peer keys asked", _PEER_BLOCKS, "asked"),
    _daemon("peer_found_blocks", "Keys a peer had when asked", "peer keys found", _PEER_BLOCKS, "found"),
    _daemon("peer_probed_blocks", "Blocks this daemon told asking peers it holds", "peer keys answered", _PEER_BLOCKS,
            "answered"),
    _daemon("peer_errors", "Calls to peers that failed or missed their deadline", "peer errors",
            Metric("kvstore_peer_errors", "Calls to peers that failed or missed their deadline")),
    _daemon("peer_bytes_in_grpc", "Block bytes fetched from peers over the gRPC stream", "peer bytes in (grpc)",
            _PEER_DATA, "in", "grpc", unit=Unit.BYTES),
    _daemon("peer_bytes_out_grpc", "Block bytes sent to peers over the gRPC stream", "peer bytes out (grpc)",
            _PEER_DATA, "out", "grpc", unit=Unit.BYTES),
    _daemon("peer_bytes_in_nixl", "Block bytes fetched from peers by NIXL", "peer bytes in (nixl)",
            _PEER_DATA, "in", "nixl", unit=Unit.BYTES),
    _daemon("peer_bytes_out_nixl", "Block bytes sent to peers by NIXL", "peer bytes out (nixl)",
            _PEER_DATA, "out", "nixl", unit=Unit.BYTES),
    _daemon("unauthenticated_calls", "Calls without a token, or with one no tenant has", "calls unauthenticated",
            _REFUSED, "unauthenticated"),
    _daemon("denied_calls", "Calls a tenant may not make (a read-only namespace, a daemon-only call)",
            "calls denied", _REFUSED, "denied"),
    _daemon("rate_limited_calls", "Calls over a tenant's requests_per_s", "calls over a tenant's rate",
            _REFUSED, "rate"),
    _daemon("local_refused", "Same-host connections refused (credentials, ticket, session cap)",
            "same-host connections refused", _REFUSED, "same_host"),
    _daemon("tls_reloads", "Times the TLS certificate was reloaded from changed files", "TLS reloads",
            Metric("kvstore_tls_reloads", "Times the TLS certificate was reloaded from changed files")),
    # Per tier, in the order of the `kvstore stats` columns.
    _tier("hits", "Blocks served from this tier (their fastest copy was here)", "hits", "kvstore_tier_hits"),
    _tier("promotions", "Blocks copied up from this tier into a faster one", "promoted", "kvstore_tier_promotions"),
    _tier("demotions", "Blocks moved down out of this tier", "demoted", "kvstore_tier_demotions"),
    _tier("evictions", "Blocks whose last copy was dropped from this tier", "evicted", "kvstore_tier_evictions"),
    _tier(
        "integrity_failures", "Copies in this tier that failed verification (dropped)", "corrupt",
        "kvstore_tier_integrity_failures",
    ),
    _tier("uploads", "Blocks written to this tier in the background (write-behind)", "uploads", "kvstore_tier_uploads"),
    _tier(
        "dropped_uploads", "Background writes to this tier skipped because their queue was full", "dropped",
        "kvstore_tier_dropped_uploads",
    ),
    _tier("errors", "Failed calls to this tier's medium (S3 unreachable, ...)", "errors", "kvstore_tier_errors"),
    _tier(
        "evicted_bytes", "Bytes whose last copy was dropped from this tier", "evicted bytes",
        "kvstore_tier_evicted_bytes", Unit.BYTES,
    ),
)
"""Every counter the daemon reports, per-daemon fields first."""

DAEMON_FIELDS: tuple[StatField, ...] = tuple(f for f in SCHEMA if f.scope is Scope.DAEMON)
TIER_FIELDS: tuple[StatField, ...] = tuple(f for f in SCHEMA if f.scope is Scope.TIER)


def schema_dataclass(scope: Scope, *, frozen: bool = False) -> type:
    """A slotted dataclass with one keyword-only ``int`` field (default 0) per schema field of ``scope``.

    Inherit from it to give a class the schema's fields; the subclass adds its own fields and
    methods, and must itself be ``@dataclass(slots=True)`` (``frozen`` like its base).
    """
    return make_dataclass(
        f"{scope.name.title()}{'Record' if frozen else 'Counters'}Fields",
        [(f.name, int, 0) for f in SCHEMA if f.scope is scope],
        kw_only=True, slots=True, frozen=frozen,
        namespace={"__module__": __name__},
    )


@dataclass(slots=True)
class TierCounters(schema_dataclass(Scope.TIER)):
    """The per-tier fields of :data:`SCHEMA` for one tier."""


@dataclass(slots=True)
class Counters(schema_dataclass(Scope.DAEMON)):
    """The per-daemon fields of :data:`SCHEMA`, plus the counters of each tier by the tier's name."""

    tiers: dict[str, TierCounters] = field(default_factory=dict)

    def tier(self, name: str) -> TierCounters:
        """The counters of the tier called ``name``, created on first use (event-loop thread only)."""
        counters = self.tiers.get(name)
        if counters is None:
            counters = self.tiers[name] = TierCounters()
        return counters


@dataclass(frozen=True, slots=True)
class TierUsage:
    """What one tier holds now; the daemon reports one per tier in its stack, fastest first."""

    name: str
    kind: TierKind
    capacity_bytes: int   # 0: unbounded (S3), its row counts what this daemon knows to be there
    used_bytes: int
    blocks: int
