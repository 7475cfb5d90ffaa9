"""The ``kvstore`` command: ``serve`` runs a daemon, ``stats`` prints a running daemon's stats.

Configuration precedence: embedded defaults < ``--config FILE`` (TOML) < flags.
"""

from __future__ import annotations

import os

# gRPC's core logs every failed TLS handshake at INFO on stderr, in its own format, ahead of the
# one line this command prints; ERROR and up still show. Set before gRPC loads; the caller's wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore import __version__
from kvstore.config import ServerConfig, format_bytes, parse_bytes
from kvstore.errors import ConfigError, KVStoreError
from kvstore.stats import DAEMON_FIELDS, TIER_FIELDS, Unit

if TYPE_CHECKING:
    from kvstore.client import Stats

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULTS = ServerConfig()


def _size(text: str) -> int:
    return parse_bytes(text, name="size")


# flag, ServerConfig.replace() name, parse, help. Every flag can also come from the environment
# as KVSTORE_<FLAG> (--nvme-dir: KVSTORE_NVME_DIR).
SETTINGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, f"address to listen on (default {DEFAULTS.host})"),
    ("--port", "port", int, f"gRPC port, 0 picks a free one (default {DEFAULTS.port})"),
    ("--metrics-port", "metrics_port", int,
     f"Prometheus metrics HTTP port, 0 turns metrics off (default {DEFAULTS.metrics_port})"),
    ("--hbm-bytes", "hbm_capacity_bytes", _size,
     "GPU-memory tier above DRAM, e.g. 16GiB (default 0: off; left out where no CUDA device answers)"),
    ("--hbm-device", "hbm_device", int, "CUDA device of the HBM tier (default 0)"),
    ("--dram-bytes", "dram_capacity_bytes", _size,
     f"DRAM tier capacity, e.g. 8GiB (default {format_bytes(DEFAULTS.dram.capacity_bytes)})"),
    ("--dram-high-watermark", "dram_high_watermark", float,
     f"DRAM fill that starts demotion to NVMe (default {DEFAULTS.dram.high_watermark})"),
    ("--dram-low-watermark", "dram_low_watermark", float,
     f"DRAM fill that demotion brings it down to (default {DEFAULTS.dram.low_watermark})"),
    ("--nvme-dir", "nvme_dir", str,
     'NVMe tier directory; "auto" = $XDG_CACHE_HOME/kvstore/<port>, "off" = no NVMe tier (default auto)'),
    ("--nvme-bytes", "nvme_capacity_bytes", _size,
     f"NVMe tier capacity (default {format_bytes(DEFAULTS.nvme.capacity_bytes)})"),
    ("--nvme-high-watermark", "nvme_high_watermark", float, f"(default {DEFAULTS.nvme.high_watermark})"),
    ("--nvme-low-watermark", "nvme_low_watermark", float, f"(default {DEFAULTS.nvme.low_watermark})"),
    ("--nvme-io", "nvme_io_engine", str, "auto (kvikio when a CUDA driver is present), kvikio or posix"),
    ("--s3-bucket", "s3_bucket", str, "S3 bucket of the object tier; empty (the default) means no S3 tier"),
    ("--s3-endpoint-url", "s3_endpoint_url", str, "S3-compatible endpoint, e.g. http://minio:9000 (default: AWS)"),
    ("--s3-region", "s3_region", str, f"(default {DEFAULTS.s3.region})"),
    ("--s3-prefix", "s3_prefix", str, f"object name prefix in the bucket (default {DEFAULTS.s3.prefix})"),
    ("--peers", "peer_peers", str,
     "other daemons of the cluster, HOST:PORT,... (this daemon may be listed too); empty: no peer tier"),
    ("--peers-dns", "peer_dns", str,
     "NAME:PORT resolved every few seconds for the peers (a Kubernetes headless Service)"),
    ("--advertise", "peer_advertise", str,
     "HOST:PORT the peers reach this daemon at (default: --host and the bound port; this host's address for 0.0.0.0)"),
    ("--transfer", "peer_transfer", str, "how block bytes move between daemons: auto, nixl or grpc (default auto)"),
    ("--peer-timeout-s", "peer_timeout_s", float,
     f"deadline of every question to a peer (default {DEFAULTS.peer.timeout_s})"),
    ("--tls-cert", "tls_cert", str, "PEM certificate chain to serve TLS with (default: plaintext; see docs/security.md)"),
    ("--tls-key", "tls_key", str, "PEM private key of --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", str, "PEM CA bundle: require client certificates it signed (mTLS)"),
    ("--tls-peer-ca", "tls_peer_ca", str, "PEM CA bundle the peers' certificates are checked against (default --tls-client-ca)"),
    ("--tls-peer-server-name", "tls_peer_server_name", str,
     "name expected in the peers' certificates when their addresses are not in them"),
    ("--tenants", "tenants", str,
     "tenants file (TOML): bearer tokens (hashed), shared namespaces, request rates; see docs/security.md"),
    ("--peer-token-file", "peer_token_file", str,
     "file holding the bearer token this daemon presents to its peers (a tenant with peer = true)"),
    ("--policy", "policy", str, "eviction policy: lru or s3fifo (scan-resistant) (default lru)"),
    ("--local-socket", "local_socket", str, 'same-host socket path, "auto" or "off" (default auto)'),
    ("--log-level", "log_level", str, "debug, info, warning or error (default info)"),
]
SWITCHES: list[tuple[str, str, str]] = [
    ("--dram-prefault", "dram_prefault",
     "touch the whole DRAM arena at start-up (commits the memory; no first-touch stalls later)"),
    ("--write-through", "write_through", "persist every put on NVMe before acknowledging it"),
    ("--s3-write-through", "s3_write_through", "upload every put to S3 before acknowledging it"),
]


