"""The v1 routes: transport only (decode, call the service, map the result)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from shoal.common.contracts import Status
from shoal.gateway.api import keys, secrets
from shoal.gateway.api.deps import Caller, Service, gateway_state
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.ws import serve_client, serve_runner

router = APIRouter(prefix="/v1")
router.include_router(keys.router)  # API keys and secrets live in their own modules
router.include_router(secrets.router)

# Seqs are int64 in the ledger and in PostgreSQL: a larger ``after`` is a 400 here, not a
# failed query in the session service (found by tests/test_openapi_fuzz.py).
MAX_SEQ = 2**63 - 1

_SESSION_EXAMPLE: dict[str, Any] = {
    "id": "ses_01J9Z3K8Q2W5",
    "owner": "alice",
    "status": "idle",
    "created_at": "2025-01-01T12:00:00.000Z",
    "updated_at": "2025-01-01T12:00:00.000Z",
    "metadata": {"repo": "acme/api", "allowed_secrets": ["GH_TOKEN"]},
    "runner_connected": False,
    "current_prompt_id": None,
    "queued_prompts": 0,
    "last_seq": 1,
}


class CreateSession(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"metadata": {"repo": "acme/api", "allowed_secrets": ["GH_TOKEN"]}}]
        },
    )

    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form, fixed at creation (at most SHOAL_MAX_METADATA_BYTES as JSON); "
        "allowed_secrets names the secrets the session's runner may read.",
    )


class SubmitPrompt(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"content": "Fix the failing test", "idempotency_key": "k1"}]
        },
    )

    content: str = Field(min_length=1, description="At most SHOAL_MAX_PROMPT_BYTES of UTF-8")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        description="The same key always yields the same prompt_id, and queues the prompt once",
    )


class Session(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_SESSION_EXAMPLE]})

    id: str
    owner: str
    status: Status
    created_at: str = Field(description="RFC 3339, UTC")
    updated_at: str = Field(description="RFC 3339, UTC")
    metadata: dict[str, Any]
    runner_connected: bool = False
    current_prompt_id: str | None = None
    queued_prompts: int = Field(default=0, ge=0)
    last_seq: int = Field(default=0, ge=0, description="Seq of the session's latest event")


class CreatedSession(Session):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_SESSION_EXAMPLE, "runner_token": "srt_Zm9vYmFy…"}]}
    )

    runner_token: str = Field(description="The runner's credential: shown here once, never again")


class PromptReceipt(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt_id": "prm_01J9Z4",
                    "session_id": "ses_01J9Z3",
                    "status": "queued",
                    "seq": 2,
                }
            ]
        }
    )

    prompt_id: str
    session_id: str
    status: str = Field(description="Always 'queued'")
    seq: int | None = Field(default=None, description="Seq of the prompt.queued event")


class Message(BaseModel):
    id: str
    prompt_id: str | None
    role: str = Field(description="'user' or 'assistant'")
    content: str
    created_at: str = Field(description="RFC 3339, UTC")
    seq: int = Field(description="Seq of the event that completed it")


class MessagesPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {
                            "id": "msg_01J9Z5",
                            "prompt_id": "prm_01J9Z4",
                            "role": "assistant",
                            "content": "Done: the test passes.",
                            "created_at": "2025-01-01T12:00:05.000Z",
                            "seq": 7,
                        }
                    ],
                    "next": None,
                }
            ]
        }
    )

    messages: list[Message]
    next: int | None = Field(description="Pass back as ?after= for the next page; null: no more")


@router.post(
    "/sessions",
    status_code=201,
    response_model=CreatedSession,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 413, 503, 504),
)
async def create_session(
    caller: Caller, service: Service, body: CreateSession | None = None
) -> dict[str, Any]:
    """Create a session; the answer holds its ``runner_token`` (shown once)."""
    return await service.create_session(caller, body.metadata if body else None)


@router.get(
    "/sessions/{session_id}",
    response_model=Session,
    tags=["sessions"],
    responses=problem_responses(401, 403, 404, 503),
)
async def get_session(session_id: str, caller: Caller, service: Service) -> dict[str, Any]:
    """The session (without its runner token)."""
    return await service.get_session(caller, session_id)


@router.post(
    "/sessions/{session_id}/prompts",
    status_code=202,
    response_model=PromptReceipt,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 503, 504),
)
async def submit_prompt(
    session_id: str, body: SubmitPrompt, caller: Caller, service: Service
) -> dict[str, Any]:
    """Queue a prompt; the same ``idempotency_key`` always yields the same ``prompt_id``."""
    return await service.submit_prompt(caller, session_id, body.content, body.idempotency_key)


@router.get(
    "/sessions/{session_id}/messages",
    response_model=MessagesPage,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 503),
)
async def list_messages(
    session_id: str,
    caller: Caller,
    service: Service,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description="An event seq (a page's next)")
    ] = None,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 50, max 200)")] = None,
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
