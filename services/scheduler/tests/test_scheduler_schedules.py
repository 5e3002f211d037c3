"""Schedules against real PostgreSQL and NATS, the clock injected: firing, restarts, prompts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import SecretStr

from shoal.common.clock import ManualClock
from shoal.common.errors import BadRequest, NotFound
from shoal.common.messaging import MSG_ID_HEADER, Subjects, decode, request
from shoal.scheduler.app import create_app
from shoal.scheduler.config import SchedulerSettings

pytestmark = pytest.mark.timeout(60)


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
        scheduler_sweep_interval=timedelta(milliseconds=50),
        scheduler_schedule_skip_grace=timedelta(seconds=5),
    )


@asynccontextmanager
async def running(settings: SchedulerSettings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


class Rpc:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc, self.subjects = nc, subjects

    async def __call__(self, method: str, **body: Any) -> Any:
        return await request(self.nc, self.subjects.rpc("scheduler", method), body)

    async def fired(self, kind: str, clock: ManualClock, seconds: float) -> list[dict[str, Any]]:
        """Advance the clock, wait for the firing's jobs.ready broadcast, list the jobs."""
        ready = await self.nc.subscribe(self.subjects.broadcast(f"jobs.ready.{kind}"))
        clock.advance(seconds)
        await ready.next_msg(timeout=10)
        await ready.unsubscribe()
        return list((await self("jobs.list", owner="alice", kind=kind))["jobs"])


@pytest.fixture
def rpc(nc: NATS, subject_prefix: str) -> Rpc:
    return Rpc(nc, Subjects(subject_prefix))


async def test_an_every_schedule_starts_jobs_and_shows_its_firings(
    settings: SchedulerSettings, clock: ManualClock, rpc: Rpc
) -> None:
    async with running(settings, clock):
        body = {"every": 10, "target": {"job": {"kind": "tick", "input": {"n": 1}}}}
        created = await rpc("schedules.create", owner="alice", schedule=body)
        assert created["every"] == 10
        assert created["catch_up"] == "once"
        (job,) = await rpc.fired("tick", clock, 10)
        assert job["schedule_id"] == created["id"]
        assert job["input"] == {"n": 1}
        shown = await rpc("schedules.get", owner="alice", id=created["id"])
        assert [f["job_id"] for f in shown["firings"]] == [job["id"]]
        assert (await rpc("schedules.list", owner="alice"))["schedules"][0]["id"] == created["id"]
        with pytest.raises(NotFound):
            await rpc("schedules.get", owner="bob", id=created["id"])
        with pytest.raises(NotFound):
            await rpc("schedules.delete", owner="bob", id=created["id"])
        assert await rpc("schedules.delete", owner="alice", id=created["id"]) == {"deleted": True}
        assert (await rpc("schedules.list", owner="alice"))["schedules"] == []


async def test_bad_schedules_create_nothing(
    settings: SchedulerSettings, clock: ManualClock, rpc: Rpc
) -> None:
    async with running(settings, clock):
        for bad in (
            {"cron": "nope", "target": {"job": {"kind": "k"}}},
            {"every": 5, "target": {"job": {"kind": "k", "max_attempts": 99}}},
            {"every": 5, "target": {"job": {"kind": "k"}}, "colour": "red"},
            {"at": "2001-01-01T00:00:00Z", "target": {"job": {"kind": "k"}}},
        ):
            with pytest.raises(BadRequest):
                await rpc("schedules.create", owner="alice", schedule=bad)
        assert (await rpc("schedules.list", owner="alice"))["schedules"] == []


@pytest.mark.parametrize(("catch_up", "after_restart"), [("all", 4), ("once", 1), ("skip", 1)])
async def test_a_restart_honours_catch_up(
    settings: SchedulerSettings, clock: ManualClock, rpc: Rpc, catch_up: str, after_restart: int
) -> None:
    body = {"every": 10, "catch_up": catch_up, "target": {"job": {"kind": "beat"}}}
    async with running(settings, clock):
        await rpc("schedules.create", owner="alice", schedule=body)
        assert len(await rpc.fired("beat", clock, 10)) == 1
    # Down for 4 firings (+20 .. +50); the first pass at +52 s finds +50 within the 5 s grace.
    clock.advance(42)
    ready = await rpc.nc.subscribe(rpc.subjects.broadcast("jobs.ready.beat"))
    async with running(settings, clock):
        await ready.next_msg(timeout=10)
        jobs = (await rpc("jobs.list", owner="alice", kind="beat"))["jobs"]
    await ready.unsubscribe()
    assert len(jobs) == 1 + after_restart


async def test_two_replicas_fire_each_firing_once(
    settings: SchedulerSettings, clock: ManualClock, rpc: Rpc
) -> None:
    async with running(settings, clock), running(settings, clock):
        body = {"every": 1, "catch_up": "all", "target": {"job": {"kind": "pair"}}}
        await rpc("schedules.create", owner="alice", schedule=body)
        for n in range(1, 11):
            jobs = await rpc.fired("pair", clock, 1)
            assert len(jobs) == n


async def test_a_prompt_schedule_sends_a_deduplicable_prompt_command(
    settings: SchedulerSettings, clock: ManualClock, rpc: Rpc, js: JetStreamContext
) -> None:
    subjects = Subjects(settings.subject_prefix)
    async with running(settings, clock):
        body = {"every": 10, "target": {"prompt": {"session_id": "ses_1", "content": "nightly"}}}
        created = await rpc("schedules.create", owner="alice", schedule=body)
        sub = await js.pull_subscribe(
            f"{subjects.prefix}.session.cmd.>",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
            stream=subjects.session_cmd_stream,
        )
        clock.advance(10)
        (msg,) = await sub.fetch(1, timeout=10)
        # The firing is recorded once the prompt is published: it may trail the message.
        for _ in range(200):
            shown = await rpc("schedules.get", owner="alice", id=created["id"])
            if shown["firings"]:
                break
            await asyncio.sleep(0.05)
    command = decode(msg.data)
    assert (command.type, command.subject, command.owner) == ("prompt.submit", "ses_1", "alice")
    assert command.data["content"] == "nightly"
    assert msg.headers is not None
    assert msg.headers[MSG_ID_HEADER] == command.id
    assert shown["firings"][0]["prompt_id"] == command.data["prompt_id"]
    await sub.unsubscribe()
