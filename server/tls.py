"""The daemon's TLS: server credentials that follow their files.

gRPC asks :meth:`ReloadingCertificates.fetch` before every handshake; it compares the files'
modification stamps with those it loaded (a few ``stat`` calls) and, when one changed, reads and
checks them again. A renewed certificate (cert-manager rewriting a Secret, an operator replacing
the files) is served to the next connection without a restart; a half-written or mismatched set
is not taken: the daemon keeps serving the last good one and logs why (once per change).
"""

from __future__ import annotations

import logging
import threading

import grpc

from kvstore.errors import ConfigError
from kvstore.proto.channel import FileStamps, check_pair, check_roots, read_pem
from kvstore.tls import TlsConfig

log = logging.getLogger("kvstore.tls")


class ReloadingCertificates:
    """Server credentials for ``config``, reloaded when its files change.

    Raises:
        ConfigError: at construction, naming the setting, when a file cannot be read, is not PEM,
            or the key is not the certificate's.
    """

    def __init__(self, config: TlsConfig, on_reload=None) -> None:
        self.config = config
        self.reloads = 0
        self.on_reload = on_reload   # called (on a gRPC thread) after each reload
        self._lock = threading.Lock()
        self._stamps = FileStamps([config.cert, config.key, config.client_ca])
        self._initial = self._load()
        self._refused: tuple | None = None

    def _load(self) -> grpc.ServerCertificateConfiguration:
        config = self.config
        cert, key = read_pem(config.cert, "tls.cert"), read_pem(config.key, "tls.key")
        check_pair(cert, key, "tls.cert", "tls.key")
        roots = None
        if config.client_ca:
            roots = read_pem(config.client_ca, "tls.client_ca")
            check_roots(roots, "tls.client_ca")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.config.mutual
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC (on its own threads) before each handshake: a new configuration when
        the files changed and the new set is good, else None (keep the current one)."""
        stamps = self._stamps.changed()
        if stamps is None or stamps == self._refused:
            return None
        with self._lock:
            try:
                loaded = self._load()
            except ConfigError as exc:
                self._refused = stamps
                log.warning("TLS files changed but cannot be used (still serving the previous ones): %s", exc)
                return None
            self._stamps.seen, self._refused = stamps, None
            self.reloads += 1
            if self.on_reload is not None:
                self.on_reload()
        log.info("TLS certificate reloaded from %s", self.config.cert)
        return loaded
