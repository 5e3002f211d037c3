"""The session's rules: a pure command handler, ``apply(state, command, stream_seq)``.

``apply`` does no I/O and reads no clock: ids and times come from the command (the gateway
stamps them) and event ids from the command's stream sequence, so running it twice on the
same state gives byte-identical events. That is what makes redelivery safe (DESIGN §3.3): the
edge publishes the events with ``Nats-Msg-Id`` = event id and the ledger drops the copies.

Example::

    result = apply(None, create_command, stream_seq=7)
    result.new_state.event_seq        # 1
    result.events[0].id               # "<session>:7:0" (session.created)
    timers_for(result.new_state)      # [TimerSpec("<session>:idle", ...)]

The model (DESIGN §4): prompts queue in order and one runs at a time, only while a runner is
connected and the session is not in ``error``; ``message.complete``, an abort, a runner error or
the watchdog end the running prompt and dispatch the next. One runner connection is live at a
time (``runner_connection_id``): a new one replaces it, and commands of a replaced connection
change nothing. A question puts the session in ``waiting_input`` until every open question is
answered or expired. A session idle for ``idle_timeout`` hibernates; a prompt, an answer or a
runner connecting wakes it. ``session.terminate`` is final.

Durable timers are a pure function of the state (:func:`timers_for`): the edge sets and cancels
the difference after each commit, and a firing (``timer.fire``) counts only if the state still
wants exactly that timer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol, TypeVar

import msgspec

from shoal.common.clock import iso
from shoal.common.contracts import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PROMPT_TIMEOUT,
    Command,
    Event,
    MessageComplete,
    PendingQuestion,
    PromptAbort,
    PromptSubmit,
    QuestionAnswer,
    QuestionAsk,
    QueuedPrompt,
    RunnerConnect,
    RunnerDisconnect,
    RunnerError,
    RunnerHeartbeat,
    SessionCreate,
    SessionSnapshot,
    SessionTerminate,
    SessionUpdate,
    Status,
    TimerFire,
    TimerKind,
    encode_snapshot,
    public_session,
)
from shoal.common.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ShoalError
from shoal.common.messaging import Envelope, is_token

EVENT_SOURCE = "session"
# Recent prompt ids remembered for idempotent resubmission. Part of the rules: changing it
# changes what a replay of old commands yields, so treat it like a schema change.
PROMPT_ID_MEMORY = 200
# Recent answered or expired question ids: a late second answer gets 409, not 404.
CLOSED_QUESTION_MEMORY = 50
# Open questions at once: a runner asking without end would grow the snapshot.
MAX_OPEN_QUESTIONS = 20
# The snapshot must stay well below the KV value limit (1 MiB) or its write would fail
# forever; a prompt that would grow it past this is rejected instead.
MAX_STATE_BYTES = 768 * 1024
# An assistant message travels in one event (SESSION_EVT refuses messages over 1 MiB, and a
# refused publish would be retried forever): longer content is refused up front, in bytes.
MAX_CONTENT_BYTES = 768 * 1024
TIMER_SOURCE = "session.timer"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

_T = TypeVar("_T")


def _parse(data: dict[str, Any], kind: type[_T], command_type: str) -> _T:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid {command_type} payload: {exc}") from exc


def _time(value: str, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{what} must be an RFC 3339 time", detail={what: value}) from exc
    if parsed.tzinfo is None:
        raise BadRequest(f"{what} must carry a time zone (e.g. Z)", detail={what: value})
    return parsed.astimezone(UTC)


def _after(value: str, seconds: float) -> str:
    """``value`` (RFC 3339) plus ``seconds``, in the envelope's time format."""
    return iso((_time(value, "time") + timedelta(seconds=seconds)).timestamp())


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


# -- durable timers --
@dataclass(frozen=True, slots=True)
class TimerSpec:
    """One timer the session wants: at ``fire_at`` the scheduler publishes ``fire`` back."""

    id: str
    fire_at: str
    fire: TimerFire


