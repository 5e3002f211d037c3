"""Object storage: S3 (AWS, MinIO, moto in tests) or a directory on disk for ``shoal up``.

Both stores accept the same keys (``/``-separated, no ``.``/``..`` or empty segments, no NUL,
not absolute, at most 1024 UTF-8 bytes) so code that works on one works on the other; any
other key raises :class:`~shoal.common.errors.BadRequest`. ETags are the MD5 hex digest of
the data, without S3's surrounding quotes.

Example::

    objects = object_storage_from_settings(settings)
    await objects.put("sessions/s1/transcript.json", b"{}", "application/json")
    stored = await objects.get("sessions/s1/transcript.json")   # StoredObject | None
    infos = await objects.list("sessions/s1/")                   # [ObjectInfo(key=...), ...]
    await objects.close()
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from shoal.common.errors import BadRequest, Conflict, Unavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.literals import BucketLocationConstraintType

    from shoal.common.settings import CommonSettings

__all__ = [
    "FilesystemObjectStorage",
    "ObjectInfo",
    "ObjectStorage",
    "S3ObjectStorage",
    "StoredObject",
    "object_storage_from_settings",
    "validate_key",
]

DEFAULT_CONTENT_TYPE = "application/octet-stream"
_MAX_KEY_BYTES = 1024  # S3's limit
# The filesystem store keeps its sidecars and temp files under this first segment.
_RESERVED = ".shoal"
# Fail over to the caller's retry (Unavailable is retryable) within seconds rather than
# botocore's default of 5 attempts with backoff (one retry here). Timeouts in seconds.
_CLIENT_CONFIG = AioConfig(
    connect_timeout=5, read_timeout=60, retries={"mode": "standard", "total_max_attempts": 2}
)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One entry of a listing."""

    key: str
    size: int
    etag: str
    modified: datetime


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object's bytes and metadata, as :meth:`ObjectStorage.get` returns them."""

    data: bytes
    content_type: str
    size: int
    etag: str
    modified: datetime


