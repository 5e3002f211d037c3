"""The public event contract: every session event's payload, declared once.

Other services consume ``<prefix>.session.evt.<session>.commit`` (the ledger: one message per
command, ``{"events": [...]}``, ``shoal.common.messaging.ledger``) and
``<prefix>.deliver.user.<owner>`` (the eventbus: one message per event); each event is an
:class:`EventMessage` (CloudEvents attribute names) whose ``data`` is the payload model of its
``type`` here.
``docs/asyncapi.json`` is generated from these models, and a test fails when the session rules
emit a field or an event type that is not declared here.

Compatibility: within a ``schemaversion`` changes are additive only (new event types, new
optional fields); consumers must ignore fields they do not know. Removing or retyping a field
bumps ``schemaversion``.

Example::

    payload = EVENT_PAYLOADS["prompt.queued"].model_validate(envelope.data)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shoal.common.contracts import Event, Status


class Payload(BaseModel):
    """Base of every event payload: unknown fields are kept (additive evolution)."""

    model_config = ConfigDict(extra="allow")


class SessionCreated(Payload):
    metadata: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    idle_timeout: int = Field(0, description="seconds idle before the session hibernates")
    prompt_timeout: int = Field(0, description="seconds a prompt may run without runner activity")


class SessionStatus(Payload):
    status: Status


class SessionUpdated(Payload):
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class SessionTerminated(Payload):
    reason: str = ""


class PromptQueued(Payload):
    prompt_id: str
    content: str


class PromptDispatched(Payload):
    prompt_id: str
    content: str


class PromptAborted(Payload):
    prompt_id: str


class PromptProgress(Payload):
    """The runner showed activity on the running prompt (recorded at most every half timeout)."""

    prompt_id: str


class PromptFailed(Payload):
    prompt_id: str
    message: str = ""
    reason: str = Field(description='"runner_error" or "timeout"')


class MessageCompleted(Payload):
    message_id: str
    prompt_id: str
    role: str = "assistant"
    content: str


class QuestionAsked(Payload):
    question_id: str
    prompt_id: str | None = None
    content: str
    options: list[str] | None = None
    expires_at: str | None = None


class QuestionAnswered(Payload):
    question_id: str
    answer: str


class QuestionExpired(Payload):
    question_id: str


class RunnerConnected(Payload):
    connection_id: str


class RunnerDisconnected(Payload):
    connection_id: str
    reason: str = ""


class RejectedError(Payload):
    code: str
    message: str


class CommandRejected(Payload):
    command_id: str
    command_type: str
    error: RejectedError


EVENT_PAYLOADS: dict[str, type[Payload]] = {
    Event.SESSION_CREATED: SessionCreated,
    Event.SESSION_STATUS: SessionStatus,
    Event.SESSION_UPDATED: SessionUpdated,
    Event.SESSION_TERMINATED: SessionTerminated,
    Event.PROMPT_QUEUED: PromptQueued,
    Event.PROMPT_DISPATCHED: PromptDispatched,
    Event.PROMPT_ABORTED: PromptAborted,
    Event.PROMPT_PROGRESS: PromptProgress,
    Event.PROMPT_FAILED: PromptFailed,
    Event.MESSAGE_COMPLETED: MessageCompleted,
    Event.QUESTION_ASKED: QuestionAsked,
    Event.QUESTION_ANSWERED: QuestionAnswered,
    Event.QUESTION_EXPIRED: QuestionExpired,
    Event.RUNNER_CONNECTED: RunnerConnected,
    Event.RUNNER_DISCONNECTED: RunnerDisconnected,
    Event.COMMAND_REJECTED: CommandRejected,
}


class EventMessage(BaseModel):
    """The envelope of every event (CloudEvents attribute names; ``data`` by ``type``)."""

    id: str = Field(description="<session>:<command stream seq>:<n>; also the Nats-Msg-Id")
    type: str = Field(description="the event type, e.g. prompt.queued")
    source: str = Field(description='the emitting service, "session"')
    time: str = Field(description="RFC 3339; the time of the command that caused it")
    subject: str = Field(description="the session id")
    specversion: str = "1.0"
    schemaversion: int = Field(1, description="the payload schema's major version")
    owner: str | None = Field(None, description="the session's owner")
    seq: int | None = Field(None, description="per-session sequence, contiguous from 1")
    data: dict[str, Any] = Field(default_factory=dict)
