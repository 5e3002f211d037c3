"""``/v1/sessions/{id}/files``: a session's files in object storage (rules in ``gateway.files``).

The upload body is the file itself (any media type; its ``Content-Type`` is kept), read to at
most ``SHOAL_MAX_FILE_BYTES``. Downloads answer the bytes with the stored ``Content-Type``, a
quoted ``ETag`` and ``nosniff``/``sandbox`` headers, so a browser never runs an uploaded page
in the API's origin. Besides API keys, every route takes the session's runner token
(``Authorization: Bearer srt_…``): a runner reads and writes its own session's files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Scope

from shoal.common.errors import Unavailable
from shoal.gateway.api.deps import get_principal, get_service
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.files import MAX_LIST_LIMIT, RunnerAccess, SessionFiles
from shoal.gateway.files import Caller as FilesCaller
from shoal.gateway.service import RUNNER_TOKEN_PREFIX, Principal, bearer_token


class _FilePathConvertor(Convertor[str]):
    """Starlette's ``path`` without its blind spot: ``.`` skips line breaks, so a path holding
    one would match no route (a bare 404) instead of reaching the rules (400)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("filepath", _FilePathConvertor())

router = APIRouter(prefix="/v1/sessions/{session_id}/files", tags=["files"])

FilePath = Annotated[
    str,
    Path(
        description="Relative, '/'-separated; no empty, '.' or '..' segment, no control "
        "character, at most 1024 bytes with the session's prefix",
        examples=["notes/todo.md"],
    ),
]
_FILE_PUT_PATH = re.compile(r"^/v1/sessions/[^/]+/files/")
# Stops a browser from sniffing or running an uploaded file (the API's origin serves it).
_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


def session_files(app: FastAPI | ASGIApp) -> SessionFiles:
    """The lifespan's :class:`SessionFiles` (``app.state.files``)."""
    files = getattr(getattr(app, "state", None), "files", None)
    if not isinstance(files, SessionFiles):
        raise Unavailable("gateway is starting")
    return files


def upload_limit(max_file_bytes: int) -> Callable[[Scope], int | None]:
    """For :class:`~shoal.gateway.api.limits.BodySizeLimit`: a file upload's own body cap."""

    def limit_for(scope: Scope) -> int | None:
        path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))
        if scope.get("method") == "PUT" and _FILE_PUT_PATH.match(path):
            return max_file_bytes
        return None

    return limit_for


async def files_caller(request: Request) -> FilesCaller:
    """An API key's principal, or the runner token of the session in the path (checked by
    :class:`SessionFiles` against that session only)."""
    token = bearer_token(request.headers.get("authorization"))
    if token is not None and token.startswith(RUNNER_TOKEN_PREFIX):
        return RunnerAccess(token=token)
    principal: Principal = await get_principal(request, await get_service(request))
    return principal


Caller = Annotated[FilesCaller, Depends(files_caller)]


class FileUploaded(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "path": "notes/todo.md",
                    "size": 12,
                    "etag": "5eb63bbbe01eeed093cb22bb8f5acdc3",
                    "content_type": "text/markdown",
                }
            ]
        }
    )

    path: str
    size: int = Field(ge=0, description="Bytes")
    etag: str = Field(description="MD5 hex digest of the bytes (the ETag header, unquoted)")
    content_type: str


class FileEntry(BaseModel):
    path: str
    size: int = Field(ge=0, description="Bytes")
    etag: str = Field(description="MD5 hex digest of the bytes")
    modified: datetime = Field(description="RFC 3339, UTC")


class FileList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "files": [
                        {
                            "path": "notes/todo.md",
                            "size": 12,
                            "etag": "5eb63bbbe01eeed093cb22bb8f5acdc3",
                            "modified": "2025-01-01T12:00:00Z",
                        }
                    ],
                    "truncated": False,
                }
            ]
        }
    )

    files: list[FileEntry]
    truncated: bool = Field(description="More files matched than ``limit``: narrow the prefix")


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "The file's bytes (an empty body is an empty file); its Content-Type is "
        "kept and served back (default application/octet-stream)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_DOWNLOAD: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes, with the Content-Type it was stored with",
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {"ETag": {"description": "Quoted MD5 hex digest", "schema": {"type": "string"}}},
    },
    304: {"description": "If-None-Match named the file's current ETag"},
    **problem_responses(400, 401, 403, 404, 503),
}


@router.put(
    "/{path:filepath}",
    status_code=201,
    response_model=FileUploaded,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 503),
    openapi_extra=_UPLOAD_BODY,
)
async def put_file(
    session_id: str, path: FilePath, request: Request, caller: Caller
) -> dict[str, Any]:
    """Store a file of the session, replacing any file at ``path`` (409: the session is
    terminated, or the filesystem store holds a directory or file in the way)."""
    files = session_files(request.app)
    content_type = request.headers.get("content-type")
    info = await files.put(caller, session_id, path, request.stream(), content_type)
    return info.as_dict()


@router.get("/{path:filepath}", response_class=Response, responses=_DOWNLOAD)
async def get_file(session_id: str, path: FilePath, request: Request, caller: Caller) -> Response:
    """The file's bytes; 404 if the session has no file at ``path``."""
    stored = await session_files(request.app).get(caller, session_id, path)
    etag = f'"{stored.etag}"'
    headers = {"ETag": etag, **_DOWNLOAD_HEADERS}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    # As a header, not media_type=: Starlette would add "; charset=utf-8" to a text/* type.
    return Response(stored.data, headers={**headers, "Content-Type": stored.content_type})


@router.delete(
    "/{path:filepath}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(400, 401, 403, 404, 503),
)
async def delete_file(
    session_id: str, path: FilePath, request: Request, caller: Caller
) -> Response:
    """Delete the file at ``path``; 404 if there is none."""
    await session_files(request.app).delete(caller, session_id, path)
    return Response(status_code=204)


@router.get("", response_model=FileList, responses=problem_responses(400, 401, 403, 404, 503))
async def list_files(
    session_id: str,
    request: Request,
    caller: Caller,
    prefix: Annotated[str, Query(description="Paths starting with this", max_length=1024)] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = MAX_LIST_LIMIT,
) -> dict[str, Any]:
    """The session's files whose path starts with ``prefix``, in path order."""
    found, truncated = await session_files(request.app).list(caller, session_id, prefix, limit)
    return {"files": [f.as_dict() for f in found], "truncated": truncated}
