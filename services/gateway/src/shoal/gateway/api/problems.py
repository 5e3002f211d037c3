"""``application/problem+json`` (RFC 9457) for every error the gateway answers over HTTP.

Members: ``type`` (``urn:shoal:problem:<code>``), ``title``, ``status``, ``detail`` (a sentence),
``code`` (stable, from :mod:`shoal.common.errors`), ``instance`` (the request path),
``request_id`` (the ``X-Request-ID`` of the request), plus the error's own context as extension
members (e.g. ``session_id``, ``max_bytes``, ``errors``).

Request validation failures — malformed JSON and schema errors alike — are **400** with code
``bad_request`` and an ``errors`` list (never 422), so clients handle one status.

Routes declare the problems they may answer; :mod:`shoal.gateway.api.openapi` documents them
as ``application/problem+json`` with an example each::

    @router.get("/things/{id}", responses=problem_responses(401, 403, 404, 503))
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.common.errors import RateLimited, ShoalError
from shoal.gateway.api.request_id import request_id_of

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# ``instance`` is the decoded request path: control characters in it (a NUL in a file path) go
# back percent-encoded, as the client sent them, never raw.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RESERVED = frozenset({"type", "title", "status", "detail", "code", "instance", "request_id"})
_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    429: ("rate_limited", "Too many requests"),
}


class ValidationIssue(BaseModel):
    """One schema error of a 400: where, what, which rule (never the offending input)."""

    loc: list[str | int] = Field(description="Path to the value: ['body', 'content']")
    message: str
    type: str = Field(description="The rule that failed, e.g. 'missing', 'string_too_short'")


class ProblemDetail(BaseModel):
    """An error (RFC 9457). Context members beyond these may be present (``session_id``, …)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:shoal:problem:not_found",
                    "title": "Not found",
                    "status": 404,
                    "detail": "session not found",
                    "code": "not_found",
                    "instance": "/v1/sessions/ses_01J9Z3",
                    "request_id": "req_5f0c3a9e2b7d4e1a8c6b0d2f",
                    "session_id": "ses_01J9Z3",
                }
            ]
        },
    )

    type: str = Field(description="urn:shoal:problem:<code>")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    code: str = Field(description="Stable machine-readable code (shoal.common.errors)")
    instance: str = Field(description="The request path")
    request_id: str | None = Field(
        default=None, description="The request's X-Request-ID (given or generated)"
    )
    errors: list[ValidationIssue] | None = Field(
        default=None, description="Schema errors of a 400 (no input is echoed)"
    )


# Each documented status: its code, title, what it means here, an example detail.
PROBLEM_STATUSES: dict[int, tuple[str, str, str, str]] = {
    400: (
        "bad_request",
        "Bad request",
        "Malformed JSON, a schema error or a bad value (never 422)",
        "request validation failed",
    ),
    401: (
        "unauthorized",
        "Unauthorized",
        "Missing, unknown, revoked or expired API key",
        "invalid API key",
    ),
    403: (
        "forbidden",
        "Forbidden",
        "The key lacks the route's scope, or acts for another owner without admin",
        "this API key lacks the scope for this request (needs sessions)",
    ),
    404: (
        "not_found",
        "Not found",
        "Unknown, or another owner's (which looks the same)",
        "session not found",
    ),
    409: (
        "conflict",
        "Conflict",
        "The session refused the command (e.g. it is terminated)",
        "session is terminated",
    ),
    413: (
        "payload_too_large",
        "Payload too large",
        "Body, prompt, metadata or secret value above its limit (``max_bytes``)",
        "prompt too large",
    ),
    502: (
        "runner_unavailable",
        "Runner unavailable",
        "No runner connected to the session, or its answer was unusable",
        "no runner connected",
    ),
    503: (
        "unavailable",
        "Service unavailable",
        "NATS, the keys service or the session service is unreachable; retry with backoff",
        "keys service unavailable",
    ),
    504: (
        "timeout",
        "Timed out",
        "Stored but not confirmed in time: the command stays queued and will be applied",
        "command not confirmed in time",
    ),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status as a :class:`ProblemDetail`."""
    return {
        status: {"model": ProblemDetail, "description": PROBLEM_STATUSES[status][2]}
        for status in statuses
    }


def _percent(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group().encode())


def problem_body(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    extra: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k not in _RESERVED}
    body.update(
        type=f"urn:shoal:problem:{code}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        instance=_CONTROL.sub(_percent, instance),
    )
    if request_id is not None:
        body["request_id"] = request_id
    return body


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    extra: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="shoal"'} if status == 401 else {}
    if request_id is not None:
        # Also set here: a 500 is sent by Starlette's outermost middleware, past ours.
        headers["X-Request-ID"] = request_id
    return JSONResponse(
        problem_body(status, code, title, detail, instance, extra, request_id),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def shoal_problem(exc: ShoalError, instance: str, request_id: str | None = None) -> JSONResponse:
    response = problem(
        exc.status, exc.code, exc.title, exc.message, instance, exc.detail, request_id
    )
    retry_after = exc.detail.get("retry_after")
    if isinstance(exc, RateLimited) and isinstance(retry_after, int):
        response.headers["Retry-After"] = str(retry_after)  # whole seconds, as the member says
    return response


async def _on_shoal_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ShoalError)
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.message)
    return shoal_problem(exc, request.url.path, request_id_of(request))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": list(e.get("loc", ())),
            "message": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]  # the offending input is left out on purpose: it may hold secrets
    malformed = any(e["type"] == "json_invalid" for e in errors)
    detail = "malformed JSON body" if malformed else "request validation failed"
    return problem(
        400,
        "bad_request",
        "Bad request",
        detail,
        request.url.path,
        {"errors": errors},
        request_id_of(request),
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    extra = getattr(exc, "problem_extra", None)  # context members, e.g. limits.py's max_bytes
    response = problem(
        exc.status_code, code, title, detail, request.url.path, extra, request_id_of(request)
    )
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request)
    log.exception(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=exc,
        extra={"request_id": request_id},
    )
    return problem(
        500, "internal", "Internal error", "internal error", request.url.path, None, request_id
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Map every error to problem+json; an unexpected one to a 500 that names no internals."""
    app.add_exception_handler(ShoalError, _on_shoal_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
