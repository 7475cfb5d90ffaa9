"""`kvstore bench` runs end to end and reports every row (figures are not asserted: no timing in tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys


def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server.cli", "bench", "--quick", "--block-sizes", "64KiB",
         "--batches", "1,4", "--dram-bytes", "256MiB", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    names = {(r["name"], r["batch"]) for r in rows}
    expected = {"memcpy", "put local", "get local", "put remote", "get remote", "lookup", "block_keys (client)"}
    if shutil.which("redis-server"):
        expected |= {"put redis", "get redis"}
    else:
        assert "no Redis rows" in result.stdout
    expected |= {"nvme write", "nvme read", "raw write", "raw read", "s3 put", "s3 get", "raw s3 put", "raw s3 get"}
    expected |= {"peer get grpc", "peer put grpc", "put remote mTLS", "get remote mTLS",
                 "put local tenant", "get local tenant"}
    from kvstore.tiers.peer_nixl import nixl_module

    nixl = nixl_module() is not None
    if nixl:
        expected |= {"raw nixl read", "raw nixl write", "peer get nixl", "peer put nixl"}
    assert expected <= {name for name, _ in names}
    assert {batch for name, batch in names if name == "get local"} == {1, 4}
    for r in rows:
        if r["name"].endswith(("mTLS", "tenant")):   # against the same path without it, same case
            assert r["gbps"] > 0 and r["vs_raw"] > 0 and r["batch"] == 4
        elif r["name"].startswith(("put ", "get ")):
            assert r["gbps"] > 0 and r["p50_ms"] > 0 and r["vs_memcpy"] > 0
        if r["name"] in ("nvme write", "nvme read", "s3 put", "s3 get") or (nixl and r["name"].startswith("peer ")):
            assert r["gbps"] > 0 and r["vs_raw"] > 0
    assert "vs memcpy" in result.stdout and "get local" in result.stdout


def test_bench_scale_runs_and_writes_json(tmp_path):
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server.cli", "bench", "--scale", "8192", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["blocks"] == 8192 and figures["put_blocks_per_s"] > 0 and figures["restart_s"] > 0
    assert 0 < figures["write_through_blocks_per_s"] and 0 < figures["raw_write_blocks_per_s"]
    assert 0 < figures["full_put_blocks_per_s"] and 0 < figures["full_write_through_blocks_per_s"]
    assert "daemon memory per block" in result.stdout and "restart to ready" in result.stdout
