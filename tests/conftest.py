"""Shared fixtures: a real daemon on port 0 in the test's event loop, and a real client."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from kvstore import Namespace, ServerConfig, block_keys
from kvstore.client import KVClient
from kvstore.config import DramConfig, NvmeConfig
from kvstore.server import KVStoreServer

NS = Namespace(model_id="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)


def make_config(dram_bytes: int = 64 << 20, *, nvme: NvmeConfig | None = None, dram: dict | None = None, **overrides) -> ServerConfig:
    """A daemon on a free loopback port with metrics off, a small DRAM tier and (unless given) no NVMe."""
    base = dict(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_s=1.0)
    base.update(overrides)
    return ServerConfig(
        dram=DramConfig(capacity_bytes=dram_bytes, **(dram or {})), nvme=nvme or NvmeConfig(dir="off"), **base
    )


def chain(n_blocks: int, *, seed: int = 0, block_size: int = 16) -> list[bytes]:
    """Keys of a random token sequence of ``n_blocks`` full blocks."""
    rng = random.Random(seed)
    tokens = [rng.randrange(50_000) for _ in range(n_blocks * block_size)]
    return block_keys(tokens, block_size=block_size, namespace=NS)


def pins(record) -> int:
    """Holds (readers, moves) on any copy of a block."""
    return sum(copy.holds for copy in record.copies.values())


def random_blocks(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


@pytest.fixture(scope="module")
def moto(request):
    """A real S3-compatible server (moto) on loopback for one test module, with the module's
    ``BUCKET`` created when it names one."""
    from s3server import MotoServer, use_test_credentials

    use_test_credentials()
    server = MotoServer().start()
    bucket = getattr(request.module, "BUCKET", None)
    if bucket:
        import boto3

        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield server
    server.stop()


@pytest.fixture
async def server():
    async with KVStoreServer(make_config()) as srv:
        yield srv


class DaemonThread:
    """A real daemon on its own event loop in a background thread, for code under test that calls
    it synchronously (engine connectors): ``address`` is ``host:port``; ``stop()`` ends it."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self._config = config or make_config()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: KVStoreServer | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        try:
            async with KVStoreServer(self._config) as srv:
                self.server = srv
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self) -> DaemonThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, coro):
        """Run ``coro`` on the daemon's loop (to inspect it) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


@pytest.fixture
def daemon_thread():
    """A real daemon (64 MiB DRAM, no NVMe) in a background thread; yields its :class:`DaemonThread`."""
    daemon = DaemonThread().start()
    yield daemon
    daemon.stop()


@pytest.fixture(params=["local", "remote"])
async def kv(server, request):
    """A client on each data path: same-host shared memory, and gRPC streams."""
    mode = "require" if request.param == "local" else "off"
    async with KVClient(f"127.0.0.1:{server.port}", local=mode) as client:
        assert client.path == request.param
        yield client


@pytest.fixture
async def remote_kv(server):
    async with KVClient(f"127.0.0.1:{server.port}", local="off") as client:
        yield client


def _cuda_reason() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install -e '.[gpu]')"
    try:
        if cupy.cuda.is_available():
            return None
    except Exception:
        pass
    return "no CUDA device or driver on this machine"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    reason = _cuda_reason() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