def timer_id(session_id: str, kind: str, ref: str = "") -> str:
    """The scheduler's id of one session timer: readable when it is a valid timer id (1..128
    of ``A-Za-z0-9_-``), else a digest of the readable form (a long or unusual question id)."""
    readable = "_".join(part for part in (session_id, kind, ref) if part)
    if is_token(readable):
        return readable
    return "tmr_" + hashlib.blake2b(readable.encode(), digest_size=24).hexdigest()


def timers_for(state: SessionSnapshot | None) -> list[TimerSpec]:
    """Every timer ``state`` wants armed, with deterministic ids (``<session>_idle``,
    ``<session>_wd``, ``<session>_q_<question>``; see :func:`timer_id`) so that setting one
    replaces its earlier version and the edge can set/cancel the difference between two
    states."""
    if state is None or state.status in (Status.TERMINATED, Status.HIBERNATED):
        return []
    specs: list[TimerSpec] = []
    if state.status == Status.IDLE and state.current_prompt is None and not state.queue:
        # Any event re-arms it: idle means no command changed the session for idle_timeout.
        specs.append(
            TimerSpec(
                timer_id(state.id, "idle"),
                _after(state.updated_at, state.idle_timeout or DEFAULT_IDLE_TIMEOUT),
                TimerFire(kind=TimerKind.IDLE, armed_seq=state.event_seq),
            )
        )
    if state.status == Status.RUNNING and state.current_prompt is not None:
        # Paused while the session waits for an answer (status waiting_input).
        specs.append(
            TimerSpec(
                timer_id(state.id, "wd"),
                _after(_active_since(state), _prompt_timeout(state)),
                TimerFire(kind=TimerKind.WATCHDOG, ref=state.current_prompt.prompt_id),
            )
        )
    for q in state.questions:
        if q.expires_at:
            specs.append(
                TimerSpec(
                    timer_id(state.id, "q", q.question_id),
                    q.expires_at,
                    TimerFire(kind=TimerKind.QUESTION, ref=q.question_id),
                )
            )
    return specs


def _active_since(state: SessionSnapshot) -> str:
    """The running prompt's last recorded runner activity (a snapshot written before the
    watchdog existed has none: its last change stands in)."""
    return state.prompt_active_at or state.updated_at


def _prompt_timeout(state: SessionSnapshot) -> int:
    return state.prompt_timeout or DEFAULT_PROMPT_TIMEOUT


def timer_changes(
    old: SessionSnapshot | None, new: SessionSnapshot | None, command: Envelope | None = None
) -> tuple[list[TimerSpec], list[str]]:
    """What moving from ``old`` to ``new`` (by ``command``) asks of the scheduler: the timers
    to set (new or changed) and the ids to cancel. ``old=None`` sets every timer ``new`` wants
    (a redelivered command re-sets them: setting is replace-by-id). The timer whose firing
    ``command`` is has fired: the scheduler has no such timer left to cancel."""
    before = {spec.id: spec for spec in timers_for(old)}
    after = timers_for(new)
    wanted = {spec.id for spec in after}
    fired = _fired(before.values(), command)
    return [spec for spec in after if before.get(spec.id) != spec], [
        timer_id for timer_id in before if timer_id not in wanted and timer_id != fired
    ]


def _fired(specs: Iterable[TimerSpec], command: Envelope | None) -> str | None:
    if command is None or command.type != Command.TIMER_FIRE:
        return None
    try:
        fire = msgspec.convert(command.data, TimerFire)
    except msgspec.ValidationError:
        return None
    return next(
        (spec.id for spec in specs if spec.fire == fire and spec.fire_at == command.time), None
    )


