"""All I/O of the session service: the state bucket, the event ledger, replies, PostgreSQL.

Example::

    states = StateStore(await js.key_value(subjects.session_state_bucket))
    snapshot, revision = await states.load("ses_1")          # (None, 0) when absent
    revision = await states.save(new_snapshot, revision)     # CAS; raises Fenced on a lost race
    await EventLedger(js, subjects).publish(result.events, headers)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    Table,
    Text,
    case,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert

from shoal.common.clock import iso
from shoal.common.contracts import Event, SessionSnapshot, Status, decode_snapshot, encode_snapshot
from shoal.common.errors import Fenced
from shoal.common.messaging import MSG_ID_HEADER, Envelope, Subjects, dumps, encode
from shoal.common.storage import DatabaseClient

log = logging.getLogger(__name__)


class StateStore:
    """The ``session-state`` bucket: one key per session, written only by compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def load(self, session_id: str) -> tuple[SessionSnapshot | None, int]:
        """The session's snapshot and KV revision; ``(None, 0)`` if it has none."""
        try:
            entry = await self._kv.get(session_id)
        except KeyNotFoundError:  # also covers a deleted key (KeyDeletedError)
            return None, 0
        if entry.value is None:
            return None, 0
        return decode_snapshot(entry.value), int(entry.revision or 0)

    async def save(self, snapshot: SessionSnapshot, revision: int) -> int:
        """Write ``snapshot`` if the key is still at ``revision`` (0 = must not exist yet).

        Returns the new revision. Raises :class:`Fenced` when someone else wrote in between.
        """
        value = encode_snapshot(snapshot)
        try:
            if revision == 0:
                return int(await self._kv.create(snapshot.id, value))
            return int(await self._kv.update(snapshot.id, value, last=revision))
        except KeyWrongLastSequenceError as exc:
            raise Fenced(
                "session state changed under this writer",
                detail={"session_id": snapshot.id, "expected_revision": revision},
            ) from exc


class EventLedger:
    """Publishes session events to SESSION_EVT, each deduplicated by its id."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subjects = subjects

    async def publish(self, events: Sequence[Envelope], headers: Mapping[str, str]) -> None:
        """Publish in order, awaiting each PubAck (a duplicate ack counts as published)."""
        for event in events:
            await self._js.publish(
                self._subjects.session_event(event.subject, event.type),
                encode(event),
                stream=self._subjects.session_evt_stream,
                headers={**headers, MSG_ID_HEADER: event.id},
            )


class Replier:
    """Answers a command's ``Shoal-Reply-To`` inbox over core NATS."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def reply(self, inbox: str, body: dict[str, Any]) -> None:
        await self._nc.publish(inbox, dumps(body))


# -- PostgreSQL: the projection of SESSION_EVT (rebuildable by replaying the ledger) --
metadata = MetaData()

session_messages = Table(
    "session_messages",
    metadata,
    Column("id", Text, primary_key=True),  # the event id: re-projecting is a no-op
    Column("session_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("prompt_id", Text),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_session_messages_session_seq", "session_id", "seq", unique=True),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Seq of the event that set ``status``: an older event arriving late never overwrites it.
    Column("last_seq", BigInteger, nullable=False),
    Index("ix_sessions_owner_created", "owner", "created_at"),
)


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    seq: int
    prompt_id: str | None
    role: str
    content: str
    created_at: str


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


class HistoryStore:
    """The ``session_messages`` and ``sessions`` tables."""

    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def project(self, events: Sequence[Envelope]) -> None:
        """Write the rows these events imply, in one transaction; safe to repeat."""
        messages: list[dict[str, Any]] = []
        index: list[dict[str, Any]] = []
        for event in events:
            row = _message_row(event)
            if row is not None:
                messages.append(row)
            row = _session_row(event)
            if row is not None:
                index.append(row)
        if not messages and not index:
            return
        async with self._db.session() as s, s.begin():
            if messages:
                await s.execute(insert(session_messages).on_conflict_do_nothing(), messages)
            # One statement per row, in ledger order, so a batch holding two updates of the
            # same session applies them in turn.
            for row in index:
                await s.execute(_upsert_session(row))

    async def messages(self, session_id: str, after: int, limit: int) -> list[MessageRow]:
        """Up to ``limit`` messages with ``seq > after``, oldest first."""
        query = (
            select(session_messages)
            .where(session_messages.c.session_id == session_id, session_messages.c.seq > after)
            .order_by(session_messages.c.seq)
            .limit(limit)
        )
        async with self._db.session() as s:
            rows = (await s.execute(query)).mappings().all()
        return [
            MessageRow(
                id=r["id"],
                seq=int(r["seq"]),
                prompt_id=r["prompt_id"],
                role=r["role"],
                content=r["content"],
                created_at=iso(r["created_at"].timestamp()),
            )
            for r in rows
        ]


def _message_row(event: Envelope) -> dict[str, Any] | None:
    if event.type == Event.PROMPT_QUEUED:
        role = "user"
    elif event.type == Event.MESSAGE_COMPLETED:
        role = str(event.data.get("role") or "assistant")
    else:
        return None
    return {
        "id": event.id,
        "session_id": event.subject,
        "seq": int(event.seq or 0),
        "prompt_id": event.data.get("prompt_id"),
        "role": role,
        "content": str(event.data.get("content") or ""),
        "created_at": _ts(event.time),
    }


def _session_row(event: Envelope) -> dict[str, Any] | None:
    if event.type == Event.SESSION_CREATED:
        status = str(Status.IDLE)
    elif event.type == Event.SESSION_STATUS:
        status = str(event.data.get("status") or Status.IDLE)
    elif event.type == Event.SESSION_TERMINATED:
        status = str(Status.TERMINATED)
    else:
        return None
    at = _ts(event.time)
    return {
        "id": event.subject,
        "owner": event.owner or "",
        "status": status,
        "created_at": at,
        "updated_at": at,
        "last_seq": int(event.seq or 0),
    }


def _upsert_session(row: dict[str, Any]) -> Any:
    stmt = insert(sessions).values(**row)
    new = stmt.excluded
    newer = sessions.c.last_seq < new.last_seq
    return stmt.on_conflict_do_update(
        index_elements=[sessions.c.id],
        set_={
            # created_at converges on the earliest event seen (session.created), whatever order
            # the events arrive in; status and updated_at follow the newest event only.
            "created_at": func.least(sessions.c.created_at, new.created_at),
            "status": case((newer, new.status), else_=sessions.c.status),
            "updated_at": case((newer, new.updated_at), else_=sessions.c.updated_at),
            "last_seq": func.greatest(sessions.c.last_seq, new.last_seq),
        },
    )
