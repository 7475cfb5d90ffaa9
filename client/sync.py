"""A blocking wrapper around :class:`KVClient` for code that is not async.

    with SyncKVClient("127.0.0.1:7070") as kv:
        kv.put(keys, blocks)

It runs the async client on a private event loop in a background thread, so it is safe to use
from any thread, including one that already runs its own event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from kvstore.client.client import KVClient
from kvstore.client.config import ClientConfig
from kvstore.errors import UnavailableError
from kvstore.client.results import LookupResult, PutResult, Stats

T = TypeVar("T")


class SyncKVClient:
    """A blocking :class:`KVClient`: the same arguments (``config=`` or its fields) and methods."""

    def __init__(self, target: str, *, config: ClientConfig | None = None, **options: Any) -> None:
        self._client = KVClient(target, config=config, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SyncKVClient:
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self) -> None:
        if self._loop is not None:
            raise RuntimeError("SyncKVClient is already connected")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-client", daemon=True)
        self._thread.start()
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._run(self._client.close())
            finally:
                self._stop_loop()

    @property
    def path(self) -> str:
        """The data path in use (:attr:`KVClient.path`)."""
        return self._client.path

    @property
    def config(self) -> ClientConfig:
        """The client's settings (:attr:`KVClient.config`)."""
        return self._client.config

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def _run(self, coro):
        if self._loop is None:
            coro.close()
            raise UnavailableError("SyncKVClient is not connected (use `with SyncKVClient(...)`)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, call: Callable[[KVClient], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Start ``call(client)`` on the client's loop without waiting: for callers that must not
        block (an engine's scheduler), which poll or wait on the future with their own deadline.

            future = kv.submit(lambda client: client.lookup(keys))
        """
        if self._loop is None:
            raise UnavailableError("SyncKVClient is not connected (use `with SyncKVClient(...)`)")

        async def run() -> T:
            return await call(self._client)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return self._run(self._client.lookup(keys))

    def put(self, keys: Sequence[bytes], blocks: Sequence[Any]) -> PutResult:
        return self._run(self._client.put(keys, blocks))

    def get(self, keys: Sequence[bytes]) -> list[bytearray]:
        return self._run(self._client.get(keys))

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> int:
        return self._run(self._client.get_into(keys, buffers))

    def delete(self, keys: Sequence[bytes]) -> int:
        return self._run(self._client.delete(keys))

    def stats(self) -> Stats:
        return self._run(self._client.stats())
