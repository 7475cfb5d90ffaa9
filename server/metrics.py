"""Prometheus metrics of one daemon, on an HTTP port of its own.

Counters are read from the daemon's :class:`~kvstore.stats.Counters` at scrape time (one source of
truth) and exported as :data:`~kvstore.stats.SCHEMA` declares, so a field added there shows up here;
RPC latency is a histogram the servicer observes. Each daemon has its own registry, so several
daemons (or tests) in one process never share series.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.core import Metric as MetricFamily
from prometheus_client.registry import Collector

from kvstore.stats import DAEMON_FIELDS, TIER_FIELDS, Counters, Metric, MetricKind, TierCounters, TierUsage

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

_USAGE = (  # TierUsage attribute, gauge, help
    ("capacity_bytes", "kvstore_tier_capacity_bytes", "Tier capacity (no sample for unbounded tiers)"),
    ("used_bytes", "kvstore_tier_used_bytes", "Tier bytes in use"),
    ("blocks", "kvstore_tier_blocks", "Blocks resident"),
)

_NONE_YET = TierCounters()  # a tier nothing has been counted for: read, never mutated


class StatsSource(Protocol):
    """What the collector reads from a daemon."""

    version: str
    counters: Counters

    def usage(self) -> Sequence[TierUsage]: ...


def _family(families: dict[Metric, MetricFamily], metric: Metric, labels: Sequence[str]) -> MetricFamily:
    """The family ``metric`` is exported as, made on first use (several fields may share one)."""
    family = families.get(metric)
    if family is None:
        kind = CounterMetricFamily if metric.kind is MetricKind.COUNTER else GaugeMetricFamily
        family = families[metric] = kind(metric.name, metric.help, labels=list(labels))
    return family


class DaemonCollector(Collector):
    def __init__(self, daemon: StatsSource) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[MetricFamily]:
        c = self._daemon.counters
        usage = self._daemon.usage()
        families: dict[Metric, MetricFamily] = {}
        for f in DAEMON_FIELDS:
            _family(families, f.metric, f.metric.labels).add_metric(list(f.label_values), getattr(c, f.name))
        tiers = [(u.name, c.tiers.get(u.name, _NONE_YET)) for u in usage]  # read-only: this runs off the loop
        for f in TIER_FIELDS:
            family = _family(families, f.metric, ("tier", *f.metric.labels))
            for name, counters in tiers:
                family.add_metric([name, *f.label_values], getattr(counters, f.name))
        yield from families.values()
        for attr, name, help_text in _USAGE:
            gauge = GaugeMetricFamily(name, help_text, labels=["tier"])
            for u in usage:
                if attr == "capacity_bytes" and not u.capacity_bytes:
                    continue  # a bucket has no capacity: no 0 for dashboards to divide by
                gauge.add_metric([u.name], getattr(u, attr))
            yield gauge
        build = GaugeMetricFamily("kvstore_build_info", "The daemon's version", labels=["version"])
        build.add_metric([self._daemon.version], 1)
        yield build


class Metrics:
    """The registry of one daemon plus the RPC instruments the servicer records into."""

    def __init__(self, daemon: StatsSource) -> None:
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

    def serve(self, host: str, port: int, certfile: str = "", keyfile: str = "") -> int:
        """Start the HTTP exporter (HTTPS with ``certfile``/``keyfile``); returns the bound port."""
        tls = {"certfile": certfile, "keyfile": keyfile} if certfile else {}
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry, **tls)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
