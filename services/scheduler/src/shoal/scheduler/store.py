"""All I/O of the scheduler: the ``timers`` table and the JetStream publish of a firing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from sqlalchemy.dialects import postgresql

from shoal.common.errors import NotFound, Timeout, Unavailable
from shoal.common.messaging import MSG_ID_HEADER
from shoal.common.observability import trace_carrier
from shoal.common.storage import DatabaseClient

metadata = sa.MetaData()

# Mirrors migrations/0001_initial.py; the migration, not this table, creates the schema.
timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("traceparent", sa.Text),  # migrations/0005
    sa.Column("tracestate", sa.Text),
)


@dataclass(frozen=True, slots=True)
class Timer:
    id: str
    subject: str
    payload: bytes
    fire_at: datetime  # when it was meant to fire: part of its dedup id
    due_at: datetime  # when to try next (fire_at, or later after a failed publish)
    created_at: datetime
    attempts: int = 0
    last_error: str | None = None
    # The W3C trace context of the call that armed it: the firing continues that trace.
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def trace_headers(self) -> dict[str, str]:
        """The stored trace context as message headers (empty when there is none)."""
        return trace_carrier(self.traceparent, self.tracestate)


@dataclass
class Claim:
    """Due timers locked by one transaction; record what became of each before it ends."""

    timers: list[Timer]
    _fired: list[str] = field(default_factory=list)
    _retries: list[tuple[str, datetime, str]] = field(default_factory=list)

    def fired(self, timer: Timer) -> None:
        self._fired.append(timer.id)

    def retry(self, timer: Timer, due_at: datetime, error: str) -> None:
        self._retries.append((timer.id, due_at, error[:1000]))


class TimerStore:
    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def upsert(self, timer: Timer) -> None:
        """Arm ``timer``, replacing a pending timer of the same id."""
        values = {
            "id": timer.id,
            "subject": timer.subject,
            "payload": timer.payload,
            "fire_at": timer.fire_at,
            "due_at": timer.due_at,
            "attempts": 0,
            "last_error": None,
            "created_at": timer.created_at,
            "traceparent": timer.traceparent,
            "tracestate": timer.tracestate,
        }
        stmt = postgresql.insert(timers).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[timers.c.id],
            set_={k: stmt.excluded[k] for k in values if k != "id"},
        )
        async with self._db.session() as session, session.begin():
            await session.execute(stmt)

    async def delete(self, timer_id: str) -> bool:
        async with self._db.session() as session, session.begin():
            result = await session.execute(sa.delete(timers).where(timers.c.id == timer_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def get(self, timer_id: str) -> Timer | None:
        async with self._db.session() as session:
            result = await session.execute(sa.select(timers).where(timers.c.id == timer_id))
            row = result.mappings().first()
        return _timer(row) if row is not None else None

    @asynccontextmanager
    async def claim_due(self, now: datetime, limit: int) -> AsyncIterator[Claim]:
        """Lock up to ``limit`` timers due by ``now``; on exit delete the fired ones and
        reschedule the failed ones, in the same transaction.

        ``SKIP LOCKED``: replicas claim disjoint timers, so a timer is fired by one replica at a
        time. The publishes happen while the rows are locked and before the commit; a crash in
        between fires the timer again later with the same ``Nats-Msg-Id``, which the target
        stream's duplicate window drops.
        """
        query = (
            sa.select(timers)
            .where(timers.c.due_at <= now)
            .order_by(timers.c.due_at, timers.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._db.session() as session, session.begin():
            result = await session.execute(query)
            claim = Claim([_timer(row) for row in result.mappings().all()])
            yield claim
            if claim._fired:
                await session.execute(sa.delete(timers).where(timers.c.id.in_(claim._fired)))
            for timer_id, due_at, error in claim._retries:
                await session.execute(
                    sa.update(timers)
                    .where(timers.c.id == timer_id)
                    .values(due_at=due_at, attempts=timers.c.attempts + 1, last_error=error)
                )


def _timer(row: sa.RowMapping) -> Timer:
    return Timer(
        id=row["id"],
        subject=row["subject"],
        payload=bytes(row["payload"]),
        fire_at=row["fire_at"],
        due_at=row["due_at"],
        created_at=row["created_at"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
    )


class JetStreamTimerPublisher:
    """Publishes a firing with JetStream; maps NATS failures onto :mod:`shoal.common.errors`."""

    def __init__(self, js: JetStreamContext, timeout: float) -> None:
        self._js = js
        self._timeout = timeout

    async def publish(
        self, subject: str, payload: bytes, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> None:
        try:
            await self._js.publish(
                subject,
                payload,
                timeout=self._timeout,
                headers={**(headers or {}), MSG_ID_HEADER: msg_id},
            )
        except (NoStreamResponseError, NoRespondersError) as exc:
            # Specific to this timer's subject: other timers can still fire.
            raise NotFound(f"no stream stores {subject}") from exc
        except (NatsTimeout, TimeoutError) as exc:
            raise Timeout(f"JetStream did not ack a publish to {subject}") from exc
        except Exception as exc:  # nats-py raises unrelated types while (re)connecting
            raise Unavailable(f"publish to {subject} failed: {exc}") from exc
