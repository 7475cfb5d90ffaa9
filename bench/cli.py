"""``kvstore bench``: starts a daemon (and Redis) on loopback, or uses ``--target``, and prints the table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses

from kvstore.bench.plan import MiB, Plan
from kvstore.config import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer sizes and calls: done in under a minute")
    parser.add_argument("--target", help="benchmark a running daemon instead of starting one")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--block-sizes", help="comma-separated sizes (default 256KiB,2MiB,8MiB)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--paths", default="local,remote", help="data paths to measure: local, remote or both")
    parser.add_argument("--no-redis", action="store_true", help="leave out the Redis baseline")
    parser.add_argument("--dram-bytes", default="2GiB", help="DRAM of the daemon the benchmark starts")
    parser.add_argument("--no-nvme", action="store_true", help="leave out the NVMe tier rows")
    parser.add_argument("--nvme-dir", help="where the NVMe rows write (default: a temporary directory)")


def plan_from(args: argparse.Namespace) -> Plan:
    plan = Plan(block_sizes=(256 * 1024, 2 * MiB), bytes_per_case=64 * MiB, lookup_calls=50) if args.quick else Plan()
    if args.block_sizes:
        sizes = tuple(parse_bytes(s, name="--block-sizes") for s in args.block_sizes.split(","))
        plan = dataclasses.replace(plan, block_sizes=sizes)
    if args.batches:
        plan = dataclasses.replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    return plan


async def _run(target: str, plan: Plan, paths: list[str], redis_port: int | None) -> list:
    from kvstore.bench.datapath import datapath_rows, lookup_rows
    from kvstore.client import KVClient

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for path in paths:
            mode = "require" if path == "local" else "off"
            clients.append(await stack.enter_async_context(KVClient(target, local=mode, timeout_s=120)))
        rows = await datapath_rows(clients, plan, redis_port)
        rows += await lookup_rows(clients[0], plan)
    return rows


def main(args: argparse.Namespace) -> int:
    from kvstore.bench.baselines import RedisServer
    from kvstore.bench.report import machine, table, write_json
    from kvstore.server.process import DaemonProcess

    plan = plan_from(args)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - {"local", "remote"}:
        raise SystemExit("kvstore bench: --paths takes local, remote or local,remote")
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer()) if not args.no_redis else None
        redis_port = redis.port if redis is not None and redis.available else None
        target = args.target or stack.enter_context(
            DaemonProcess(["--dram-bytes", args.dram_bytes, "--dram-prefault"])
        ).target
        rows = asyncio.run(_run(target, plan, paths, redis_port))
    if not args.no_nvme:
        from kvstore.bench.tiers import nvme_rows

        sizes = tuple(s for s in plan.block_sizes if s >= 256 * 1024) or plan.block_sizes
        rows += asyncio.run(nvme_rows(sizes, batch=64 if not args.quick else 16, rounds=5 if not args.quick else 3,
                                      directory=args.nvme_dir))
    print(f"kvstore bench on {machine()}")
    print(table(rows))
    if redis_port is None:
        print("(no Redis rows: redis-server is not installed or --no-redis was given)")
    if args.json:
        write_json(args.json, rows, {"plan": dataclasses.asdict(plan), "paths": paths})
    return 0