def timer_command(state: SessionSnapshot, spec: TimerSpec) -> Envelope:
    """The ``timer.fire`` command the scheduler publishes for ``spec``: its ``time`` is the
    timer's ``fire_at``, which is how the rules tell a current firing from a stale one."""
    return Envelope(
        id=f"tmr:{spec.id}:{spec.fire_at}",
        type=Command.TIMER_FIRE,
        source=TIMER_SOURCE,
        time=spec.fire_at,
        subject=state.id,
        owner=state.owner,
        data=msgspec.to_builtins(spec.fire),
    )


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
            tags=list(state.tags),
            questions=list(state.questions),
            closed_questions=list(state.closed_questions),
        )
        self.command = command
        self.stream_seq = stream_seq
        self.events: list[Envelope] = []
        # The status was changed without an event (woken, error cleared): the status the
        # command ends in is announced once, by set_status or at commit.
        self._unannounced = False

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
            self._unannounced = False
            self.emit(Event.SESSION_STATUS, {"status": status})

    def wake(self) -> None:
        """Leave ``hibernated`` quietly; the status the command ends in is announced once."""
        if self.state.status == Status.HIBERNATED:
            self.quietly_idle()

    def quietly_idle(self) -> None:
        self.state.status = Status.IDLE
        self._unannounced = True

    def settle_status(self) -> None:
        """The status the prompt and questions imply (error and terminated are left alone)."""
        s = self.state
        if s.status in (Status.ERROR, Status.TERMINATED, Status.HIBERNATED):
            return
        if s.questions:
            self.set_status(Status.WAITING_INPUT)
        elif s.current_prompt is not None:
            self.set_status(Status.RUNNING)
        else:
            self.set_status(Status.IDLE)

    def dispatch(self, prompt: QueuedPrompt) -> None:
        s = self.state
        s.current_prompt = prompt
        s.prompt_active_at = self.command.time
        self.emit(Event.PROMPT_DISPATCHED, _prompt_data(prompt))

    def dispatch_next(self) -> bool:
        """Start the head of the queue if a runner is there and nothing runs; True if started."""
        s = self.state
        if (
            not s.runner_connected
            or s.status == Status.ERROR
            or s.current_prompt is not None
            or not s.queue
        ):
            return False
        self.dispatch(s.queue.pop(0))
        self.settle_status()
        return True

    def finish_current(self, *, run_next: bool = True) -> None:
        """The running prompt is over: its open questions expire; run the next one (unless
        ``run_next`` is False), or settle into idle."""
        s = self.state
        ended = s.current_prompt
        s.current_prompt = None
        s.prompt_active_at = ""
        if ended is not None:
            for q in [q for q in s.questions if q.prompt_id == ended.prompt_id]:
                self.close_question(q.question_id)
                self.emit(Event.QUESTION_EXPIRED, {"question_id": q.question_id})
        if not run_next:
            return  # the caller sets the status (a failed session)
        if not self.dispatch_next():
            self.settle_status()

    def close_question(self, question_id: str) -> None:
        s = self.state
        s.questions = [q for q in s.questions if q.question_id != question_id]
        s.closed_questions = [*s.closed_questions, question_id][-CLOSED_QUESTION_MEMORY:]

    def commit(self) -> Result:
        s = self.state
        if self._unannounced:
            self._unannounced = False
            self.emit(Event.SESSION_STATUS, {"status": s.status})
        s.applied_seq = self.stream_seq
        # A timer firing carries its due time, which a late firing (the scheduler was down)
        # puts before the last change: updated_at never goes back. Same format, so max is
        # chronological.
        s.updated_at = max(s.updated_at, self.command.time)
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
    _time(command.time, "time")
    if command.type == Command.SESSION_CREATE:
        return _create(state, command, stream_seq)
    if state is None:
        return _refused(None, NotFound("session not found", detail={"session_id": command.subject}))
    if state.status == Status.TERMINATED:
        if command.type == Command.SESSION_TERMINATE:
            _parse(command.data, SessionTerminate, command.type)
            return _unchanged(state)  # terminating twice is not an error (DELETE is idempotent)
        if command.type in _QUIET_WHEN_TERMINATED:
            return _unchanged(state)  # a runner or timer catching up: nothing to tell anyone
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
        case Command.RUNNER_HEARTBEAT:
            return _runner_heartbeat(t)
        case Command.RUNNER_ERROR:
            return _runner_error(t)
        case Command.MESSAGE_COMPLETE:
            return _message_complete(t)
        case Command.QUESTION_ASK:
            return _question_ask(t)
        case Command.QUESTION_ANSWER:
            return _question_answer(t)
        case Command.TIMER_FIRE:
            return _timer_fire(t)
        case Command.SESSION_UPDATE:
            return _update(t)
        case Command.SESSION_TERMINATE:
            return _terminate(t)
    raise BadRequest(f"unsupported command type {command.type!r}")


