"""How a client or a daemon reaches a daemon: a plaintext or TLS channel, and waiting until it
answers with an error that says what is wrong when TLS is.

``ChannelTls.load`` reads the PEM files once (a missing or unreadable file is a
:class:`~kvstore.errors.ConfigError` naming the setting); :func:`open_channel` opens the channel;
:func:`wait_until_ready` waits for it and, when the connection fails, looks at why: a plaintext
client meeting a TLS daemon (or the reverse), a daemon certificate the CA did not sign or that
does not name the host, a daemon that wants a client certificate. Those fail at once with a
sentence naming the setting to change; anything else (nothing listening yet) is waited out until
the deadline, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kvstore.errors import ConfigError, UnavailableError
from kvstore.proto import CHANNEL_OPTIONS

PROBE_TIMEOUT_S = 1.0

log = logging.getLogger("kvstore.tls")


def read_pem(path: str | os.PathLike[str], setting: str) -> bytes:
    """The bytes of a PEM file; a :class:`ConfigError` naming ``setting`` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {os.fspath(path)}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {os.fspath(path)} is not a PEM file")
    return data


def read_token(path: str | os.PathLike[str], setting: str) -> str:
    """A bearer token from a file (surrounding whitespace dropped); a :class:`ConfigError` naming
    ``setting`` if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {os.fspath(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError(f"{setting}: {os.fspath(path)} is empty")
    return token


def check_pair(cert: bytes, key: bytes, cert_setting: str, key_setting: str) -> None:
    """Refuse a certificate chain that does not parse, or a key that is not its key."""
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as exc:
        raise ConfigError(f"{cert_setting}: not a PEM certificate ({exc})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_setting}: not an unencrypted PEM private key ({exc})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_setting} is not the private key of the certificate in {cert_setting}")


def check_roots(data: bytes, setting: str) -> None:
    """Refuse a bundle that does not parse or holds no CA certificate (a leaf by mistake)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{setting}: not a PEM CA bundle ({exc})") from None
    if not any(_is_ca(cert) for cert in certs):
        raise ConfigError(f"{setting}: holds no CA certificate (a server or client certificate by mistake?)")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject   # an old self-signed root without the extension


@dataclass(frozen=True, slots=True)
class ChannelTls:
    """What a TLS channel needs, read from files: the CA, the client certificate and key (mTLS),
    and the name expected in the daemon's certificate."""

    ca: bytes | None = None       # None: the system's roots
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""         # empty: the host of the target
    cert_path: str = ""           # the files cert and key came from (the TLS diagnosis presents them)
    key_path: str = ""

    @classmethod
    def load(
        cls, *, ca: str = "", cert: str = "", key: str = "", server_name: str = "",
        settings: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key"),
    ) -> ChannelTls:
        """Read the files (paths; empty for none). ``settings`` name them in errors."""
        ca_setting, cert_setting, key_setting = settings
        if bool(cert) != bool(key):
            raise ConfigError(f"{cert_setting} and {key_setting} go together: give both or neither")
        roots = read_pem(ca, ca_setting) if ca else None
        if roots is not None:
            check_roots(roots, ca_setting)
        chain = read_pem(cert, cert_setting) if cert else None
        private = read_pem(key, key_setting) if key else None
        if chain is not None:
            check_pair(chain, private, cert_setting, key_setting)
        return cls(ca=roots, cert=chain, key=private, server_name=server_name, cert_path=cert, key_path=key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class FileStamps:
    """Modification stamps of a set of files, to tell cheaply whether any of them changed."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = [p for p in paths if p]
        self.seen = self.now()

    def now(self) -> tuple:
        out = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def changed(self) -> tuple | None:
        """The new stamps if any file changed since :attr:`seen`, else None."""
        now = self.now()
        return None if now == self.seen else now


class ReloadingChannelTls:
    """A :class:`ChannelTls` that follows its files: :meth:`refresh` reads them again when one
    changed (a renewed client certificate), so the owner can reopen its channels."""

    def __init__(self, *, ca: str = "", cert: str = "", key: str = "", server_name: str = "",
                 settings: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key")) -> None:
        self._files = {"ca": ca, "cert": cert, "key": key, "server_name": server_name, "settings": settings}
        self.stamps = FileStamps([ca, cert, key])
        self.current = ChannelTls.load(**self._files)

    def refresh(self) -> bool:
        """True when the files changed and the new ones are good (the caller reopens channels);
        a bad new set is logged and the previous one kept."""
        stamps = self.stamps.changed()
        if stamps is None:
            return False
        self.stamps.seen = stamps
        try:
            self.current = ChannelTls.load(**self._files)
        except ConfigError as exc:
            log.warning("TLS files changed but cannot be used (keeping the previous ones): %s", exc)
            return False
        return True


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata (the daemon's tenants)."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._pair)
        return details._replace(metadata=metadata)


# One class per call shape: a channel files each interceptor under the first shape it implements.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


def bearer_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send ``token`` with every call of a channel."""
    return [_BearerUnaryUnary(token), _BearerUnaryStream(token), _BearerStreamUnary(token)]


def open_channel(target: str, tls: ChannelTls | None, token: str = "") -> grpc.aio.Channel:
    """A channel to ``target``: TLS when ``tls`` is given, plaintext otherwise; every call carries
    ``token`` as its bearer token when one is given."""
    interceptors = bearer_token(token) if token else None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=[*CHANNEL_OPTIONS, *tls.options()], interceptors=interceptors
    )


