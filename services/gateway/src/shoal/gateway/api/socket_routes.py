"""The event sockets, dispatched ahead of the framework's routing and middleware.

A socket's handler stays parked for the socket's whole life, and with it every frame of the
stack above it: FastAPI's routing (two exit stacks, the endpoint wrapper, scope copies) and each
middleware's call. That is ~13 KB per idle socket — more than the rest of the gateway's share.
The client socket (``/v1/sessions/{id}/ws``), the runner socket (``/v1/sessions/{id}/runner``)
and the user socket (``/v1/events/ws``) are plain ASGI here, so their handlers sit right under
the server. They run the same code as the routes (``serve_client``, ``serve_runner``,
``user_socket``); none of the skipped middleware acts on a WebSocket (request ids, CORS, body
limits and tracing are for HTTP). Every other scope goes on to the app.

Installed as the app's outermost middleware::

    app.add_middleware(SocketRoutes)
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from shoal.gateway.api.deps import gateway_state
from shoal.gateway.api.sockets import serve_client, serve_runner
from shoal.gateway.api.streams import user_socket

_SESSION_SOCKETS = {"ws": serve_client, "runner": serve_runner}


class SocketRoutes:
    """``/v1/sessions/{id}/ws``, ``…/runner`` and ``/v1/events/ws`` straight to their handlers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            parts = scope["path"].split("/")
            # "/v1/sessions/<id>/ws" -> ["", "v1", "sessions", "<id>", "ws"]
            if len(parts) == 5 and parts[1] == "v1" and parts[2] == "sessions" and parts[3]:
                serve = _SESSION_SOCKETS.get(parts[4])
                if serve is not None:
                    websocket = WebSocket(scope, receive, send)
                    state = gateway_state(websocket.app)
                    await serve(websocket, state.service, state.hub, parts[3])
                    return
            elif scope["path"] == "/v1/events/ws":
                await user_socket(WebSocket(scope, receive, send))
                return
        await self.app(scope, receive, send)
