"""A connector's link to its kvstore daemon: calls with deadlines, and failures that are misses.

Engines call their cache from loops that must not stop: a scheduler step, a model's forward pass.
:class:`DaemonLink` owns a :class:`~kvstore.client.SyncKVClient` for one connector and gives it
the guarantees those loops need:

- construction never blocks and never fails because the daemon is down: the link connects in the
  background, retrying with a growing pause, and until it has connected every call is a miss;
- every call has a deadline (``timeout_s``, or the caller's own) and returns the caller's default
  on any failure (timeout, daemon gone, bad answer), with a warning at most every few seconds;
- :meth:`submit` starts a call without waiting, for callers that poll (vLLM's scheduler answers
  "ask again later" while a lookup is in flight).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore.backoff import Backoff
from kvstore.client.client import KVClient
from kvstore.client.config import ClientConfig, LocalMode, security_options
from kvstore.client.sync import SyncKVClient
from kvstore.errors import ConfigError

log = logging.getLogger("kvstore.integrations")

T = TypeVar("T")
WARN_EVERY_S = 10.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkConfig:
    """How a connector reaches its daemon; the same keys in every engine's extra config.

    Args:
        address: ``host:port`` of the daemon (the node's own daemon: same-host clients map its
            memory).
        local: the client's same-host mode (``"auto"``, ``"off"``, ``"require"``).
        timeout_s: deadline of each load or save.
        lookup_timeout_s: the longest a lookup may take before it counts as a miss.
        connect_timeout_s: deadline of each attempt to connect.
        retry_s: first pause between attempts to connect (it doubles, up to a minute).
        token_file: a file holding the bearer token of the engine's tenant (a daemon with
            tenants); without one, ``$KVSTORE_TOKEN`` when set. Not the token itself: engine
            options end up in command lines and logs.
        tls_ca, tls_cert, tls_key, tls_server_name: as in :class:`~kvstore.client.ClientConfig`.
    """

    address: str = "127.0.0.1:7070"
    local: str = "auto"
    timeout_s: float = 5.0
    lookup_timeout_s: float = 0.5
    connect_timeout_s: float = 5.0
    retry_s: float = 1.0
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or ":" not in self.address:
            raise ConfigError(f"address must be 'host:port', got {self.address!r}")
        if self.local not in {mode.value for mode in LocalMode}:
            raise ConfigError(f"local must be one of 'auto', 'off', 'require', got {self.local!r}")
        for name in ("timeout_s", "lookup_timeout_s", "connect_timeout_s", "retry_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
                raise ConfigError(f"{name} must be a number of seconds in (0, 3600), got {value!r}")
        for name in ("token_file", "tls_ca", "tls_cert", "tls_key", "tls_server_name"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string (a path), got {getattr(self, name)!r}")

    def client_security(self) -> dict[str, str]:
        """The client's token and TLS settings (the token read from ``token_file`` or ``$KVSTORE_TOKEN``)."""
        return security_options(self, token_setting="token_file", token_env="KVSTORE_TOKEN")

    @classmethod
    def split(cls, options: Mapping[str, Any], known: Mapping[str, Any], *, where: str) -> tuple[LinkConfig, dict]:
        """The link's settings from an engine's option mapping, and the connector's own.

        ``known`` maps each of the connector's own keys to its default. A key that is neither is
        refused with a message naming it and ``where`` it came from.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - fields - set(known)
        if unknown:
            allowed = ", ".join(sorted(fields | set(known)))
            raise ConfigError(f"unknown kvstore option(s) {', '.join(sorted(unknown))} in {where}; known: {allowed}")
        link = cls(**{k: v for k, v in options.items() if k in fields})
        own = {**known, **{k: v for k, v in options.items() if k in known}}
        return link, own


class DaemonLink:
    """A background-connected client whose calls return a default instead of raising.

    Args:
        config: where the daemon is and the deadlines.
        namespace: the client's namespace (see :class:`~kvstore.client.ClientConfig`).
        owner: names the connector in log lines and thread names.
    """

    def __init__(self, config: LinkConfig, *, namespace: bytes, owner: str) -> None:
        self.config = config
        self.owner = owner
        self._client = SyncKVClient(config.address, config=ClientConfig(
            namespace=namespace, local=config.local, timeout_s=config.timeout_s,
            connect_timeout_s=config.connect_timeout_s, **config.client_security(),
        ))
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._last_warning = 0.0
        self._suppressed = 0
        self._thread = threading.Thread(target=self._connect, name=f"kvstore-{owner}-connect", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def path(self) -> str | None:
        """The client's data path (``"local"`` or ``"remote"``), None before it connects."""
        return self._client.path if self.connected else None

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def _connect(self) -> None:
        backoff = Backoff(base_s=self.config.retry_s, growth=max(60.0 / self.config.retry_s, 1.0))
        while not self._closed.is_set():
            try:
                self._client.connect()
            except Exception as exc:
                pause = backoff.failed(time.monotonic())
                self.warn(f"cannot reach the kvstore daemon at {self.config.address} ({exc}); "
                          f"every lookup is a miss until it answers (next try in {pause:.0f}s)")
                self._closed.wait(pause)
                continue
            if self._closed.is_set():   # closed while connecting
                self._client.close()
                return
            log.info("%s connected to kvstore at %s (%s path)", self.owner, self.config.address, self.path)
            self._connected.set()
            return

    def submit(self, call: Callable[[KVClient], Awaitable[T]]) -> concurrent.futures.Future[T] | None:
        """Start ``call(client)``; None when the link is not connected (a miss)."""
        if not self._connected.is_set() or self._closed.is_set():
            return None
        try:
            return self._client.submit(call)
        except Exception as exc:   # the loop is gone (closing)
            self.warn(f"{self.owner}: {exc}")
            return None

    def call(self, what: str, call: Callable[[KVClient], Awaitable[T]], default: T, *, timeout_s: float | None = None) -> T:
        """``call(client)`` within ``timeout_s`` (``config.timeout_s``), or ``default`` on any failure.

        It does not return while an abandoned call still runs: a call given up on before it
        started never starts, and one that started is waited for (up to ``config.timeout_s``
        more), so it cannot still read or write the caller's buffers (an engine's pages) after.
        """
        lock, state, settled = threading.Lock(), {"started": False, "abandoned": False}, threading.Event()

        async def guarded(client: KVClient) -> T:
            with lock:
                if state["abandoned"]:
                    return default
                state["started"] = True
            try:
                return await call(client)
            finally:
                settled.set()

        future = self.submit(guarded)
        if future is None:
            return default
        failed = object()
        result = self.result(what, future, failed, timeout_s=timeout_s)
        if result is not failed:
            return result
        with lock:
            state["abandoned"] = True
            started = state["started"]
        if started and not settled.wait(self.config.timeout_s):
            log.error("%s: kvstore %s still runs after it was abandoned; the buffers it was given may change",
                      self.owner, what)
        return default

    def result(self, what: str, future: concurrent.futures.Future[T], default: T, *, timeout_s: float | None = None) -> T:
        """The value of a :meth:`submit`-ted call, waiting up to ``timeout_s``; ``default`` on failure."""
        try:
            return future.result(self.config.timeout_s if timeout_s is None else timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.warn(f"kvstore {what} took longer than {timeout_s or self.config.timeout_s:g}s; treated as a miss")
        except concurrent.futures.CancelledError:
            pass
        except Exception as exc:
            self.warn(f"kvstore {what} failed ({type(exc).__name__}: {exc}); treated as a miss")
        return default

    def warn(self, message: str) -> None:
        """Log ``message`` unless another warning went out in the last few seconds."""
        now = time.monotonic()
        if now - self._last_warning < WARN_EVERY_S:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} similar warnings suppressed)"
        self._last_warning, self._suppressed = now, 0
        log.warning("%s: %s", self.owner, message)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        if self._connected.is_set():
            self._connected.clear()
            self._client.close()