_QUIET_WHEN_TERMINATED = frozenset(
    {Command.RUNNER_DISCONNECT, Command.RUNNER_HEARTBEAT, Command.TIMER_FIRE}
)


def _create(state: SessionSnapshot | None, command: Envelope, stream_seq: int) -> Result:
    data = _parse(command.data, SessionCreate, command.type)
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
        tags=_unique(data.tags),
        idle_timeout=data.idle_timeout or DEFAULT_IDLE_TIMEOUT,
        prompt_timeout=data.prompt_timeout or DEFAULT_PROMPT_TIMEOUT,
    )
    if len(encode_snapshot(created)) > MAX_STATE_BYTES:
        return _refused(None, PayloadTooLarge("session metadata is too large"))
    t = _Transition(created, command, stream_seq)
    t.emit(
        Event.SESSION_CREATED,
        {
            "metadata": created.metadata,
            "tags": created.tags,
            "idle_timeout": created.idle_timeout,
            "prompt_timeout": created.prompt_timeout,
        },
    )
    return t.commit()


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def _submit(t: _Transition) -> Result:
    data = _parse(t.command.data, PromptSubmit, t.command.type)
    s = t.state
    running = [s.current_prompt] if s.current_prompt else []
    if data.prompt_id in s.prompt_ids or any(
        p.prompt_id == data.prompt_id for p in (*running, *s.queue)
    ):
        return _unchanged(s)  # idempotent resubmission: no new events
    t.wake()
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
    data = _parse(t.command.data, PromptAbort, t.command.type)
    current = t.state.current_prompt
    if current is None or (data.prompt_id and data.prompt_id != current.prompt_id):
        return _unchanged(t.state)  # nothing (or another prompt) runs: a no-op, not an error
    # Only the running prompt is aborted; queued prompts keep their turn.
    t.emit(Event.PROMPT_ABORTED, {"prompt_id": current.prompt_id})
    t.finish_current()
    return t.commit()


def _runner_connect(t: _Transition) -> Result:
    data = _parse(t.command.data, RunnerConnect, t.command.type)
    s = t.state
    if s.runner_connected and s.runner_connection_id == data.connection_id:
        return _unchanged(s)  # the same connection announced again
    t.wake()
    if s.runner_connected:
        # One runner per session: the new connection takes over from the live one.
        t.emit(
            Event.RUNNER_DISCONNECTED,
            {"connection_id": s.runner_connection_id, "reason": "replaced"},
        )
    s.runner_connected = True
    s.runner_connection_id = data.connection_id
    s.runner_epoch += 1
    t.emit(Event.RUNNER_CONNECTED, {"connection_id": data.connection_id})
    if s.status == Status.ERROR:
        s.error = ""  # a new runner is a fresh start for a session the old one failed
        t.quietly_idle()
    if s.current_prompt is not None:
        # The new connection has not seen the running prompt: send it again.
        t.dispatch(s.current_prompt)
    else:
        t.dispatch_next()
    t.settle_status()
    return t.commit()


def _live(t: _Transition, connection_id: str) -> bool:
    """Whether a runner command comes from the live connection (an empty id: not checked)."""
    s = t.state
    return s.runner_connected and (not connection_id or connection_id == s.runner_connection_id)


def _runner_disconnect(t: _Transition) -> Result:
    data = _parse(t.command.data, RunnerDisconnect, t.command.type)
    s = t.state
    if not s.runner_connected or data.connection_id != s.runner_connection_id:
        return _unchanged(s)  # a replaced (or already gone) connection: fenced off
    s.runner_connected = False
    s.runner_connection_id = ""
    t.emit(
        Event.RUNNER_DISCONNECTED,
        {"connection_id": data.connection_id, "reason": data.reason or "closed"},
    )
    if s.current_prompt is not None:
        # The runner went away mid-prompt: the prompt goes back to the head of the queue (it
        # runs again, first, when a runner connects) and the session is idle meanwhile. No
        # second prompt.queued: the user's message is already in the history once.
        s.queue.insert(0, s.current_prompt)
        s.current_prompt = None
        s.prompt_active_at = ""
        t.settle_status()
    return t.commit()


