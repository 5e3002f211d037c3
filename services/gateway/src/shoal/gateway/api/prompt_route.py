"""``POST /v1/sessions/{id}/prompts`` served ahead of the framework: the command path's hot route.

A plain ASGI handler that does for this one route what the framework's stack does (most of a
prompt request's CPU in the gateway was that stack; bench/README.md): the request id, the body
cap (413), a server span continuing ``traceparent`` and the request metrics, the key (the
service checks its scope, once), the body validated by the route's own model, the receipt as
the service shapes it, errors as the app's handlers answer them. What it does not handle goes
to the app untouched: a request with an ``Origin`` (CORS is the framework's), a non-JSON
content type, a ``root_path``, and every body that fails validation (replayed to the FastAPI
route, so a 400's ``errors`` come from one place). ``tests/test_gateway_http.py`` proves both
answer alike; ``tests/test_gateway_fast_paths.py`` pins the middleware stack this skips.

Installed as the app's outermost middleware::

    app.add_middleware(PromptRoute, max_body_bytes=settings.max_body_bytes)
"""

from __future__ import annotations

import logging
import time

import msgspec
import orjson
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.common.errors import ShoalError
from shoal.common.observability import start_span
from shoal.common.service import observe_request
from shoal.gateway.api.deps import gateway_state
from shoal.gateway.api.limits import body_too_large
from shoal.gateway.api.problems import problem, shoal_problem
from shoal.gateway.api.request_id import (
    REQUEST_ID_HEADER,
    accepted_request_id,
    serving_request,
)
from shoal.gateway.api.routes import SubmitPrompt
from shoal.gateway.service import bearer_token
from shoal.gateway.views import PromptReceipt

# The route template the framework's own route has (the request metrics' label).
PROMPT_ROUTE = "/v1/sessions/{session_id}/prompts"

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


class _BodyTooLarge(Exception):
    pass


class PromptRoute:
    """ASGI middleware: ``POST /v1/sessions/{id}/prompts`` handled here, the rest passed on."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = _prompt_route(scope)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if b"origin" in headers or content_type != b"application/json":
            await self.app(scope, receive, send)
            return
        incoming = headers.get(_REQUEST_ID)
        request_id = accepted_request_id(incoming.decode("latin-1") if incoming else None)
        scope.setdefault("state", {})["request_id"] = request_id
        with serving_request(request_id):
            await self._serve(scope, receive, send, headers, session_id, request_id)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        session_id: str,
        request_id: str,
    ) -> None:
        path: str = scope["path"]
        try:
            body = await _read_body(receive, headers.get(b"content-length"), self.max_body_bytes)
        except _BodyTooLarge:
            await body_too_large(self.max_body_bytes, path, request_id)(scope, receive, send)
            return
        try:
            prompt = SubmitPrompt.model_validate_json(body)
        except ValidationError:
            # The framework answers it, from the same body: one source of validation errors.
            await self.app(scope, _replay(body, receive), send)
            return
        carrier = {
            k.decode(): v.decode("latin-1") for k, v in headers.items() if k in _TRACE_HEADERS
        }
        attributes = {"http.request.method": "POST", "url.path": path}
        started = time.perf_counter()
        with start_span(f"POST {path}", carrier, **attributes) as span:
            receipt = await self._submit(scope, headers, session_id, prompt, request_id)
            status = receipt.status_code if isinstance(receipt, Response) else 202
            span.set_attribute("http.response.status_code", status)
        if isinstance(receipt, Response):
            await receipt(scope, receive, send)
        else:
            await _accepted(send, receipt, request_id)
        observe_request("POST", PROMPT_ROUTE, status, time.perf_counter() - started)

    async def _submit(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        session_id: str,
        prompt: SubmitPrompt,
        request_id: str,
    ) -> PromptReceipt | Response:
        """The receipt, or the problem the app's handlers would send."""
        path: str = scope["path"]
        try:
            service = gateway_state(scope["app"]).service
            authorization = headers.get(b"authorization")
            principal = await service.authenticate(
                bearer_token(authorization.decode("latin-1") if authorization else None)
            )
            return await service.submit_prompt(
                principal, session_id, prompt.content, prompt.idempotency_key
            )
        except ShoalError as exc:
            if exc.status >= 500:
                log.warning("POST %s -> %s: %s", path, exc.code, exc.message)
            return shoal_problem(exc, path, request_id)
        except Exception:
            log.exception("unhandled error on POST %s", path, extra={"request_id": request_id})
            return problem(
                500, "internal", "Internal error", "internal error", path, None, request_id
            )


def _prompt_route(scope: Scope) -> str | None:
    """The session id of a ``POST /v1/sessions/<id>/prompts`` at the app's root, else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    parts = scope["path"].split("/")
    # "/v1/sessions/<id>/prompts" -> ["", "v1", "sessions", "<id>", "prompts"]
    if len(parts) == 5 and parts[4] == "prompts" and parts[1] == "v1" and parts[2] == "sessions":
        return parts[3] or None
    return None


async def _read_body(receive: Receive, declared: bytes | None, max_bytes: int) -> bytes:
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise _BodyTooLarge
        except ValueError:
            pass  # the server validated the header; a bad one reads as a streamed body
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # http.disconnect: answer what arrived; the send goes nowhere
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the body already read, then defers to the server's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _accepted(send: Send, receipt: PromptReceipt, request_id: str) -> None:
    """The 202, written as two ASGI messages (the hot path: no Response object per prompt)."""
    payload = orjson.dumps(msgspec.structs.asdict(receipt))
    headers = [
        _JSON,
        (b"content-length", str(len(payload)).encode()),
        (_REQUEST_ID, request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
