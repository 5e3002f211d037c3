"""The app's WebSocket routes, served straight from the app's own ``__call__``.

A socket's handler stays parked for the socket's whole life, and with it every frame of the
stack above it (routing, exit stacks, middleware calls): memory per idle socket. So the
declared WebSocket routes (``routes.py``, ``streams.py``) are matched here, by the routes' own
matchers, and their endpoints called with the socket and its path parameters, right under the
server; none of the middleware skipped acts on a WebSocket (request ids, CORS, body limits and
tracing are for HTTP). A request under a ``root_path`` goes through the framework, as
``PromptRoute`` does. Every other scope goes on to FastAPI.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIWebSocketRoute
from starlette.routing import Match, WebSocketRoute
from starlette.types import Receive, Scope, Send

from shoal.gateway.ws import DirectWebSocket


class GatewayApp(FastAPI):
    """FastAPI, but its WebSocket routes' endpoints are called without the framework's stack."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct_sockets: list[WebSocketRoute] = []

    def include_router(self, router: APIRouter, *, prefix: str = "", **kwargs: Any) -> None:
        """As FastAPI's; the router's WebSocket routes are also served directly. Each must take
        only the socket and its path parameters: no dependency would be resolved."""
        super().include_router(router, prefix=prefix, **kwargs)
        for route in router.routes:
            if not isinstance(route, APIWebSocketRoute):
                continue
            direct = WebSocketRoute(prefix + route.path, route.endpoint, name=route.name)
            params = set(inspect.signature(route.endpoint).parameters)
            if (
                route.dependencies
                or kwargs.get("dependencies")
                or (params != {"websocket", *direct.param_convertors})
            ):
                raise TypeError(
                    f"WebSocket route {direct.path}: a directly served socket takes only "
                    f"`websocket` and its path parameters, and no dependencies (has {params})"
                )
            self.direct_sockets.append(direct)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not scope.get("root_path"):
            for route in self.direct_sockets:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    # What Starlette would set, and no more: this frame stays parked per socket.
                    scope["app"] = self
                    params = scope["path_params"] = child_scope["path_params"]
                    del child_scope
                    await route.endpoint(DirectWebSocket(scope, receive, send), **params)
                    return
        await super().__call__(scope, receive, send)
