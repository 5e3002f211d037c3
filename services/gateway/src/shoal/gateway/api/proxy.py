"""The runner proxy: ``ANY /v1/sessions/{id}/proxy/{path}`` reaches the agent's own HTTP server.

The caller's key and its access to the session are checked first; then the request travels as
one core-NATS request to whichever gateway holds the session's runner socket, which sends the
runner ``{"type":"http.request","id","method","path","query","headers","body_b64"}`` and waits
for ``{"type":"http.response","ref","status","headers","body"|"body_b64"}``.

Limits: request and response bodies up to ``proxy_max_body_bytes`` (413 / 502 beyond), an answer
within ``proxy_timeout`` (504). No runner connected anywhere: 502 ``runner_unavailable``. The
caller's ``Authorization`` and ``Cookie`` headers and hop-by-hop headers are not forwarded.
Bodies are buffered, not streamed (a whole body travels in one message).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request, Response

from shoal.common.errors import PayloadTooLarge, ShoalError, Timeout, Unavailable
from shoal.common.messaging import dumps, loads
from shoal.gateway.api.deps import Caller, Service
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.realtime import RunnerUnavailable
from shoal.gateway.ws.upgrade import streaming_state

router = APIRouter(prefix="/v1")

PROXY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Not forwarded to the runner: the caller's credentials and hop-by-hop headers (RFC 9110 §7.6.1).
_DROP_REQUEST = frozenset(
    {
        "authorization",
        "cookie",
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "set-cookie"}
)


async def proxy(
    session_id: str, path: str, request: Request, caller: Caller, service: Service
) -> Response:
    """Forward this request to the session's runner and return its answer."""
    await service.visible_session(caller, session_id)
    streaming = streaming_state(request.app)
    if streaming is None:
        raise Unavailable("gateway is starting")
    limit = service.settings.proxy_max_body_bytes
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(
                f"proxied body exceeds {limit} bytes", detail={"max_bytes": limit}
            )
    outgoing = {
        "method": request.method,
        "path": "/" + path,
        "query": request.url.query,
        "headers": {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST},
        "body_b64": base64.b64encode(bytes(body)).decode(),
    }
    answer = loads(await streaming.realtime.proxy_request(session_id, dumps(outgoing)))
    return _response(answer, session_id)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The runner's answer (its status, headers and body, as it gave them)"},
    "default": {"description": "The runner's answer with the status it chose"},
    **problem_responses(401, 403, 404, 413, 502, 503, 504),
}
# One route per method, so each gets its own operation id (proxy_get, proxy_post, …).
for _method in PROXY_METHODS:
    router.add_api_route(
        "/sessions/{session_id}/proxy/{path:path}",
        proxy,
        methods=[_method],
        name=f"proxy_{_method.lower()}",
        tags=["proxy"],
        response_class=Response,
        responses=_RESPONSES,
    )


def _response(answer: Any, session_id: str) -> Response:
    if not isinstance(answer, dict):
        raise RunnerUnavailable("malformed proxy answer", detail={"session_id": session_id})
    status = answer.get("status")
    error = answer.get("error")
    if isinstance(error, str):
        cls: type[ShoalError] = Timeout if status == 504 else RunnerUnavailable
        raise cls(error, detail={"session_id": session_id})
    headers = {
        str(k): str(v)
        for k, v in (answer.get("headers") or {}).items()
        if str(k).lower() not in _DROP_RESPONSE
    }
    content = base64.b64decode(str(answer.get("body_b64") or ""))
    return Response(content=content, status_code=int(status or 502), headers=headers)