def _runner_heartbeat(t: _Transition) -> Result:
    """Runner activity for the watchdog. Recorded (event ``prompt.progress``) at most once per
    half ``prompt_timeout``, so a runner sending a frame at least every ``prompt_timeout``
    always keeps its prompt alive without filling the ledger."""
    data = _parse(t.command.data, RunnerHeartbeat, t.command.type)
    s = t.state
    current = s.current_prompt
    if not _live(t, data.connection_id) or current is None or s.status != Status.RUNNING:
        return _unchanged(s)
    if data.prompt_id and data.prompt_id != current.prompt_id:
        return _unchanged(s)
    since = _time(t.command.time, "time") - _time(_active_since(s), "prompt_active_at")
    if since < timedelta(seconds=_prompt_timeout(s) / 2):
        return _unchanged(s)
    s.prompt_active_at = t.command.time
    t.emit(Event.PROMPT_PROGRESS, {"prompt_id": current.prompt_id})
    return t.commit()


def _fail_current(t: _Transition, message: str, reason: str, *, run_next: bool = True) -> None:
    current = t.state.current_prompt
    assert current is not None
    t.emit(
        Event.PROMPT_FAILED,
        {"prompt_id": current.prompt_id, "message": message, "reason": reason},
    )
    t.finish_current(run_next=run_next)


def _runner_error(t: _Transition) -> Result:
    """A runner's ``error`` frame. With the running prompt's id: that prompt failed and the
    next one goes on. Without a prompt id: the session failed — the running prompt (if any)
    fails too and the session goes to ``error`` (prompts queue, none runs) until a new runner
    connects."""
    data = _parse(t.command.data, RunnerError, t.command.type)
    s = t.state
    if not _live(t, data.connection_id):
        return _unchanged(s)  # a replaced connection's last words
    current = s.current_prompt
    if data.prompt_id:
        if current is None or current.prompt_id != data.prompt_id:
            return _unchanged(s)  # already ended (aborted, timed out) or never ran
        _fail_current(t, data.message, "runner_error")
        return t.commit()
    s.error = data.message or "the runner reported an error"
    if current is not None:
        _fail_current(t, data.message, "runner_error", run_next=False)
    t.set_status(Status.ERROR)
    return t.commit()


def _message_complete(t: _Transition) -> Result:
    data = _parse(t.command.data, MessageComplete, t.command.type)
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


def _question_ask(t: _Transition) -> Result:
    data = _parse(t.command.data, QuestionAsk, t.command.type)
    s = t.state
    if any(q.question_id == data.question_id for q in s.questions) or (
        data.question_id in s.closed_questions
    ):
        return _unchanged(s)  # the same question sent again
    if len(s.questions) >= MAX_OPEN_QUESTIONS:
        return t.reject(
            Conflict(
                "too many open questions",
                detail={"open_questions": len(s.questions), "limit": MAX_OPEN_QUESTIONS},
            )
        )
    expires_at = iso(_time(data.expires_at, "expires_at").timestamp()) if data.expires_at else None
    question = PendingQuestion(
        question_id=data.question_id,
        prompt_id=s.current_prompt.prompt_id if s.current_prompt else "",
        content=data.content,
        options=data.options,
        expires_at=expires_at,
        asked_at=t.command.time,
    )
    s.questions.append(question)
    if len(encode_snapshot(s)) > MAX_STATE_BYTES:
        return t.reject(PayloadTooLarge("the question is too large"))
    t.wake()
    if s.current_prompt is not None:
        s.prompt_active_at = t.command.time
    t.emit(
        Event.QUESTION_ASKED,
        {
            "question_id": question.question_id,
            "prompt_id": question.prompt_id or None,
            "content": question.content,
            "options": question.options,
            "expires_at": question.expires_at,
        },
    )
    t.settle_status()
    return t.commit()


