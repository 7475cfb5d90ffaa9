"""What TLS costs: the remote path with mTLS on, against the same path in plaintext in the same run.

A second daemon is started with a throwaway CA's certificates (:mod:`kvstore.bench.certs`) and
requires client certificates; the client connects with its own. Each row's ``vs raw`` is its
throughput over the plaintext row of the same operation, block size and batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Sequence

import numpy as np

from kvstore.bench.certs import CertificateAuthority
from kvstore.bench.datapath import kvstore_rows
from kvstore.bench.measure import Result, ratio
from kvstore.bench.plan import Plan


def tls_rows(plan: Plan, plain: Sequence[Result], dram_bytes: str) -> list[Result]:
    """put/get over mTLS for each block size at the plan's largest batch."""
    import os

    from kvstore.client import KVClient
    from kvstore.server.process import DaemonProcess

    batch = max(plan.batches)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-tls-") as directory:
        ca = CertificateAuthority(directory)
        server, client = ca.issue("server"), ca.issue("client", server=False)
        args = ["--dram-bytes", dram_bytes, "--dram-prefault", "--tls-cert", str(server.cert),
                "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert)]
        with DaemonProcess(args) as daemon:

            async def measure() -> list[Result]:
                rows: list[Result] = []
                async with KVClient(daemon.target, local="off", timeout_s=120, tls_ca=str(ca.cert),
                                    tls_cert=str(client.cert), tls_key=str(client.key)) as kv:
                    for size in plan.block_sizes:
                        blocks = [np.frombuffer(os.urandom(size), np.uint8) for _ in range(batch)]
                        out = [np.ones(size, np.uint8) for _ in range(batch)]
                        for row in await kvstore_rows(kv, blocks, out, plan.calls(size, batch)):
                            name = row.name.replace("remote", "remote mTLS")
                            base = next((p for p in plain if p.name == row.name and p.block_bytes == size
                                         and p.batch == batch), None)
                            rows.append(dataclasses.replace(row, name=name, vs_raw=ratio(row, base)))
                return rows

            return asyncio.run(measure())
