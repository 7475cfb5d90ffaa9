"""S3 tier: one object per block in an S3-compatible bucket, through aiobotocore.

Unlike the extent tiers, this one is addressed by key. Object names encode the namespace and the
block key, ``<prefix><namespace hex or "_">/<key hex>``, so daemons that share a bucket share
blocks, and different namespaces (tenants, models) never collide. Each object carries its size,
XXH3-64 checksum and namespace as metadata; a read whose bytes or namespace do not match is a
miss, never data.

One aiobotocore client lives as long as the tier. Requests are bounded by a semaphore, retried
with backoff by botocore (throttling, 5xx, timeouts), and time out quickly, so an S3 that is down
or slow turns into :class:`~kvstore.errors.UnavailableError` (the daemon answers misses), never a
hung call. Large blocks are uploaded in parts and read with parallel ranged GETs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.checksum import checksum
from kvstore.config import S3Config
from kvstore.errors import ConfigError, UnavailableError
from kvstore.tier_kind import TierKind

log = logging.getLogger("kvstore.tiers.s3")

_META_SIZE, _META_SUM, _META_NS = "kvstore-size", "kvstore-xxh3", "kvstore-namespace"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    checksum: int
    namespace: bytes


class S3Tier:
    kind = TierKind.S3

    def __init__(self, config: S3Config) -> None:
        if not config.bucket:
            raise ConfigError("s3.bucket must be set for the S3 tier")
        self.config = config
        self._client = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)

    @classmethod
    def from_config(cls, config: S3Config) -> S3Tier:
        return cls(config)

    @property
    def description(self) -> str:
        where = self.config.endpoint_url or f"AWS {self.config.region}"
        return f"s3://{self.config.bucket}/{self.config.prefix} at {where}"

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

    def object_name(self, key: bytes, namespace: bytes = b"") -> str:
        return f"{self.config.prefix}{namespace.hex() or '_'}/{key.hex()}"

    async def put(self, key: bytes, data: memoryview, checksum_: int, namespace: bytes = b"") -> None:
        """Store one block (multipart above the threshold). Raises UnavailableError."""
        name = self.object_name(key, namespace)
        meta = {_META_SIZE: str(data.nbytes), _META_SUM: f"{checksum_:016x}", _META_NS: namespace.hex()}
        async with self._errors("put", name):
            if data.nbytes < self.config.multipart_threshold_bytes:
                async with self._slots:
                    await self._client.put_object(Bucket=self.config.bucket, Key=name, Body=bytes(data), Metadata=meta)
            else:
                await self._multipart(name, data, meta)

    async def _multipart(self, name: str, data: memoryview, meta: dict) -> None:
        bucket, part = self.config.bucket, self.config.part_bytes
        async with self._slots:
            upload = await self._client.create_multipart_upload(Bucket=bucket, Key=name, Metadata=meta)
        upload_id = upload["UploadId"]
        try:
            async def send(number: int, start: int) -> dict:
                async with self._slots:
                    r = await self._client.upload_part(
                        Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number,
                        Body=bytes(data[start : start + part]),
                    )
                return {"PartNumber": number, "ETag": r["ETag"]}

            parts = await asyncio.gather(*(send(i + 1, s) for i, s in enumerate(range(0, data.nbytes, part))))
            async with self._slots:
                await self._client.complete_multipart_upload(
                    Bucket=bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id)
            raise

    async def head(self, key: bytes, namespace: bytes = b"") -> ObjectInfo | None:
        """What S3 says about a block, or None when it has no (well-formed) object for it."""
        name = self.object_name(key, namespace)
        async with self._errors("head", name):
            try:
                async with self._slots:
                    r = await self._client.head_object(Bucket=self.config.bucket, Key=name)
            except self._client.exceptions.ClientError as exc:
                if _status(exc) == 404:
                    return None
                raise
        return _info(r.get("Metadata", {}))

    async def head_many(self, keys: Sequence[bytes], namespace: bytes = b"") -> list[ObjectInfo | None]:
        return list(await asyncio.gather(*(self.head(k, namespace) for k in keys)))

    async def get_into(self, key: bytes, out: memoryview, namespace: bytes = b"") -> int | None:
        """Read a block into ``out`` (at least its size) and verify it: its size, or None for a
        miss (absent, corrupt, another namespace's, larger than ``out``).

        The first ranged GET brings the metadata with the first part; larger blocks fetch the
        rest of their parts in parallel.
        """
        name = self.object_name(key, namespace)
        part = self.config.part_bytes
        async with self._errors("get", name):
            try:
                async with self._slots:
                    r = await self._client.get_object(Bucket=self.config.bucket, Key=name, Range=f"bytes=0-{part - 1}")
                    async with r["Body"] as body:
                        first = await body.read()
            except self._client.exceptions.ClientError as exc:
                if _status(exc) in (404, 416):
                    return None
                raise
            info = _info(r.get("Metadata", {}))
            if info is None or info.namespace != namespace or info.size > out.nbytes or len(first) != min(part, info.size):
                return None
            out[: len(first)] = first
            await asyncio.gather(*(
                self._get_range(name, out, start, min(start + part, info.size)) for start in range(part, info.size, part)
            ))
        if checksum(out[: info.size]) != info.checksum:
            log.warning("S3 object %s failed verification: a miss", name)
            return None
        return info.size

    async def _get_range(self, name: str, out: memoryview, start: int, end: int) -> None:
        async with self._slots:
            r = await self._client.get_object(Bucket=self.config.bucket, Key=name, Range=f"bytes={start}-{end - 1}")
            async with r["Body"] as body:
                data = await body.read()
        if len(data) != end - start:
            raise OSError(f"short read of {name}: {len(data)} of {end - start} bytes")
        out[start:end] = data

    async def delete(self, keys: Sequence[bytes], namespace: bytes = b"") -> None:
        names = [self.object_name(k, namespace) for k in keys]
        for start in range(0, len(names), 1000):
            batch = names[start : start + 1000]
            async with self._errors("delete", batch[0]), self._slots:
                await self._client.delete_objects(
                    Bucket=self.config.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True}
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
        except Exception as exc:
            raise UnavailableError(f"S3 {op} of {name} failed: {type(exc).__name__}: {exc}") from None


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _info(meta: dict) -> ObjectInfo | None:
    try:
        return ObjectInfo(
            size=int(meta[_META_SIZE]), checksum=int(meta[_META_SUM], 16), namespace=bytes.fromhex(meta.get(_META_NS, "")),
        )
    except (KeyError, ValueError):
        return None  # not written by kvstore, or damaged metadata
