"""The stats schema is declared once: the proto, the counters, the client, Prometheus and the CLI follow it."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvstore import TierKind
from kvstore.client.results import Stats, TierStats
from kvstore.config import format_bytes
from kvstore.proto.stats import stats_to_proto
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.server.cli import format_stats
from kvstore.server.metrics import Metrics
from kvstore.stats import (
    DAEMON_FIELDS, SCHEMA, TIER_FIELDS, Counters, Metric, MetricKind, Scope, StatField, TierCounters, TierUsage,
    Unit,
)

DAEMON_NAMES = [f.name for f in DAEMON_FIELDS]
TIER_NAMES = [f.name for f in TIER_FIELDS]
USAGE_NAMES = ["capacity_bytes", "used_bytes", "blocks"]

USAGE = [
    TierUsage("dram", TierKind.DRAM, 64 << 20, 3 << 20, 3),
    TierUsage("nvme", TierKind.NVME, 1 << 30, 5 << 20, 5),
    TierUsage("s3", TierKind.S3, 0, 7 << 20, 7),
]


def counted() -> Counters:
    """Counters where every field of every tier has a value of its own (so a mix-up shows)."""
    counters = Counters(**{name: 1000 + i for i, name in enumerate(DAEMON_NAMES)})
    for t, usage in enumerate(USAGE):
        tier = counters.tier(usage.name)
        for i, name in enumerate(TIER_NAMES):
            setattr(tier, name, 100 * (t + 1) + i)
    return counters


def names(message) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def values(obj, fields: list[str]) -> dict[str, int]:
    return {name: getattr(obj, name) for name in fields}


def test_the_proto_messages_carry_exactly_the_schemas_fields():
    assert names(pb.StatsResponse) == {*DAEMON_NAMES, "version", "uptime_s", "tiers"}
    assert names(pb.TierStats) == {*TIER_NAMES, "tier", "name", *USAGE_NAMES}


def test_the_counters_and_the_clients_results_have_exactly_the_schemas_fields():
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert fields(Counters) == {*DAEMON_NAMES, "tiers"}
    assert fields(TierCounters) == set(TIER_NAMES)
    assert fields(Stats) == {*DAEMON_NAMES, "version", "uptime_s", "tiers"}
    assert fields(TierStats) == {*TIER_NAMES, "tier", "name", *USAGE_NAMES}
    assert [f.name for f in dataclasses.fields(TierUsage)] == ["name", "kind", *USAGE_NAMES]


def test_the_schema_names_each_field_and_each_sample_once():
    for scope in Scope:
        in_scope = [f.name for f in SCHEMA if f.scope is scope]
        assert len(in_scope) == len(set(in_scope)), scope
    samples = [(f.metric.name, f.label_values) for f in SCHEMA]
    assert len(samples) == len(set(samples))
    families = {f.metric for f in SCHEMA}
    assert len({m.name for m in families}) == len(families), "two families share a metric name"
    assert all("tier" not in f.metric.labels for f in TIER_FIELDS), "the collector adds the tier label"
    assert len({f.title for f in TIER_FIELDS}) == len(TIER_FIELDS), "two columns share a header"


def test_a_field_whose_labels_do_not_fit_its_metric_is_refused():
    with pytest.raises(ValueError, match="stats field x"):
        StatField("x", "help", Scope.DAEMON, Metric("m", "help", labels=("op",)), (), "x")


def test_counters_round_trip_through_the_proto_to_the_clients_stats():
    counters = counted()
    msg = stats_to_proto(version="1.2.3", uptime_s=42.5, counters=counters, usage=USAGE)
    stats = Stats.from_proto(pb.StatsResponse.FromString(msg.SerializeToString()))

    assert (stats.version, stats.uptime_s) == ("1.2.3", 42.5)
    assert values(stats, DAEMON_NAMES) == values(counters, DAEMON_NAMES)
    assert [(t.name, t.tier) for t in stats.tiers] == [(u.name, u.kind) for u in USAGE]
    for row, usage in zip(stats.tiers, USAGE):
        assert values(row, USAGE_NAMES) == values(usage, USAGE_NAMES)
        assert values(row, TIER_NAMES) == values(counters.tiers[usage.name], TIER_NAMES)


def test_a_tier_nothing_was_counted_for_reports_zeros_and_is_not_added():
    counters = Counters()
    msg = stats_to_proto(version="v", uptime_s=0.0, counters=counters, usage=USAGE[:1])
    assert all(getattr(msg.tiers[0], name) == 0 for name in TIER_NAMES)
    assert counters.tiers == {}


def test_the_clients_stats_find_tiers_by_kind_and_by_name():
    usage = [*USAGE, TierUsage("nvme-archive", TierKind.NVME, 1 << 40, 0, 0)]
    counters = counted()
    counters.tier("nvme-archive").hits = 9
    stats = Stats.from_proto(stats_to_proto(version="v", uptime_s=1.0, counters=counters, usage=usage))

    assert stats.tier(TierKind.NVME).name == "nvme"   # the first of its kind
    assert stats.tier_named("nvme-archive").hits == 9
    assert stats.tier(TierKind.HBM) is None and stats.tier_named("tape") is None
    rows = stats.as_dict()["tiers"]
    assert [(r["tier"], r["name"]) for r in rows][-2:] == [("s3", "s3"), ("nvme", "nvme-archive")]
    assert rows[2]["dropped_uploads"] == counters.tiers["s3"].dropped_uploads


def scrape(counters: Counters) -> dict[tuple[str, tuple], float]:
    """Every sample a daemon at version 1.2.3 with tiers USAGE exports, by (name, sorted labels)."""
    daemon = SimpleNamespace(counters=counters, usage=lambda: USAGE, version="1.2.3")
    text = generate_latest(Metrics(daemon).registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_name(field: StatField) -> str:
    return field.metric.name + ("_total" if field.metric.kind is MetricKind.COUNTER else "")


def test_prometheus_exports_every_schema_field_for_every_tier():
    counters = counted()
    samples = scrape(counters)

    for f in DAEMON_FIELDS:
        labels = tuple(sorted(zip(f.metric.labels, f.label_values)))
        assert samples[(sample_name(f), labels)] == getattr(counters, f.name), f.name
    for f in TIER_FIELDS:
        for usage in USAGE:
            labels = tuple(sorted([("tier", usage.name), *zip(f.metric.labels, f.label_values)]))
            expected = getattr(counters.tiers[usage.name], f.name)
            assert samples[(sample_name(f), labels)] == expected, (f.name, usage.name)
    for usage in USAGE:
        for name in USAGE_NAMES:
            sample = (f"kvstore_tier_{name}", (("tier", usage.name),))
            if name == "capacity_bytes" and usage.capacity_bytes == 0:
                assert sample not in samples  # unbounded (S3): no 0 for dashboards to divide by
                continue
            assert samples[sample] == getattr(usage, name)
    assert samples[("kvstore_build_info", (("version", "1.2.3"),))] == 1


def test_prometheus_keeps_the_metric_names_dashboards_use():
    counters = counted()
    samples = scrape(counters)
    assert samples[("kvstore_blocks_total", (("op", "get"), ("result", "hit")))] == counters.get_hit_blocks
    assert samples[("kvstore_data_bytes_total", (("direction", "in"),))] == counters.bytes_in
    assert samples[("kvstore_integrity_failures_total", ())] == counters.integrity_failures
    s3 = counters.tiers["s3"]
    assert samples[("kvstore_tier_hits_total", (("tier", "s3"),))] == s3.hits
    for name in ("errors", "uploads", "dropped_uploads"):   # missing before the schema
        assert samples[(f"kvstore_tier_{name}_total", (("tier", "s3"),))] == getattr(s3, name)


def test_a_scrape_does_not_add_tiers_to_the_counters():
    counters = Counters()
    samples = scrape(counters)
    assert samples[("kvstore_tier_hits_total", (("tier", "nvme"),))] == 0
    assert counters.tiers == {}


def table(counters: Counters) -> list[str]:
    return format_stats(Stats.from_proto(stats_to_proto(version="v", uptime_s=1.0, counters=counters, usage=USAGE)))


def test_the_stats_table_has_a_column_per_tier_field_with_each_value_under_its_header():
    counters = counted()
    header, rule, *rest = table(counters)
    rows = rest[:len(USAGE)]

    assert header.split()[:5] == ["tier", "used", "capacity", "use%", "blocks"] and set(rule) == {"-"}
    assert [row.split()[0] for row in rows] == ["dram", "nvme", "s3"]
    for f in TIER_FIELDS:
        end = header.index(f" {f.title}") + len(f" {f.title}")   # cells are right-aligned under it
        for row, usage in zip(rows, USAGE):
            value = getattr(counters.tiers[usage.name], f.name)
            shown = format_bytes(value) if f.unit is Unit.BYTES else str(value)
            assert row[:end].endswith(f" {shown}"), (f.name, row)


def test_the_stats_table_shows_no_capacity_for_an_unbounded_tier():
    dram, _, s3 = table(counted())[2:5]
    assert dram.split()[1:7] == ["3.0", "MiB", "64.0", "MiB", "4.7%", "3"]
    assert s3.split()[1:6] == ["7.0", "MiB", "-", "-", "7"]


def test_the_stats_report_has_a_row_per_daemon_field():
    counters = counted()
    lines = table(counters)
    for f in DAEMON_FIELDS:
        value = getattr(counters, f.name)
        shown = format_bytes(value) if f.unit is Unit.BYTES else str(value)
        assert any(line.startswith(f.title) and line.endswith(f" {shown}") for line in lines), f.title
    assert any(line.startswith("lookup hit rate") for line in lines)
