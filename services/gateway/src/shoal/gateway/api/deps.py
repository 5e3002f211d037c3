"""Dependencies the routes share: the process's gateway state and the caller's principal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp

from shoal.common.errors import Unavailable
from shoal.gateway.service import GatewayService, Principal, bearer_token
from shoal.gateway.tenancy import authorize_route
from shoal.gateway.ws import SocketHub


@dataclass(frozen=True, slots=True)
class GatewayState:
    """What the lifespan built and hands to every request (``app.state.gateway``)."""

    service: GatewayService
    hub: SocketHub


def gateway_state(app: FastAPI | ASGIApp) -> GatewayState:
    state = getattr(getattr(app, "state", None), "gateway", None)
    if not isinstance(state, GatewayState):
        raise Unavailable("gateway is starting")
    return state


async def get_service(request: Request) -> GatewayService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, and that hand-off
    # (twice per request, with the principal) cost more than the rest of the request.
    return gateway_state(request.app).service


Service = Annotated[GatewayService, Depends(get_service)]


async def get_principal(request: Request, service: Service) -> Principal:
    """The caller, once its key's scopes cover the route (403 otherwise; tenancy.py)."""
    principal = await service.authenticate(bearer_token(request.headers.get("authorization")))
    # The request path, not the route template: FastAPI's included routers keep templates
    # without their parents' prefixes. Every route starts with its family's literal prefix.
    path = request.url.path.removeprefix(request.scope.get("root_path", "").rstrip("/"))
    authorize_route(principal, path, request.method)
    return principal


Caller = Annotated[Principal, Depends(get_principal)]


async def get_key_holder(request: Request, service: Service) -> Principal:
    """The caller, scopes not yet checked: for a route whose service method authorizes itself
    (the prompt route, which the socket and the direct route share with it)."""
    return await service.authenticate(bearer_token(request.headers.get("authorization")))


KeyHolder = Annotated[Principal, Depends(get_key_holder)]
