"""The session's rules: a pure command handler, ``apply(state, command, stream_seq)``.

``apply`` does no I/O and reads no clock: ids and times come from the command (the gateway
stamps them) and event ids from the command's stream sequence, so running it twice on the
same state gives byte-identical events. That is what makes redelivery safe (DESIGN §3.3): the
edge publishes the events with ``Nats-Msg-Id`` = event id and the ledger drops the copies.

Example::

    result = apply(None, create_command, stream_seq=7)
    result.new_state.event_seq        # 1
    result.events[0].id               # "<session>:7:0" (session.created)

The model (DESIGN §4, a subset for now): prompts queue in order and one runs at a time, only
while a runner is connected; ``message.complete`` finishes the running prompt and dispatches
the next; ``session.terminate`` is final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

import msgspec

from shoal.common.contracts import (
    Command,
    Event,
    QueuedPrompt,
    SessionSnapshot,
    Status,
    encode_snapshot,
    public_session,
)
from shoal.common.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ShoalError
from shoal.common.messaging import Envelope

EVENT_SOURCE = "session"
# Recent prompt ids remembered for idempotent resubmission. Part of the rules: changing it
# changes what a replay of old commands yields, so treat it like a schema change.
PROMPT_ID_MEMORY = 200
# The snapshot must stay well below the KV value limit (1 MiB) or its write would fail
# forever; a prompt that would grow it past this is rejected instead.
MAX_STATE_BYTES = 768 * 1024
# An assistant message travels in one event (SESSION_EVT refuses messages over 1 MiB, and a
# refused publish would be retried forever): longer content is refused up front, in bytes.
MAX_CONTENT_BYTES = 768 * 1024

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# -- command payloads (docs/CONTRACTS.md); unknown fields are ignored for forward compat --
class _Create(msgspec.Struct, kw_only=True):
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    runner_token_hash: str = ""


class _Submit(msgspec.Struct, kw_only=True):
    prompt_id: NonEmpty
    content: str


class _Connection(msgspec.Struct, kw_only=True):
    connection_id: NonEmpty


class _Complete(msgspec.Struct, kw_only=True):
    prompt_id: NonEmpty
    message_id: NonEmpty
    content: str


class _Terminate(msgspec.Struct, kw_only=True):
    reason: str = ""


class _Abort(msgspec.Struct, kw_only=True):
    pass


_T = TypeVar("_T")


def _parse(data: dict[str, Any], kind: type[_T], command_type: str) -> _T:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid {command_type} payload: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Result:
    """What one command did: the state to write (if ``changed``), events, and the reply body.

    ``new_state`` is None only when the session does not exist (and was not created).
    ``already_applied`` marks a redelivered command at or below ``applied_seq``: nothing to
    write or publish, but the caller answers again.
    """

    new_state: SessionSnapshot | None
    events: list[Envelope]
    reply: dict[str, Any]
    changed: bool = False
    already_applied: bool = False
    error: ShoalError | None = field(default=None)


def ok_reply(state: SessionSnapshot) -> dict[str, Any]:
    """The applied reply of docs/CONTRACTS.md."""
    return {"ok": True, "data": {"session": public_session(state), "seq": state.event_seq}}


def error_reply(error: ShoalError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_dict()}


class _Transition:
    """A working copy of the state plus the events emitted so far for one command."""

    def __init__(self, state: SessionSnapshot, command: Envelope, stream_seq: int) -> None:
        self.original = state
        # Copy every mutable field: apply must never change the caller's state.
        self.state = msgspec.structs.replace(
            state,
            metadata=dict(state.metadata),
            queue=list(state.queue),
            prompt_ids=list(state.prompt_ids),
        )
        self.command = command
        self.stream_seq = stream_seq
        self.events: list[Envelope] = []

    def emit(self, event_type: Event, data: dict[str, Any]) -> None:
        s = self.state
        s.event_seq += 1
        self.events.append(
            Envelope(
                id=f"{s.id}:{self.stream_seq}:{len(self.events)}",
                type=event_type,
                source=EVENT_SOURCE,
                time=self.command.time,
                subject=s.id,
                owner=s.owner,
                seq=s.event_seq,
                data=data,
            )
        )

    def set_status(self, status: Status) -> None:
        if self.state.status != status:
            self.state.status = status
            self.emit(Event.SESSION_STATUS, {"status": status})

    def dispatch_next(self) -> bool:
        """Start the head of the queue if a runner is there and nothing runs; True if started."""
        s = self.state
        if not s.runner_connected or s.current_prompt is not None or not s.queue:
            return False
        s.current_prompt = s.queue.pop(0)
        self.emit(Event.PROMPT_DISPATCHED, _prompt_data(s.current_prompt))
        self.set_status(Status.RUNNING)
        return True

    def finish_current(self) -> None:
        """The running prompt is over: run the next one, or go idle."""
        self.state.current_prompt = None
        if not self.dispatch_next():
            self.set_status(Status.IDLE)

    def commit(self) -> Result:
        s = self.state
        s.applied_seq = self.stream_seq
        s.updated_at = self.command.time
        return Result(s, self.events, ok_reply(s), changed=True)

    def reject(self, error: ShoalError) -> Result:
        """Record a rejection on the ledger (``command.rejected``) and answer with the error.

        Starts again from the original state: whatever this transition changed is dropped.
        """
        t = _Transition(self.original, self.command, self.stream_seq)
        t.emit(
            Event.COMMAND_REJECTED,
            {
                "command_id": self.command.id,
                "command_type": self.command.type,
                "error": {"code": error.code, "message": error.message},
            },
        )
        result = t.commit()
        return Result(
            result.new_state, result.events, error_reply(error), changed=True, error=error
        )


def _prompt_data(prompt: QueuedPrompt) -> dict[str, Any]:
    return {"prompt_id": prompt.prompt_id, "content": prompt.content}


def _unchanged(state: SessionSnapshot) -> Result:
    return Result(state, [], ok_reply(state))


def _refused(state: SessionSnapshot | None, error: ShoalError) -> Result:
    """A rejection that leaves no trace on the ledger (no session, terminated, malformed)."""
    return Result(state, [], error_reply(error), error=error)


def apply(state: SessionSnapshot | None, command: Envelope, stream_seq: int) -> Result:
    """Apply one command (stored at ``stream_seq`` in SESSION_CMD) to a session's state.

    Pure and deterministic. Never raises for bad input: a malformed or unknown command gets a
    ``bad_request`` reply and no events.
    """
    if state is not None and stream_seq <= state.applied_seq:
        # A redelivery of a command whose effects are already written (and whose events were
        # published before that write): acknowledge it and answer again.
        return Result(state, [], ok_reply(state), already_applied=True)
    try:
        return _apply(state, command, stream_seq)
    except BadRequest as exc:
        return _refused(state, exc)


def _apply(state: SessionSnapshot | None, command: Envelope, stream_seq: int) -> Result:
    if not command.subject:
        raise BadRequest("command has no subject (session id)")
    if command.type == Command.SESSION_CREATE:
        return _create(state, command, stream_seq)
    if state is None:
        return _refused(None, NotFound("session not found", detail={"session_id": command.subject}))
    if state.status == Status.TERMINATED:
        if command.type == Command.SESSION_TERMINATE:
            _parse(command.data, _Terminate, command.type)
            return _unchanged(state)  # terminating twice is not an error (DELETE is idempotent)
        return _refused(state, Conflict("session is terminated", detail={"session_id": state.id}))

    t = _Transition(state, command, stream_seq)
    match command.type:
        case Command.PROMPT_SUBMIT:
            return _submit(t)
        case Command.PROMPT_ABORT:
            return _abort(t)
        case Command.RUNNER_CONNECT:
            return _runner_connect(t)
        case Command.RUNNER_DISCONNECT:
            return _runner_disconnect(t)
        case Command.MESSAGE_COMPLETE:
            return _message_complete(t)
        case Command.SESSION_TERMINATE:
            return _terminate(t)
    raise BadRequest(f"unsupported command type {command.type!r}")


def _create(state: SessionSnapshot | None, command: Envelope, stream_seq: int) -> Result:
    data = _parse(command.data, _Create, command.type)
    if not command.owner:
        raise BadRequest("session.create needs an owner")
    if state is not None:
        if state.owner == command.owner and state.created_at == command.time:
            return _unchanged(state)  # the same create sent again (gateway retry)
        return _refused(state, Conflict("session already exists", detail={"session_id": state.id}))
    created = SessionSnapshot(
        id=command.subject,
        owner=command.owner,
        status=Status.IDLE,
        created_at=command.time,
        updated_at=command.time,
        metadata=data.metadata,
        runner_token_hash=data.runner_token_hash,
    )
    if len(encode_snapshot(created)) > MAX_STATE_BYTES:
        return _refused(None, PayloadTooLarge("session metadata is too large"))
    t = _Transition(created, command, stream_seq)
    t.emit(Event.SESSION_CREATED, {"metadata": data.metadata})
    return t.commit()


def _submit(t: _Transition) -> Result:
    data = _parse(t.command.data, _Submit, t.command.type)
    s = t.state
    running = [s.current_prompt] if s.current_prompt else []
    if data.prompt_id in s.prompt_ids or any(
        p.prompt_id == data.prompt_id for p in (*running, *s.queue)
    ):
        return _unchanged(s)  # idempotent resubmission: no new events
    prompt = QueuedPrompt(prompt_id=data.prompt_id, content=data.content, queued_at=t.command.time)
    s.queue.append(prompt)
    s.prompt_ids = [*s.prompt_ids, data.prompt_id][-PROMPT_ID_MEMORY:]
    if len(encode_snapshot(s)) > MAX_STATE_BYTES:
        return t.reject(
            PayloadTooLarge(
                "the session's prompt queue is full; wait for queued prompts to run",
                detail={"queued_prompts": len(s.queue) - 1},
            )
        )
    t.emit(Event.PROMPT_QUEUED, _prompt_data(prompt))
    t.dispatch_next()
    return t.commit()


def _abort(t: _Transition) -> Result:
    _parse(t.command.data, _Abort, t.command.type)
    current = t.state.current_prompt
    if current is None:
        return _unchanged(t.state)  # nothing runs: aborting is a no-op, not an error
    # Only the running prompt is aborted; queued prompts keep their turn.
    t.emit(Event.PROMPT_ABORTED, {"prompt_id": current.prompt_id})
    t.finish_current()
    return t.commit()


def _runner_connect(t: _Transition) -> Result:
    data = _parse(t.command.data, _Connection, t.command.type)
    s = t.state
    s.runner_connected = True
    s.runner_epoch += 1
    t.emit(Event.RUNNER_CONNECTED, {"connection_id": data.connection_id})
    if s.current_prompt is not None:
        # A runner reconnected before its old connection's disconnect arrived: the new
        # connection has not seen the running prompt, so send it again.
        t.emit(Event.PROMPT_DISPATCHED, _prompt_data(s.current_prompt))
    else:
        t.dispatch_next()
    return t.commit()


def _runner_disconnect(t: _Transition) -> Result:
    data = _parse(t.command.data, _Connection, t.command.type)
    s = t.state
    if not s.runner_connected:
        return _unchanged(s)
    s.runner_connected = False
    t.emit(Event.RUNNER_DISCONNECTED, {"connection_id": data.connection_id})
    if s.current_prompt is not None:
        # The runner went away mid-prompt: the prompt goes back to the head of the queue (it
        # runs again, first, when a runner connects) and the session is idle meanwhile. No
        # second prompt.queued: the user's message is already in the history once.
        s.queue.insert(0, s.current_prompt)
        s.current_prompt = None
        t.set_status(Status.IDLE)
    return t.commit()


def _message_complete(t: _Transition) -> Result:
    data = _parse(t.command.data, _Complete, t.command.type)
    s = t.state
    if len(data.content.encode()) > MAX_CONTENT_BYTES:
        return t.reject(
            PayloadTooLarge(
                "message content is too large; store it as a file and reference it",
                detail={"limit_bytes": MAX_CONTENT_BYTES},
            )
        )
    if s.current_prompt is None or s.current_prompt.prompt_id != data.prompt_id:
        return t.reject(
            Conflict(
                "prompt is not running",
                detail={
                    "prompt_id": data.prompt_id,
                    "running": s.current_prompt.prompt_id if s.current_prompt else None,
                },
            )
        )
    t.emit(
        Event.MESSAGE_COMPLETED,
        {
            "message_id": data.message_id,
            "prompt_id": data.prompt_id,
            "role": "assistant",
            "content": data.content,
        },
    )
    s.message_count += 1
    t.finish_current()
    return t.commit()


def _terminate(t: _Transition) -> Result:
    data = _parse(t.command.data, _Terminate, t.command.type)
    s = t.state
    if s.current_prompt is not None:
        t.emit(Event.PROMPT_ABORTED, {"prompt_id": s.current_prompt.prompt_id})
        s.current_prompt = None
    s.queue = []  # queued prompts never run; the history still holds them
    s.runner_connected = False
    t.set_status(Status.TERMINATED)
    t.emit(Event.SESSION_TERMINATED, {"reason": data.reason})
    return t.commit()


# -- message history (served from the PostgreSQL projection) --
MESSAGES_DEFAULT_LIMIT = 50
MESSAGES_MAX_LIMIT = 500


class _MessagesBody(msgspec.Struct, kw_only=True):
    session_id: NonEmpty
    after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] = MESSAGES_DEFAULT_LIMIT


@dataclass(frozen=True, slots=True)
class MessagesQuery:
    """One page request: messages with ``seq > after``, at most ``limit`` of them."""

    session_id: str
    after: int
    limit: int


def parse_messages_query(body: dict[str, Any]) -> MessagesQuery:
    """Validate an RPC body; ``limit`` above the maximum is lowered to it, not refused."""
    data = _parse(body, _MessagesBody, "session.messages")
    return MessagesQuery(data.session_id, data.after or 0, min(data.limit, MESSAGES_MAX_LIMIT))


class _HasSeq(Protocol):
    @property
    def seq(self) -> int: ...


_Row = TypeVar("_Row", bound=_HasSeq)


def messages_page(rows: list[_Row], limit: int) -> tuple[list[_Row], int | None]:
    """Cut ``rows`` (fetched with ``limit + 1``) to a page and the cursor of the next one."""
    if len(rows) > limit:
        page = rows[:limit]
        return page, page[-1].seq
    return rows, None


# -- introspection (rpc "admin.session") --
class _SessionBody(msgspec.Struct, kw_only=True):
    session_id: NonEmpty


@dataclass(frozen=True, slots=True)
class SessionQuery:
    session_id: str


def parse_session_query(body: dict[str, Any]) -> SessionQuery:
    return SessionQuery(_parse(body, _SessionBody, "session.admin.session").session_id)


class _LeaseView(Protocol):
    @property
    def owner(self) -> str: ...


def session_introspection(
    state: SessionSnapshot, revision: int, partition: int, lease: _LeaseView | None, epoch: int
) -> dict[str, Any]:
    """The admin view of one session: its writer (the partition's lease) and its counters."""
    return {
        "session_id": state.id,
        "partition": partition,
        "owner": lease.owner if lease is not None else None,
        "epoch": epoch if lease is not None else None,
        "revision": revision,
        "applied_seq": state.applied_seq,
        "event_seq": state.event_seq,
        "ledger_seq": state.ledger_seq,
        "status": state.status,
        "session_owner": state.owner,
    }
