"""Durable timers against real PostgreSQL and NATS, with the clock injected (no waiting)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from shoal.common.clock import ManualClock, iso
from shoal.common.errors import BadRequest
from shoal.common.messaging import MSG_ID_HEADER, Catalog, Subjects, loads, provision, request
from shoal.common.observability import start_span
from shoal.common.storage import Database
from shoal.scheduler import Scheduler, TimerService, fire_msg_id
from shoal.scheduler.app import MIGRATIONS, VERSION_TABLE, create_app
from shoal.scheduler.config import SchedulerSettings
from shoal.scheduler.store import JetStreamTimerPublisher, TimerStore


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=time.time())


@pytest.fixture
def settings(nats_url: str, database_url: str, subject_prefix: str) -> SchedulerSettings:
    return SchedulerSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        log_json=False,
        scheduler_poll_interval=timedelta(milliseconds=50),
    )


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(subject_prefix)


@pytest.fixture
async def target(js: JetStreamContext, subject_prefix: str) -> Callable[[str], str]:
    """A stream (limits retention, 2 min dedup window) that timers fire into; subject builder."""
    await js.add_stream(
        StreamConfig(
            name=f"{subject_prefix}_TARGET",
            subjects=[f"{subject_prefix}.target.>"],
            duplicate_window=120,
        )
    )
    return lambda name: f"{subject_prefix}.target.{name}"


@asynccontextmanager
async def running(settings: SchedulerSettings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def scheduler_app(settings: SchedulerSettings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    async with running(settings, clock) as app:
        yield app


@pytest.fixture
async def service(
    settings: SchedulerSettings, js: JetStreamContext, clock: ManualClock, subjects: Subjects
) -> AsyncIterator[TimerService]:
    """The timer service alone (no loop): the test decides when due timers are fired."""
    await provision(js, Catalog.from_settings(settings))
    db = Database(settings.database_url.get_secret_value(), pool_size=2)
    await db.migrate(MIGRATIONS, VERSION_TABLE)
    yield TimerService(TimerStore(db), JetStreamTimerPublisher(js, 2.0), subjects, clock)
    await db.close()


async def fired(js: JetStreamContext, subject: str, expected: int) -> list[Msg]:
    """The messages the JOBS stream holds on ``subject``: waits for ``expected``, proves no more."""
    sub = await js.pull_subscribe(
        subject, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30)
    )
    msgs: list[Msg] = []
    deadline = time.monotonic() + 10
    while len(msgs) < expected and time.monotonic() < deadline:
        try:
            msgs += await sub.fetch(expected - len(msgs), timeout=1)
        except NatsTimeout:
            continue
    with pytest.raises(NatsTimeout):
        msgs += await sub.fetch(1, timeout=0.3)
    await sub.unsubscribe()
    for msg in msgs:
        await msg.ack()
    return msgs


async def set_timer(
    nc: NATS, subjects: Subjects, timer_id: str, fire_at: float, subject: str, payload: Any
) -> Any:
    body = {"id": timer_id, "fire_at": iso(fire_at), "subject": subject, "payload": payload}
    return await request(nc, subjects.rpc("scheduler", "set_timer"), body)


async def cancel_timer(nc: NATS, subjects: Subjects, timer_id: str) -> Any:
    return await request(nc, subjects.rpc("scheduler", "cancel_timer"), {"id": timer_id})


@pytest.mark.usefixtures("scheduler_app")
async def test_a_timer_fires_once_into_its_subject_when_the_clock_reaches_it(
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    later, now = target("later"), target("now")
    reply = await set_timer(nc, subjects, "t-later", clock.now() + 30, later, {"n": 1})
    assert reply == {"id": "t-later", "fire_at": iso(clock.now() + 30)}
    # A timer due now fires while the other, 30 s off on the injected clock, does not.
    await set_timer(nc, subjects, "t-now", clock.now(), now, {"n": 0})
    assert [loads(m.data) for m in await fired(js, now, 1)] == [{"n": 0}]
    assert await fired(js, later, 0) == []

    clock.advance(30)
    (msg,) = await fired(js, later, 1)
    assert loads(msg.data) == {"n": 1}
    assert msg.headers is not None
    stored_fire_at = datetime.fromisoformat(reply["fire_at"])  # RFC 3339 keeps milliseconds
    assert msg.headers[MSG_ID_HEADER] == fire_msg_id("t-later", stored_fire_at)
    # Fired timers are gone: nothing left to cancel.
    assert await cancel_timer(nc, subjects, "t-later") == {"cancelled": False}


@pytest.mark.usefixtures("scheduler_app")
async def test_a_firing_continues_the_trace_of_the_call_that_armed_the_timer(
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    clock: ManualClock,
    target: Callable[[str], str],
    spans: InMemorySpanExporter,
) -> None:
    subject = target("traced")
    caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    caller["tracestate"] = "vendor=opaque"
    with start_span("session.apply", caller) as apply:
        await set_timer(nc, subjects, "t-traced", clock.now() + 5, subject, {"n": 1})
    clock.advance(5)
    (msg,) = await fired(js, subject, 1)

    trace_id = apply.get_span_context().trace_id
    by_name = {span.name: span for span in spans.get_finished_spans()}
    rpc = by_name[f"rpc {subjects.rpc('scheduler', 'set_timer')}"]
    fire = by_name["scheduler.fire"]
    # session.apply -> rpc set_timer -> scheduler.fire -> the fired message, one trace.
    assert rpc.parent is not None
    assert rpc.parent.span_id == apply.get_span_context().span_id
    assert fire.parent is not None
    assert fire.parent.span_id == rpc.context.span_id
    assert {rpc.context.trace_id, fire.context.trace_id} == {trace_id}
    assert fire.attributes is not None
    assert fire.attributes["shoal.timer_id"] == "t-traced"
    assert msg.headers is not None
    assert msg.headers["traceparent"] == f"00-{trace_id:032x}-{fire.context.span_id:016x}-01"
    assert msg.headers["tracestate"] == "vendor=opaque"


async def test_a_timer_armed_outside_a_trace_fires_in_a_trace_of_its_own(
    service: TimerService, js: JetStreamContext, clock: ManualClock, target: Callable[[str], str]
) -> None:
    subject = target("untraced")
    await service.set_timer(
        "t-untraced", datetime.fromtimestamp(clock.now(), tz=UTC), subject, b"x", trace={}
    )
    assert (await service.fire_due()).fired == 1
    (msg,) = await fired(js, subject, 1)
    assert msg.headers is not None
    assert msg.headers["traceparent"].startswith("00-")


@pytest.mark.usefixtures("scheduler_app")
async def test_cancel_disarms_a_timer(
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    subject = target("cancel")
    await set_timer(nc, subjects, "t-a", clock.now() + 10, subject, "a")
    await set_timer(nc, subjects, "t-b", clock.now() + 20, subject, "b")
    assert await cancel_timer(nc, subjects, "t-a") == {"cancelled": True}
    assert await cancel_timer(nc, subjects, "t-a") == {"cancelled": False}
    clock.advance(25)
    assert [loads(m.data) for m in await fired(js, subject, 1)] == ["b"]


@pytest.mark.usefixtures("scheduler_app")
async def test_re_arming_replaces_the_timer(
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    subject = target("rearm")
    await set_timer(nc, subjects, "t-r", clock.now() + 10, subject, "first")
    await set_timer(nc, subjects, "t-r", clock.now() + 60, subject, "second")
    clock.advance(30)
    assert await fired(js, subject, 0) == []
    clock.advance(30)
    assert [loads(m.data) for m in await fired(js, subject, 1)] == ["second"]


@pytest.mark.usefixtures("scheduler_app")
async def test_set_timer_validates_its_input(
    nc: NATS, subjects: Subjects, subject_prefix: str, clock: ManualClock
) -> None:
    good = {"id": "t1", "fire_at": iso(clock.now()), "subject": subjects.job("x"), "payload": 1}
    bad_bodies: list[dict[str, Any]] = [
        {**good, "id": "has.dot"},
        {**good, "fire_at": "tomorrow"},
        {**good, "fire_at": "2030-01-01T00:00:00"},  # no zone
        {**good, "subject": "elsewhere.jobs.x"},
        {**good, "subject": f"{subject_prefix}.jobs.*"},
        {**good, "subject": f"{subject_prefix}.jobs..x"},
        {k: v for k, v in good.items() if k != "subject"},
    ]
    for body in bad_bodies:
        with pytest.raises(BadRequest):
            await request(nc, subjects.rpc("scheduler", "set_timer"), body)


async def test_two_replicas_fire_each_timer_once(
    settings: SchedulerSettings,
    nc: NATS,
    js: JetStreamContext,
    subjects: Subjects,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    subject = target("many")
    async with running(settings, clock), running(settings, clock):
        for i in range(40):
            await set_timer(nc, subjects, f"t{i}", clock.now() + 5, subject, i)
        clock.advance(5)
        msgs = await fired(js, subject, 40)
    assert sorted(loads(m.data) for m in msgs) == list(range(40))


async def test_fire_due_follows_the_injected_clock(
    service: TimerService,
    js: JetStreamContext,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    scheduler: Scheduler = service  # the implementation satisfies the seam
    subject = target("clock")
    fire_at = datetime.fromtimestamp(clock.now(), tz=UTC) + timedelta(seconds=60)
    await scheduler.set_timer("t-clock", fire_at, subject, b"tick")
    assert (await service.fire_due()).fired == 0
    clock.advance(59.9)
    assert (await service.fire_due()).fired == 0
    clock.advance(0.1)
    assert (await service.fire_due()).fired == 1
    assert (await service.fire_due()).fired == 0
    (msg,) = await fired(js, subject, 1)
    assert msg.data == b"tick"


async def test_a_firing_repeated_after_a_crash_is_stored_once(
    service: TimerService,
    js: JetStreamContext,
    clock: ManualClock,
    target: Callable[[str], str],
) -> None:
    subject = target("crash")
    fire_at = datetime.fromtimestamp(clock.now(), tz=UTC)
    await service.set_timer("t-crash", fire_at, subject, b"once")
    # A replica published the firing, then died before deleting the timer.
    await js.publish(subject, b"once", headers={MSG_ID_HEADER: fire_msg_id("t-crash", fire_at)})
    assert (await service.fire_due()).fired == 1
    assert [m.data for m in await fired(js, subject, 1)] == [b"once"]


async def test_a_timer_without_a_stream_is_retried_with_backoff(
    service: TimerService, js: JetStreamContext, subject_prefix: str, clock: ManualClock
) -> None:
    subject = f"{subject_prefix}.nostream.x"
    await service.set_timer(
        "t-retry", datetime.fromtimestamp(clock.now(), tz=UTC), subject, b"late"
    )
    result = await service.fire_due()
    assert (result.fired, result.failed) == (0, 1)
    assert (await service.fire_due()).claimed == 0  # backing off (1 s)
    await js.add_stream(
        StreamConfig(name=f"{subject_prefix}_NOSTREAM", subjects=[f"{subject_prefix}.nostream.>"])
    )
    clock.advance(1)
    assert (await service.fire_due()).fired == 1
    assert [m.data for m in await fired(js, subject, 1)] == [b"late"]


async def test_health_readiness_and_metrics(scheduler_app: FastAPI) -> None:
    import httpx

    transport = httpx.ASGITransport(app=scheduler_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://scheduler") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok", "service": "scheduler"}
        for _ in range(100):  # the database probe's first ping runs in the background
            ready = await client.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert ready.json()["checks"] == {
            "nats": True,
            "database": True,
            "timers": True,
            "leases": True,
            "schedules": True,
            "webhooks": True,
        }
        assert "shoal_scheduler_timers_fired_total" in (await client.get("/metrics")).text
