"""What the API returns, as typed structs (unknown fields are ignored, so newer servers work)."""

from __future__ import annotations

from typing import Any

import msgspec


class Session(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    status: str
    created_at: str
    updated_at: str = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    runner_connected: bool = False
    current_prompt_id: str | None = None
    queued_prompts: int = 0
    last_seq: int = 0
    runner_token: str | None = None  # only in the answer to create_session


class SessionPage(msgspec.Struct, kw_only=True):
    """A page of sessions, newest first; ``next`` is the cursor of the next page (None: last)."""

    sessions: list[Session]
    next: str | None = None


class PromptReceipt(msgspec.Struct, kw_only=True):
    prompt_id: str
    session_id: str
    status: str
    seq: int | None = None


class Message(msgspec.Struct, kw_only=True):
    id: str
    prompt_id: str | None = None
    role: str
    content: str
    created_at: str = ""
    seq: int | None = None


class MessagePage(msgspec.Struct, kw_only=True):
    messages: list[Message]
    next: int | None = None


class Event(msgspec.Struct, kw_only=True):
    """One session event (CloudEvents attribute names); ``seq`` is contiguous per session."""

    id: str
    type: str
    source: str = ""
    time: str = ""
    subject: str = ""
    owner: str | None = None
    seq: int
    schemaversion: int = 1
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class ApiKey(msgspec.Struct, kw_only=True):
    """An API key as listed; ``key`` (the secret itself) only in the answer to ``create_key``."""

    id: str
    name: str
    owner: str
    scopes: list[str]
    created_at: str
    expires_at: str | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None
    key: str | None = None


class SecretInfo(msgspec.Struct, kw_only=True):
    """A stored secret's name and dates (the API never returns values)."""

    name: str
    version: int = 0
    created_at: str = ""
    updated_at: str = ""


class FileInfo(msgspec.Struct, kw_only=True):
    """A session file as an upload or a listing describes it (``etag``: MD5 hex, unquoted)."""

    path: str
    size: int
    etag: str
    content_type: str | None = None  # in the answer to put_file
    modified: str | None = None  # RFC 3339, in listings


class File(msgspec.Struct, kw_only=True):
    """A downloaded session file."""

    path: str
    data: bytes
    content_type: str
    etag: str


class _FileList(msgspec.Struct, kw_only=True):
    files: list[FileInfo]
    truncated: bool = False


class _KeyList(msgspec.Struct, kw_only=True):
    keys: list[ApiKey]


class _SecretList(msgspec.Struct, kw_only=True):
    secrets: list[SecretInfo]


class Prompt(msgspec.Struct, kw_only=True):
    """A prompt dispatched to a runner."""

    prompt_id: str
    content: str


class JobAttempt(msgspec.Struct, kw_only=True):
    n: int
    worker: str
    started_at: str
    ended_at: str | None = None
    error: Any = None


class Job(msgspec.Struct, kw_only=True):
    """An async job; ``status`` is queued, running, succeeded, cancelled or dead."""

    id: str
    kind: str
    status: str
    input: Any = None
    output: Any = None
    error: Any = None
    attempts: list[JobAttempt] = msgspec.field(default_factory=list)
    max_attempts: int = 3
    timeout: float = 30.0
    run_at: str = ""
    created_at: str = ""
    updated_at: str = ""
    idempotency_key: str | None = None
    callback_url: str | None = None
    deliveries: list[dict[str, Any]] | None = None
    cancel_requested: bool | None = None
    schedule_id: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("succeeded", "cancelled", "dead")


class JobPage(msgspec.Struct, kw_only=True):
    jobs: list[Job]
    next: str | None = None


class Schedule(msgspec.Struct, kw_only=True):
    """When a job or prompt fires (one of ``cron``, ``every``, ``at``) and its latest firings."""

    id: str
    target: dict[str, Any]
    timezone: str = "UTC"
    catch_up: str = "once"
    cron: str | None = None
    every: float | None = None
    at: str | None = None
    next_fire_at: str | None = None
    created_at: str = ""
    firings: list[dict[str, Any]] | None = None


class SchedulePage(msgspec.Struct, kw_only=True):
    schedules: list[Schedule]
    next: str | None = None
