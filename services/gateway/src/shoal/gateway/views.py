"""What the gateway's service layer answers: sessions, receipts, pages, jobs, admin rows.

Structs, not dicts: a route hands one to its response model (``msgspec.to_builtins``), a socket
frame spreads its fields, and a reply from another service is converted into one where it
arrives (:func:`convert`), so a malformed reply fails there and not deep in a route. Fields
keep the order the API answers them in. ``UNSET`` marks a member an answer leaves out (a job's
``output`` before it succeeded), so what was absent stays absent on the wire.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from shoal.common.contracts import SessionView
from shoal.common.errors import Unavailable

T = TypeVar("T")


def convert(data: object, kind: type[T], what: str) -> T:
    """``data`` (decoded JSON from another service) as ``kind``; :class:`Unavailable` if it is
    not one (that service answered something this gateway does not understand)."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise Unavailable(f"malformed {what}: {exc}") from None


def plain(value: msgspec.Struct) -> dict[str, Any]:
    """A view as the JSON object a response model validates (``UNSET`` members left out)."""
    data: dict[str, Any] = msgspec.to_builtins(value)
    return data


# -- keys --
class VerifiedKey(msgspec.Struct, kw_only=True):
    """The keys service's ``verify`` answer for a valid key."""

    key_id: str
    owner: str
    scopes: list[str] | None = None
    name: str | None = None
    expires_at: str | None = None


# -- sessions --
class CreatedSession(SessionView, kw_only=True):
    """A session just created: its runner token, shown this once."""

    runner_token: str


class Applied(msgspec.Struct, kw_only=True):
    """The session service's applied reply: the session after the command, its last seq."""

    seq: int | None = None
    session: SessionView | None = None


class AppliedReply(msgspec.Struct, kw_only=True):
    """The session service's answer to a command sent with a reply inbox (decoded from JSON
    straight into this: it arrives once per awaited command)."""

    ok: bool
    data: Applied | None = None
    error: dict[str, Any] | None = None


class SessionPage(msgspec.Struct, kw_only=True):
    """A page of ``GET /v1/sessions``: newest first; ``next`` continues after the last one."""

    sessions: list[SessionView]
    next: str | None


class IndexPage(msgspec.Struct, kw_only=True):
    """A page of the session index (the session service's ``list``): ids, newest first."""

    class Row(msgspec.Struct):
        id: str

    sessions: list[Row] = msgspec.field(default_factory=list)
    next: str | None = None


# -- prompts and commands --
class PromptReceipt(msgspec.Struct, kw_only=True):
    """A queued prompt, as ``POST …/prompts`` (202) and the socket's ``prompt.accepted`` say it."""

    prompt_id: str
    session_id: str
    status: str = "queued"
    seq: int | None = None


class CommandReceipt(msgspec.Struct, kw_only=True):
    """An accepted command: ``seq`` is the session's last event seq once it was applied."""

    session_id: str
    seq: int | None = None
    question_id: str | None = None


class MessageAccepted(msgspec.Struct, kw_only=True):
    """A runner's completed message, recorded."""

    prompt_id: str
    message_id: str


# -- history --
class MessageView(msgspec.Struct, kw_only=True):
    """A completed message; ``seq`` is the event that completed it."""

    id: str
    prompt_id: str | None
    role: str
    content: str
    created_at: str
    seq: int


class MessagesPage(msgspec.Struct, kw_only=True):
    """A page of a session's completed messages; ``next`` is the ``after`` to pass back."""

    messages: list[MessageView] = msgspec.field(default_factory=list)
    next: int | None = None


class EventsPage(msgspec.Struct, kw_only=True):
    """A page of a session's ledger: envelopes in seq order (as JSON objects: an event may carry
    members the API does not list); ``next`` is the ``after`` to pass back (None: no more events
    yet)."""

    events: list[dict[str, Any]]
    next: int | None


# -- admin --
class PartitionRow(msgspec.Struct, kw_only=True):
    """Owner, lease epoch and lag of one partition of the session command stream."""

    partition: int
    owner: str | None
    epoch: int | None
    lease_revision: int | None
    lag: int | None
    in_flight: int | None


class SessionPlacement(msgspec.Struct, kw_only=True):
    """Where a session lives (its partition and the lease holder) and how far it is applied."""

    session_id: str
    partition: int
    owner: str | None
    epoch: int | None
    revision: int
    applied_seq: int
    event_seq: int
    ledger_seq: int
    status: str
    session_owner: str


# -- secrets --
class SecretValue(msgspec.Struct, kw_only=True):
    """A secret's value for a session's runner (the ``secret`` frame)."""

    name: str
    value: str | None


# -- jobs, schedules, webhooks --
class JobAttempt(msgspec.Struct, kw_only=True):
    n: int
    worker: str
    started_at: str
    ended_at: str | None = None
    error: Any | UnsetType = UNSET


class JobView(msgspec.Struct, kw_only=True):
    """A job as the scheduler shows it; members it leaves out stay ``UNSET``."""

    id: str
    kind: str
    status: str
    input: Any = None
    attempts: list[JobAttempt] = msgspec.field(default_factory=list)
    max_attempts: int
    timeout: int | float
    run_at: str
    created_at: str
    updated_at: str
    output: Any | UnsetType = UNSET
    error: Any | UnsetType = UNSET
    idempotency_key: str | UnsetType = UNSET
    callback_url: str | UnsetType = UNSET
    deliveries: list[dict[str, Any]] | UnsetType = UNSET
    cancel_requested: bool | UnsetType = UNSET
    schedule_id: str | UnsetType = UNSET


class JobsPage(msgspec.Struct, kw_only=True):
    jobs: list[JobView] = msgspec.field(default_factory=list)
    next: str | None = None


class JobRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job to submit (``POST /v1/jobs``, ``/v1/run``); members left out are the scheduler's
    defaults."""

    kind: str
    input: Any = None
    idempotency_key: str | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    callback_url: str | None = None
    run_at: str | None = None


class ScheduleTarget(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a schedule starts: a job body (as ``POST /v1/jobs``) or a prompt
    (``{session_id, content}``); the scheduler checks either."""

    job: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class ScheduleRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A schedule to create: one of ``cron``, ``every``, ``at`` (the scheduler checks which)."""

    cron: str | None = None
    every: float | None = None
    at: str | None = None
    timezone: str | None = None
    catch_up: str | None = None
    target: ScheduleTarget


class ScheduleView(msgspec.Struct, kw_only=True):
    """A schedule as the scheduler shows it; members it leaves out stay ``UNSET``."""

    id: str
    cron: str | None | UnsetType = UNSET
    every: float | None | UnsetType = UNSET
    at: str | None | UnsetType = UNSET
    timezone: str
    catch_up: str
    target: dict[str, Any]
    next_fire_at: str | None
    created_at: str
    firings: list[dict[str, Any]] | None | UnsetType = UNSET


class SchedulesPage(msgspec.Struct, kw_only=True):
    schedules: list[ScheduleView] = msgspec.field(default_factory=list)
    next: str | None = None


class SigningSecret(msgspec.Struct, kw_only=True):
    """An owner's job-callback signing secret; ``previous_expires_at`` while the old one still
    signs."""

    secret: str
    created_at: str
    previous_expires_at: str | None | UnsetType = UNSET
