"""One running kvstore node: the daemon, its gRPC server, health service and metrics endpoint.

``async with KVStoreServer(config) as server`` binds everything (port 0 picks a free port,
reported in ``server.port``) and shuts it all down gracefully on exit: health flips to
NOT_SERVING, new calls are refused, calls in flight get ``shutdown_grace_s`` to finish, then the
tiers are closed.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kvstore.config import ServerConfig
from kvstore.errors import ConfigError, UnauthenticatedError
from kvstore.lease import LeaseTable
from kvstore.proto import CHANNEL_OPTIONS
from kvstore.proto.channel import read_token
from kvstore.server.background import Background
from kvstore.server.daemon import Daemon
from kvstore.server.gate import Gate, load_tenants
from kvstore.server.leasing import Leasing
from kvstore.server.local import LocalSocket
from kvstore.server.metrics import Metrics
from kvstore.server.servicer import SERVICE, KVStoreServicer
from kvstore.server.tls import ReloadingCertificates

log = logging.getLogger("kvstore.server")


class KVStoreServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.daemon: Daemon | None = None
        self.leasing: Leasing | None = None
        self.metrics: Metrics | None = None
        self.port: int = 0
        self.metrics_port: int = 0
        self._grpc: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._local: LocalSocket | None = None
        self._background: Background | None = None
        self.certificates: ReloadingCertificates | None = None
        self.gate = Gate(None)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def __aenter__(self) -> KVStoreServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        # The certificate files are read first: a bad one stops the start before anything opens.
        self.certificates = ReloadingCertificates(config.tls) if config.tls.enabled else None
        self.gate = Gate(load_tenants(config.tenants) if config.tenants else None)
        if not self.gate.open and config.peer.enabled:
            _check_peer_token(self.gate, config.peer.token_file)
        self.daemon = Daemon(config, self.gate.tenants)
        if self.certificates is not None:
            counters = self.daemon.counters

            def reloaded() -> None:   # on a gRPC thread: one integer add, as the GIL keeps it
                counters.tls_reloads += 1

            self.certificates.on_reload = reloaded
        self.leasing = Leasing(self.daemon, LeaseTable(config.lease_ttl_s))
        try:
            await self.daemon.start()
            self.metrics = Metrics(self.daemon)
            # No SO_REUSEPORT: a second daemon on a busy port must fail, not silently share it.
            self._grpc = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
            servicer = KVStoreServicer(self.daemon, self.leasing, self.metrics, gate=self.gate)
            self._grpc.add_generic_rpc_handlers((servicer.handler(),))
            self._health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            try:
                bind = f"{config.host}:{config.port}"
                if self.certificates is None:
                    self.port = self._grpc.add_insecure_port(bind)
                else:
                    self.port = self._grpc.add_secure_port(bind, self.certificates.credentials())
            except RuntimeError:
                self.port = 0
            if self.port == 0:
                raise ConfigError(f"cannot listen on {config.host}:{config.port} (in use, or not an address of this host)")
            self.daemon.serving_at(self.port)   # the peers learn this daemon's own address
            path = config.local_socket_path(self.port)
            if path is not None:
                # With tenants a same-host session maps a window of its own, never the arena.
                self._local = LocalSocket(self.daemon, self.leasing, servicer, path,
                                          config.local_socket_uids, config.local_socket_gids,
                                          tenants=not self.gate.open, window_bytes=config.local_window_bytes,
                                          sessions_per_tenant=config.local_sessions_per_tenant)
                await self._local.start()
                servicer.local_socket_path, servicer.local = path, self._local
            self._background = self._background_work()
            self._background.start()
            await self._grpc.start()
            if config.metrics_port:
                try:
                    https = config.tls.enabled and not config.tls.plaintext_metrics
                    self.metrics_port = self.metrics.serve(
                        config.host, config.metrics_port, *((config.tls.cert, config.tls.key) if https else ())
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror}"
                    ) from None
            for service in ("", SERVICE):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.stop()
            raise
        if not config.tls.enabled and not config.loopback_only:
            log.warning(
                "listening on %s in plaintext%s: %s (see docs/security.md: --tls-cert, --tenants)", config.host,
                "" if not self.gate.open else " and without tenants",
                "bearer tokens and blocks cross the network unencrypted" if not self.gate.open
                else "anyone who can reach this port can read and write every block",
            )
        log.info(
            "kvstore %s listening on %s%s (metrics %s; same-host socket %s); policy %s; %s%s",
            self.daemon.version, self.address,
            ("" if self.certificates is None else (" with mTLS" if config.tls.mutual else " with TLS"))
            + ("" if self.gate.open else f", {len(self.gate.tenants.tenants)} tenants"),
            f"{'https' if config.tls.enabled and not config.tls.plaintext_metrics else 'http'}://{config.host}:"
            f"{self.metrics_port}/metrics" if self.metrics_port else "off",
            self._local.path if self._local else "off", config.policy.value, self.daemon.describe(),
            ", write-through" if config.write_through else "",
        )

    async def stop(self) -> None:
        """Graceful shutdown; safe to call more than once, and every part is stopped even if one fails."""
        try:
            if self._health is not None:
                health, self._health = self._health, None
                await health.enter_graceful_shutdown()
        finally:
            try:
                if self._grpc is not None:
                    grpc_server, self._grpc = self._grpc, None
                    await grpc_server.stop(self.config.shutdown_grace_s)
            finally:
                if self._background is not None:
                    background, self._background = self._background, None
                    await background.stop()
                if self._local is not None:
                    local, self._local = self._local, None
                    await local.stop()
                if self.metrics is not None:
                    metrics, self.metrics = self.metrics, None
                    metrics.stop()
                if self.daemon is not None:
                    daemon, self.daemon = self.daemon, None
                    await daemon.close()
                    log.info("kvstore stopped")

    def _background_work(self) -> Background:
        """Demotion on watermarks (and trimming what is remembered of the shared level), the
        write-behind uploads, and taking back leases that outlived their TTL: one group."""
        config, daemon, leasing = self.config, self.daemon, self.leasing
        background = Background()
        background.once("warm", daemon.warm)
        background.every("rebalance", config.demote_interval_s, daemon.rebalance)
        for shared in daemon.shared.levels if daemon.shared is not None else ():
            background.every(f"write-behind-{shared.name}", 0, functools.partial(daemon.write_behind, shared.level))

        async def expire_leases() -> None:
            leasing.expire(time.monotonic())

        background.every("lease-expiry", min(1.0, config.lease_ttl_s / 4), expire_leases)
        return background



def _check_peer_token(gate: Gate, token_file: str) -> None:
    """With tenants, daemons call each other as a tenant marked ``peer``: refuse, at start, a
    cluster whose calls would all be refused."""
    if not token_file:
        raise ConfigError(
            "with tenants, peers call each other as a tenant with peer = true: set peer.token_file (--peer-token-file)"
        )
    try:
        tenant = gate.tenants.authenticate("Bearer " + read_token(token_file, "peer.token_file"))
    except UnauthenticatedError:
        raise ConfigError(f"peer.token_file: the token in {token_file} is no tenant's in the tenants file") from None
    if not tenant.peer:
        raise ConfigError(f"peer.token_file: the token in {token_file} is tenant {tenant.name!r}'s, which is not peer = true")