def _env_name(flag: str) -> str:
    return "KVSTORE_" + flag.lstrip("-").upper().replace("-", "_")


def load_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """Defaults, then the TOML file, then KVSTORE_* environment variables, then flags."""
    config = DEFAULTS
    if args.config is not None:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except OSError as exc:
            raise KVStoreError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise KVStoreError(f"config file {args.config} is not valid TOML: {exc}") from None
        config = ServerConfig.from_mapping(data)
    overrides: dict[str, Any] = {}
    for flag, name, parse, _ in SETTINGS:
        raw = getattr(args, name)
        source = flag
        if raw is None and _env_name(flag) in environ:
            raw, source = environ[_env_name(flag)], _env_name(flag)
        if raw is not None:
            try:
                overrides[name] = parse(raw)
            except (ValueError, KVStoreError):
                raise ConfigError(f"{source}: cannot read {raw!r}") from None
    for flag, name, _ in SWITCHES:
        value = environ.get(_env_name(flag), "").lower() in ("1", "true", "yes", "on") or getattr(args, name)
        if value:
            overrides[name] = True
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


def client_options(args: argparse.Namespace) -> dict[str, str]:
    """The client settings of ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name``
    and ``--token-file`` (the token read from it)."""
    from kvstore.client.config import security_options

    return security_options(args, token_setting="--token-file")


def add_client_tls(parser: argparse.ArgumentParser) -> None:
    """The flags a command that connects to a TLS daemon needs (``stats``, ``bench --target``)."""
    parser.add_argument("--token-file", metavar="PATH",
                        help="a file holding the bearer token of a tenant (a daemon with tenants)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA that signed the daemon's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a daemon that requires one (mTLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-server-name", metavar="NAME", help="name expected in the daemon's certificate")


def _print_stats(args: argparse.Namespace) -> None:
    from kvstore.client import SyncKVClient

    target, as_json = args.target, args.json
    with SyncKVClient(target, timeout_s=args.timeout, connect_timeout_s=args.timeout, **client_options(args)) as kv:
        stats = kv.stats()
    if as_json:
        print(json.dumps(stats.as_dict(), indent=2))
        return
    print(f"kvstore {stats.version} at {target}, up {stats.uptime_s:.0f}s")
    print()
    for line in format_stats(stats):
        print(line)


