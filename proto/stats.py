"""The daemon's counters and tier usage as a ``kvstore.v1.StatsResponse``, field by field from the schema.

The message is hand-written in ``v1/kvstore.proto``; its counter fields carry the names of
:data:`kvstore.stats.SCHEMA` (a test keeps the two equal), so this module loops over the schema
instead of naming them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.stats import DAEMON_FIELDS, TIER_FIELDS, Counters, TierCounters, TierUsage

_NONE_YET = TierCounters()  # a tier nothing has been counted for: read, never mutated


def stats_to_proto(
    *, version: str, uptime_s: float, counters: Counters, usage: Sequence[TierUsage]
) -> pb.StatsResponse:
    """One ``StatsResponse``: a ``TierStats`` row per ``usage`` entry, in order, with that tier's counters.

    Reads ``counters`` only (a tier without counters yet reports zeros), so it may run off the
    event-loop thread.
    """
    rows = []
    for u in usage:
        tier = counters.tiers.get(u.name, _NONE_YET)
        rows.append(pb.TierStats(
            tier=u.kind, name=u.name, capacity_bytes=u.capacity_bytes, used_bytes=u.used_bytes, blocks=u.blocks,
            **{f.name: getattr(tier, f.name) for f in TIER_FIELDS},
        ))
    return pb.StatsResponse(
        version=version, uptime_s=uptime_s, tiers=rows,
        **{f.name: getattr(counters, f.name) for f in DAEMON_FIELDS},
    )
