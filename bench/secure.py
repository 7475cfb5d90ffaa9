"""What the security controls cost, against the same paths without them in the same run.

- mTLS: a second daemon is started with a throwaway CA's certificates (:mod:`kvstore.bench.certs`)
  and requires client certificates; the remote path runs over it.
- Tenants: the same daemon has a tenants file, so a same-host client maps a window of its own and
  the daemon copies between it and the arena (one more memcpy each way).

Each row's ``vs raw`` is its throughput over the row of the same operation, block size and batch
without the control (the plaintext remote path, the same-host path mapping the arena).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvstore.bench.certs import CertificateAuthority
from kvstore.bench.datapath import kvstore_rows
from kvstore.bench.measure import Result, ratio
from kvstore.bench.plan import Plan


def secure_rows(plan: Plan, plain: Sequence[Result], dram_bytes: str, paths: Sequence[str]) -> list[Result]:
    """put/get over mTLS (remote) and through a tenant's window (local), for each block size at
    the plan's largest batch."""
    import secrets

    from kvstore.client import KVClient
    from kvstore.server.process import DaemonProcess
    from kvstore.tenants import hash_token

    batch = max(plan.batches)
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-secure-") as directory:
        ca = CertificateAuthority(directory)
        server, client = ca.issue("server"), ca.issue("client", server=False)
        tenants = Path(directory) / "tenants.toml"
        tenants.write_text(f'[[tenant]]\nname = "bench"\ntoken_sha256 = ["{hash_token(token)}"]\n')
        args = ["--dram-bytes", dram_bytes, "--dram-prefault", "--tls-cert", str(server.cert),
                "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert), "--tenants", str(tenants)]
        tls = dict(tls_ca=str(ca.cert), tls_cert=str(client.cert), tls_key=str(client.key), token=token)
        with DaemonProcess(args) as daemon:

            async def measure() -> list[Result]:
                rows: list[Result] = []
                for path, label in (("remote", "remote mTLS"), ("local", "local tenant")):
                    if path not in paths:
                        continue
                    mode = "off" if path == "remote" else "require"
                    async with KVClient(daemon.target, local=mode, timeout_s=120, **tls) as kv:
                        for size in plan.block_sizes:
                            blocks = [np.frombuffer(os.urandom(size), np.uint8) for _ in range(batch)]
                            out = [np.ones(size, np.uint8) for _ in range(batch)]
                            for row in await kvstore_rows(kv, blocks, out, plan.calls(size, batch)):
                                base = next((p for p in plain if p.name == row.name and p.block_bytes == size
                                             and p.batch == batch), None)
                                rows.append(dataclasses.replace(row, name=row.name.replace(path, label),
                                                                vs_raw=ratio(row, base)))
                return rows

            return asyncio.run(measure())
