"""The v1 routes: transport only (decode, call the service, map the result)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from shoal.gateway.api import keys, secrets
from shoal.gateway.api.deps import Caller, Service, gateway_state
from shoal.gateway.api.sockets import serve_client, serve_runner

router = APIRouter(prefix="/v1")
router.include_router(keys.router)  # issue 5: API keys and secrets in their own modules
router.include_router(secrets.router)


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] = Field(default_factory=dict)


class SubmitPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1)
    idempotency_key: str | None = Field(default=None, min_length=1)


@router.post("/sessions", status_code=201)
async def create_session(
    caller: Caller, service: Service, body: CreateSession | None = None
) -> dict[str, Any]:
    """Create a session; the answer holds its ``runner_token`` (shown once)."""
    return await service.create_session(caller, body.metadata if body else None)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, caller: Caller, service: Service) -> dict[str, Any]:
    return await service.get_session(caller, session_id)


@router.post("/sessions/{session_id}/prompts", status_code=202)
async def submit_prompt(
    session_id: str, body: SubmitPrompt, caller: Caller, service: Service
) -> dict[str, Any]:
    """Queue a prompt; the same ``idempotency_key`` always yields the same ``prompt_id``."""
    return await service.submit_prompt(caller, session_id, body.content, body.idempotency_key)


@router.get("/sessions/{session_id}/messages")
async def list_messages(
    session_id: str,
    caller: Caller,
    service: Service,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """Completed messages after event seq ``after``; pass ``next`` back as ``after`` to page."""
    return await service.list_messages(caller, session_id, after, limit)


@router.websocket("/sessions/{session_id}/ws")
async def client_socket(websocket: WebSocket, session_id: str) -> None:
    state = gateway_state(websocket.app)
    await serve_client(websocket, state.service, state.hub, session_id)


@router.websocket("/sessions/{session_id}/runner")
async def runner_socket(websocket: WebSocket, session_id: str) -> None:
    state = gateway_state(websocket.app)
    await serve_runner(websocket, state.service, state.hub, session_id)
