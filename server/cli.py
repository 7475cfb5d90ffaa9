"""The ``kvstore`` command: ``serve`` runs a daemon, ``stats`` prints a running daemon's stats.

Configuration precedence: embedded defaults < ``--config FILE`` (TOML) < flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from kvstore import __version__
from kvstore.config import ServerConfig, format_bytes, parse_bytes
from kvstore.errors import KVStoreError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULTS = ServerConfig()


def load_config(args: argparse.Namespace) -> ServerConfig:
    """Defaults, then the TOML file, then flags."""
    config = DEFAULTS
    if args.config is not None:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except OSError as exc:
            raise KVStoreError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise KVStoreError(f"config file {args.config} is not valid TOML: {exc}") from None
        config = ServerConfig.from_mapping(data)
    overrides = {
        name: value
        for name, value in (
            ("host", args.host), ("port", args.port), ("metrics_port", args.metrics_port),
            ("log_level", args.log_level),
        )
        if value is not None
    }
    if args.dram_bytes is not None:
        overrides["dram_capacity_bytes"] = parse_bytes(args.dram_bytes, name="--dram-bytes")
    if args.dram_prefault:
        overrides["dram_prefault"] = True
    return config.replace(**overrides)


async def serve(config: ServerConfig, ready_file: str | None = None) -> None:
    """Run a daemon until SIGTERM or SIGINT, then shut it down gracefully."""
    from kvstore.server.server import KVStoreServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with KVStoreServer(config) as server:
        if ready_file:
            # Written atomically once the daemon answers, so a supervisor can poll for it.
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(json.dumps({"port": server.port, "metrics_port": server.metrics_port}))
            tmp.replace(ready_file)
        await stop.wait()
        logging.getLogger("kvstore.server").info("shutting down (grace %.1fs)", config.shutdown_grace_s)


def _print_stats(target: str, as_json: bool, timeout_s: float) -> None:
    from kvstore.client import SyncKVClient

    with SyncKVClient(target, timeout_s=timeout_s) as kv:
        stats = kv.stats()
    if as_json:
        print(json.dumps(stats.as_dict(), indent=2))
        return
    print(f"kvstore {stats.version} at {target}, up {stats.uptime_s:.0f}s")
    print()
    header = f"{'tier':<6} {'used':>12} {'capacity':>12} {'use%':>6} {'blocks':>9} {'hits':>10} {'evictions':>10}"
    print(header)
    print("-" * len(header))
    for t in stats.tiers:
        pct = 100.0 * t.used_bytes / t.capacity_bytes if t.capacity_bytes else 0.0
        print(
            f"{t.tier.label:<6} {format_bytes(t.used_bytes):>12} {format_bytes(t.capacity_bytes):>12} "
            f"{pct:>5.1f}% {t.blocks:>9} {t.hits:>10} {t.evictions:>10}"
        )
    print()
    looked = stats.lookup_hit_blocks + stats.lookup_miss_blocks
    fetched = stats.get_hit_blocks + stats.get_miss_blocks
    rows = [
        ("lookup blocks hit / asked", f"{stats.lookup_hit_blocks} / {looked}", _ratio(stats.lookup_hit_blocks, looked)),
        ("get blocks hit / asked", f"{stats.get_hit_blocks} / {fetched}", _ratio(stats.get_hit_blocks, fetched)),
        ("put blocks stored", str(stats.put_stored_blocks), ""),
        ("put blocks already present", str(stats.put_present_blocks), ""),
        ("put blocks dropped (no room)", str(stats.put_dropped_blocks), ""),
        ("blocks deleted", str(stats.deleted_blocks), ""),
        ("bytes in / out", f"{format_bytes(stats.bytes_in)} / {format_bytes(stats.bytes_out)}", ""),
        ("integrity failures", str(stats.integrity_failures), ""),
    ]
    for name, value, extra in rows:
        print(f"{name:<30} {value:>24} {extra}")


def _ratio(a: int, b: int) -> str:
    return f"({100.0 * a / b:.1f}%)" if b else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache store for LLM inference.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the cache daemon (no config file needed)")
    s.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
    s.add_argument("--host", help=f"address to listen on (default {DEFAULTS.host})")
    s.add_argument("--port", type=int, help=f"gRPC port, 0 picks a free one (default {DEFAULTS.port})")
    s.add_argument(
        "--metrics-port", type=int,
        help=f"Prometheus metrics HTTP port, 0 turns metrics off (default {DEFAULTS.metrics_port})",
    )
    s.add_argument(
        "--dram-bytes", metavar="SIZE",
        help=f"DRAM tier capacity, e.g. 8GiB (default {format_bytes(DEFAULTS.dram.capacity_bytes)})",
    )
    s.add_argument(
        "--dram-prefault", action="store_true",
        help="touch the whole DRAM arena at start-up (commits the memory; no first-touch stalls later)",
    )
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--ready-file", metavar="PATH",
        help='once serving, write {"port": ..., "metrics_port": ...} as JSON to PATH (for supervisors)',
    )

    st = sub.add_parser("stats", help="print a running daemon's stats")
    st.add_argument("--target", default=f"127.0.0.1:{DEFAULTS.port}", help="daemon address host:port")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    b = sub.add_parser("bench", help="benchmark put/get/lookup against same-run baselines")
    from kvstore.bench.cli import add_arguments

    add_arguments(b)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = load_config(args)
            logging.basicConfig(
                level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            asyncio.run(serve(config, args.ready_file))
        elif args.command == "stats":
            _print_stats(args.target, args.json, args.timeout)
        elif args.command == "bench":
            from kvstore.bench.cli import main as bench_main

            return bench_main(args)
    except KVStoreError as exc:
        print(f"kvstore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kvstore stats | head`
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
