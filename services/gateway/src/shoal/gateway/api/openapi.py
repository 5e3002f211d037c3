"""The gateway's OpenAPI document: tags, Bearer auth, problem+json errors, request ids.

FastAPI builds the operations from the routes (models, examples, ``responses=``); this module
finishes the document once: every 4xx/5xx response becomes a :class:`ProblemDetail` under
``application/problem+json`` with an example, FastAPI's 422 (this API answers 400) goes away with
its ``HTTPValidationError`` schemas, every response declares ``X-Request-ID``, and the ``/v1``
operations declare Bearer auth (SSE also ``?ticket=``).

Example::

    install_openapi(app)      # after the routers are included
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from shoal.gateway.api.problems import PROBLEM_JSON, PROBLEM_STATUSES, problem_body
from shoal.gateway.api.request_id import REQUEST_ID_HEADER

TAGS: list[dict[str, Any]] = [
    {"name": "sessions", "description": "Sessions, prompts and message history"},
    {"name": "keys", "description": "API keys: issue, list, revoke"},
    {"name": "secrets", "description": "Users' secrets: values go in, never out"},
    {
        "name": "streaming",
        "description": "Server-sent events and WebSocket tickets. The sockets themselves "
        "(/v1/sessions/{id}/ws, /v1/sessions/{id}/runner, /v1/events/ws) are not HTTP operations: "
        "see services/gateway/README.md.",
    },
    {"name": "proxy", "description": "HTTP to the agent's own server, through its runner"},
    {"name": "admin", "description": "Partitions and session placement (admin keys only)"},
]

DESCRIPTION = """\
Shoal's public API. Authenticate with `Authorization: Bearer <api key>`.

Errors are `application/problem+json` (RFC 9457) with a stable `code`; validation errors are
**400** (never 422). Every response carries `X-Request-ID` — the caller's own when it is 1–128
characters of `A-Z a-z 0-9 . _ : / + = @ -`, a generated one otherwise — and problem bodies
repeat it as `request_id`.
"""

_EXAMPLE_INSTANCE = "/v1/sessions/ses_01J9Z3"
_EXAMPLE_REQUEST_ID = "req_5f0c3a9e2b7d4e1a8c6b0d2f"
_REQUEST_ID_RESPONSE_HEADER = {
    "description": "The request's id (given or generated); also in problem bodies",
    "schema": {"type": "string"},
}
_SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (POST /v1/keys, or the admin key of the deployment)",
    },
    "wsTicket": {
        "type": "apiKey",
        "in": "query",
        "name": "ticket",
        "description": "A single-use ticket from POST /v1/ws-tickets (SSE from browsers)",
    },
}


def operation_id(route: APIRoute) -> str:
    """The route's name (its function's, or the ``name=`` it was given) as its operation id."""
    return route.name


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that finishes FastAPI's document (built once)."""
    generate = app.openapi
    app.openapi_tags = TAGS
    app.description = DESCRIPTION

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                _finish(path, operation)
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        components["securitySchemes"] = _SECURITY_SCHEMES
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _finish(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)
    for status, response in responses.items():
        response.setdefault("headers", {})[REQUEST_ID_HEADER] = _REQUEST_ID_RESPONSE_HEADER
        if status.isdigit() and int(status) >= 400:
            response["content"] = {PROBLEM_JSON: _problem_media(int(status))}
    if path.startswith("/v1/"):
        streaming = path.endswith("/events/stream")
        operation["security"] = [{"bearerAuth": []}] + ([{"wsTicket": []}] if streaming else [])


def _problem_media(status: int) -> dict[str, Any]:
    code, title, _, detail = PROBLEM_STATUSES.get(status, ("error", "Error", "", "error"))
    example = problem_body(
        status, code, title, detail, _EXAMPLE_INSTANCE, None, _EXAMPLE_REQUEST_ID
    )
    return {"schema": {"$ref": "#/components/schemas/ProblemDetail"}, "example": example}
