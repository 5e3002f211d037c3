"""The public message contract: command and event types, their payloads, the session snapshot.

Commands go to ``<prefix>.session.cmd.<session>``; the gateway stamps ``id`` and ``time`` so a
re-run of the handler gives the same result. Events go to
``<prefix>.session.evt.<session>.commit``, one message per command (``messaging.ledger``), with
``seq`` contiguous per session from 1.
The session snapshot is the value of the ``session-state`` KV bucket; other services read it
(never write it) — the session service is its single writer.

Example::

    Envelope(id=new_id("cmd"), type=Command.PROMPT_SUBMIT, source="gateway", time=now,
             subject=session_id, owner=owner, data={"prompt_id": pid, "content": "hi"})
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

import msgspec


class Command(StrEnum):
    SESSION_CREATE = "session.create"
    SESSION_TERMINATE = "session.terminate"
    PROMPT_SUBMIT = "prompt.submit"
    PROMPT_ABORT = "prompt.abort"
    RUNNER_CONNECT = "runner.connect"
    RUNNER_DISCONNECT = "runner.disconnect"
    MESSAGE_COMPLETE = "message.complete"
    QUESTION_ASK = "question.ask"
    QUESTION_ANSWER = "question.answer"
    SESSION_UPDATE = "session.update"
    RUNNER_ERROR = "runner.error"
    TIMER_FIRE = "timer.fire"
    RUNNER_HEARTBEAT = "runner.heartbeat"


class Event(StrEnum):
    SESSION_CREATED = "session.created"
    SESSION_STATUS = "session.status"
    SESSION_TERMINATED = "session.terminated"
    PROMPT_QUEUED = "prompt.queued"
    PROMPT_DISPATCHED = "prompt.dispatched"
    PROMPT_ABORTED = "prompt.aborted"
    PROMPT_FAILED = "prompt.failed"
    MESSAGE_CREATED = "message.created"
    MESSAGE_DELTA = "message.delta"
    MESSAGE_COMPLETED = "message.completed"
    QUESTION_ASKED = "question.asked"
    QUESTION_ANSWERED = "question.answered"
    QUESTION_EXPIRED = "question.expired"
    RUNNER_CONNECTED = "runner.connected"
    RUNNER_DISCONNECTED = "runner.disconnected"
    SESSION_UPDATED = "session.updated"
    PROMPT_PROGRESS = "prompt.progress"
    COMMAND_REJECTED = "command.rejected"


# On every ledger event: the session's tags (after the command), comma-separated; absent when
# it has none. Set by the session service, read by the eventbus (per-tag delivery). A header,
# not an envelope field, so the event's bytes and every existing reader stay as they are.
TAGS_HEADER = "Shoal-Tags"


def tags_header(tags: list[str]) -> dict[str, str]:
    return {TAGS_HEADER: ",".join(tags)} if tags else {}


def tags_from_header(headers: Mapping[str, str]) -> list[str]:
    value = headers.get(TAGS_HEADER, "")
    return [tag for tag in value.split(",") if tag]


class Status(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    WAITING_INPUT = "waiting_input"
    HIBERNATED = "hibernated"
    TERMINATED = "terminated"
    ERROR = "error"


class TimerKind(StrEnum):
    """The session's durable timers (set through the scheduler, fired as ``timer.fire``)."""

    IDLE = "idle"  # idle_timeout elapsed with nothing running or queued -> hibernated
    QUESTION = "question"  # a question's expires_at -> question.expired
    WATCHDOG = "watchdog"  # a running prompt without runner activity -> prompt.failed


