"""The rules emit only what the public event contract (shoal.common.events) declares."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from shoal.common.contracts import Command, Event
from shoal.common.events import EVENT_PAYLOADS
from shoal.common.messaging import Envelope
from shoal.session.service import apply

SID = "ses_contract"


def _declared_fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _check(event: Envelope) -> None:
    model = EVENT_PAYLOADS.get(event.type)
    assert model is not None, f"{event.type} is emitted but not declared in shoal.common.events"
    undeclared = set(event.data) - _declared_fields(model)
    assert not undeclared, f"{event.type} carries undeclared fields {sorted(undeclared)}"
    model.model_validate(event.data)


def _run(commands: list[tuple[str, dict[str, Any]]]) -> list[Envelope]:
    state = None
    events: list[Envelope] = []
    for n, (kind, data) in enumerate(commands, start=1):
        command = Envelope(
            id=f"cmd_{n}",
            type=kind,
            source="gateway",
            time=f"2025-01-01T00:00:{n:02d}.000Z",
            subject=SID,
            owner="u1",
            data=data,
        )
        result = apply(state, command, n)
        if result.changed:
            state = result.new_state
        events.extend(result.events)
    return events


SCENARIO: list[tuple[str, dict[str, Any]]] = [
    (
        Command.SESSION_CREATE,
        {"metadata": {"k": "v"}, "runner_token_hash": "h", "tags": ["t1"], "prompt_timeout": 2},
    ),
    (Command.PROMPT_SUBMIT, {"prompt_id": "p1", "content": "hi"}),
    (Command.RUNNER_CONNECT, {"connection_id": "c1"}),
    (Command.PROMPT_SUBMIT, {"prompt_id": "p2", "content": "next"}),
    (Command.MESSAGE_COMPLETE, {"prompt_id": "nope", "message_id": "m0", "content": "x"}),
    (Command.MESSAGE_COMPLETE, {"prompt_id": "p1", "message_id": "m1", "content": "hello"}),
    (Command.RUNNER_HEARTBEAT, {"connection_id": "c1", "prompt_id": "p2"}),
    (Command.QUESTION_ASK, {"question_id": "q1", "content": "sure?", "options": ["y", "n"]}),
    (Command.QUESTION_ANSWER, {"question_id": "q1", "answer": "y"}),
    (Command.QUESTION_ASK, {"question_id": "q2", "content": "really?"}),
    (Command.TIMER_FIRE, {"kind": "question", "ref": "q2"}),
    (Command.RUNNER_ERROR, {"connection_id": "c1", "prompt_id": "p2", "message": "boom"}),
    (Command.PROMPT_SUBMIT, {"prompt_id": "p4", "content": "four"}),
    (Command.PROMPT_ABORT, {}),
    (Command.SESSION_UPDATE, {"tags": ["t2"], "metadata": {"k": "w"}}),
    (Command.PROMPT_SUBMIT, {"prompt_id": "p3", "content": "again"}),
    (Command.RUNNER_CONNECT, {"connection_id": "c2"}),
    (Command.RUNNER_DISCONNECT, {"connection_id": "c1"}),
    (Command.RUNNER_DISCONNECT, {"connection_id": "c2"}),
    (Command.SESSION_TERMINATE, {"reason": "done"}),
]


def test_every_emitted_event_is_declared_with_its_fields() -> None:
    events = _run(SCENARIO)
    assert {e.type for e in events} >= {
        Event.SESSION_CREATED,
        Event.PROMPT_QUEUED,
        Event.PROMPT_DISPATCHED,
        Event.MESSAGE_COMPLETED,
        Event.PROMPT_ABORTED,
        Event.COMMAND_REJECTED,
        Event.RUNNER_CONNECTED,
        Event.RUNNER_DISCONNECTED,
        Event.SESSION_STATUS,
        Event.SESSION_TERMINATED,
        Event.SESSION_UPDATED,
        Event.PROMPT_PROGRESS,
        Event.PROMPT_FAILED,
        Event.QUESTION_ASKED,
        Event.QUESTION_ANSWERED,
        Event.QUESTION_EXPIRED,
    }
    for event in events:
        _check(event)


def test_an_undeclared_field_is_caught() -> None:
    event = Envelope(
        id="x",
        type=Event.PROMPT_ABORTED,
        source="session",
        time="t",
        data={"prompt_id": "p", "why": 1},
    )
    with pytest.raises(AssertionError, match="undeclared fields"):
        _check(event)


def test_every_declared_event_is_an_event_type() -> None:
    assert set(EVENT_PAYLOADS) <= {e.value for e in Event}
