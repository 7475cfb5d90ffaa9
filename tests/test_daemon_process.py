"""`kvstore serve` and `kvstore stats` as a user runs them: real processes, real signals."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.client import KVClient
from kvstore.server.process import DaemonProcess
from kvstore.checksum import checksum
from kvstore.proto.v1 import kvstore_pb2 as pb
from kvstore.proto.v1 import kvstore_pb2_grpc as pb_grpc

from conftest import chain, random_blocks

KVSTORE = [sys.executable, "-m", "kvstore.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon():
    with DaemonProcess(["--metrics-port", str(free_port()), "--dram-bytes", "64MiB"]) as d:
        yield d


def test_serve_needs_no_config_and_answers_health_and_rpcs(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvstore.v1.KVStore"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.KVStoreStub(channel)
        assert stub.Lookup(pb.LookupRequest(keys=[b"k"]), timeout=5).count == 0


def test_metrics_endpoint_reports_usage_and_rpc_latency(daemon):
    metrics_port = daemon.metrics_port
    assert f"metrics http://127.0.0.1:{metrics_port}/metrics" in daemon.log()

    async def traffic():
        async with KVClient(daemon.target, local="require") as kv:
            keys = chain(3, seed=50)
            await kv.put(keys, random_blocks(3, 8192))
            await kv.get(keys)
            await kv.lookup(keys)

    asyncio.run(traffic())
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'kvstore_tier_capacity_bytes{tier="dram"} 6.7108864e+07' in text
    assert 'kvstore_tier_used_bytes{tier="dram"} 24576.0' in text
    assert 'kvstore_blocks_total{op="get",result="hit"} 3.0' in text
    assert 'kvstore_tier_hits_total{tier="dram"} 3.0' in text
    for method in ("Attach", "Reserve", "Commit", "Acquire", "Lookup"):
        assert re.search(rf'kvstore_rpc_duration_seconds_count\{{method="{method}"\}} 1\.0', text), method
    assert 'kvstore_tier_evictions_total{tier="dram"} 0.0' in text


def test_stats_command_prints_a_table(daemon):
    async def traffic():
        async with KVClient(daemon.target) as kv:
            await kv.put(chain(2, seed=51), random_blocks(2, 1 << 20))

    asyncio.run(traffic())
    out = subprocess.run(
        [*KVSTORE, "stats", "--target", daemon.target], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert re.search(r"dram\s+2\.0 MiB\s+64\.0 MiB\s+3\.1%\s+2\s+0\s+0\s+0\s+0\s+0\s+0\s+0", out), out
    assert re.search(r"put blocks stored\s+2", out), out
    as_json = subprocess.run(
        [*KVSTORE, "stats", "--target", daemon.target, "--json"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert '"put_stored_blocks": 2' in as_json and '"tier": "dram"' in as_json


def test_stats_command_without_a_daemon_fails_clearly():
    result = subprocess.run(
        [*KVSTORE, "stats", "--target", f"127.0.0.1:{free_port()}", "--timeout", "0.5"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "no kvstore daemon answered" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_gracefully(daemon, sig):
    port = daemon.port
    assert daemon.stop(sig) == 0
    log = daemon.log()
    assert "shutting down" in log and "kvstore stopped" in log and "Traceback" not in log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_a_put_in_flight_finishes_during_graceful_shutdown(daemon):
    keys = chain(4, seed=52)
    blocks = random_blocks(4, 256 * 1024)
    header = pb.PutHeader(keys=keys, sizes=[len(b) for b in blocks], checksums=[checksum(b) for b in blocks])

    def slow_stream():
        yield pb.PutRequest(header=header)
        for i, block in enumerate(blocks):
            if i == 1:
                daemon.proc.send_signal(signal.SIGTERM)  # mid-stream
            time.sleep(0.2)
            yield pb.PutRequest(data=block)

    with grpc.insecure_channel(daemon.target) as channel:
        response = pb_grpc.KVStoreStub(channel).Put(slow_stream(), timeout=10)
    assert response.stored == 4
    assert daemon.proc.wait(timeout=10) == 0


def test_bad_config_and_busy_port_exit_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dram]\ncapacity = 5\n")
    result = subprocess.run([*KVSTORE, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown config key 'dram.capacity'" in result.stderr

    result = subprocess.run([*KVSTORE, "serve", "--dram-bytes", "lots"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--dram-bytes: cannot read 'lots'" in result.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [*KVSTORE, "serve", "--port", str(port), "--metrics-port", "0", "--dram-bytes", "16MiB", "--nvme-dir", "off"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_second_daemon_on_the_same_port_is_refused(daemon):
    result = subprocess.run(
        [*KVSTORE, "serve", "--port", str(daemon.port), "--metrics-port", "0", "--dram-bytes", "16MiB", "--nvme-dir", "off"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{daemon.port}" in result.stderr


def serve_refused(*args: str) -> str:
    """Run ``kvstore serve`` with ``args``: it must refuse with exit status 2 and one line."""
    result = subprocess.run(
        [*KVSTORE, "serve", "--port", "0", "--metrics-port", "0", *args], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, named", [
    (["--nvme-dir", "off", "--s3-bucket", "b", "--s3-endpoint-url", "minio:9000"], "s3.endpoint_url"),
    (["--nvme-dir", "off", "--dram-bytes", "64TiB"], "dram.capacity_bytes=64.0 TiB is more than this machine"),
    (["--nvme-dir", "off", "--nvme-io", "bogus"], "nvme.io_engine must be one of"),
    (["--nvme-dir", "off", "--policy", "bogus"], "policy must be one of 'lru', 's3fifo'"),
    (["--dram-bytes", "16MiB"], 'nvme.dir "auto" is named after the port'),
])
def test_a_bad_setting_is_one_line_naming_it(args, named):
    assert named in serve_refused(*args)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 MiB tmpfs (needs root; skipped where it cannot be mounted)."""
    import os

    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
    ).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_nvme_space_the_filesystem_cannot_hold_is_refused_at_start(tiny_filesystem):
    line = serve_refused("--dram-bytes", "16MiB", "--nvme-dir", str(tiny_filesystem / "nvme"), "--nvme-bytes", "256MiB")
    assert "nvme.capacity_bytes=256.0 MiB does not fit" in line
    with open(tiny_filesystem / "filler", "wb") as filler:  # now the filesystem is full
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()
        except OSError:
            pass
    line = serve_refused("--dram-bytes", "16MiB", "--nvme-dir", str(tiny_filesystem / "nvme2"), "--nvme-bytes", "1MiB")
    assert "does not fit in nvme.dir=" in line or "cannot set up the NVMe tier" in line


async def test_a_block_too_large_is_the_same_error_on_both_paths():
    from kvstore import BlockTooLargeError
    from kvstore.server import KVStoreServer

    from conftest import make_config

    async with KVStoreServer(make_config(max_block_bytes=1 << 20)) as srv:
        for mode in ("require", "off"):
            async with KVClient(f"127.0.0.1:{srv.port}", local=mode) as kv:
                with pytest.raises(BlockTooLargeError, match="largest block this daemon stores is 1048576"):
                    await kv.put(chain(1, seed=400), [b"x" * ((1 << 20) + 1)])