def _question_answer(t: _Transition) -> Result:
    data = _parse(t.command.data, QuestionAnswer, t.command.type)
    s = t.state
    if data.question_id in s.closed_questions:
        return _refused(
            s,
            Conflict(
                "question is already answered or expired", detail={"question_id": data.question_id}
            ),
        )
    if not any(q.question_id == data.question_id for q in s.questions):
        return _refused(s, NotFound("question not found", detail={"question_id": data.question_id}))
    t.wake()
    t.close_question(data.question_id)
    if s.current_prompt is not None:
        s.prompt_active_at = t.command.time  # the watchdog starts again from the answer
    t.emit(Event.QUESTION_ANSWERED, {"question_id": data.question_id, "answer": data.answer})
    t.settle_status()
    return t.commit()


def _timer_fire(t: _Transition) -> Result:
    data = _parse(t.command.data, TimerFire, t.command.type)
    s = t.state
    if _fired(timers_for(t.original), t.command) is None:
        return _unchanged(s)  # re-armed, or made moot by what happened since
    match data.kind:
        case TimerKind.IDLE:
            t.set_status(Status.HIBERNATED)
        case TimerKind.QUESTION:
            t.close_question(data.ref)
            t.emit(Event.QUESTION_EXPIRED, {"question_id": data.ref})
            t.settle_status()
        case TimerKind.WATCHDOG:
            _fail_current(t, f"no runner activity for {_prompt_timeout(s)} s", "timeout")
    return t.commit()


def _update(t: _Transition) -> Result:
    data = _parse(t.command.data, SessionUpdate, t.command.type)
    s = t.state
    changed: dict[str, Any] = {}
    if data.tags is not None and _unique(data.tags) != s.tags:
        s.tags = _unique(data.tags)
        changed["tags"] = s.tags
    if data.metadata is not None and data.metadata != s.metadata:
        s.metadata = data.metadata
        changed["metadata"] = s.metadata
    if not changed:
        return _unchanged(s)
    if len(encode_snapshot(s)) > MAX_STATE_BYTES:
        return t.reject(PayloadTooLarge("session metadata is too large"))
    t.emit(Event.SESSION_UPDATED, changed)
    return t.commit()


def _terminate(t: _Transition) -> Result:
    data = _parse(t.command.data, SessionTerminate, t.command.type)
    s = t.state
    if s.current_prompt is not None:
        t.emit(Event.PROMPT_ABORTED, {"prompt_id": s.current_prompt.prompt_id})
        s.current_prompt = None
        s.prompt_active_at = ""
    s.queue = []  # queued prompts never run; the history still holds them
    s.questions = []
    s.runner_connected = False
    s.runner_connection_id = ""
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


# -- recovery: snapshot + the ledger's tail --


@dataclass(frozen=True, slots=True)
class LedgerCommand:
    """A command recorded in the ledger: on the last event it produced (at ``ledger_seq``),
    the command's envelope and its sequence in SESSION_CMD travel as headers."""

    ledger_seq: int
    command: Envelope
    stream_seq: int


def replay(state: SessionSnapshot | None, tail: Iterable[LedgerCommand]) -> SessionSnapshot | None:
    """The state after re-applying the ledger's commands that follow ``state``'s ``ledger_seq``.

    Pure: the rules are deterministic, so applying the same commands to the same snapshot gives
    the state their writer had. Commands at or below ``applied_seq`` (already in the snapshot)
    are skipped. ``ledger_seq`` ends at the last command's last event: a command cut short
    after some of its events (a crash mid-append) is not in ``tail`` and is redelivered, so its
    re-run finds its own events at the ledger's tip and resumes after them.
    """
    for entry in tail:
        if state is not None and entry.ledger_seq <= state.ledger_seq:
            continue
        result = apply(state, entry.command, entry.stream_seq)
        if result.changed and result.new_state is not None:
            state = msgspec.structs.replace(result.new_state, ledger_seq=entry.ledger_seq)
    return state
