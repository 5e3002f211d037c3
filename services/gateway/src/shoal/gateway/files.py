"""Session files: the rules of ``/v1/sessions/{id}/files/{path}`` (DESIGN.md §5–§6).

No transport here. A file is one object under ``sessions/<session_id>/files/<path>`` in the
gateway's :class:`~shoal.common.storage.ObjectStorage`; it belongs to the session's owner, so
every method first checks the caller may see the session (another owner's answers 404, like a
missing one) and only then looks at the path or reads a byte of the body. Paths follow the
store's key rules (:func:`~shoal.common.storage.objects.validate_key`): 400 otherwise, and a
path holding control characters is never echoed. The session's runner reaches the same files
with its runner token (:class:`RunnerAccess`), for its own session only.

Example::

    files = SessionFiles(service, object_storage_from_settings(settings), max_bytes=25 * MiB)
    info = await files.put(principal, "ses_1", "notes/todo.md", chunks, "text/markdown")
    stored = await files.get(principal, "ses_1", "notes/todo.md")   # StoredObject
    listed = await files.list(principal, "ses_1", prefix="notes/")  # [FileInfo, ...]
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shoal.common.contracts import Status
from shoal.common.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from shoal.common.storage.objects import (
    DEFAULT_CONTENT_TYPE,
    ObjectStorage,
    StoredObject,
    validate_key,
)
from shoal.gateway import tenancy
from shoal.gateway.service import GatewayService, Principal

MAX_LIST_LIMIT = 1000  # one S3 page
MAX_KEY_BYTES = 1024  # the object stores' key limit (S3's), prefix included
MAX_CONTENT_TYPE_CHARS = 255
# type "/" subtype, then parameters; RFC 9110 tokens. Anything else is refused (400) rather
# than stored and served back as a header nobody can parse.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE_RE = re.compile(rf"^{_TCHARS}/{_TCHARS}(\s*;\s*{_TCHARS}=({_TCHARS}|\"[^\"\\]*\"))*$")


@dataclass(frozen=True, slots=True)
class RunnerAccess:
    """A caller holding a runner token: it may use the files of the one session it belongs to."""

    token: str


Caller = Principal | RunnerAccess


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file of a session, as a listing or an upload describes it."""

    path: str
    size: int
    etag: str
    modified: datetime | None = None
    content_type: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "path": self.path,
                "size": self.size,
                "etag": self.etag,
                "modified": self.modified,
                "content_type": self.content_type,
            }.items()
            if v is not None
        }


def files_prefix(session_id: str) -> str:
    """Where a session's files live in the object store (``sessions/<id>/files/``)."""
    return f"sessions/{session_id}/files/"


def is_echoable(value: str) -> bool:
    """Whether ``value`` may appear in an error: no control, format, surrogate or unassigned
    characters."""
    return not any(unicodedata.category(c).startswith("C") for c in value)


def _bad_path(exc: BadRequest, what: str, value: str) -> BadRequest:
    message = exc.message.replace("object key", f"file {what}").replace(
        "object prefix", f"file {what}"
    )
    return BadRequest(message, detail={what: value} if is_echoable(value) else {})


def check_content_type(content_type: str | None) -> str:
    """The media type to store (``application/octet-stream`` when none was sent), else 400."""
    if content_type is None or not content_type.strip():
        return DEFAULT_CONTENT_TYPE
    content_type = content_type.strip()
    if len(content_type) > MAX_CONTENT_TYPE_CHARS or not _MEDIA_TYPE_RE.match(content_type):
        raise BadRequest("Content-Type must be a media type like 'text/plain; charset=utf-8'")
    return content_type