# -- command payloads: built by the gateway (and the scheduler's timers), parsed by the
# session rules with these same types. Unknown fields are ignored (additive evolution).
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# A tag is one token of the eventbus's delivery subject (``<prefix>.deliver.tag.<owner>.<tag>``):
# no dots, wildcards or whitespace.
TAG_PATTERN = r"^[A-Za-z0-9_:-]{1,64}$"
MAX_TAGS = 32
Tag = Annotated[str, msgspec.Meta(pattern=TAG_PATTERN)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=MAX_TAGS)]
# Timeouts in seconds; 0 = the session service's default (DEFAULT_IDLE_TIMEOUT / ...).
IDLE_TIMEOUT_MAX = 7 * 24 * 3600
PROMPT_TIMEOUT_MAX = 24 * 3600
DEFAULT_IDLE_TIMEOUT = 900
DEFAULT_PROMPT_TIMEOUT = 600
IdleTimeout = Annotated[int, msgspec.Meta(ge=0, le=IDLE_TIMEOUT_MAX)]
PromptTimeout = Annotated[int, msgspec.Meta(ge=0, le=PROMPT_TIMEOUT_MAX)]


class SessionCreate(msgspec.Struct, kw_only=True):
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    runner_token_hash: str = ""
    tags: Tags = msgspec.field(default_factory=list)
    idle_timeout: IdleTimeout = 0  # seconds; 0 = DEFAULT_IDLE_TIMEOUT
    prompt_timeout: PromptTimeout = 0  # seconds; 0 = DEFAULT_PROMPT_TIMEOUT


class SessionUpdate(msgspec.Struct, kw_only=True):
    """Change what a client may change after creation; an absent field is left as it is."""

    tags: Tags | None = None
    metadata: dict[str, Any] | None = None


class SessionTerminate(msgspec.Struct, kw_only=True):
    reason: str = ""


class PromptSubmit(msgspec.Struct, kw_only=True):
    prompt_id: Id
    content: str


class PromptAbort(msgspec.Struct, kw_only=True):
    prompt_id: str = ""  # empty: whatever runs; else only if that prompt is the running one


class RunnerConnect(msgspec.Struct, kw_only=True):
    connection_id: Id


class RunnerDisconnect(msgspec.Struct, kw_only=True):
    connection_id: Id
    reason: str = ""  # "closed", "heartbeat", "replaced", ...


class MessageComplete(msgspec.Struct, kw_only=True):
    prompt_id: Id
    message_id: Id
    content: str


class RunnerError(msgspec.Struct, kw_only=True):
    """A runner's ``error`` frame: with ``prompt_id`` that prompt failed; without, the session."""

    connection_id: str = ""
    prompt_id: str = ""
    message: str


class RunnerHeartbeat(msgspec.Struct, kw_only=True):
    """The runner is alive and working on ``prompt_id`` (keeps the prompt watchdog away)."""

    connection_id: Id
    prompt_id: str = ""


class QuestionAsk(msgspec.Struct, kw_only=True):
    question_id: Id
    content: str
    options: list[str] | None = None
    expires_at: str | None = None  # RFC 3339, stamped by the gateway from the frame's expires_in


class QuestionAnswer(msgspec.Struct, kw_only=True):
    question_id: Id
    answer: str


class TimerFire(msgspec.Struct, kw_only=True):
    """A durable timer firing into the session's own command stream.

    ``ref`` names what it was armed for (a question id, a prompt id, or "" for idle) and
    ``armed_seq`` the session's ``event_seq`` when it was armed (idle timers; 0 otherwise). A
    firing is applied only if the session still wants exactly that timer at exactly that time
    (the envelope's ``time`` is the timer's ``fire_at``); otherwise it is a no-op.
    """

    kind: TimerKind
    ref: str = ""
    armed_seq: int = 0


class QueuedPrompt(msgspec.Struct, kw_only=True):
    prompt_id: str
    content: str
    queued_at: str


class PendingQuestion(msgspec.Struct, kw_only=True, omit_defaults=True):
    question_id: str
    prompt_id: str = ""
    content: str
    options: list[str] | None = None
    expires_at: str | None = None
    asked_at: str


