"""TLS settings of the daemon: its certificate on the gRPC port, mTLS, and how it checks peers.

The files are named here and read at the edge (:mod:`kvstore.server.tls` builds the gRPC
credentials and reloads them when the files change). With ``cert`` empty the port is plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """The ``[tls]`` section (flags ``--tls-cert``, ``--tls-key``, ``--tls-client-ca``, ...).

    Args:
        cert: PEM certificate chain the daemon presents; empty: the port is plaintext.
        key: the PEM private key of ``cert``.
        client_ca: PEM CA bundle; when set every client must present a certificate it signed
            (mTLS). The daemon's calls to its peers present ``cert`` as their client certificate.
        peer_ca: PEM CA bundle the peers' certificates are checked against (default:
            ``client_ca``, else the system's roots).
        peer_server_name: the name expected in the peers' certificates, when they are reached by
            an address their certificates do not name (default: each peer's host).
        plaintext_metrics: serve the metrics endpoint over plain HTTP even with TLS on (by
            default it is HTTPS with ``cert``, read at start).
    """

    cert: str = ""
    key: str = ""
    client_ca: str = ""
    peer_ca: str = ""
    peer_server_name: str = ""
    plaintext_metrics: bool = False

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("tls.cert and tls.key go together: give both (--tls-cert, --tls-key) or neither")
        for name in ("client_ca", "peer_ca", "peer_server_name"):
            if getattr(self, name) and not self.cert:
                raise ConfigError(f"tls.{name} needs TLS on: give tls.cert and tls.key too")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate."""
        return bool(self.client_ca)

    @property
    def peer_roots(self) -> str:
        """The CA file peers' certificates are checked against; empty: the system's roots."""
        return self.peer_ca or self.client_ca
