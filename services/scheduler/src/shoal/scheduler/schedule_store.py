"""All SQL of schedules: the ``schedules`` table and ``SKIP LOCKED`` claims of due ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from shoal.common.storage import DatabaseClient
from shoal.scheduler.schedules import Spec

metadata = sa.MetaData()

# Mirrors migrations/0003_schedules.py; the migration, not this table, creates the schema.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("spec", postgresql.JSONB, nullable=False),
    sa.Column("target", postgresql.JSONB, nullable=False),
    sa.Column("next_fire_at", sa.DateTime(timezone=True)),
    sa.Column("firings", postgresql.JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class Schedule:
    id: str
    owner: str
    spec: Spec
    target: dict[str, Any]
    next_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime
    firings: tuple[dict[str, Any], ...] = ()


def _spec_json(spec: Spec) -> dict[str, Any]:
    return {
        "cron": spec.cron,
        "every": spec.every_s,
        "at": spec.at.isoformat() if spec.at else None,
        "timezone": spec.timezone,
        "catch_up": spec.catch_up,
        "anchor": spec.anchor.isoformat() if spec.anchor else None,
    }


def _spec(data: dict[str, Any]) -> Spec:
    return Spec(
        cron=data.get("cron"),
        every_s=data.get("every"),
        at=datetime.fromisoformat(data["at"]) if data.get("at") else None,
        timezone=data.get("timezone") or "UTC",
        catch_up=data.get("catch_up") or "once",
        anchor=datetime.fromisoformat(data["anchor"]) if data.get("anchor") else None,
    )


def _schedule(row: sa.RowMapping) -> Schedule:
    return Schedule(
        id=row["id"],
        owner=row["owner"],
        spec=_spec(row["spec"]),
        target=row["target"],
        next_fire_at=row["next_fire_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        firings=tuple(row["firings"]),
    )


@dataclass
class DueSchedules:
    """Due schedules locked by one transaction; the caller fires them in ``session`` (jobs
    it inserts commit with the schedule's new ``next_fire_at``) and records each with
    :meth:`advance`."""

    session: AsyncSession
    schedules: list[Schedule]
    _updates: list[tuple[str, datetime | None, list[dict[str, Any]], datetime]] = field(
        default_factory=list
    )

    def advance(
        self,
        schedule: Schedule,
        next_fire_at: datetime | None,
        firings: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        self._updates.append((schedule.id, next_fire_at, firings, now))


class ScheduleStore:
    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def insert(self, schedule: Schedule) -> None:
        async with self._db.session() as session, session.begin():
            await session.execute(
                sa.insert(schedules).values(
                    id=schedule.id,
                    owner=schedule.owner,
                    spec=_spec_json(schedule.spec),
                    target=schedule.target,
                    next_fire_at=schedule.next_fire_at,
                    firings=list(schedule.firings),
                    created_at=schedule.created_at,
                    updated_at=schedule.updated_at,
                )
            )

    async def get(self, schedule_id: str) -> Schedule | None:
        async with self._db.session() as session:
            result = await session.execute(
                sa.select(schedules).where(schedules.c.id == schedule_id)
            )
            row = result.mappings().first()
        return _schedule(row) if row is not None else None

    async def page(self, owner: str | None, limit: int, before: str | None) -> list[Schedule]:
        query = sa.select(schedules).order_by(schedules.c.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(schedules.c.owner == owner)
        if before is not None:
            query = query.where(schedules.c.id < before)
        async with self._db.session() as session:
            result = await session.execute(query)
            return [_schedule(row) for row in result.mappings().all()]

    async def delete(self, schedule_id: str, owner: str | None) -> bool:
        query = sa.delete(schedules).where(schedules.c.id == schedule_id)
        if owner is not None:
            query = query.where(schedules.c.owner == owner)
        async with self._db.session() as session, session.begin():
            result = await session.execute(query)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    @asynccontextmanager
    async def claim_due(self, now: datetime, limit: int) -> AsyncIterator[DueSchedules]:
        """Lock up to ``limit`` schedules due by ``now`` (``SKIP LOCKED``: replicas take
        disjoint ones); on exit store their new times and firings in the same transaction."""
        query = (
            sa.select(schedules)
            .where(schedules.c.next_fire_at <= now)
            .order_by(schedules.c.next_fire_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._db.session() as session, session.begin():
            result = await session.execute(query)
            due = DueSchedules(session, [_schedule(row) for row in result.mappings().all()])
            yield due
            for schedule_id, next_fire_at, firings, at in due._updates:
                await session.execute(
                    sa.update(schedules)
                    .where(schedules.c.id == schedule_id)
                    .values(next_fire_at=next_fire_at, firings=firings, updated_at=at)
                )