class SessionFiles:
    """Put, get, delete and list a session's files for a caller who may see the session."""

    def __init__(self, service: GatewayService, objects: ObjectStorage, max_bytes: int) -> None:
        self._service = service
        self.objects = objects
        self.max_bytes = max_bytes

    async def _session(self, caller: Caller, session_id: str, *, write: bool) -> str:
        """The session's status once ``caller`` may use its files (401/403/404 otherwise)."""
        if isinstance(caller, RunnerAccess):
            return (await self._service.authenticate_runner(session_id, caller.token)).status
        self._service.authorize(caller, tenancy.SESSIONS, write=write)
        return (await self._service.visible_session(caller, session_id)).status

    def _key(self, session_id: str, path: str) -> str:
        # Control characters are legal in S3 keys and file names, but break S3's XML listings
        # and log lines: refused here, on top of the store's rules.
        if any(unicodedata.category(c) == "Cc" for c in path):
            raise BadRequest("file path contains control characters")
        key = files_prefix(session_id) + path
        room = MAX_KEY_BYTES - len(files_prefix(session_id).encode())
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise BadRequest(f"file path is longer than {room} bytes", detail={"max_bytes": room})
        try:
            return validate_key(key)
        except BadRequest as exc:
            raise _bad_path(exc, "path", path) from None

    async def put(
        self,
        caller: Caller,
        session_id: str,
        path: str,
        body: AsyncIterable[bytes],
        content_type: str | None,
    ) -> FileInfo:
        """Store the body under ``path``, replacing any file there; 413 past ``max_bytes``.

        The body is read into memory only after the session and the path passed, and at most
        ``max_bytes`` + one chunk of it. A terminated session's files can still be read and
        deleted but not written (409).
        """
        status = await self._session(caller, session_id, write=True)
        key = self._key(session_id, path)
        media_type = check_content_type(content_type)
        if status == Status.TERMINATED:
            raise Conflict("session is terminated", detail={"session_id": session_id})
        data = bytearray()
        async for chunk in body:
            data.extend(chunk)
            if len(data) > self.max_bytes:
                raise PayloadTooLarge(
                    f"file exceeds {self.max_bytes} bytes", detail={"max_bytes": self.max_bytes}
                )
        content = bytes(data)
        try:
            await self.objects.put(key, content, media_type)
        except Conflict:
            # The filesystem store cannot hold both "a" and "a/b" (S3 can).
            raise Conflict(
                "file path collides with another file's directory on this store",
                detail={"path": path},
            ) from None
        # The store's ETag is the MD5 of the bytes (objects.py), so no read-back is needed.
        etag = hashlib.md5(content, usedforsecurity=False).hexdigest()
        return FileInfo(path=path, size=len(content), etag=etag, content_type=media_type)

    async def get(self, caller: Caller, session_id: str, path: str) -> StoredObject:
        """The file's bytes and metadata; :class:`NotFound` if there is none."""
        await self._session(caller, session_id, write=False)
        stored = await self.objects.get(self._key(session_id, path))
        if stored is None:
            raise NotFound("file not found", detail={"session_id": session_id})
        return stored

    async def delete(self, caller: Caller, session_id: str, path: str) -> None:
        """Delete the file; :class:`NotFound` if there is none."""
        await self._session(caller, session_id, write=True)
        if not await self.objects.delete(self._key(session_id, path)):
            raise NotFound("file not found", detail={"session_id": session_id})

    async def list(
        self, caller: Caller, session_id: str, prefix: str = "", limit: int = MAX_LIST_LIMIT
    ) -> tuple[list[FileInfo], bool]:
        """Up to ``limit`` files whose path starts with ``prefix``, in path order (UTF-8 bytes),
        and whether more were left out."""
        await self._session(caller, session_id, write=False)
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        if any(unicodedata.category(c) == "Cc" for c in prefix):
            raise BadRequest("file prefix contains control characters")
        base = files_prefix(session_id)
        try:
            infos = await self.objects.list(base + prefix, limit + 1)
        except BadRequest as exc:
            raise _bad_path(exc, "prefix", prefix) from None
        files = [
            FileInfo(
                path=info.key.removeprefix(base),
                size=info.size,
                etag=info.etag,
                modified=info.modified,
            )
            for info in infos[:limit]
        ]
        return files, len(infos) > limit
