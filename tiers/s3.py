"""S3 tier: one object per block in an S3-compatible bucket, through aiobotocore.

Unlike the extent tiers, this one is addressed by key. Object names encode the namespace and the
block key, ``<prefix><namespace>/<key hex>``, so daemons that share a bucket share blocks, and
different namespaces (tenants, models) never collide. Each object carries its size, XXH3-64
checksum and namespace as metadata; a read whose bytes or namespace do not match is a miss, never
data.

With a deployment secret (:mod:`kvstore.tiers.seal`) each object also carries a keyed MAC, or is
AES-256-GCM encrypted, and a read that does not open is a miss, counted as corrupt: a bucket
writer cannot forge a block. The namespace is then named by a hash (in the object name and its
metadata), so a listing does not show which models or tenants are cached. Without one the
layout is 0.1's: the namespace in hex, or ``_`` for none.

One aiobotocore client lives as long as the tier. Requests are bounded by a semaphore, retried
with backoff by botocore (throttling, 5xx, timeouts), and time out quickly, so an S3 that is down
or slow turns into :class:`~kvstore.errors.UnavailableError` (the daemon answers misses), never a
hung call. Large blocks are uploaded in parts and read with parallel ranged GETs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.block import BlockRecord
from kvstore.checksum import checksum
from kvstore.config import S3Config
from kvstore.errors import ConfigError, IntegrityError, UnavailableError
from kvstore.keys import unscoped
from kvstore.layout import Addressing, Capabilities
from kvstore.tier_kind import TierKind
from kvstore.tiers.base import KeyedTier, ObjectRef, ProbeInfo
from kvstore.tiers.seal import SECRET_ENV, Sealer, load_secrets

log = logging.getLogger("kvstore.tiers.s3")

_META_SIZE, _META_SUM, _META_NS = "kvstore-size", "kvstore-xxh3", "kvstore-namespace"
_META_SECRET, _META_MAC = "kvstore-secret", "kvstore-mac"

ObjectInfo = ProbeInfo


class S3Tier(KeyedTier):
    name = "s3"
    kind = TierKind.S3
    capabilities = Capabilities(persistent=True, shared=True, addressing=Addressing.KEY, bounded=False)
    config_class = S3Config

    def __init__(self, config: S3Config) -> None:
        if not config.bucket:
            raise ConfigError("s3.bucket must be set for the S3 tier")
        self.config = config
        self._client = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        # A hard bound on one request, retries included: an endpoint that accepts connections and
        # never answers must not hold a call (botocore's read timeout does not cover every wait).
        self.request_timeout_s = config.max_attempts * (config.connect_timeout_s + config.read_timeout_s) + 1.0
        self.forged = 0  # objects that failed their seal
        secrets = load_secrets(config.secret_files)
        if config.encrypt and not secrets:
            raise ConfigError(f"s3.encrypt needs a secret: s3.secret_files or ${SECRET_ENV}")
        self.sealer = Sealer(secrets, encrypt=config.encrypt) if secrets else None
        if self.sealer is None:
            log.warning(
                "s3://%s: objects are checked with XXH3 only, so anyone who can write the bucket can forge "
                "blocks; set s3.secret_files or $%s (docs/security.md)", config.bucket, SECRET_ENV,
            )

    @classmethod
    def from_config(cls, config: S3Config) -> S3Tier:
        return cls(config)

    async def _call(self, op: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        """One request: a concurrency slot, and a deadline for the whole of it."""
        async with self._slots:
            return await asyncio.wait_for(op(Bucket=self.config.bucket, **kwargs), self.request_timeout_s)

    async def _read(self, name: str, start: int, end: int) -> tuple[dict, bytes]:
        """A ranged GET, body included, under one deadline: (response, bytes)."""

        async def fetch(Bucket: str, Key: str, Range: str) -> tuple[dict, bytes]:
            r = await self._client.get_object(Bucket=Bucket, Key=Key, Range=Range)
            async with r["Body"] as body:
                return r, await body.read()

        return await self._call(fetch, Key=name, Range=f"bytes={start}-{end - 1}")

    @property
    def description(self) -> str:
        where = self.config.endpoint_url or f"AWS {self.config.region}"
        return f"s3 s3://{self.config.bucket}/{self.config.prefix} at {where}"

    # -- the tier contract -------------------------------------------------------------------------

    def reserve(self, record: BlockRecord) -> ObjectRef:
        return self.locate(unscoped(record.key), record.namespace, record.size)

    def largest_free_after(self, locations: list) -> int:
        return 1 << 62

    async def write(self, location: ObjectRef, offset: int, data: memoryview) -> None:
        if offset != 0 or data.nbytes != location.length:
            raise ValueError("an S3 object is written whole, in one call")
        await self.put(location.key, data, checksum(data), location.namespace)

    async def read_into(self, location: ObjectRef, offset: int, out: memoryview) -> None:
        """Read and verify the whole object; IntegrityError when it is absent, foreign or corrupt
        (the object is deleted then, so a put can replace it)."""
        if offset != 0:
            raise ValueError("an S3 object is read whole")
        size = await self.get_into(location.key, out, location.namespace)
        if size != location.length:
            with contextlib.suppress(UnavailableError):
                await self.delete([location.key], location.namespace)
            raise IntegrityError(f"S3 has no valid object for {self.object_name(location.key, location.namespace)}")

    async def probe(self, keys: Sequence[bytes], namespace: bytes) -> list[ProbeInfo | None]:
        return await self.head_many(keys, namespace)

    async def remove(self, keys: Sequence[bytes], namespace: bytes) -> None:
        await self.delete(keys, namespace)

    # -- S3 requests -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client. Does not touch the network: a daemon starts even when S3 is down."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        c = self.config
        client_config = AioConfig(
            connect_timeout=c.connect_timeout_s, read_timeout=c.read_timeout_s,
            retries={"max_attempts": c.max_attempts, "mode": "standard"},
            max_pool_connections=c.max_concurrency,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", region_name=c.region, endpoint_url=c.endpoint_url or None, config=client_config
            )
        )

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    def namespace_tag(self, namespace: bytes) -> str:
        """What names a namespace in the bucket: a hash of it when objects are sealed, else its hex."""
        if self.sealer is None:
            return namespace.hex()
        return hashlib.sha256(b"kvstore namespace\0" + namespace).hexdigest()[:32] if namespace else ""

    def object_name(self, key: bytes, namespace: bytes = b"") -> str:
        return f"{self.config.prefix}{self.namespace_tag(namespace) or '_'}/{key.hex()}"

    async def put(self, key: bytes, data: memoryview, checksum_: int, namespace: bytes = b"") -> None:
        """Store one block (multipart above the threshold). Raises UnavailableError."""
        name = self.object_name(key, namespace)
        meta = {_META_SIZE: str(data.nbytes), _META_SUM: f"{checksum_:016x}", _META_NS: self.namespace_tag(namespace)}
        body: bytes | memoryview = data
        if self.sealer is not None:
            label = Sealer.label(name, data.nbytes, checksum_)
            meta[_META_SECRET], meta[_META_MAC], body = await asyncio.to_thread(self.sealer.seal, label, data)
            body = memoryview(body)
        async with self._errors("put", name):
            if body.nbytes < self.config.multipart_threshold_bytes:
                await self._call(self._client.put_object, Key=name, Body=bytes(body), Metadata=meta)
            else:
                await self._multipart(name, body, meta)

    async def _multipart(self, name: str, data: memoryview, meta: dict) -> None:
        part = self.config.part_bytes
        upload = await self._call(self._client.create_multipart_upload, Key=name, Metadata=meta)
        upload_id = upload["UploadId"]
        try:
            async def send(number: int, start: int) -> dict:
                r = await self._call(
                    self._client.upload_part, Key=name, UploadId=upload_id, PartNumber=number,
                    Body=bytes(data[start : start + part]),
                )
                return {"PartNumber": number, "ETag": r["ETag"]}

            parts = await _all_or_none([send(i + 1, s) for i, s in enumerate(range(0, data.nbytes, part))])
            await self._call(
                self._client.complete_multipart_upload, Key=name, UploadId=upload_id,
                MultipartUpload={"Parts": list(parts)},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call(self._client.abort_multipart_upload, Key=name, UploadId=upload_id)
            raise

    async def head(self, key: bytes, namespace: bytes = b"") -> ObjectInfo | None:
        """What S3 says about a block, or None when it has no (well-formed) object for it."""
        name = self.object_name(key, namespace)
        async with self._errors("head", name):
            try:
                r = await self._call(self._client.head_object, Key=name)
            except self._client.exceptions.ClientError as exc:
                if _status(exc) in _MISSING:
                    return None
                raise
        return _info(r.get("Metadata", {}), namespace, self.namespace_tag(namespace))

    async def head_many(self, keys: Sequence[bytes], namespace: bytes = b"") -> list[ObjectInfo | None]:
        return list(await _all_or_none([self.head(k, namespace) for k in keys]))

    async def get_into(self, key: bytes, out: memoryview, namespace: bytes = b"") -> int | None:
        """Read a block into ``out`` (at least its size) and verify it: its size, or None for a
        miss (absent, corrupt, forged, another namespace's, larger than ``out``).

        The first ranged GET brings the metadata with the first part; larger blocks fetch the
        rest of their parts in parallel.
        """
        name = self.object_name(key, namespace)
        part = self.config.part_bytes
        sealer = self.sealer
        async with self._errors("get", name):
            try:
                r, first = await self._read(name, 0, part)
            except self._client.exceptions.ClientError as exc:
                if _status(exc) in _MISSING:
                    return None
                raise
            meta = r.get("Metadata", {})
            info = _info(meta, namespace, self.namespace_tag(namespace))
            stored = info.size + (sealer.overhead_bytes if sealer is not None else 0) if info is not None else 0
            if info is None or info.size > out.nbytes:
                return None
            if _total_size(r) != stored or len(first) != min(part, stored):
                return None  # the metadata does not describe these bytes
            # An encrypted body is read whole and opened into ``out``; a plain one lands there.
            body = bytearray(stored) if sealer is not None and sealer.encrypt else out
            target = memoryview(body)
            target[: len(first)] = first
            # All parts or none: a failed part must not leave siblings writing into ``out`` later.
            await _all_or_none([
                self._get_range(name, target, start, min(start + part, stored)) for start in range(part, stored, part)
            ])
        if sealer is not None and not await asyncio.to_thread(self._open, name, meta, info, target, out):
            self.forged += 1
            log.warning("S3 object %s failed its seal (forged, moved or sealed with an unknown secret): a miss", name)
            return None
        if checksum(out[: info.size]) != info.checksum:
            log.warning("S3 object %s failed verification: a miss", name)
            return None
        return info.size

    def _open(self, name: str, meta: dict, info: ObjectInfo, body: memoryview, out: memoryview) -> bool:
        """Check (MAC) or decrypt (AES-GCM) a sealed object's body into ``out``; anything that
        does not open (a malformed seal included) is False, a forgery."""
        try:
            return self._open_sealed(name, meta, info, body, out)
        except (ValueError, TypeError, UnicodeError):
            return False

    def _open_sealed(self, name: str, meta: dict, info: ObjectInfo, body: memoryview, out: memoryview) -> bool:
        sealer, label = self.sealer, Sealer.label(name, info.size, info.checksum)
        secret = meta.get(_META_SECRET, "")
        if not sealer.encrypt:
            return sealer.verify(secret, meta.get(_META_MAC, ""), label, out[: info.size])
        plain = sealer.open(secret, label, body)
        if plain is None or len(plain) != info.size:
            return False
        out[: info.size] = plain
        return True

    async def _get_range(self, name: str, out: memoryview, start: int, end: int) -> None:
        _, data = await self._read(name, start, end)
        if len(data) != end - start:
            raise OSError(f"short read of {name}: {len(data)} of {end - start} bytes")
        out[start:end] = data

    async def delete(self, keys: Sequence[bytes], namespace: bytes = b"") -> None:
        names = [self.object_name(k, namespace) for k in keys]
        for start in range(0, len(names), 1000):
            batch = names[start : start + 1000]
            async with self._errors("delete", batch[0]):
                await self._call(
                    self._client.delete_objects, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True}
                )

    @contextlib.asynccontextmanager
    async def _errors(self, op: str, name: str):
        """Everything S3 or the network can throw, as one retryable kvstore error."""
        if self._client is None:
            raise UnavailableError("the S3 tier is not open")
        try:
            yield
        except (asyncio.CancelledError, UnavailableError):
            raise
        except asyncio.TimeoutError:
            raise UnavailableError(f"S3 {op} of {name} took longer than {self.request_timeout_s:g}s") from None
        except Exception as exc:
            raise UnavailableError(f"S3 {op} of {name} failed: {type(exc).__name__}: {exc}") from None


# Absent: 404; 416 for a range of an empty object; 403 where the credentials may not list the
# bucket (S3 then answers 403 for keys that do not exist).
_MISSING = (403, 404, 416)


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _total_size(response: dict) -> int:
    """The object's full size from a ranged GET (``Content-Range: bytes a-b/total``)."""
    content_range = response.get("ContentRange") or ""
    if "/" in content_range:
        try:
            return int(content_range.rsplit("/", 1)[1])
        except ValueError:
            return -1
    return int(response.get("ContentLength", -1))


async def _all_or_none(coros: list[Awaitable[Any]]) -> list[Any]:
    """Run concurrently; if one fails, cancel the others and wait for them before raising."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _info(meta: dict, namespace: bytes, tag: str) -> ObjectInfo | None:
    """The object's size and checksum, if its metadata is kvstore's and names ``namespace``
    (by ``tag``)."""
    try:
        info = ObjectInfo(size=int(meta[_META_SIZE]), checksum=int(meta[_META_SUM], 16), namespace=namespace)
    except (KeyError, ValueError):
        return None  # not written by kvstore, or damaged metadata
    if meta.get(_META_NS, "") != tag:
        return None
    return info if info.size > 0 else None
