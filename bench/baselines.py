"""What kvstore is measured against, on the same bytes in the same run.

- memcpy: ``numpy.copyto`` of the blocks between warmed buffers, the bandwidth limit.
- Redis on loopback through redis-py's asyncio client: what LMCache users deploy as a remote KV
  cache. A ``redis-server`` of our own is started on a free port (no persistence) when the binary
  is installed; otherwise the Redis rows are left out and the table says so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from kvstore.bench.measure import Result, summarize, time_async, time_sync


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_listening(cmd: list[str], port: int, failure: str, timeout_s: float = 30.0) -> subprocess.Popen:
    """Start a server process and wait until it accepts connections on ``port``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.terminate()
    proc.wait(10)
    raise RuntimeError(failure)


def memcpy_row(blocks: Sequence[np.ndarray], out: Sequence[np.ndarray], calls: int) -> Result:
    def copy(_: int) -> None:
        for s, d in zip(blocks, out):
            np.copyto(d, s)

    return summarize("memcpy", blocks[0].nbytes, len(blocks), time_sync(copy, calls))


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def available(self) -> bool:
        return self.binary is not None

    def __enter__(self) -> RedisServer:
        if not self.available:
            return self
        self.port = free_port()
        self.proc = _start_listening(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--proto-max-bulk-len", "1gb"],
            self.port, "redis-server did not start",
        )
        return self

    def __exit__(self, *exc_info) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


async def redis_rows(port: int, blocks: Sequence[np.ndarray], calls: int) -> tuple[Result, Result]:
    """SET and MGET of the same blocks through ``redis.asyncio``, one pipeline per batch."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        batch, size = len(blocks), blocks[0].nbytes
        payloads = [b.tobytes() for b in blocks]

        async def put(i: int) -> None:
            pipe = client.pipeline(transaction=False)
            for payload in payloads:
                pipe.set(os.urandom(16), payload)
            await pipe.execute()

        put_row = summarize("put redis", size, batch, await time_async(put, calls))
        await client.flushall()
        hot = [os.urandom(16) for _ in blocks]
        await client.mset(dict(zip(hot, payloads)))

        async def get(i: int) -> None:
            values = await client.mget(hot)
            if any(v is None for v in values):
                raise RuntimeError("redis lost benchmark keys")

        get_row = summarize("get redis", size, batch, await time_async(get, calls))
        await client.flushall()
        return put_row, get_row
    finally:
        await client.aclose()


class MotoServer:
    """A throwaway S3-compatible server (moto's server mode) on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            return False
        return True

    def start(self) -> MotoServer:
        self.proc = _start_listening(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            self.port, "moto_server did not start (pip install 'moto[server]')",
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
