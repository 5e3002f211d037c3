"""Schedules: create, list, delete, and fire the due ones. No transport.

Each firing has a key, ``<schedule id>:<fire time in ms>`` (:func:`firing_id`). A job target
inserts a job whose idempotency key is that key, in the same transaction that moves the
schedule on, so a firing makes one job however many replicas look. A prompt target publishes a
``prompt.submit`` command to the session's command subject before that commit, with a
``prompt_id`` and ``Nats-Msg-Id`` derived from the key: a pass that dies after the publish and
before the commit fires again with the same ids, and JetStream's duplicate window and the
session's memory of prompt ids drop the copy.

Example::

    created = await schedules.create("alice", {"every": 60, "target": {"job": {"kind": "k"}}})
    fired = await schedules.fire_due()
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shoal.common.clock import Clock, iso
from shoal.common.contracts import Command
from shoal.common.errors import BadRequest, NotFound
from shoal.common.messaging import Envelope, Subjects, encode, is_token, new_id
from shoal.common.observability import inject_trace, start_span
from shoal.scheduler.job_service import JobService
from shoal.scheduler.job_store import insert_job
from shoal.scheduler.schedule_store import Schedule, ScheduleStore
from shoal.scheduler.schedules import (
    SPEC_FIELDS,
    derived_id,
    due_firings,
    firing_id,
    parse_spec,
    parse_target,
)
from shoal.scheduler.service import TimerPublisher

log = logging.getLogger(__name__)

FIRINGS_KEPT = 20
SOURCE = "scheduler"


def to_public(schedule: Schedule, *, with_firings: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": schedule.id,
        **schedule.spec.to_public(),
        "target": schedule.target,
        "next_fire_at": iso(schedule.next_fire_at.timestamp()) if schedule.next_fire_at else None,
        "created_at": iso(schedule.created_at.timestamp()),
    }
    if with_firings:
        out["firings"] = list(schedule.firings)
    return out


class ScheduleService:
    def __init__(
        self,
        store: ScheduleStore,
        jobs: JobService,
        publisher: TimerPublisher,
        subjects: Subjects,
        clock: Clock,
        *,
        skip_grace: timedelta,
        batch_size: int = 100,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._publisher = publisher
        self._subjects = subjects
        self._clock = clock
        self._grace = skip_grace
        self._batch_size = batch_size

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    async def create(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        """Validate everything first (nothing is stored for a bad body), then store."""
        unknown = sorted(set(body) - SPEC_FIELDS)
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(unknown)}", detail={"unknown": unknown})
        now = self._now()
        spec = parse_spec(body, now=now)
        target = parse_target(body.get("target"))
        if "job" in target:
            self._jobs.new_job(owner, target["job"])  # the job's own rules, checked now
        schedule = Schedule(
            id=new_id("sch"),
            owner=owner,
            spec=spec,
            target=target,
            next_fire_at=spec.at or spec.next_after(now),
            created_at=now,
            updated_at=now,
        )
        await self._store.insert(schedule)
        return to_public(schedule)

    async def get(self, owner: str | None, schedule_id: str) -> dict[str, Any]:
        schedule = await self._store.get(schedule_id) if is_token(schedule_id) else None
        if schedule is None or (owner is not None and schedule.owner != owner):
            raise NotFound("schedule not found", detail={"schedule_id": schedule_id})
        return to_public(schedule, with_firings=True)

    async def page(
        self, owner: str | None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        if not 1 <= limit <= 200:
            raise BadRequest("limit must be from 1 to 200")
        if cursor is not None and not is_token(cursor):
            raise BadRequest("cursor must be a page's next")
        found = await self._store.page(owner, limit + 1, cursor)
        page = found[:limit]
        return {
            "schedules": [to_public(s) for s in page],
            "next": page[-1].id if len(found) > limit else None,
        }

    async def delete(self, owner: str | None, schedule_id: str) -> None:
        if not is_token(schedule_id) or not await self._store.delete(schedule_id, owner):
            raise NotFound("schedule not found", detail={"schedule_id": schedule_id})

    async def fire_due(self) -> int:
        """Fire every schedule due by the clock (one batch); how many schedules were due."""
        now = self._now()
        ready: set[str] = set()
        async with self._store.claim_due(now, self._batch_size) as due:
            for schedule in due.schedules:
                assert schedule.next_fire_at is not None  # the query selects due ones
                fire, next_fire_at = due_firings(
                    schedule.spec, schedule.next_fire_at, now, grace=self._grace
                )
                firings = []
                for fire_at in fire:
                    firings.append(await self._fire(due.session, schedule, fire_at, now, ready))
                kept = [*schedule.firings, *firings][-FIRINGS_KEPT:]
                due.advance(schedule, next_fire_at, kept, now)
            count = len(due.schedules)
        for kind in ready:
            await self._jobs.signal_ready(kind)
        return count

    async def _fire(
        self, session: Any, schedule: Schedule, fire_at: datetime, now: datetime, ready: set[str]
    ) -> dict[str, Any]:
        key = firing_id(schedule.id, fire_at)
        record: dict[str, Any] = {"at": iso(fire_at.timestamp()), "fired_at": iso(now.timestamp())}
        if "job" in schedule.target:
            body = {**schedule.target["job"], "idempotency_key": f"schedule:{key}"}
            body.pop("run_at", None)
            # Like a prompt firing, the job starts a trace of its own that its attempts continue.
            with start_span("scheduler.schedule_fire", None, **{"shoal.schedule_id": schedule.id}):
                job = replace(self._jobs.new_job(schedule.owner, body), schedule_id=schedule.id)
            stored, _ = await insert_job(session, job)
            record["job_id"] = stored.id
            ready.add(stored.kind)
            return record
        prompt = schedule.target["prompt"]
        session_id = prompt["session_id"]
        prompt_id = derived_id("prm", schedule.owner, session_id, key)
        command = Envelope(
            id=derived_id("cmd", schedule.owner, session_id, key),
            type=Command.PROMPT_SUBMIT,
            source=SOURCE,
            time=iso(now.timestamp()),
            subject=session_id,
            owner=schedule.owner,
            data={"prompt_id": prompt_id, "content": prompt["content"]},
        )
        # A firing is caused by the clock, not by a request: it starts a trace of its own, which
        # the prompt's command carries on to the session.
        with start_span("scheduler.schedule_fire", None, **{"shoal.schedule_id": schedule.id}):
            await self._publisher.publish(
                self._subjects.session_command(session_id),
                encode(command),
                command.id,
                inject_trace({}),
            )
        record["prompt_id"] = prompt_id
        return record
