"""The event sockets, dispatched ahead of the framework's routing and middleware.

A socket's handler stays parked for the socket's whole life, and with it every frame of the
stack above it: FastAPI's routing (two exit stacks, the endpoint wrapper, scope copies) and each
middleware's call. That was ~13 KB per idle socket under the routes, and ~1 KB more under the
framework's own outer layers (FastAPI's and Starlette's ``__call__``, the server-error
middleware, FastAPI's telemetry and body-limit wrappers) while this was a middleware. The
client socket (``/v1/sessions/{id}/ws``), the runner socket (``/v1/sessions/{id}/runner``) and
the user socket (``/v1/events/ws``) are plain ASGI here, handled in the app's own ``__call__``,
so their handlers sit right under the server. They run the same code as the routes
(``serve_client``, ``serve_runner``, ``user_socket``); none of the skipped middleware acts on a
WebSocket (request ids, CORS, body limits and tracing are for HTTP). Every other scope goes on
to FastAPI.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from shoal.gateway.api.deps import gateway_state
from shoal.gateway.api.sockets import serve_client, serve_runner
from shoal.gateway.api.streams import user_socket

_SESSION_SOCKETS = {"ws": serve_client, "runner": serve_runner}


class GatewayApp(FastAPI):
    """FastAPI, but ``/v1/sessions/{id}/ws``, ``…/runner`` and ``/v1/events/ws`` go straight
    to their handlers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            parts = scope["path"].split("/")
            # "/v1/sessions/<id>/ws" -> ["", "v1", "sessions", "<id>", "ws"]
            if len(parts) == 5 and parts[1] == "v1" and parts[2] == "sessions" and parts[3]:
                serve = _SESSION_SOCKETS.get(parts[4])
                if serve is not None:
                    scope["app"] = self  # what Starlette would set
                    websocket = WebSocket(scope, receive, send)
                    state = gateway_state(self)
                    await serve(websocket, state.service, state.hub, parts[3])
                    return
            elif scope["path"] == "/v1/events/ws":
                scope["app"] = self
                await user_socket(WebSocket(scope, receive, send))
                return
        await super().__call__(scope, receive, send)
