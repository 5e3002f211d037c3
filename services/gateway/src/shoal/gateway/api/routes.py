"""The v1 routes: transport only (decode, call the service, map the result)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from shoal.common.contracts import (
    IDLE_TIMEOUT_MAX,
    MAX_TAGS,
    PROMPT_TIMEOUT_MAX,
    TAG_PATTERN,
    SessionUpdate,
    Status,
)
from shoal.gateway.api import admin, keys, secrets
from shoal.gateway.api.deps import Caller, KeyHolder, Service, gateway_state
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.service import MAX_ANSWER_BYTES, MAX_CURSOR_CHARS
from shoal.gateway.views import plain
from shoal.gateway.ws import serve_client, serve_runner

router = APIRouter(prefix="/v1")
router.include_router(keys.router)  # API keys and secrets live in their own modules
router.include_router(secrets.router)
router.include_router(admin.router)

Tags = Annotated[
    list[Annotated[str, Field(pattern=TAG_PATTERN)]],
    Field(max_length=MAX_TAGS, description=f"At most {MAX_TAGS}; each 1..64 of A-Z a-z 0-9 _ : -"),
]

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
    "tags": ["team-api"],
    "idle_timeout": 900,
    "prompt_timeout": 600,
    "pending_questions": [],
    "error": None,
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
        description="Free-form (at most SHOAL_MAX_METADATA_BYTES as JSON); allowed_secrets names "
        "the secrets the session's runner may read.",
    )
    tags: Tags = Field(default_factory=list)
    idle_timeout: int | None = Field(
        default=None,
        ge=1,
        le=IDLE_TIMEOUT_MAX,
        description="Seconds with nothing running or queued before the session hibernates "
        "(default SHOAL_SESSION_IDLE_TIMEOUT, 900)",
    )
    prompt_timeout: int | None = Field(
        default=None,
        ge=1,
        le=PROMPT_TIMEOUT_MAX,
        description="Seconds a running prompt may go without a runner frame before it fails "
        "(default SHOAL_SESSION_PROMPT_TIMEOUT, 600)",
    )


class UpdateSession(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"tags": ["team-api", "nightly"]}]},
    )

    tags: Tags | None = Field(default=None, description="Replaces the session's tags")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Replaces the session's metadata (same rules as at creation)"
    )


class AbortPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})

    prompt_id: str | None = Field(
        default=None, min_length=1, description="Abort only if this prompt is the running one"
    )


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"answer": "yes"}]})

    answer: str = Field(description=f"At most {MAX_ANSWER_BYTES} bytes of UTF-8")


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


class PendingQuestion(BaseModel):
    question_id: str
    prompt_id: str | None = None
    content: str
    options: list[str] | None = None
    expires_at: str | None = Field(default=None, description="RFC 3339, UTC; null: never")
    asked_at: str = Field(description="RFC 3339, UTC")


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
    tags: list[str] = Field(default_factory=list)
    idle_timeout: int = Field(default=0, ge=0, description="Seconds")
    prompt_timeout: int = Field(default=0, ge=0, description="Seconds")
    pending_questions: list[PendingQuestion] = Field(default_factory=list)
    error: str | None = Field(default=None, description="Why the status is 'error'")


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


class SessionsPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"sessions": [_SESSION_EXAMPLE], "next": "WyIyMDI1…"}]}
    )

    sessions: list[Session]
    next: str | None = Field(description="Pass back as ?cursor= for the next page; null: no more")


class CommandAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"session_id": "ses_01J9Z3", "seq": 9}]}
    )

    session_id: str
    seq: int | None = Field(
        default=None, description="The session's latest event seq once the command was applied"
    )


class AnswerAccepted(CommandAccepted):
    question_id: str


class SessionEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    type: str
    seq: int = Field(description="Contiguous per session from 1")
    time: str = Field(description="RFC 3339, UTC")
    subject: str = Field(description="The session id")
    data: dict[str, Any]


class EventsPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "id": "ses_01J9Z3:12:0",
                            "type": "prompt.queued",
                            "source": "session",
                            "time": "2025-01-01T12:00:01.000Z",
                            "subject": "ses_01J9Z3",
                            "owner": "alice",
                            "seq": 2,
                            "data": {"prompt_id": "prm_01J9Z4", "content": "hi"},
                        }
                    ],
                    "next": None,
                }
            ]
        }
    )

    events: list[SessionEvent]
    next: int | None = Field(description="Pass back as ?after= for the next page; null: no more")


@router.get(
    "/sessions",
    response_model=SessionsPage,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 503),
)
async def list_sessions(
    caller: Caller,
    service: Service,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 20, max 100)")] = None,
    cursor: Annotated[
        str | None, Query(min_length=1, max_length=MAX_CURSOR_CHARS, description="A page's next")
    ] = None,
    status: Annotated[Status | None, Query(description="Only sessions in this status")] = None,
    owner: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Another owner: admin keys")
    ] = None,
) -> dict[str, Any]:
    """The caller's sessions, newest first (an admin key: everyone's, or ``owner``'s)."""
    page = await service.list_sessions(
        caller, limit=limit, cursor=cursor, status=status, owner=owner
    )
    return plain(page)


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
    body = body or CreateSession()
    created = await service.create_session(
        caller,
        body.metadata,
        tags=body.tags,
        idle_timeout=body.idle_timeout,
        prompt_timeout=body.prompt_timeout,
    )
    return plain(created)