async def wait_until_ready(channel: grpc.aio.Channel, target: str, tls: ChannelTls | None, timeout_s: float) -> None:
    """Wait until ``channel`` is connected.

    Raises:
        UnavailableError: at once when the connection fails because of TLS (the message says what
            to change), else when nothing answered within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    diagnosed = False
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and not diagnosed:
            diagnosed = True   # once: a daemon still starting up fails the same way every retry
            budget = min(PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.05) / 3)
            problem = await asyncio.get_running_loop().run_in_executor(None, tls_problem, target, tls, budget)
            if problem is not None:
                raise UnavailableError(f"cannot connect to the kvstore daemon at {target}: {problem}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError from None
        state = channel.get_state(try_to_connect=True)


def tls_problem(target: str, tls: ChannelTls | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a connection to ``target`` with these TLS settings (None: plaintext) fails, found by a
    handshake of our own with the same certificates; None when TLS is not the problem (nothing
    listening, a daemon going away). Each step waits at most ``timeout_s``."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca is not None:
        context.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    if tls is not None and tls.cert_path:
        try:
            context.load_cert_chain(tls.cert_path, tls.key_path)
        except (OSError, ssl.SSLError):
            return None   # the files changed since they were loaded: no diagnosis
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError):
        return None   # not listening (yet): the caller waits
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=(tls.server_name if tls else "") or host) as conn:
                demands_client_cert = _demands_client_cert(conn, timeout_s)
        except ssl.SSLCertVerificationError as exc:
            return _untrusted(exc, tls)
        except (ssl.SSLError, OSError):
            if tls is None:
                return None
            return "it does not speak TLS (a plaintext daemon?), and this client connects with TLS (drop tls_ca/tls_cert, or --tls-*)"
    if tls is None:
        return "it requires TLS, and this client connects in plaintext (give the client tls_ca=, or --tls-ca on the command line)"
    if demands_client_cert and tls.cert is None:
        return "it requires a client certificate (mTLS): give the client tls_cert= and tls_key= (--tls-cert, --tls-key)"
    if demands_client_cert:   # it hung up on the very certificate this client presents
        return "it requires a client certificate signed by its --tls-client-ca, and refused this client's (tls_cert, --tls-cert)"
    return None


def _untrusted(exc: ssl.SSLCertVerificationError, tls: ChannelTls) -> str:
    reason = exc.verify_message or str(exc)
    if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
        return (
            f"its certificate does not name the host this client connects to ({reason}): connect by a name it "
            "lists, or set tls_server_name= (--tls-server-name) to one of them"
        )
    source = "the CA in tls_ca" if tls.ca is not None else "the system's roots (no tls_ca given)"
    return (
        f"its certificate is not trusted by {source}: {reason} "
        "(tls_ca, --tls-ca, must be the CA that signed the daemon's --tls-cert)"
    )


def _demands_client_cert(conn: ssl.SSLSocket, timeout_s: float) -> bool:
    """After a handshake: does the daemon hang up for want of a (good) client certificate?
    (A TLS 1.3 server checks the client's certificate after the client has finished, so the
    answer comes to the first bytes sent: the daemon's HTTP/2 settings, or a closed connection.)"""
    conn.settimeout(timeout_s)
    try:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return conn.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except OSError:   # a timeout: it said nothing either way
        return False
