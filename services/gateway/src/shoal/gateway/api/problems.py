"""``application/problem+json`` (RFC 9457) for every error the gateway answers over HTTP.

Members: ``type`` (``urn:shoal:problem:<code>``), ``title``, ``status``, ``detail`` (a sentence),
``code`` (stable, from :mod:`shoal.common.errors`), ``instance`` (the request path), plus the
error's own context as extension members (e.g. ``session_id``, ``max_bytes``, ``errors``).

Request validation failures — malformed JSON and schema errors alike — are **400** with code
``bad_request`` and an ``errors`` list (never 422), so clients handle one status.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.common.errors import ShoalError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_RESERVED = frozenset({"type", "title", "status", "detail", "code", "instance"})
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


def problem_body(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k not in _RESERVED}
    body.update(
        type=f"urn:shoal:problem:{code}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        instance=instance,
    )
    return body


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="shoal"'} if status == 401 else None
    return JSONResponse(
        problem_body(status, code, title, detail, instance, extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def shoal_problem(exc: ShoalError, instance: str) -> JSONResponse:
    return problem(exc.status, exc.code, exc.title, exc.message, instance, exc.detail)


async def _on_shoal_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ShoalError)
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.message)
    return shoal_problem(exc, request.url.path)


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
    return problem(400, "bad_request", "Bad request", detail, request.url.path, {"errors": errors})


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    response = problem(exc.status_code, code, title, detail, request.url.path)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal", "Internal error", "internal error", request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    """Map every error to problem+json; an unexpected one to a 500 that names no internals."""
    app.add_exception_handler(ShoalError, _on_shoal_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
