"""``kvstore bench``: starts a daemon on loopback (or uses ``--target``) and prints the tables."""

from __future__ import annotations

import argparse
import asyncio

from kvstore.bench.plan import MiB, Plan
from kvstore.config import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer calls and sizes: done in under a minute")
    parser.add_argument("--target", help="benchmark a running daemon instead of starting one")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--block-sizes", help="comma-separated sizes, e.g. 256KiB,2MiB,8MiB")
    parser.add_argument("--batches", help="comma-separated batch sizes, e.g. 1,64")
    parser.add_argument("--dram-bytes", default="2GiB", help="DRAM of the daemon the benchmark starts")


def plan_from(args: argparse.Namespace) -> Plan:
    plan = Plan(bytes_per_case=64 * MiB, lookup_calls=50) if args.quick else Plan()
    if args.quick and not args.block_sizes:
        plan = Plan(block_sizes=(256 * 1024, 2 * MiB), bytes_per_case=64 * MiB, lookup_calls=50)
    if args.block_sizes:
        sizes = tuple(parse_bytes(s, name="--block-sizes") for s in args.block_sizes.split(","))
        plan = Plan(**{**_fields(plan), "block_sizes": sizes})
    if args.batches:
        plan = Plan(**{**_fields(plan), "batches": tuple(int(b) for b in args.batches.split(","))})
    return plan


def _fields(plan: Plan) -> dict:
    return {name: getattr(plan, name) for name in plan.__dataclass_fields__}


async def _run(target: str, plan: Plan) -> list:
    from kvstore.bench.datapath import datapath_rows, lookup_rows
    from kvstore.client import KVClient

    async with KVClient(target, timeout_s=120) as kv:
        rows = await datapath_rows(kv, plan)
        rows += await lookup_rows(kv, plan)
    return rows


def main(args: argparse.Namespace) -> int:
    from kvstore.bench.report import machine, table, write_json
    from kvstore.server.process import DaemonProcess

    plan = plan_from(args)
    if args.target:
        rows = asyncio.run(_run(args.target, plan))
    else:
        with DaemonProcess(["--dram-bytes", args.dram_bytes, "--dram-prefault"]) as daemon:
            rows = asyncio.run(_run(daemon.target, plan))
    print(f"kvstore bench on {machine()}")
    print(table(rows))
    if args.json:
        write_json(args.json, rows, {"plan": _fields(plan)})
    return 0