async def _health(args: argparse.Namespace) -> int:
    """Probe the standard health service: 0 when SERVING, 1 (with a line) otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvstore.client.config import ClientConfig
    from kvstore.proto.channel import open_channel, wait_until_ready

    config = ClientConfig(**client_options(args))
    tls = config.channel_tls()
    channel = open_channel(args.target, tls, config.token)
    try:
        await wait_until_ready(channel, args.target, tls, args.timeout)
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    except asyncio.TimeoutError:
        print(f"kvstore: {args.target} did not answer within {args.timeout:g}s", file=sys.stderr)
        return 1
    except Exception as exc:   # a probe reports, it does not trace back
        print(f"kvstore: {args.target}: {getattr(exc, 'details', lambda: exc)()}", file=sys.stderr)
        return 1
    finally:
        await channel.close()
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"kvstore: {args.target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}", file=sys.stderr)
        return 1
    return 0


def _write_certs(directory: str, names: list[str]) -> None:
    try:
        from kvstore.bench.certs import CertificateAuthority
    except ImportError:
        raise KVStoreError("kvstore certs needs the cryptography package (pip install cryptography)") from None
    ca = CertificateAuthority(directory)
    server, client = ca.issue("server", names=names), ca.issue("client", server=False)
    print(f"wrote {ca.cert}, {server.cert}, {server.key}, {client.cert}, {client.key} (for trying TLS, not production)")
    print(f"  kvstore serve --tls-cert {server.cert} --tls-key {server.key} --tls-client-ca {ca.cert}")
    print(f"  kvstore stats --tls-ca {ca.cert} --tls-cert {client.cert} --tls-key {client.key}")


def _print_token(name: str, token_file: str | None, peer: bool = False) -> None:
    import secrets

    from kvstore.tenants import hash_token, valid_tenant_name

    if not valid_tenant_name(name):
        raise ConfigError(f"--name: a tenant name is 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    token = secrets.token_urlsafe(32)
    # The token to a file or stderr, the table to stdout: `kvstore token >> tenants.toml` stores only the hash.
    if token_file:
        try:
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"--token-file: cannot create {token_file}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"token for {name} written to {token_file} (give it to its workers: --token-file, KVClient(token=...))",
              file=sys.stderr)
    else:
        print(f"token for {name} (give it to its workers: KVClient(..., token=...); it is not stored): {token}",
              file=sys.stderr)
    print(f'[[tenant]]\nname = "{name}"\ntoken_sha256 = ["{hash_token(token)}"]' + ("\npeer = true" if peer else ""))


def format_stats(stats: Stats) -> list[str]:
    """The ``kvstore stats`` report: a table with a row per tier, then the daemon's counters.

    The table's counter columns and the counter rows are the schema's fields, in its order.
    """

    def show(value: int, unit: Unit) -> str:
        return format_bytes(value) if unit is Unit.BYTES else str(value)

    counters = [(f, max(len(f.title), 10 if f.unit is Unit.BYTES else 9)) for f in TIER_FIELDS]
    name_width = max([4, *(len(t.name) for t in stats.tiers)])
    header = f"{'tier':<{name_width}} {'used':>12} {'capacity':>12} {'use%':>6} {'blocks':>9}"
    header += "".join(f" {f.title:>{width}}" for f, width in counters)
    lines = [header, "-" * len(header)]
    for t in stats.tiers:
        # An unbounded tier (S3) has no capacity: its row counts what this daemon knows to be there.
        capacity = format_bytes(t.capacity_bytes) if t.capacity_bytes else "-"
        pct = f"{100.0 * t.used_bytes / t.capacity_bytes:>5.1f}%" if t.capacity_bytes else f"{'-':>6}"
        row = f"{t.name:<{name_width}} {format_bytes(t.used_bytes):>12} {capacity:>12} {pct} {t.blocks:>9}"
        row += "".join(f" {show(getattr(t, f.name), f.unit):>{width}}" for f, width in counters)
        lines.append(row)
    lines.append("")
    for f in DAEMON_FIELDS:
        lines.append(f"{f.title:<30} {show(getattr(stats, f.name), f.unit):>24}")
    lines.append(f"{'lookup hit rate':<30} {_ratio(stats.lookup_hit_blocks, stats.lookup_miss_blocks):>24}")
    lines.append(f"{'get hit rate':<30} {_ratio(stats.get_hit_blocks, stats.get_miss_blocks):>24}")
    return lines


def _ratio(hits: int, misses: int) -> str:
    asked = hits + misses
    return f"{100.0 * hits / asked:.1f}% of {asked}" if asked else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache store for LLM inference.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the cache daemon (no config file needed)")
    s.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
    for flag, name, _, help_text in SETTINGS:
        s.add_argument(flag, dest=name, metavar=name.rsplit("_", 1)[-1].upper(), help=help_text)
    for flag, name, help_text in SWITCHES:
        s.add_argument(flag, dest=name, action="store_true", help=help_text)
    s.add_argument(
        "--ready-file", metavar="PATH",
        help='once serving, write {"port": ..., "metrics_port": ...} as JSON to PATH (for supervisors)',
    )

    st = sub.add_parser("stats", help="print a running daemon's stats")
    st.add_argument("--target", default=f"127.0.0.1:{DEFAULTS.port}", help="daemon address host:port")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    add_client_tls(st)
    h = sub.add_parser("health", help="exit 0 when a daemon answers SERVING on the gRPC health service (probes)")
    h.add_argument("--target", default=f"127.0.0.1:{DEFAULTS.port}", help="daemon address host:port")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_client_tls(h)
    ce = sub.add_parser("certs", help="make a throwaway CA with server and client certificates, to try TLS")
    ce.add_argument("directory", help="where to write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem")
    ce.add_argument("--name", action="append", default=[],
                    help="another DNS name or IP the server certificate is valid for (repeatable)")
    tk = sub.add_parser("token", help="make a bearer token for a tenant and print it with its hash")
    tk.add_argument("--name", default="my-tenant", help="the tenant's name in the printed [[tenant]] table")
    tk.add_argument("--peer", action="store_true", help="the tenant the daemons of a cluster call each other as")
    tk.add_argument("--token-file", metavar="PATH",
                    help="write the token alone to PATH (mode 0600, a new file) instead of printing it on stderr")
    b = sub.add_parser("bench", help="benchmark put/get/lookup against same-run baselines")
    from kvstore.bench.cli import add_arguments

    add_arguments(b)
    add_client_tls(b)
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
        elif args.command == "health":
            return asyncio.run(_health(args))
        elif args.command == "certs":
            _write_certs(args.directory, args.name)
        elif args.command == "token":
            _print_token(args.name, args.token_file, args.peer)
        elif args.command == "stats":
            _print_stats(args)
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
