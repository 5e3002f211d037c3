"""Request ids: every HTTP request and socket upgrade carries one, from ``X-Request-ID`` or made up.

A caller's ``X-Request-ID`` is kept when it is 1–128 characters of ``A-Z a-z 0-9 . _ : / + = @ -``
(anything else could smuggle text into logs) and replaced by a generated ``req_…`` id otherwise.
The id is echoed as ``X-Request-ID`` on every HTTP response, put in every problem body as
``request_id`` and in every log line written while the request (or socket) runs. Socket sends are
not wrapped: a per-frame hop would cost the fan-out path for a header nobody reads there.

Example::

    app.add_middleware(RequestIdMiddleware)               # outermost: added last
    install_request_id_logging()                          # log records get ``request_id``
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_VALID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

_current: ContextVar[str | None] = ContextVar("shoal_request_id", default=None)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def accepted_request_id(value: str | None) -> str:
    """The caller's id if it is safe to log and echo, else a fresh one."""
    return value if value is not None and _VALID.match(value) else new_request_id()


def current_request_id() -> str | None:
    """The id of the request this task is serving, if any."""
    return _current.get()


@contextmanager
def serving_request(request_id: str) -> Iterator[None]:
    """Log lines written inside carry ``request_id`` (the middleware's, for direct routes)."""
    token = _current.set(request_id)
    try:
        yield
    finally:
        _current.reset(token)


def request_id_of(conn: HTTPConnection | Scope) -> str | None:
    """The id the middleware gave a request (it lives in the scope's state)."""
    scope = conn.scope if isinstance(conn, HTTPConnection) else conn
    state = scope.get("state")
    value = state.get("request_id") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Plain ASGI (streamed bodies pass untouched): pick the id, expose it, echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == _HEADER_KEY:
                incoming = value.decode("latin-1")
                break
        request_id = accepted_request_id(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (_HEADER_KEY, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        with serving_request(request_id):
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to records logged while a request runs (the JSON formatter prints it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def install_request_id_logging() -> None:
    """Put the filter on the root handlers (``setup_logging`` replaces them: call it after)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
            handler.addFilter(RequestIdLogFilter())