class ObjectStorage(Protocol):
    """Keyed blobs. ``put`` overwrites; ``get``/``delete`` of a missing key are not errors."""

    async def put(
        self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> None: ...

    async def get(self, key: str) -> StoredObject | None: ...

    async def delete(self, key: str) -> bool: ...

    async def list(self, prefix: str, limit: int = 1000) -> list[ObjectInfo]: ...

    async def close(self) -> None: ...


def validate_key(key: str) -> str:
    """``key`` if every store can hold it safely, else :class:`BadRequest`."""
    _validate(key, what="key")
    return key


def _validate(value: str, *, what: str) -> None:
    if what == "key" and not value:
        raise BadRequest("object key is empty")
    if "\x00" in value:
        raise BadRequest(f"object {what} contains NUL", detail={what: value})
    if value.startswith("/") or "\\" in value:
        raise BadRequest(f"object {what} must be relative and use '/'", detail={what: value})
    try:
        encoded = value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a bad percent-decode
        raise BadRequest(f"object {what} is not valid Unicode") from exc
    if len(encoded) > _MAX_KEY_BYTES:
        raise BadRequest(f"object {what} is longer than {_MAX_KEY_BYTES} bytes")
    segments = value.split("/")
    # A prefix's last segment may be empty ("a/") or partial; every earlier one must be whole.
    whole = segments if what == "key" else segments[:-1]
    if any(s in ("", ".", "..") for s in whole) or (segments[-1] in (".", "..")):
        raise BadRequest(f"object {what} has an empty, '.' or '..' segment", detail={what: value})
    if segments[0] == _RESERVED and (what == "key" or len(segments) > 1):
        raise BadRequest(f"object {what} starts with the reserved '{_RESERVED}/'")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise BadRequest("list limit must be at least 1", detail={"limit": limit})


class FilesystemObjectStorage:
    """Objects as files under ``root``; the content type and ETag live in a JSON sidecar.

    Writes go to a temp file and are renamed into place, so a reader sees the old or the new
    bytes, never a mix. The data file is authoritative: ``get`` computes the ETag from the bytes
    it read (``list`` reads it from the sidecar, which a concurrent put may be ahead of).
    Unlike S3, a key cannot also be a "directory" of other keys (``a`` and ``a/b``): the second
    put raises :class:`Conflict`. Meant for one machine (``shoal up``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._meta = self.root / _RESERVED / "meta"
        self._tmp = self.root / _RESERVED / "tmp"

    async def start(self) -> None:
        """Create the directories (``put`` does it too); for symmetry with S3."""
        await asyncio.to_thread(self._tmp.mkdir, parents=True, exist_ok=True)

    def _data_path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # Belt and braces after validate_key: a symlink inside root could still point out.
        if not path.is_relative_to(self.root):
            raise BadRequest("object key escapes the store", detail={"key": key})
        return path

    def _meta_path(self, key: str) -> Path:
        # Named by a hash, not by the key: "a" + ".json" could be another key's directory.
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._meta / digest[:2] / f"{digest}.json"

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        path = self._data_path(key)
        meta = json.dumps({"content_type": content_type, "etag": _md5(data)}).encode()
        await asyncio.to_thread(self._put_sync, key, path, data, meta)

    def _put_sync(self, key: str, path: Path, data: bytes, meta: bytes) -> None:
        try:
            # Sidecar first, so new bytes never appear without their content type. A crash (or
            # a concurrent reader) in between sees the new content type beside the old bytes.
            self._write_atomic(self._meta_path(key), meta)
            self._write_atomic(path, data)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise Conflict(
                "object key collides with another key's path on the filesystem store",
                detail={"key": key},
            ) from exc

    def _write_atomic(self, target: Path, data: bytes) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            # A concurrent delete may prune the parent directory between mkdir and replace.
            for attempt in range(3):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp_name, target)
                    return
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    async def get(self, key: str) -> StoredObject | None:
        """The object under ``key``, or None."""
        path = self._data_path(key)
        return await asyncio.to_thread(self._get_sync, key, path)

    def _get_sync(self, key: str, path: Path) -> StoredObject | None:
        try:
            with path.open("rb") as f:
                stat = os.fstat(f.fileno())
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return StoredObject(
            data=data,
            content_type=self._read_meta(key).get("content_type", DEFAULT_CONTENT_TYPE),
            size=len(data),
            etag=_md5(data),
            modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def _read_meta(self, key: str) -> dict[str, Any]:
        try:
            meta = json.loads(self._meta_path(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        path = self._data_path(key)
        return await asyncio.to_thread(self._delete_sync, key, path)

    def _delete_sync(self, key: str, path: Path) -> bool:
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        meta = self._meta_path(key)
        with contextlib.suppress(FileNotFoundError):
            meta.unlink()
        self._prune(path.parent, self.root)
        return True

    @staticmethod
    def _prune(directory: Path, stop: Path) -> None:
        """Remove now-empty directories from ``directory`` up to (not including) ``stop``."""
        while directory != stop and directory.is_relative_to(stop):
            try:
                directory.rmdir()
            except OSError:  # not empty, or already gone
                return
            directory = directory.parent

    async def list(self, prefix: str, limit: int = 1000) -> list[ObjectInfo]:
        """Up to ``limit`` objects whose key starts with ``prefix``, in key order."""
        _validate(prefix, what="prefix")
        _check_limit(limit)
        return await asyncio.to_thread(self._list_sync, prefix, limit)

    # builtins.list: inside the class body the name "list" is the method above.
    def _list_sync(self, prefix: str, limit: int) -> builtins.list[ObjectInfo]:
        # Walk only the deepest directory the prefix names in full.
        base = self.root.joinpath(*prefix.split("/")[:-1])
        if not base.is_dir():
            return []
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(base):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != _RESERVED]
            for name in filenames:
                key = (here / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append((key, here / name))
        # S3 orders keys by their UTF-8 bytes; match it.
        found.sort(key=lambda item: item[0].encode())
        infos: list[ObjectInfo] = []
        for key, path in found:
            if len(infos) == limit:
                break
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while we listed
                continue
            etag = self._read_meta(key).get("etag", "")
            modified = datetime.fromtimestamp(stat.st_mtime, UTC)
            infos.append(ObjectInfo(key=key, size=stat.st_size, etag=etag, modified=modified))
        return infos

    async def close(self) -> None:
        """Nothing to release; here for the protocol."""


@contextlib.asynccontextmanager
async def _s3_errors(key: str) -> AsyncIterator[None]:
    """Turn transport failures and S3 throttling into :class:`Unavailable` (retryable)."""
    try:
        yield
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500 or exc.response.get("Error", {}).get("Code") == "SlowDown":
            raise Unavailable("object store unavailable", detail={"key": key}) from exc
        raise
    except BotoCoreError as exc:
        raise Unavailable("object store unreachable", detail={"key": key}) from exc


class S3ObjectStorage:
    """Objects in one S3 bucket (AWS, MinIO, moto) through aioboto3.

    ``start()`` opens the client and creates the bucket if missing; the first call does it if
    the caller did not. ``close()`` releases the client. Credentials left as None come from
    the usual AWS chain (environment, profile, instance role).
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._client: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        """Open the client and make sure the bucket exists. Idempotent."""
        async with self._starting:
            if self._client is not None:
                return
            stack = AsyncExitStack()
            try:
                opening = self._session.client(
                    "s3", endpoint_url=self.endpoint_url, config=_CLIENT_CONFIG
                )
                client = await stack.enter_async_context(opening)
                async with _s3_errors(""):
                    await self._ensure_bucket(client)
            except BaseException:
                await stack.aclose()
                raise
            self._stack, self._client = stack, client

    async def _ensure_bucket(self, client: S3Client) -> None:
        try:
            await client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
        try:
            if self.region == "us-east-1":
                await client.create_bucket(Bucket=self.bucket)
            else:
                await client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={
                        # The stubs list AWS's regions; MinIO and others accept any name.
                        "LocationConstraint": cast("BucketLocationConstraintType", self.region)
                    },
                )
        except ClientError as exc:
            # Another replica created it between our head and our create.
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    async def _s3(self) -> S3Client:
        if self._client is None:
            await self.start()
        assert self._client is not None
        return self._client

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        validate_key(key)
        client = await self._s3()
        async with _s3_errors(key):
            await client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
            )

    async def get(self, key: str) -> StoredObject | None:
        """The object under ``key``, or None."""
        validate_key(key)
        client = await self._s3()
        async with _s3_errors(key):
            try:
                response = await client.get_object(Bucket=self.bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None
            async with response["Body"] as body:
                data = await body.read()
        return StoredObject(
            data=data,
            content_type=response.get("ContentType") or DEFAULT_CONTENT_TYPE,
            size=len(data),
            etag=response.get("ETag", "").strip('"'),
            modified=response["LastModified"],
        )

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed (a HEAD first: S3's DELETE does not say)."""
        validate_key(key)
        client = await self._s3()
        async with _s3_errors(key):
            try:
                await client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            await client.delete_object(Bucket=self.bucket, Key=key)
        return True

    async def list(self, prefix: str, limit: int = 1000) -> list[ObjectInfo]:
        """Up to ``limit`` objects whose key starts with ``prefix``, in key order."""
        _validate(prefix, what="prefix")
        _check_limit(limit)
        client = await self._s3()
        infos: list[ObjectInfo] = []
        paginator = client.get_paginator("list_objects_v2")
        async with _s3_errors(prefix):
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=prefix,
                PaginationConfig={"MaxItems": limit, "PageSize": min(limit, 1000)},
            )
            async for page in pages:
                for entry in page.get("Contents", []):
                    infos.append(
                        ObjectInfo(
                            key=entry["Key"],
                            size=entry.get("Size", 0),
                            etag=entry.get("ETag", "").strip('"'),
                            modified=entry["LastModified"],
                        )
                    )
        return infos[:limit]

    async def close(self) -> None:
        """Close the client; a later call reopens it."""
        async with self._starting:
            stack, self._stack, self._client = self._stack, None, None
            if stack is not None:
                await stack.aclose()


def object_storage_from_settings(settings: CommonSettings) -> ObjectStorage:
    """The store ``SHOAL_OBJECT_STORE`` names (``fs`` or ``s3``); connects on first use."""
    if settings.object_store == "s3":
        return S3ObjectStorage(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=(
                settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
            ),
            secret_access_key=(
                settings.s3_secret_access_key.get_secret_value()
                if settings.s3_secret_access_key
                else None
            ),
        )
    return FilesystemObjectStorage(settings.object_store_path)
