"""Prometheus metrics of one daemon, on an HTTP port of its own.

Block and byte counters are read from the daemon's :class:`~kvstore.stats.Counters` at scrape time
(one source of truth); RPC latency is a histogram the servicer observes. Each daemon has its own
registry, so several daemons (or tests) in one process never share series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.server.daemon import Daemon
from kvstore.stats import TierCounters

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator:
        c = self._daemon.counters
        blocks = CounterMetricFamily(
            "kvstore_blocks", "Blocks by operation and result", labels=["op", "result"]
        )
        for op, result, value in (
            ("lookup", "hit", c.lookup_hit_blocks), ("lookup", "miss", c.lookup_miss_blocks),
            ("get", "hit", c.get_hit_blocks), ("get", "miss", c.get_miss_blocks),
            ("put", "stored", c.put_stored_blocks), ("put", "present", c.put_present_blocks),
            ("put", "dropped", c.put_dropped_blocks), ("delete", "deleted", c.deleted_blocks),
        ):
            blocks.add_metric([op, result], value)
        yield blocks
        traffic = CounterMetricFamily("kvstore_data_bytes", "Block bytes moved", labels=["direction"])
        traffic.add_metric(["in"], c.bytes_in)
        traffic.add_metric(["out"], c.bytes_out)
        yield traffic
        yield CounterMetricFamily(
            "kvstore_integrity_failures", "Blocks that failed checksum verification",
            value=c.integrity_failures,
        )

        hits = CounterMetricFamily("kvstore_tier_hits", "Blocks served, by tier", labels=["tier"])
        evictions = CounterMetricFamily("kvstore_tier_evictions", "Blocks whose last copy was evicted", labels=["tier"])
        promotions = CounterMetricFamily("kvstore_tier_promotions", "Blocks copied up from this tier", labels=["tier"])
        demotions = CounterMetricFamily("kvstore_tier_demotions", "Blocks moved down from this tier", labels=["tier"])
        corrupt = CounterMetricFamily(
            "kvstore_tier_integrity_failures", "Copies that failed verification (dropped)", labels=["tier"]
        )
        evicted = CounterMetricFamily("kvstore_tier_evicted_bytes", "Bytes evicted", labels=["tier"])
        capacity = GaugeMetricFamily("kvstore_tier_capacity_bytes", "Tier capacity", labels=["tier"])
        used = GaugeMetricFamily("kvstore_tier_used_bytes", "Tier bytes in use", labels=["tier"])
        count = GaugeMetricFamily("kvstore_tier_blocks", "Blocks resident", labels=["tier"])
        for usage in self._daemon.usage():
            label = [usage.kind.label]
            tc = c.tiers.get(usage.kind) or TierCounters()  # read-only: this runs off the loop
            hits.add_metric(label, tc.hits)
            evictions.add_metric(label, tc.evictions)
            promotions.add_metric(label, tc.promotions)
            demotions.add_metric(label, tc.demotions)
            corrupt.add_metric(label, tc.integrity_failures)
            evicted.add_metric(label, tc.evicted_bytes)
            capacity.add_metric(label, usage.capacity_bytes)
            used.add_metric(label, usage.used_bytes)
            count.add_metric(label, usage.blocks)
        yield from (hits, evictions, evicted, promotions, demotions, corrupt, capacity, used, count)


class Metrics:
    """The registry of one daemon plus the RPC instruments the servicer records into."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(daemon))
        self.rpc_latency = Histogram(
            "kvstore_rpc_duration_seconds", "RPC handling time", ["method"],
            registry=self.registry, buckets=_LATENCY_BUCKETS,
        )
        self.rpc_errors = Counter(
            "kvstore_rpc_errors", "RPCs answered with an error status", ["method", "code"],
            registry=self.registry,
        )
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
