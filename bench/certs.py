"""A throwaway certificate authority: a CA and the server and client certificates it signs.

For trying TLS and mTLS without a PKI (``kvstore certs DIR``), for ``kvstore bench --tls`` and for
the tests. Keys are ECDSA P-256, certificates valid for ``days``; a server certificate names
``localhost``, ``127.0.0.1`` and ``::1`` plus the names given. The CA's key lives only in memory,
so a CA signs only while its object lives; for production use your own PKI or cert-manager.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class CertificateAuthority:
    """A CA whose key and certificate live as PEM files in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], *, name: str = "kvstore test CA", days: int = 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._name = subject
        self._cert = (
            self._builder(subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self._write("ca.pem", self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, *, server: bool = True, client: bool = True, names: Sequence[str] = (), loopback: bool = True
    ) -> Issued:
        """A certificate for ``name`` (file stem and common name) signed by this CA.

        Args:
            server: usable as a TLS server certificate (its subject names include ``names``).
            client: usable as a TLS client certificate (mTLS).
            names: extra DNS names or IP addresses the certificate is valid for.
            loopback: valid for ``localhost`` and the loopback addresses too.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names([name, *(LOOPBACK_NAMES if loopback else ()), *names])), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(
            cert=self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key=self._write(f"{name}-key.pem", key_pem, private=True),
        )

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        issuer = getattr(self, "_name", subject)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
        )

    def _write(self, filename: str, data: bytes, *, private: bool = False) -> Path:
        path = self.directory / filename
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)   # readers (a daemon reloading its certificate) never see half a file
        return path


def _alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out
