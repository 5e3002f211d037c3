"""A hard cap on HTTP request bodies, enforced before any route reads them.

A declared ``Content-Length`` above the cap is refused at once; a chunked body is counted as it
streams and refused when it crosses the cap. Either way: 413 problem+json.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.gateway.api.problems import problem


class _TooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTP exceptions met while reading a body."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")
        self.problem_extra = {"max_bytes": max_bytes}


class BodySizeLimit:
    """ASGI middleware: bodies larger than ``max_bytes`` get 413.

    ``limit_for(scope)`` may name another cap for some requests (file uploads); None: the default.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        limit_for: Callable[[Scope], int | None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        special = self.limit_for(scope) if self.limit_for is not None else None
        max_bytes = self.max_bytes if special is None else special
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    await body_too_large(max_bytes, scope["path"])(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _TooLarge(max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await body_too_large(max_bytes, scope["path"])(scope, receive, send)


def body_too_large(max_bytes: int, instance: str, request_id: str | None = None) -> JSONResponse:
    """The 413 for a body over ``max_bytes``; the connection closes (the rest is not read)."""
    response = problem(
        413,
        "payload_too_large",
        "Payload too large",
        f"request body exceeds {max_bytes} bytes",
        instance,
        {"max_bytes": max_bytes},
        request_id,
    )
    response.headers["connection"] = "close"
    return response
