"""The pure command handler: rules, determinism and invariants (no I/O)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.common.contracts import Command, Event, SessionSnapshot, Status, encode_snapshot
from shoal.common.errors import BadRequest
from shoal.common.messaging import Envelope, encode, is_token
from shoal.session.service import (
    MAX_STATE_BYTES,
    MESSAGES_MAX_LIMIT,
    Result,
    apply,
    messages_page,
    parse_messages_query,
    timer_changes,
    timer_command,
    timer_id,
    timers_for,
)

SID = "ses_1"
T0 = "2025-01-01T00:00:00.000Z"


def cmd(
    type_: str,
    data: dict[str, Any] | None = None,
    *,
    n: int = 0,
    owner: str = "u1",
    at: str | None = None,
) -> Envelope:
    return Envelope(
        id=f"cmd_{n}",
        type=type_,
        source="gateway",
        time=at or f"2025-01-01T00:00:{n % 60:02d}.000Z",
        subject=SID,
        owner=owner,
        data=data or {},
    )


class Session:
    """Feeds commands through ``apply`` with increasing stream sequences, like the edge."""

    def __init__(self) -> None:
        self.state: SessionSnapshot | None = None
        self.seq = 0
        self.events: list[Envelope] = []

    def send(
        self, type_: str, data: dict[str, Any] | None = None, *, at: str | None = None
    ) -> Result:
        return self.deliver(cmd(type_, data, n=self.seq + 1, at=at))

    def deliver(self, command: Envelope) -> Result:
        """Apply ``command`` at the next stream sequence, as the edge would."""
        self.seq += 1
        result = apply(self.state, command, self.seq)
        if result.changed:
            self.state = result.new_state
        self.events.extend(result.events)
        return result

    def fire(self, timer_id: str) -> Result:
        """Fire the timer ``timer_id`` that the current state wants, as the scheduler would."""
        [spec] = [spec for spec in timers_for(self.state) if spec.id == timer_id]
        return self.deliver(timer_command(self.s, spec))

    def create(self) -> Result:
        return self.send(Command.SESSION_CREATE, {"metadata": {"k": "v"}, "runner_token_hash": "h"})

    def submit(self, pid: str, content: str = "hi") -> Result:
        return self.send(Command.PROMPT_SUBMIT, {"prompt_id": pid, "content": content})

    def connect(self, conn: str = "c1") -> Result:
        return self.send(Command.RUNNER_CONNECT, {"connection_id": conn})

    def disconnect(self, conn: str = "c1") -> Result:
        return self.send(Command.RUNNER_DISCONNECT, {"connection_id": conn})

    def complete(self, pid: str, content: str = "done") -> Result:
        return self.send(
            Command.MESSAGE_COMPLETE,
            {"prompt_id": pid, "message_id": f"m-{pid}", "content": content},
        )

    @property
    def s(self) -> SessionSnapshot:
        assert self.state is not None
        return self.state


def types(result: Result) -> list[str]:
    return [e.type for e in result.events]


def test_create_emits_session_created_with_ids_from_the_command() -> None:
    result = apply(None, cmd(Command.SESSION_CREATE, {"metadata": {"a": 1}}, n=3), 42)
    assert result.changed
    assert result.error is None
    state = result.new_state
    assert state is not None
    assert (state.id, state.owner, state.status) == (SID, "u1", Status.IDLE)
    assert (state.created_at, state.applied_seq, state.event_seq) == (
        "2025-01-01T00:00:03.000Z",
        42,
        1,
    )
    [event] = result.events
    assert event.id == f"{SID}:42:0"
    assert (event.type, event.seq, event.owner, event.source) == (
        Event.SESSION_CREATED,
        1,
        "u1",
        "session",
    )
    assert event.time == state.created_at
    assert event.data == {
        "metadata": {"a": 1},
        "tags": [],
        "idle_timeout": 900,
        "prompt_timeout": 600,
    }
    assert result.reply["ok"] is True
    assert result.reply["data"]["seq"] == 1
    assert result.reply["data"]["session"]["id"] == SID
    assert "runner_token_hash" not in result.reply["data"]["session"]


@pytest.mark.parametrize(
    "type_",
    [c for c in Command if c not in (Command.SESSION_CREATE,)],
)
def test_commands_to_a_missing_session_are_not_found(type_: str) -> None:
    result = apply(None, cmd(type_, {"prompt_id": "p", "content": "x"}), 1)
    assert result.new_state is None
    assert result.events == []
    assert not result.changed
    assert result.reply == {
        "ok": False,
        "error": {
            "code": "not_found",
            "message": "session not found",
            "detail": {"session_id": SID},
        },
    }


def test_create_needs_an_owner_and_a_valid_payload() -> None:
    no_owner = apply(None, cmd(Command.SESSION_CREATE, owner=""), 1)
    assert no_owner.reply["error"]["code"] == "bad_request"
    bad = apply(None, cmd(Command.SESSION_CREATE, {"metadata": "nope"}), 1)
    assert bad.reply["error"]["code"] == "bad_request"
    assert bad.events == []
    assert bad.new_state is None


def test_create_again_is_idempotent_only_for_the_same_command() -> None:
    s = Session()
    s.create()
    again = apply(s.state, cmd(Command.SESSION_CREATE, n=1), 10)
    assert again.reply["ok"]
    assert again.events == []
    assert not again.changed
    other = apply(s.state, cmd(Command.SESSION_CREATE, n=7), 11)
    assert other.reply["error"]["code"] == "conflict"
    assert other.events == []


def test_prompt_queues_while_no_runner_and_runs_when_one_connects() -> None:
    s = Session()
    s.create()
    r = s.submit("p1")
    assert types(r) == [Event.PROMPT_QUEUED]
    assert r.events[0].data == {"prompt_id": "p1", "content": "hi"}
    assert s.s.status == Status.IDLE
    assert [p.prompt_id for p in s.s.queue] == ["p1"]
    r = s.connect()
    assert types(r) == [Event.RUNNER_CONNECTED, Event.PROMPT_DISPATCHED, Event.SESSION_STATUS]
    assert r.events[2].data == {"status": "running"}
    assert s.s.current_prompt is not None
    assert s.s.current_prompt.prompt_id == "p1"
    assert s.s.queue == []
    assert s.s.runner_epoch == 1


def test_one_prompt_runs_at_a_time_and_the_rest_wait_in_order() -> None:
    s = Session()
    s.create()
    s.connect()
    assert types(s.submit("p1")) == [
        Event.PROMPT_QUEUED,
        Event.PROMPT_DISPATCHED,
        Event.SESSION_STATUS,
    ]
    assert types(s.submit("p2")) == [Event.PROMPT_QUEUED]
    assert types(s.submit("p3")) == [Event.PROMPT_QUEUED]
    r = s.complete("p1", "answer 1")
    assert types(r) == [Event.MESSAGE_COMPLETED, Event.PROMPT_DISPATCHED]
    assert r.events[0].data == {
        "message_id": "m-p1",
        "prompt_id": "p1",
        "role": "assistant",
        "content": "answer 1",
    }
    assert r.events[1].data["prompt_id"] == "p2"
    assert types(s.complete("p2")) == [Event.MESSAGE_COMPLETED, Event.PROMPT_DISPATCHED]
    r = s.complete("p3")
    assert types(r) == [Event.MESSAGE_COMPLETED, Event.SESSION_STATUS]
    assert r.events[1].data == {"status": "idle"}
    assert s.s.status == Status.IDLE
    assert s.s.current_prompt is None
    assert s.s.message_count == 3


def test_disconnect_while_running_requeues_the_prompt_at_the_head() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    s.submit("p2")
    r = s.disconnect()
    assert types(r) == [Event.RUNNER_DISCONNECTED, Event.SESSION_STATUS]
    assert r.events[1].data == {"status": "idle"}
    assert [p.prompt_id for p in s.s.queue] == ["p1", "p2"]
    assert s.s.current_prompt is None
    assert not s.s.runner_connected
    r = s.connect("c2")
    assert types(r) == [Event.RUNNER_CONNECTED, Event.PROMPT_DISPATCHED, Event.SESSION_STATUS]
    assert r.events[1].data["prompt_id"] == "p1"
    # the user's message is in the history once
    assert sum(e.type == Event.PROMPT_QUEUED for e in s.events) == 2


def test_disconnect_without_runner_is_a_no_op() -> None:
    s = Session()
    s.create()
    r = s.disconnect()
    assert r.reply["ok"]
    assert r.events == []
    assert not r.changed


def test_reconnect_while_running_sends_the_prompt_again() -> None:
    s = Session()
    s.create()
    s.connect("c1")
    s.submit("p1")
    r = s.connect("c2")
    assert types(r) == [
        Event.RUNNER_DISCONNECTED,
        Event.RUNNER_CONNECTED,
        Event.PROMPT_DISPATCHED,
    ]
    assert r.events[0].data == {"connection_id": "c1", "reason": "replaced"}
    assert r.events[1].data == {"connection_id": "c2"}
    assert r.events[2].data["prompt_id"] == "p1"
    assert s.s.status == Status.RUNNING
    assert (s.s.runner_epoch, s.s.runner_connection_id) == (2, "c2")


def test_duplicate_prompt_id_is_idempotent() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    s.submit("p2")
    before = s.s
    for pid in ("p1", "p2"):  # running and queued
        r = s.submit(pid, "other content")
        assert r.events == []
        assert not r.changed
        assert r.reply["ok"]
    s.complete("p1")
    s.complete("p2")
    r = s.submit("p1")  # finished, still remembered
    assert r.events == []
    assert not r.changed
    assert before.event_seq < s.s.event_seq


def test_terminate_is_final() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    s.submit("p2")
    r = s.send(Command.SESSION_TERMINATE, {"reason": "user"})
    assert types(r) == [Event.PROMPT_ABORTED, Event.SESSION_STATUS, Event.SESSION_TERMINATED]
    assert r.events[-1].data == {"reason": "user"}
    assert s.s.status == Status.TERMINATED
    assert s.s.queue == []
    assert s.s.current_prompt is None
    for type_, data in [
        (Command.PROMPT_SUBMIT, {"prompt_id": "p9", "content": "x"}),
        (Command.RUNNER_CONNECT, {"connection_id": "c"}),
        (Command.MESSAGE_COMPLETE, {"prompt_id": "p1", "message_id": "m", "content": ""}),
        (Command.PROMPT_ABORT, {}),
    ]:
        rejected = s.send(type_, data)
        assert rejected.reply["error"]["code"] == "conflict"
        assert rejected.events == []
        assert not rejected.changed
    again = s.send(Command.SESSION_TERMINATE, {"reason": "again"})
    assert again.reply["ok"]
    assert again.events == []


@pytest.mark.parametrize(
    ("type_", "data"),
    [
        (Command.PROMPT_SUBMIT, {"content": "no id"}),
        (Command.PROMPT_SUBMIT, {"prompt_id": "", "content": "x"}),
        (Command.PROMPT_SUBMIT, {"prompt_id": 5, "content": "x"}),
        (Command.RUNNER_CONNECT, {}),
        (Command.MESSAGE_COMPLETE, {"prompt_id": "p1"}),
        (Command.SESSION_TERMINATE, {"reason": 3}),
        ("session.explode", {}),
        (Command.QUESTION_ASK, {}),  # not part of the model yet
    ],
)
def test_malformed_commands_are_bad_requests_with_no_effect(
    type_: str, data: dict[str, Any]
) -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    before = encode_snapshot(s.s)
    r = s.send(type_, data)
    assert r.reply["ok"] is False
    assert r.reply["error"]["code"] == "bad_request"
    assert r.events == []
    assert not r.changed
    assert encode_snapshot(s.s) == before


def test_a_redelivered_command_is_already_applied() -> None:
    s = Session()
    s.create()
    s.submit("p1")
    state = s.s
    r = apply(state, cmd(Command.PROMPT_SUBMIT, {"prompt_id": "p2", "content": "x"}), s.seq)
    assert r.already_applied
    assert r.events == []
    assert not r.changed
    assert r.reply["ok"]
    r = apply(state, cmd(Command.SESSION_CREATE), 1)
    assert r.already_applied


def test_apply_is_deterministic_and_leaves_its_input_alone() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    s.submit("p2")
    state = s.s
    frozen = encode_snapshot(state)
    command = cmd(
        Command.MESSAGE_COMPLETE, {"prompt_id": "p1", "message_id": "m", "content": "x"}, n=9
    )
    first, second = apply(state, command, 99), apply(state, command, 99)
    assert [encode(e) for e in first.events] == [encode(e) for e in second.events]
    assert first.new_state == second.new_state
    assert encode_snapshot(state) == frozen
    assert [e.id for e in first.events] == [f"{SID}:99:0", f"{SID}:99:1"]


def test_completing_a_prompt_that_is_not_running_is_rejected_on_the_ledger() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    seq = s.s.event_seq
    r = s.complete("p-other")
    assert r.reply["error"]["code"] == "conflict"
    assert types(r) == [Event.COMMAND_REJECTED]
    assert r.events[0].data == {
        "command_id": f"cmd_{s.seq}",
        "command_type": Command.MESSAGE_COMPLETE,
        "error": {"code": "conflict", "message": "prompt is not running"},
    }
    assert r.events[0].seq == seq + 1
    assert s.s.event_seq == seq + 1
    assert s.s.current_prompt is not None
    assert s.s.current_prompt.prompt_id == "p1"


def test_abort_stops_the_running_prompt_and_starts_the_next() -> None:
    s = Session()
    s.create()
    assert s.send(Command.PROMPT_ABORT).events == []  # nothing runs: no-op
    s.connect()
    s.submit("p1")
    s.submit("p2")
    r = s.send(Command.PROMPT_ABORT)
    assert types(r) == [Event.PROMPT_ABORTED, Event.PROMPT_DISPATCHED]
    assert r.events[0].data == {"prompt_id": "p1"}
    assert r.events[1].data["prompt_id"] == "p2"
    r = s.send(Command.PROMPT_ABORT)
    assert types(r) == [Event.PROMPT_ABORTED, Event.SESSION_STATUS]
    assert s.s.status == Status.IDLE


def test_a_prompt_that_would_overflow_the_snapshot_is_rejected() -> None:
    s = Session()
    s.create()
    big = "x" * (MAX_STATE_BYTES // 3)
    s.submit("p1", big)
    s.submit("p2", big)
    r = s.submit("p3", big)
    assert r.reply["error"]["code"] == "payload_too_large"
    assert types(r) == [Event.COMMAND_REJECTED]
    assert [p.prompt_id for p in s.s.queue] == ["p1", "p2"]
    assert "p3" not in s.s.prompt_ids
    assert len(encode_snapshot(s.s)) < MAX_STATE_BYTES


def test_messages_query_defaults_and_limits() -> None:
    q = parse_messages_query({"session_id": "s"})
    assert (q.after, q.limit) == (0, 50)
    q = parse_messages_query({"session_id": "s", "after": None, "limit": 10_000})
    assert q.limit == MESSAGES_MAX_LIMIT
    for bad in ({}, {"session_id": "s", "limit": 0}, {"session_id": "s", "after": -1}):
        with pytest.raises(BadRequest):
            parse_messages_query(bad)


def test_messages_page_cursor() -> None:
    class Row(msgspec.Struct):
        seq: int

    rows = [Row(seq) for seq in (2, 5, 9)]
    assert messages_page(rows, 2) == (rows[:2], 5)
    assert messages_page(rows, 3) == (rows, None)


# -- property: any sequence of commands keeps the session's invariants --
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(["p1", "p2", "p3", "p4", "p5"])),
        st.tuples(st.just("connect"), st.sampled_from(["c1", "c2"])),
        st.tuples(st.just("disconnect"), st.sampled_from(["c1", "c2"])),
        st.tuples(st.just("complete"), st.sampled_from(["p1", "p2", "p3", "p4", "p5", "cur"])),
        st.tuples(st.just("abort"), st.just("")),
        st.tuples(st.just("ask"), st.sampled_from(["q1", "q2"])),
        st.tuples(st.just("answer"), st.sampled_from(["q1", "q2"])),
        st.tuples(st.just("error"), st.sampled_from(["cur", ""])),
        st.tuples(st.just("fire"), st.sampled_from(["idle", "wd", "q_q1", "q_q2"])),
        st.tuples(st.just("heartbeat"), st.just("")),
        st.tuples(st.just("update"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("terminate"), st.just("")),
    ),
    max_size=40,
)


def _run(ops: list[tuple[str, str]]) -> Session:
    s = Session()
    s.create()
    for op, arg in ops:
        if op == "submit":
            s.submit(arg)
        elif op == "connect":
            s.connect(arg)
        elif op == "disconnect":
            s.disconnect(arg)
        elif op == "complete":
            running = s.s.current_prompt.prompt_id if s.s.current_prompt else "none"
            s.complete(running if arg == "cur" else arg)
        elif op == "abort":
            s.send(Command.PROMPT_ABORT)
        elif op == "ask":
            ask(s, arg, "2025-01-01T02:00:00Z")
        elif op == "answer":
            s.send(Command.QUESTION_ANSWER, {"question_id": arg, "answer": "a"})
        elif op == "error":
            running = s.s.current_prompt.prompt_id if s.s.current_prompt else ""
            conn = s.s.runner_connection_id
            payload = {"connection_id": conn, "prompt_id": running if arg else "", "message": "m"}
            s.send(Command.RUNNER_ERROR, payload)
        elif op == "heartbeat":
            beat = {"connection_id": s.s.runner_connection_id or "c0"}
            s.send(Command.RUNNER_HEARTBEAT, beat)
        elif op == "update":
            s.send(Command.SESSION_UPDATE, {"tags": [arg]})
        elif op == "fire":
            if any(spec.id == f"{SID}_{arg}" for spec in timers_for(s.state)):
                s.fire(f"{SID}_{arg}")
        else:
            s.send(Command.SESSION_TERMINATE, {"reason": "r"})
        state = s.s
        # invariants after every command
        if state.status == Status.TERMINATED:
            continue
        assert (state.status == Status.RUNNING) == (
            state.current_prompt is not None and not state.questions
        ), state.status
        if state.status != Status.ERROR:
            assert (state.status == Status.WAITING_INPUT) == bool(state.questions)
        if state.current_prompt is not None:
            assert state.runner_connected
            assert state.prompt_active_at
        elif state.status != Status.ERROR:
            assert not (state.runner_connected and state.queue), "a prompt waits for no reason"
        if state.status == Status.HIBERNATED:
            assert not state.queue
        assert (state.status == Status.ERROR) == bool(state.error)
        wanted = [spec.id for spec in timers_for(state)]
        assert len(wanted) == len(set(wanted))
        ids = [p.prompt_id for p in state.queue]
        assert len(ids) == len(set(ids))
    return s


@settings(max_examples=1000, deadline=None)
@given(_ops)
def test_any_command_sequence_keeps_the_invariants(ops: list[tuple[str, str]]) -> None:
    s = _run(ops)
    seqs = [e.seq for e in s.events]
    assert seqs == list(range(1, len(seqs) + 1))  # contiguous from 1
    assert s.s.event_seq == len(seqs)
    assert len({e.id for e in s.events}) == len(s.events)
    queued = [e.data["prompt_id"] for e in s.events if e.type == Event.PROMPT_QUEUED]
    assert len(queued) == len(set(queued))  # each prompt enters the history once
    completed = [e.data["prompt_id"] for e in s.events if e.type == Event.MESSAGE_COMPLETED]
    assert len(completed) == len(set(completed))
    assert set(completed) <= set(queued)
    # prompts start in the order they were submitted (a requeued one keeps its place)
    first_dispatch: list[str] = []
    for e in s.events:
        if e.type == Event.PROMPT_DISPATCHED and e.data["prompt_id"] not in first_dispatch:
            first_dispatch.append(e.data["prompt_id"])
    assert first_dispatch == [p for p in queued if p in first_dispatch]
    terminated = [i for i, e in enumerate(s.events) if e.type == Event.SESSION_TERMINATED]
    if terminated:
        assert terminated == [len(s.events) - 1]  # terminal: nothing after it
    # replaying the same commands gives byte-identical events
    assert [encode(e) for e in _run(ops).events] == [encode(e) for e in s.events]


def test_oversized_content_and_metadata_are_refused() -> None:
    from shoal.session.service import MAX_CONTENT_BYTES

    huge = apply(None, cmd(Command.SESSION_CREATE, {"metadata": {"x": "y" * MAX_STATE_BYTES}}), 1)
    assert huge.reply["error"]["code"] == "payload_too_large"
    assert huge.new_state is None
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    r = s.complete("p1", "z" * (MAX_CONTENT_BYTES + 1))
    assert r.reply["error"]["code"] == "payload_too_large"
    assert types(r) == [Event.COMMAND_REJECTED]
    assert s.s.current_prompt is not None


# -- runner takeover, fenced by connection id --
def test_a_late_disconnect_of_a_replaced_connection_changes_nothing() -> None:
    s = Session()
    s.create()
    s.connect("c1")
    s.connect("c2")
    r = s.disconnect("c1")
    assert r.events == []
    assert not r.changed
    assert (s.s.runner_connected, s.s.runner_connection_id) == (True, "c2")
    r = s.submit("p1")  # the next prompt goes to c2
    assert types(r) == [Event.PROMPT_QUEUED, Event.PROMPT_DISPATCHED, Event.SESSION_STATUS]
    r = s.disconnect("c2")
    assert r.events[0].data == {"connection_id": "c2", "reason": "closed"}
    assert not s.s.runner_connected


def test_the_same_connection_announced_twice_is_one_connection() -> None:
    s = Session()
    s.create()
    s.connect("c1")
    r = s.connect("c1")
    assert r.events == []
    assert s.s.runner_epoch == 1


# -- abort and terminate --
def test_abort_of_a_prompt_that_is_not_running_is_a_no_op() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    s.submit("p2")
    r = s.send(Command.PROMPT_ABORT, {"prompt_id": "p2"})  # queued, not running
    assert r.events == []
    assert r.reply["ok"]
    r = s.send(Command.PROMPT_ABORT, {"prompt_id": "p1"})
    assert types(r) == [Event.PROMPT_ABORTED, Event.PROMPT_DISPATCHED]


# -- runner errors --
def test_a_runner_error_with_the_running_prompt_fails_it_and_the_next_goes_on() -> None:
    s = Session()
    s.create()
    s.connect("c1")
    s.submit("p1")
    s.submit("p2")
    r = s.send(Command.RUNNER_ERROR, {"connection_id": "c1", "prompt_id": "p1", "message": "oom"})
    assert types(r) == [Event.PROMPT_FAILED, Event.PROMPT_DISPATCHED]
    assert r.events[0].data == {"prompt_id": "p1", "message": "oom", "reason": "runner_error"}
    assert r.events[1].data["prompt_id"] == "p2"
    stale = s.send(Command.RUNNER_ERROR, {"connection_id": "c0", "prompt_id": "p2", "message": "x"})
    assert stale.events == []
    other = s.send(Command.RUNNER_ERROR, {"prompt_id": "p1", "message": "late"})
    assert other.events == []


def test_a_session_level_runner_error_holds_prompts_until_a_new_runner_connects() -> None:
    s = Session()
    s.create()
    s.connect("c1")
    s.submit("p1")
    s.submit("p2")
    r = s.send(Command.RUNNER_ERROR, {"connection_id": "c1", "message": "sandbox broken"})
    assert types(r) == [Event.PROMPT_FAILED, Event.SESSION_STATUS]
    assert r.events[1].data == {"status": "error"}
    assert (s.s.status, s.s.error) == (Status.ERROR, "sandbox broken")
    assert types(s.submit("p3")) == [Event.PROMPT_QUEUED]  # queued, not run
    assert s.s.current_prompt is None
    assert timers_for(s.s) == []
    r = s.connect("c2")
    assert types(r) == [
        Event.RUNNER_DISCONNECTED,
        Event.RUNNER_CONNECTED,
        Event.PROMPT_DISPATCHED,
        Event.SESSION_STATUS,
    ]
    assert r.events[-1].data == {"status": "running"}
    assert (s.s.error, s.s.current_prompt and s.s.current_prompt.prompt_id) == ("", "p2")


# -- questions --
def ask(s: Session, qid: str, expires_at: str | None = None) -> Result:
    data: dict[str, Any] = {"question_id": qid, "content": "Deploy?", "options": ["yes", "no"]}
    if expires_at:
        data["expires_at"] = expires_at
    return s.send(Command.QUESTION_ASK, data)


def test_a_question_waits_for_its_answer() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    r = ask(s, "q1", "2025-01-01T01:00:00Z")
    assert types(r) == [Event.QUESTION_ASKED, Event.SESSION_STATUS]
    assert r.events[0].data == {
        "question_id": "q1",
        "prompt_id": "p1",
        "content": "Deploy?",
        "options": ["yes", "no"],
        "expires_at": "2025-01-01T01:00:00.000Z",
    }
    assert s.s.status == Status.WAITING_INPUT
    assert [t.id for t in timers_for(s.s)] == [f"{SID}_q_q1"]  # no watchdog while waiting
    assert ask(s, "q1").events == []  # asked again: the same question
    missing = s.send(Command.QUESTION_ANSWER, {"question_id": "q9", "answer": "yes"})
    assert missing.reply["error"]["code"] == "not_found"
    r = s.send(Command.QUESTION_ANSWER, {"question_id": "q1", "answer": "yes"})
    assert types(r) == [Event.QUESTION_ANSWERED, Event.SESSION_STATUS]
    assert r.events[0].data == {"question_id": "q1", "answer": "yes"}
    assert s.s.status == Status.RUNNING
    again = s.send(Command.QUESTION_ANSWER, {"question_id": "q1", "answer": "no"})
    assert again.reply["error"]["code"] == "conflict"
    assert again.events == []


def test_a_question_expires_on_its_timer_and_the_prompt_goes_on() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    ask(s, "q1", "2025-01-01T01:00:00Z")
    [spec] = timers_for(s.s)
    assert spec.fire_at == "2025-01-01T01:00:00.000Z"
    r = s.fire(f"{SID}_q_q1")
    assert types(r) == [Event.QUESTION_EXPIRED, Event.SESSION_STATUS]
    assert r.events[0].data == {"question_id": "q1"}
    assert s.s.status == Status.RUNNING
    late = s.deliver(timer_command(s.s, spec))  # fired twice: the second is a no-op
    assert late.events == []
    answer = s.send(Command.QUESTION_ANSWER, {"question_id": "q1", "answer": "yes"})
    assert answer.reply["error"]["code"] == "conflict"


def test_open_questions_expire_with_their_prompt() -> None:
    s = Session()
    s.create()
    s.connect()
    s.submit("p1")
    ask(s, "q1")
    r = s.send(Command.PROMPT_ABORT)
    assert types(r) == [Event.PROMPT_ABORTED, Event.QUESTION_EXPIRED, Event.SESSION_STATUS]
    assert (s.s.questions, s.s.status) == ([], Status.IDLE)


# -- watchdog --
def test_the_watchdog_fails_a_silent_prompt_and_heartbeats_keep_it_away() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"prompt_timeout": 10}, at="2025-01-01T00:00:00.000Z")
    s.send(Command.RUNNER_CONNECT, {"connection_id": "c1"}, at="2025-01-01T00:00:00.000Z")
    s.send(Command.PROMPT_SUBMIT, {"prompt_id": "p1", "content": "x"}, at="2025-01-01T00:00:01Z")
    [wd] = timers_for(s.s)
    assert (wd.id, wd.fire_at) == (f"{SID}_wd", "2025-01-01T00:00:11.000Z")
    beat = {"connection_id": "c1", "prompt_id": "p1"}
    assert s.send(Command.RUNNER_HEARTBEAT, beat, at="2025-01-01T00:00:03Z").events == []
    r = s.send(Command.RUNNER_HEARTBEAT, beat, at="2025-01-01T00:00:07.000Z")
    assert types(r) == [Event.PROMPT_PROGRESS]
    stale = s.deliver(timer_command(s.s, wd))  # armed before the heartbeat: moot
    assert stale.events == []
    [wd] = timers_for(s.s)
    assert wd.fire_at == "2025-01-01T00:00:17.000Z"
    other = {"connection_id": "c0", "prompt_id": "p1"}
    assert s.send(Command.RUNNER_HEARTBEAT, other, at="2025-01-01T00:00:16Z").events == []
    r = s.fire(f"{SID}_wd")
    assert types(r) == [Event.PROMPT_FAILED, Event.SESSION_STATUS]
    assert r.events[0].data == {
        "prompt_id": "p1",
        "message": "no runner activity for 10 s",
        "reason": "timeout",
    }
    assert s.s.status == Status.IDLE


# -- hibernation --
def test_an_idle_session_hibernates_and_a_prompt_wakes_it_with_nothing_lost() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"idle_timeout": 1}, at="2025-01-01T00:00:00.000Z")
    [idle] = timers_for(s.s)
    assert (idle.id, idle.fire_at) == (f"{SID}_idle", "2025-01-01T00:00:01.000Z")
    r = s.fire(f"{SID}_idle")
    assert types(r) == [Event.SESSION_STATUS]
    assert r.events[0].data == {"status": "hibernated"}
    assert timers_for(s.s) == []
    r = s.submit("p1")
    assert types(r) == [Event.PROMPT_QUEUED, Event.SESSION_STATUS]
    assert r.events[1].data == {"status": "idle"}
    assert [p.prompt_id for p in s.s.queue] == ["p1"]
    assert timers_for(s.s) == []  # a queued prompt is not idle
    s.send(Command.SESSION_TERMINATE)
    assert timers_for(s.s) == []


def test_a_runner_connecting_wakes_a_hibernated_session_once() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"idle_timeout": 5})
    s.fire(f"{SID}_idle")
    r = s.connect("c1")
    assert types(r) == [Event.RUNNER_CONNECTED, Event.SESSION_STATUS]
    assert r.events[1].data == {"status": "idle"}
    s.fire(f"{SID}_idle")
    r = s.submit("p1")  # woken straight into running: one status event
    assert types(r) == [Event.PROMPT_QUEUED, Event.PROMPT_DISPATCHED, Event.SESSION_STATUS]
    assert r.events[2].data == {"status": "running"}


def test_an_idle_timer_armed_before_activity_is_moot() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"idle_timeout": 5})
    [first] = timers_for(s.s)
    s.send(Command.SESSION_UPDATE, {"tags": ["a"]})
    assert s.deliver(timer_command(s.s, first)).events == []
    assert s.s.status == Status.IDLE


@pytest.mark.parametrize(
    "data",
    [{"idle_timeout": -1}, {"idle_timeout": 10**9}, {"prompt_timeout": -5}, {"tags": ["a.b"]}],
)
def test_create_refuses_out_of_bounds_timeouts_and_bad_tags(data: dict[str, Any]) -> None:
    r = apply(None, cmd(Command.SESSION_CREATE, data), 1)
    assert r.reply["error"]["code"] == "bad_request"


# -- update --
def test_update_changes_tags_and_metadata_and_says_what_changed() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"tags": ["a", "a", "b"], "idle_timeout": 60})
    assert (s.s.tags, s.s.idle_timeout, s.s.prompt_timeout) == (["a", "b"], 60, 600)
    r = s.send(Command.SESSION_UPDATE, {"tags": ["c"]})
    assert types(r) == [Event.SESSION_UPDATED]
    assert r.events[0].data == {"tags": ["c"]}
    r = s.send(Command.SESSION_UPDATE, {"metadata": {"x": 1}, "tags": ["c"]})
    assert r.events[0].data == {"metadata": {"x": 1}}
    assert s.send(Command.SESSION_UPDATE, {"tags": ["c"]}).events == []
    assert s.send(Command.SESSION_UPDATE, {}).events == []


def test_timer_ids_are_valid_scheduler_ids() -> None:
    assert timer_id("ses_1", "q", "q1") == "ses_1_q_q1"
    odd = timer_id("ses_1", "q", "question: what?")
    assert odd.startswith("tmr_")
    assert is_token(odd)
    assert odd == timer_id("ses_1", "q", "question: what?")
    assert is_token(timer_id("s" * 128, "idle"))


def test_timer_changes_set_what_is_new_and_cancel_what_is_gone_but_not_what_fired() -> None:
    s = Session()
    s.send(Command.SESSION_CREATE, {"idle_timeout": 5})
    created = s.s
    to_set, to_cancel = timer_changes(None, created)
    assert ([t.id for t in to_set], to_cancel) == ([f"{SID}_idle"], [])
    s.submit("p1")  # queued: not idle any more
    assert timer_changes(created, s.s) == ([], [f"{SID}_idle"])
    s2 = Session()
    s2.send(Command.SESSION_CREATE, {"idle_timeout": 5})
    firing = timer_command(s2.s, timers_for(s2.s)[0])
    before = s2.s
    s2.deliver(firing)
    assert s2.s.status == Status.HIBERNATED
    assert timer_changes(before, s2.s, firing) == ([], [])  # fired: nothing to cancel
    assert timer_changes(before, s2.s) == ([], [f"{SID}_idle"])
