"""Sealing blocks that leave the daemon's hands: a keyed MAC, or AES-256-GCM encryption.

(And, with ``nvme.encrypt``, blocks at rest on the NVMe tier: each extent holds the frame of
:meth:`Sealer.seal_frame`, bound to its offset and size.)

A block in a shared bucket can be rewritten by anyone who can write the bucket, and an XXH3
checksum in its metadata is no defence (they recompute it). With a deployment secret
(``s3.secret_files`` or ``KVSTORE_S3_SECRET``) every object carries an HMAC-SHA256 of its name,
size, checksum and bytes, checked on every read: a forged or moved object is a miss. With
``encrypt = true`` the bytes are AES-256-GCM encrypted instead (the tag authenticates the same
label), so the bucket's owner cannot read the KV either.

Rotation: a secret is known by its id (a hash of it, stored with each object). The first secret
seals what is written; every listed secret opens what is read. To rotate, add the new secret
second on every daemon, then move it first, then, once the objects sealed with the old one have
aged out (or been deleted), drop the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvstore.errors import ConfigError

SECRET_ENV = "KVSTORE_S3_SECRET"
NVME_SECRET_ENV = "KVSTORE_NVME_SECRET"
NONCE_BYTES = 12
TAG_BYTES = 16
MIN_SECRET_BYTES = 16
FRAME_BYTES = 8 + NONCE_BYTES + TAG_BYTES
"""What :meth:`Sealer.seal_frame` adds to a block: secret id, nonce, tag."""


@dataclass(frozen=True, slots=True)
class Secret:
    id: str
    mac_key: bytes
    aead_key: bytes

    @classmethod
    def derive(cls, raw: bytes) -> Secret:
        """Separate keys for each use, and an id that reveals nothing of the secret."""
        return cls(
            id=hashlib.sha256(b"kvstore secret id\0" + raw).hexdigest()[:16],
            mac_key=hmac.new(raw, b"kvstore block mac v1", "sha256").digest(),
            aead_key=hmac.new(raw, b"kvstore block aes-gcm v1", "sha256").digest(),
        )


def load_secrets(
    files: Sequence[str], environ: Mapping[str, str] = os.environ, setting: str = "s3.secret_files",
    env: str = SECRET_ENV,
) -> list[Secret]:
    """The secrets: ``$env`` first when set, then each file. Each is at least 16 bytes."""
    raws: list[tuple[str, bytes]] = []
    if environ.get(env):
        raws.append((env, environ[env].strip().encode()))
    for path in files:
        try:
            with open(path, "rb") as f:
                raws.append((f"{setting}: {path}", f.read().strip()))
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    for source, raw in raws:
        if len(raw) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{source}: a secret of {len(raw)} bytes is too short; use at least {MIN_SECRET_BYTES} "
                "(for example `head -c 32 /dev/urandom | base64`)"
            )
    return [Secret.derive(raw) for _, raw in raws]


class Sealer:
    """Seals and opens block bytes with the first of ``secrets`` (opens with any of them)."""

    def __init__(self, secrets: Sequence[Secret], *, encrypt: bool) -> None:
        if not secrets:
            raise ConfigError("sealing needs a secret (s3.secret_files or $KVSTORE_S3_SECRET)")
        self.secrets = {s.id: s for s in secrets}
        self.current = secrets[0]
        self.encrypt = encrypt
        self.overhead_bytes = NONCE_BYTES + TAG_BYTES if encrypt else 0

    @staticmethod
    def label(name: str, size: int, checksum: int) -> bytes:
        """What a seal binds the bytes to: where they live, how long they are, their checksum."""
        return name.encode() + b"\0" + size.to_bytes(8, "little") + checksum.to_bytes(8, "little")

    def mac(self, secret: Secret, label: bytes, data: memoryview | bytes) -> str:
        h = hmac.new(secret.mac_key, len(label).to_bytes(4, "little") + label, "sha256")
        h.update(data)
        return h.hexdigest()

    def seal(self, label: bytes, data: memoryview) -> tuple[str, str, bytes | memoryview]:
        """(secret id, MAC or "", body to store): the bytes themselves with a MAC, or
        nonce + ciphertext + tag."""
        secret = self.current
        if not self.encrypt:
            return secret.id, self.mac(secret, label, data), data
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(NONCE_BYTES)
        return secret.id, "", nonce + AESGCM(secret.aead_key).encrypt(nonce, bytes(data), label)

    def verify(self, secret_id: str, mac: str, label: bytes, data: memoryview) -> bool:
        """Whether ``data`` (stored as is) carries a valid MAC of a known secret."""
        secret = self.secrets.get(secret_id)
        if secret is None or not isinstance(mac, str) or not mac:
            return False
        return hmac.compare_digest(self.mac(secret, label, data).encode(), mac.encode("utf-8", "replace"))

    def seal_frame(self, label: bytes, data: memoryview | bytes) -> bytes:
        """Secret id (8 bytes), nonce, ciphertext and tag, in one buffer: for a medium without
        metadata (an NVMe extent). ``FRAME_BYTES`` more than ``data``."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        secret = self.current
        nonce = os.urandom(NONCE_BYTES)
        return bytes.fromhex(secret.id) + nonce + AESGCM(secret.aead_key).encrypt(nonce, bytes(data), label)

    def open_frame(self, label: bytes, frame: memoryview | bytes, size: int) -> bytes | None:
        """The plaintext of a :meth:`seal_frame` frame of ``size`` bytes of data, or None."""
        frame = memoryview(frame)
        if frame.nbytes < size + FRAME_BYTES:
            return None
        return self.open(bytes(frame[:8]).hex(), label, frame[8 : size + FRAME_BYTES])

    def open(self, secret_id: str, label: bytes, body: bytes | memoryview) -> bytes | None:
        """The plaintext of an encrypted body, or None when it is not authentic."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        secret = self.secrets.get(secret_id)
        if secret is None or len(body) < NONCE_BYTES + TAG_BYTES:
            return None
        body = memoryview(body)
        try:
            return AESGCM(secret.aead_key).decrypt(bytes(body[:NONCE_BYTES]), bytes(body[NONCE_BYTES:]), label)
        except InvalidTag:
            return None
