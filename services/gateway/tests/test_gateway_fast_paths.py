"""The paths served ahead of the framework (``PromptRoute``, ``GatewayApp``'s sockets) stay
bounded: the middleware they skip is pinned, they serve the declared routes, and a
``root_path`` sends everything through the framework."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, WebSocket
from gateway_fakes import FakeKeys, FakeSessionService
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect

from shoal.common.service import ServiceServer, server_config
from shoal.gateway.api import routes, streams, workers
from shoal.gateway.api.limits import BodySizeLimit
from shoal.gateway.api.prompt_route import PromptRoute
from shoal.gateway.api.request_id import RequestIdMiddleware
from shoal.gateway.api.socket_routes import GatewayApp
from shoal.gateway.app import create_app
from shoal.gateway.config import GatewaySettings

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.mark.parametrize("cors", [False, True])
def test_middleware_stack_is_pinned(settings: GatewaySettings, cors: bool) -> None:
    """The prompt route and the sockets skip every middleware below: a new one fails this test,
    so whoever adds it decides what the direct paths do about it (and updates this list)."""
    from fastapi.middleware.cors import CORSMiddleware

    from shoal.common.service import ObserveRequests

    if cors:
        settings = settings.model_copy(update={"cors_allow_origins": ["https://app.example"]})
    app = create_app(settings)
    expected: list[type[Any]] = [PromptRoute, RequestIdMiddleware]
    expected += [CORSMiddleware] if cors else []
    expected += [BodySizeLimit, ObserveRequests]  # the prompt route observes itself
    assert [m.cls for m in app.user_middleware] == expected


def test_direct_sockets_are_the_declared_routes(settings: GatewaySettings) -> None:
    app = create_app(settings)
    assert isinstance(app, GatewayApp)
    served = {(route.path, route.endpoint) for route in app.direct_sockets}
    assert served == {
        ("/v1/sessions/{session_id}/ws", routes.client_socket),
        ("/v1/sessions/{session_id}/runner", routes.runner_socket),
        ("/v1/events/ws", streams.user_socket),
        ("/v1/workers/ws", workers.worker_socket),
    }


def test_a_socket_route_with_dependencies_is_refused() -> None:
    """Nothing would resolve a dependency of a directly served socket: refused at start-up."""

    async def token() -> str:
        return "t"

    router = APIRouter()

    @router.websocket("/v1/other/ws")
    async def other(websocket: WebSocket, value: str = Depends(token)) -> None:
        await websocket.close()

    with pytest.raises(TypeError, match="directly served socket"):
        GatewayApp().include_router(router)


async def test_under_a_root_path_the_framework_serves_prompts_and_sockets(
    keys: FakeKeys,
    sessions: FakeSessionService,
    settings: GatewaySettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a proxy that strips ``/api``, uvicorn puts its ``root_path`` back in front of the
    path; the direct paths leave such requests to the framework, which strips it again: the
    same answers, the frames through the ASGI send."""
    asgi_sends: list[dict[str, Any]] = []
    original = WebSocketsSansIOProtocol.send

    async def send(self: WebSocketsSansIOProtocol, message: Any) -> None:
        if message["type"] == "websocket.send":
            asgi_sends.append(message)
        await original(self, message)

    monkeypatch.setattr(WebSocketsSansIOProtocol, "send", send)
    app = create_app(settings)
    server = ServiceServer(server_config(app, settings, log_level="warning", root_path="/api"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if serving.done():
                    serving.result()  # surface the start-up error
                await asyncio.sleep(0.02)
        host = f"{settings.http_host}:{settings.http_port}"
        async with httpx.AsyncClient(base_url=f"http://{host}", headers=ALICE) as http:
            response = await http.post("/v1/sessions", json={})
            assert response.status_code == 201, response.text
            session_id = response.json()["id"]
            url = f"ws://{host}/v1/sessions/{session_id}/ws"
            async with connect(url, additional_headers=ALICE, compression=None) as conn:
                first = json.loads(await asyncio.wait_for(conn.recv(), 10))
                assert (first["type"], first["seq"]) == ("event", 1)
                prompt = await http.post(
                    f"/v1/sessions/{session_id}/prompts", json={"content": "hi"}
                )
                assert prompt.status_code == 202, prompt.text
                assert set(prompt.json()) == {"prompt_id", "session_id", "status", "seq"}
                queued = json.loads(await asyncio.wait_for(conn.recv(), 10))
                assert queued["event"]["data"]["prompt_id"] == prompt.json()["prompt_id"]
        assert len(asgi_sends) == 2  # not written directly: the framework served the socket
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
