"""Durable timers end to end, in one process: the session service sets them through a real
scheduler (PostgreSQL, its clock injected so no test waits for a timeout) and their firings
come back as ``timer.fire`` commands: hibernation and waking, question expiry, the watchdog."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

import msgspec
import pytest
from _session_support import Gateway, eventually, load_state, read_events, running
from fastapi import FastAPI
from nats.js import JetStreamContext
from pydantic import SecretStr

from shoal.common.clock import ManualClock, iso
from shoal.common.contracts import Event, Status
from shoal.common.messaging import Envelope, Subjects
from shoal.scheduler.app import create_app as create_scheduler
from shoal.scheduler.config import SchedulerSettings
from shoal.session.config import SessionSettings


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=time.time())


@pytest.fixture
async def scheduler(
    nats_url: str,
    database_url: str,
    subject_prefix: str,
    clock: ManualClock,
    settings: SessionSettings,
) -> AsyncIterator[FastAPI]:
    scheduler_settings = SchedulerSettings(
        environment="test",
        session_partitions=settings.session_partitions,
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        log_json=False,
        scheduler_poll_interval=timedelta(milliseconds=50),
    )
    app = create_scheduler(scheduler_settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def session_app(settings: SessionSettings, scheduler: FastAPI) -> AsyncIterator[FastAPI]:
    async with running(settings.model_copy(update={"session_timers": True})) as app:
        yield app


def advance_past(clock: ManualClock, when: float) -> None:
    """Move the scheduler's clock just past ``when`` (timers are due from command times, which
    are wall-clock: the injected clock starts at the wall clock, but set-up takes a while)."""
    clock.advance(max(0.0, when + 0.5 - clock.now()))


async def events_of(js: JetStreamContext, subjects: Subjects, sid: str) -> list[Envelope]:
    return await read_events(js, subjects, sid, settle=0.1)


async def wait_for_event(
    js: JetStreamContext, subjects: Subjects, sid: str, event_type: str, count: int = 1
) -> list[Envelope]:
    found = await eventually(
        lambda: events_of(js, subjects, sid),
        lambda events: sum(e.type == event_type for e in events) >= count,
    )
    return [e for e in found if e.type == event_type]


@pytest.mark.usefixtures("session_app")
async def test_an_idle_session_hibernates_leaves_memory_and_wakes_on_a_prompt(
    js: JetStreamContext,
    gateway: Gateway,
    subjects: Subjects,
    clock: ManualClock,
    session_app: FastAPI,
) -> None:
    sid = "ses_hib"
    reply = await gateway.send(sid, "session.create", {"idle_timeout": 5})
    assert reply["ok"]
    assert reply["data"]["session"]["idle_timeout"] == 5
    advance_past(clock, time.time() + 5)
    [hibernated] = await wait_for_event(js, subjects, sid, Event.SESSION_STATUS)
    assert hibernated.data == {"status": "hibernated"}
    worker = session_app.state.session.worker
    await eventually(lambda: _lanes(worker), lambda n: n == 0)  # its lane left at once

    reply = await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "hi"})
    assert reply["data"]["session"]["status"] == Status.IDLE
    assert reply["data"]["session"]["queued_prompts"] == 1
    statuses = [e.data["status"] for e in await events_of(js, subjects, sid) if "status" in e.data]
    assert statuses == ["hibernated", "idle"]


async def _lanes(worker: object) -> int:
    partitions = worker._partitions.values()  # type: ignore[attr-defined]
    return sum(len(part.lanes or ()) for part in partitions)


@pytest.mark.usefixtures("session_app")
async def test_a_question_expires_on_the_scheduler_and_an_answer_after_it_is_refused(
    js: JetStreamContext, gateway: Gateway, subjects: Subjects, clock: ManualClock
) -> None:
    sid = "ses_q"
    await gateway.send(sid, "session.create", {})
    await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "hi"})
    expires = iso(time.time() + 30)
    reply = await gateway.send(
        sid, "question.ask", {"question_id": "q1", "content": "ok?", "expires_at": expires}
    )
    assert reply["data"]["session"]["status"] == Status.WAITING_INPUT
    advance_past(clock, time.time() + 30)
    [expired] = await wait_for_event(js, subjects, sid, Event.QUESTION_EXPIRED)
    assert expired.data == {"question_id": "q1"}
    state = await load_state(js, subjects, sid)
    assert (state.status, state.questions) == (Status.RUNNING, [])
    late = await gateway.send(sid, "question.answer", {"question_id": "q1", "answer": "yes"})
    assert late["error"]["code"] == "conflict"


@pytest.mark.usefixtures("session_app")
async def test_the_watchdog_fails_a_silent_prompt_and_the_next_one_runs(
    js: JetStreamContext, gateway: Gateway, subjects: Subjects, clock: ManualClock
) -> None:
    sid = "ses_wd"
    await gateway.send(sid, "session.create", {"prompt_timeout": 60})
    await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "a"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "b"})
    advance_past(clock, time.time() + 60)
    [failed] = await wait_for_event(js, subjects, sid, Event.PROMPT_FAILED)
    assert failed.data["prompt_id"] == "p1"
    assert failed.data["reason"] == "timeout"
    state = await load_state(js, subjects, sid)
    assert state.current_prompt is not None
    assert state.current_prompt.prompt_id == "p2"
    dispatched = [
        e.data["prompt_id"]
        for e in await events_of(js, subjects, sid)
        if e.type == Event.PROMPT_DISPATCHED
    ]
    assert dispatched == ["p1", "p2"]
    assert msgspec.structs.asdict(state)["prompt_timeout"] == 60