class SessionSnapshot(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The hot state of one session (KV ``session-state``, key = session id). Keep it small."""

    id: str
    owner: str
    status: str = Status.IDLE
    created_at: str
    updated_at: str
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    runner_token_hash: str = ""
    runner_connected: bool = False
    runner_connection_id: str = ""  # the live runner socket; a stale disconnect is ignored
    runner_epoch: int = 0
    current_prompt: QueuedPrompt | None = None
    queue: list[QueuedPrompt] = msgspec.field(default_factory=list)
    prompt_ids: list[str] = msgspec.field(default_factory=list)  # recent, for idempotency
    event_seq: int = 0  # last event seq published for this session
    applied_seq: int = 0  # stream sequence of the last command applied
    # SESSION_EVT stream sequence of this session's last commit: the next writer's commit must
    # append right after it (the ledger fence of the session service).
    ledger_seq: int = 0
    message_count: int = 0
    tags: list[str] = msgspec.field(default_factory=list)
    idle_timeout: int = 0  # seconds, resolved at create (never 0 once created by these rules)
    prompt_timeout: int = 0  # seconds, resolved at create
    questions: list[PendingQuestion] = msgspec.field(default_factory=list)
    error: str = ""  # why the session is in status "error"
    closed_questions: list[str] = msgspec.field(default_factory=list)  # recent, answered/expired
    prompt_active_at: str = ""  # last recorded runner activity on current_prompt (watchdog)


_snapshot_encoder = msgspec.json.Encoder()
_snapshot_decoder = msgspec.json.Decoder(SessionSnapshot)


def encode_snapshot(snapshot: SessionSnapshot) -> bytes:
    return _snapshot_encoder.encode(snapshot)


def decode_snapshot(raw: bytes) -> SessionSnapshot:
    return _snapshot_decoder.decode(raw)


class QuestionView(msgspec.Struct, kw_only=True):
    """A question the runner asked and nobody answered yet (every member, also empty ones)."""

    question_id: str
    prompt_id: str = ""
    content: str
    options: list[str] | None = None
    expires_at: str | None = None
    asked_at: str


class SessionView(msgspec.Struct, kw_only=True):
    """The API's view of a session (``GET /v1/sessions/{id}``): no token hash, no counters."""

    id: str
    owner: str
    status: str
    created_at: str
    updated_at: str
    metadata: dict[str, Any]
    runner_connected: bool = False
    current_prompt_id: str | None = None
    queued_prompts: int = 0
    last_seq: int = 0
    tags: list[str] = msgspec.field(default_factory=list)
    idle_timeout: int = 0
    prompt_timeout: int = 0
    pending_questions: list[QuestionView] = msgspec.field(default_factory=list)
    error: str | None = None


def session_view(snapshot: SessionSnapshot) -> SessionView:
    """The API's view of a session's state."""
    return SessionView(
        id=snapshot.id,
        owner=snapshot.owner,
        status=snapshot.status,
        created_at=snapshot.created_at,
        updated_at=snapshot.updated_at,
        metadata=snapshot.metadata,
        runner_connected=snapshot.runner_connected,
        current_prompt_id=snapshot.current_prompt.prompt_id if snapshot.current_prompt else None,
        queued_prompts=len(snapshot.queue),
        last_seq=snapshot.event_seq,
        tags=snapshot.tags,
        idle_timeout=snapshot.idle_timeout,
        prompt_timeout=snapshot.prompt_timeout,
        pending_questions=[_question(q) for q in snapshot.questions],
        error=snapshot.error or None,
    )


def _question(question: PendingQuestion) -> QuestionView:
    return QuestionView(
        question_id=question.question_id,
        prompt_id=question.prompt_id,
        content=question.content,
        options=question.options,
        expires_at=question.expires_at,
        asked_at=question.asked_at,
    )


def public_session(snapshot: SessionSnapshot) -> dict[str, Any]:
    """The API's view of a session as JSON-ready builtins (the session service's replies)."""
    result: dict[str, Any] = msgspec.to_builtins(session_view(snapshot))
    return result