@router.get(
    "/sessions/{session_id}",
    response_model=Session,
    tags=["sessions"],
    responses=problem_responses(401, 403, 404, 503),
)
async def get_session(session_id: str, caller: Caller, service: Service) -> dict[str, Any]:
    """The session (without its runner token)."""
    return plain(await service.get_session(caller, session_id))


@router.patch(
    "/sessions/{session_id}",
    response_model=Session,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 503, 504),
)
async def update_session(
    session_id: str, body: UpdateSession, caller: Caller, service: Service
) -> dict[str, Any]:
    """Replace the session's ``tags`` and/or ``metadata``; 409 once it is terminated."""
    update = SessionUpdate(tags=body.tags, metadata=body.metadata)
    return plain(await service.update_session(caller, session_id, update))


@router.delete(
    "/sessions/{session_id}",
    response_model=Session,
    tags=["sessions"],
    responses=problem_responses(401, 403, 404, 503, 504),
)
async def terminate_session(session_id: str, caller: Caller, service: Service) -> dict[str, Any]:
    """Terminate the session (idempotent): the running prompt is aborted, queued ones dropped,
    later prompts refused with 409. Its history and files stay readable."""
    return plain(await service.terminate_session(caller, session_id))


@router.post(
    "/sessions/{session_id}/abort",
    status_code=202,
    response_model=CommandAccepted,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 409, 503, 504),
)
async def abort_prompt(
    session_id: str, caller: Caller, service: Service, body: AbortPrompt | None = None
) -> dict[str, Any]:
    """Abort the running prompt (the next queued one starts); with none running, 202 and no
    event. 409 once the session is terminated."""
    receipt = await service.abort(caller, session_id, body.prompt_id if body else None)
    return plain(receipt)


@router.post(
    "/sessions/{session_id}/questions/{question_id}/answer",
    status_code=202,
    response_model=AnswerAccepted,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 503, 504),
)
async def answer_question(
    session_id: str,
    question_id: Annotated[str, Path(description="From the question.asked event")],
    body: Answer,
    caller: Caller,
    service: Service,
) -> dict[str, Any]:
    """Answer the runner's question; 404 for an unknown question, 409 once it was answered
    (or expired)."""
    receipt = await service.answer_question(caller, session_id, question_id, body.answer)
    return plain(receipt)


@router.get(
    "/sessions/{session_id}/events",
    response_model=EventsPage,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 503),
)
async def list_events(
    session_id: str,
    caller: Caller,
    service: Service,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description="An event seq (a page's next)")
    ] = None,
    limit: Annotated[
        int | None, Query(ge=1, description="Page size (default 100, max 500)")
    ] = None,
) -> dict[str, Any]:
    """The session's events after seq ``after`` from its ledger, in seq order."""
    page = await service.list_events(caller, session_id, after, limit)
    return plain(page)


@router.post(
    "/sessions/{session_id}/prompts",
    status_code=202,
    response_model=PromptReceipt,
    tags=["sessions"],
    responses=problem_responses(400, 401, 403, 404, 409, 413, 503, 504),
)
async def submit_prompt(
    session_id: str, body: SubmitPrompt, caller: KeyHolder, service: Service
) -> dict[str, Any]:
    """Queue a prompt; the same ``idempotency_key`` always yields the same ``prompt_id``."""
    # The service checks the key's scope (as for the direct route and the client socket).
    receipt = await service.submit_prompt(caller, session_id, body.content, body.idempotency_key)
    return plain(receipt)


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
    return plain(await service.list_messages(caller, session_id, after, limit))


@router.websocket("/sessions/{session_id}/ws")
async def client_socket(websocket: WebSocket, session_id: str) -> None:
    state = gateway_state(websocket.app)
    await serve_client(websocket, state.service, state.hub, session_id)


@router.websocket("/sessions/{session_id}/runner")
async def runner_socket(websocket: WebSocket, session_id: str) -> None:
    state = gateway_state(websocket.app)
    await serve_runner(websocket, state.service, state.hub, session_id)
