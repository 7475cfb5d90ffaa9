"""``kvstore bench``: starts a daemon (and Redis) on loopback, or uses ``--target``, and prints the table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses

from kvstore.bench.plan import MiB, Plan
from kvstore.config import parse_bytes

BATCH_MIN = 8192


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
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 rows")
    parser.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint for the S3 rows (default: a moto server started on loopback, when installed)",
    )
    parser.add_argument("--s3-bucket", default="kvstore-bench", help="bucket for the S3 rows")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out the peer rows (two daemons, NIXL and the gRPC stream, against raw NIXL)")
    parser.add_argument("--no-secure", action="store_true",
                        help="leave out the rows of a daemon with mTLS and tenants (against the same paths without)")
    parser.add_argument(
        "--scale", type=int, metavar="N",
        help="instead: put N blocks, then report put rate, daemon memory per block, lookup at that size, "
             "write-through against raw I/O and restart time (see kvstore/bench/scale.py)",
    )


def plan_from(args: argparse.Namespace) -> Plan:
    plan = Plan(block_sizes=(256 * 1024, 2 * MiB), bytes_per_case=64 * MiB, lookup_calls=50) if args.quick else Plan()
    if args.block_sizes:
        sizes = tuple(parse_bytes(s, name="--block-sizes") for s in args.block_sizes.split(","))
        plan = dataclasses.replace(plan, block_sizes=sizes)
    if args.batches:
        plan = dataclasses.replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    return plan


async def _run(target: str, plan: Plan, paths: list[str], redis_port: int | None, client: dict | None = None) -> list:
    from kvstore.bench.datapath import datapath_rows, lookup_rows
    from kvstore.client import KVClient

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for path in paths:
            mode = "require" if path == "local" else "off"
            clients.append(await stack.enter_async_context(KVClient(target, local=mode, timeout_s=120, **(client or {}))))
        rows = await datapath_rows(clients, plan, redis_port)
        rows += await lookup_rows(clients[0], plan)
    return rows


def _s3(args: argparse.Namespace, plan: Plan) -> list:
    import os

    from kvstore.bench.baselines import MotoServer
    from kvstore.bench.tiers import s3_rows

    sizes = tuple(s for s in plan.block_sizes if s <= 8 * MiB)[:2]
    batch, rounds = (16, 2) if args.quick else (32, 3)
    if args.s3_endpoint_url:
        return asyncio.run(s3_rows(args.s3_endpoint_url, args.s3_bucket, sizes, batch, rounds))
    if not MotoServer.available():
        print("(no S3 rows: give --s3-endpoint-url, or install moto[server] for a local S3)")
        return []
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "kvstore-bench")  # moto takes any credentials
    server = MotoServer().start()
    try:
        return asyncio.run(s3_rows(server.url, args.s3_bucket, sizes, batch, rounds))
    finally:
        server.stop()


def main(args: argparse.Namespace) -> int:
    from kvstore.bench.baselines import RedisServer
    from kvstore.bench.report import machine, table, write_json
    from kvstore.server.process import DaemonProcess

    if args.scale is not None:
        from kvstore.bench.scale import run

        if args.scale < BATCH_MIN:
            raise SystemExit(f"kvstore bench: --scale takes at least {BATCH_MIN} blocks")
        return run(args.scale, args.nvme_dir, args.json)
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
        from kvstore.server.cli import client_options

        rows = asyncio.run(_run(target, plan, paths, redis_port, client_options(args)))
    if not args.no_secure and not args.target:
        from kvstore.bench.secure import secure_rows

        rows += secure_rows(plan, rows, args.dram_bytes, paths)
    if not args.no_nvme:
        from kvstore.bench.tiers import nvme_rows

        sizes = tuple(s for s in plan.block_sizes if s >= 256 * 1024) or plan.block_sizes
        rows += asyncio.run(nvme_rows(sizes, batch=64 if not args.quick else 16, rounds=5 if not args.quick else 3,
                                      directory=args.nvme_dir))
    if not args.no_s3:
        rows += _s3(args, plan)
    if not args.no_peers:
        from kvstore.bench.peers import peer_rows

        rows += peer_rows(rounds=2 if args.quick else 3)
    print(f"kvstore bench on {machine()}")
    print(table(rows))
    if redis_port is None:
        print("(no Redis rows: redis-server is not installed or --no-redis was given)")
    if any("mTLS" in r.name or "tenant" in r.name for r in rows):
        print("(mTLS and tenant rows: vs raw is against the row of the same path, block size and batch without them)")
    if args.json:
        write_json(args.json, rows, {"plan": dataclasses.asdict(plan), "paths": paths})
    return 0
