"""All I/O of the session service: the state bucket, the event ledger, replies, PostgreSQL.

Example::

    states = StateStore(await js.key_value(subjects.session_state_bucket))
    snapshot, revision = await states.load("ses_1")          # (None, 0) when absent
    revision = await states.save(new_snapshot, revision)     # CAS; raises Fenced on a lost race
    appended = await EventLedger(js, subjects).publish(events, headers, after=snapshot.ledger_seq)
    lease = await LeaseStore(js, subjects).grant(3, LeaseValue(owner="r1"), last=0, ttl=4)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
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
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert

from shoal.common.clock import iso
from shoal.common.contracts import Event, SessionSnapshot, Status, decode_snapshot, encode_snapshot
from shoal.common.errors import BadRequest, Fenced
from shoal.common.messaging import (
    LEDGER_SEQ_HEADER,
    MSG_ID_HEADER,
    Envelope,
    Subjects,
    commit_body,
    decode,
    dumps,
    encode,
    ledger_last_seq,
    request,
)
from shoal.common.messaging.catalog import KV_VALUE_LIMIT
from shoal.common.storage import DatabaseClient
from shoal.session.service import LedgerCommand

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
                detail={"session_id": snapshot.id, "expected_revision": revision, "fence": "state"},
            ) from exc


# Server 2.11+: the expected last sequence is checked over every subject matching this filter
# (the whole session's ledger, ``<prefix>.session.evt.<session>.>``), not the one subject.
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
# JSStreamWrongLastSequenceErrF / ...ConstantErr: the expected-sequence check failed.
_WRONG_LAST_SEQUENCE = (10071, 10164)


# On every commit: the command itself (base64 of its envelope) and its sequence in SESSION_CMD,
# so the ledger alone can rebuild the state (service.replay).
COMMAND_HEADER = "Shoal-Command"
COMMAND_SEQ_HEADER = "Shoal-Command-Seq"
# A commit stays below SESSION_EVT's message limit with room for the other headers (trace,
# tags, fence). Commands whose events and command do not fit (multi-hundred-KiB contents) are
# written as several commits and/or without the command header (:meth:`EventLedger.publish`).
COMMIT_BUDGET = KV_VALUE_LIMIT - 64 * 1024


def command_headers(command: Envelope, stream_seq: int) -> dict[str, str]:
    """The headers recording ``command`` on its commit."""
    return {
        COMMAND_HEADER: base64.b64encode(encode(command)).decode("ascii"),
        COMMAND_SEQ_HEADER: str(stream_seq),
    }


@dataclass(frozen=True, slots=True)
class LedgerTip:
    """The last message of one session in SESSION_EVT: its stream sequence, ``Nats-Msg-Id``
    (a commit's first event id, or an older message's one event id), its last event's seq,
    and whether it records a command."""

    seq: int
    msg_id: str
    last_event_seq: int | None
    has_command: bool


@dataclass(frozen=True, slots=True)
class Appended:
    """What :meth:`EventLedger.publish` left in the ledger: the stream sequence of the command's
    last message, and whether that message records the command (else the caller must write
    the snapshot before answering: a replay could not rebuild this state)."""

    seq: int
    recorded: bool


def _commit_end(sizes: Sequence[int], start: int, budget: int) -> int:
    """The end (exclusive) of the commit starting at event ``start``: as many events as fit
    in ``budget`` bytes, at least one."""
    end, total = start + 1, sizes[start]
    while end < len(sizes) and total + 1 + sizes[end] <= budget:
        total += 1 + sizes[end]
        end += 1
    return end


class EventLedger:
    """Appends one command's events to SESSION_EVT as one commit, fenced on the session's
    ledger position (format: ``shoal.common.messaging.ledger``).

    The commit is published with ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence
    of the session's previous message, checked over the session's whole subject tree. A writer
    working from a stale snapshot therefore cannot append: the ledger moved past what it read.
    The server checks the expectation *before* deduplication, so a legitimate re-run after a
    crash between publish and state write (its commit already appended, the snapshot not yet
    recording it) is recognised here: the ledger's tip is this very command's commit (its
    ``Nats-Msg-Id`` is the first event's id; deterministic re-runs give the same events), or,
    in a ledger an older version wrote one message per event, one of its events — publishing
    then resumes after it.
    """

    def __init__(
        self, js: JetStreamContext, subjects: Subjects, *, budget: int = COMMIT_BUDGET
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._budget = budget

    async def tip(self, session_id: str) -> LedgerTip | None:
        """The session's last message in the ledger (read from the stream leader)."""
        try:
            msg = await self._js.get_last_msg(
                self._subjects.session_evt_stream, self._subjects.session_events(session_id)
            )
        except NotFoundError:
            return None
        headers = msg.headers or {}
        return LedgerTip(
            int(msg.seq or 0),
            headers.get(MSG_ID_HEADER, ""),
            ledger_last_seq(msg.data or b"", headers),
            COMMAND_HEADER in headers,
        )

    async def commands_after(self, session_id: str, after: int) -> list[LedgerCommand]:
        """The commands recorded in the session's ledger after sequence ``after``, in order
        (one read per message of the tail; messages without a command header are skipped)."""
        ledger_filter = self._subjects.session_events(session_id)
        found: list[LedgerCommand] = []
        seq = after + 1
        while True:
            try:
                msg = await self._js.get_msg(
                    self._subjects.session_evt_stream, seq, subject=ledger_filter, next=True
                )
            except NotFoundError:
                return found
            at = int(msg.seq or 0)
            headers = msg.headers or {}
            if COMMAND_HEADER in headers and COMMAND_SEQ_HEADER in headers:
                try:
                    command = decode(base64.b64decode(headers[COMMAND_HEADER]))
                    found.append(LedgerCommand(at, command, int(headers[COMMAND_SEQ_HEADER])))
                except (BadRequest, ValueError, binascii.Error):
                    log.warning("unreadable command header at ledger seq %d; skipped", at)
            seq = at + 1

    async def publish(
        self,
        events: Sequence[Envelope],
        headers: Mapping[str, str],
        *,
        after: int,
        command: Mapping[str, str] | None = None,
    ) -> Appended:
        """Append ``events`` (one command's, in seq order) right after ledger sequence ``after``.

        ``after`` is the sequence the snapshot recorded (0: the session has no message yet);
        ``command`` (:func:`command_headers`) goes on the commit. One commit normally; only
        events too big for one message are split over several (each fenced on the previous),
        and a command too big to ride along is left out (``Appended.recorded`` False).
        Raises :class:`Fenced` when someone else appended to this session's ledger.
        """
        if not events:
            return Appended(after, False)
        session_id = events[0].subject
        ledger_filter = self._subjects.session_events(session_id)
        subject = self._subjects.session_commit(session_id)
        stream = self._subjects.session_evt_stream
        bodies = [encode(e) for e in events]
        sizes = [len(b) for b in bodies]
        command_size = sum(len(k) + len(v) for k, v in (command or {}).items())
        expected, i, recorded = after, 0, False
        # Each reconciliation moves i forward or raises; the bound is a guard against a bug.
        for _ in range(2 * len(events) + 2):
            if i >= len(events):
                return Appended(expected, recorded)
            end = _commit_end(sizes, i, self._budget)
            body = commit_body(bodies[i:end])
            with_command = (
                command is not None
                and end == len(events)
                and len(body) + command_size <= self._budget
            )
            try:
                ack = await self._js.publish(
                    subject,
                    body,
                    stream=stream,
                    headers={
                        **headers,
                        **(command if with_command and command is not None else {}),
                        MSG_ID_HEADER: events[i].id,
                        LEDGER_SEQ_HEADER: str(events[end - 1].seq or 0),
                        EXPECTED_LAST_SUBJECT_SEQ: str(expected),
                        EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: ledger_filter,
                    },
                )
            except APIError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise
                tip = await self.tip(session_id)
                resume = _resume_after(events, tip)
                if tip is None or resume is None:
                    raise Fenced(
                        "the session's ledger moved under this writer",
                        detail={
                            "session_id": session_id,
                            "expected_seq": expected,
                            "ledger_seq": tip.seq if tip else 0,
                            "fence": "ledger",
                        },
                    ) from exc
                expected, i, recorded = tip.seq, resume, tip.has_command
                continue
            expected, i, recorded = int(ack.seq), end, with_command
        if i >= len(events):
            return Appended(expected, recorded)
        raise RuntimeError("ledger reconciliation did not converge")  # pragma: no cover


def _resume_after(events: Sequence[Envelope], tip: LedgerTip | None) -> int | None:
    """The index of the first of ``events`` not in the ledger yet when ``tip`` is one of this
    command's own messages (a commit, or one event of an older ledger); None if it is not."""
    if tip is None:
        return None
    first = next((n for n, e in enumerate(events) if e.id == tip.msg_id), None)
    if first is None:
        return None
    last = next(
        (n for n, e in enumerate(events) if n >= first and e.seq == tip.last_event_seq), first
    )
    return last + 1


class LeaseValue(msgspec.Struct, kw_only=True):
    """The value of a partition's lease key. ``epoch`` is 0 in the grant itself (its own
    revision is only known from the ack) and set by every renewal."""

    owner: str
    token: str = ""  # this process's incarnation: one replica name restarted is a new holder
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a lease key holds now: the revision to compare-and-set on, and the lease if live.

    ``value`` is None when the key is free (never written, released, or expired: the server
    leaves a ``MaxAge`` marker); ``revision`` is then the marker's (0 if none)."""

    revision: int
    value: LeaseValue | None

    @property
    def epoch(self) -> int:
        if self.value is None:
            return 0
        return self.value.epoch or self.revision


_lease_encoder = msgspec.json.Encoder()
_lease_decoder = msgspec.json.Decoder(LeaseValue)
_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"


class LeaseStore:
    """The ``session-leases`` bucket: key = partition, value = :class:`LeaseValue`, with a TTL.

    Writes are raw publishes to ``$KV.<bucket>.<key>`` carrying both
    ``Nats-Expected-Last-Subject-Sequence`` (compare-and-set on the revision) and ``Nats-TTL``:
    nats-py's ``update`` takes no TTL (DESIGN §8). Reads go to the stream leader.
    """

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._bucket = subjects.session_leases_bucket
        self._stream = f"KV_{self._bucket}"

    def _subject(self, partition: int) -> str:
        return f"$KV.{self._bucket}.{partition}"

    async def read(self, partition: int) -> LeaseRecord:
        try:
            msg = await self._js.get_last_msg(self._stream, self._subject(partition))
        except NotFoundError:
            return LeaseRecord(0, None)
        headers = msg.headers or {}
        if _KV_OPERATION in headers or _MARKER_REASON in headers or not msg.data:
            return LeaseRecord(int(msg.seq or 0), None)
        try:
            return LeaseRecord(int(msg.seq or 0), _lease_decoder.decode(msg.data))
        except msgspec.DecodeError:
            log.warning("unreadable lease for partition %d; treating it as held", partition)
            return LeaseRecord(int(msg.seq or 0), LeaseValue(owner="?"))

    async def read_all(self, partitions: int) -> dict[int, LeaseRecord]:
        records = await asyncio.gather(*(self.read(p) for p in range(partitions)))
        return dict(enumerate(records))

    async def write(self, partition: int, value: LeaseValue, *, last: int, ttl: int) -> int | None:
        """Grant or renew: the new revision, or None when the key is not at ``last`` any more."""
        try:
            ack = await self._js.publish(
                self._subject(partition),
                _lease_encoder.encode(value),
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(last)},
                msg_ttl=ttl,
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    async def release(self, partition: int, *, last: int) -> bool:
        """Delete the lease if it is still at revision ``last`` (ours); False if it was not."""
        try:
            await self._js.publish(
                self._subject(partition),
                b"",
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(last), _KV_OPERATION: "DEL"},
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True


class MemberStore:
    """The ``session-members`` bucket: one key per live replica, kept alive by TTL heartbeats."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv
        self._bucket = subjects.session_members_bucket

    async def heartbeat(self, member_id: str, value: bytes, *, ttl: int) -> None:
        await self._js.publish(f"$KV.{self._bucket}.{member_id}", value, msg_ttl=ttl)

    async def leave(self, member_id: str) -> None:
        await self._kv.delete(member_id)

    async def live(self) -> list[str]:
        """Members whose last heartbeat has not expired (expiry markers count as gone)."""
        try:
            return sorted(await self._kv.keys())
        except NoKeysError:
            return []


def partition_consumer(partition: int, epoch: int) -> str:
    """The durable consumer of one partition under one lease epoch.

    A new owner deletes its predecessor's consumer and creates its own: on a work-queue stream
    the new one starts at the ack floor (acked commands are gone), redelivering at once and in
    order whatever the old owner held unacked — no wait for ``ack_wait``, and never a later
    command of a session before an earlier one. A paused old owner's fetches and acks then
    reach a consumer that no longer exists.
    """
    return f"session-p{partition}-e{epoch}"


def _consumer_partition(name: str) -> int | None:
    """The partition of a session consumer name (``session-p<p>`` or ``session-p<p>-e<n>``)."""
    if not name.startswith("session-p"):
        return None
    head = name[len("session-p") :].split("-e", 1)[0]
    return int(head) if head.isdigit() else None


class PartitionConsumers:
    """Creates, finds and deletes the per-partition consumers on SESSION_CMD."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subjects = subjects
        self._stream = subjects.session_cmd_stream

    async def existing(self) -> dict[int, list[str]]:
        """Session partition consumers on the stream, by partition."""
        found: dict[int, list[str]] = {}
        offset = 0
        while True:
            page = await self._js.consumers_info(self._stream, offset=offset)
            for info in page:
                name = info.name or ""
                p = _consumer_partition(name)
                if p is not None:
                    found.setdefault(p, []).append(name)
            if len(page) < 256:  # the server's page size
                return found
            offset += len(page)

    async def open(
        self,
        partition: int,
        epoch: int,
        config: ConsumerConfig,
        existing: list[str],
    ) -> str:
        """Replace the partition's consumer by this epoch's; its name."""
        name = partition_consumer(partition, epoch)
        for old in existing:
            if old != name:
                await self.delete_named(old)
        config.name = config.durable_name = name
        config.filter_subject = self._subjects.session_partition_filter(partition)
        config.ack_policy = AckPolicy.EXPLICIT
        config.deliver_policy = DeliverPolicy.ALL
        await self._js.add_consumer(self._stream, config)
        return name

    async def delete_named(self, name: str) -> None:
        try:
            await self._js.delete_consumer(self._stream, name)
        except NotFoundError:
            pass

    async def lag(self, partition: int, epoch: int) -> tuple[int, int] | None:
        """(pending, ack_pending) of the partition's consumer under ``epoch``, if it exists."""
        try:
            info = await self._js.consumer_info(self._stream, partition_consumer(partition, epoch))
        except NotFoundError:
            return None
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)


class Replier:
    """Answers a command's ``Shoal-Reply-To`` inbox over core NATS."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def reply(self, inbox: str, body: dict[str, Any]) -> None:
        await self._nc.publish(inbox, dumps(body))


class SchedulerTimers:
    """The scheduler's durable timers, through its RPCs: ``set`` replaces a timer of the same
    id (idempotent), ``cancel`` of an unknown id is a no-op. Errors are raised (the command
    handler retries them like any other I/O).

    At most ``concurrency`` calls are in flight from this replica: each is a database write
    in the scheduler, and a burst of thousands (sessions created at once) would otherwise time
    out together and come back as a storm of retries. A call waits for its turn here instead.
    """

    def __init__(
        self, nc: NATS, subjects: Subjects, *, timeout: float = 5.0, concurrency: int = 32
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._timeout = timeout
        self._turns = asyncio.Semaphore(concurrency)

    async def set(self, timer_id: str, fire_at: str, subject: str, payload: dict[str, Any]) -> None:
        body = {"id": timer_id, "fire_at": fire_at, "subject": subject, "payload": payload}
        await self._call("set_timer", body)

    async def cancel(self, timer_id: str) -> None:
        await self._call("cancel_timer", {"id": timer_id})

    async def _call(self, method: str, body: dict[str, Any]) -> None:
        async with self._turns:
            await request(
                self._nc, self._subjects.rpc("scheduler", method), body, timeout=self._timeout
            )


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
    Column("tags", ARRAY(Text), nullable=False, server_default="{}"),
    # Seq of the event that set ``tags`` (session.created or session.updated), same rule.
    Column("tags_seq", BigInteger, nullable=False, server_default="0"),
    # Pages run newest first on (created_at, id); these serve one owner, one owner's status,
    # and (admin keys) everyone.
    Index("ix_sessions_owner_created_id", "owner", "created_at", "id"),
    Index("ix_sessions_owner_status_created_id", "owner", "status", "created_at", "id"),
    Index("ix_sessions_created_id", "created_at", "id"),
)


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    seq: int
    prompt_id: str | None
    role: str
    content: str
    created_at: str


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One session of the index (the projection's view: it follows the ledger)."""

    id: str
    owner: str
    status: str
    tags: list[str]
    created_at: datetime
    updated_at: datetime


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


class HistoryStore:
    """The ``session_messages`` and ``sessions`` tables."""

    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def project(self, events: Sequence[Envelope]) -> None:
        """Write the rows these events imply, in one transaction; safe to repeat.

        Two statements per batch whatever its size: the messages, and one row per session
        (its events merged first: the upsert keeps the earliest creation and the newest
        status, so merging in memory gives what applying them one by one would).
        """
        messages: list[dict[str, Any]] = []
        index: dict[str, dict[str, Any]] = {}
        for event in events:
            row = _message_row(event)
            if row is not None:
                messages.append(row)
            row = _session_row(event)
            if row is not None:
                index[row["id"]] = _merge_session_rows(index.get(row["id"]), row)
        if not messages and not index:
            return
        async with self._db.session() as s, s.begin():
            if messages:
                await s.execute(_INSERT_MESSAGES, messages)
            if index:
                await s.execute(_UPSERT_SESSIONS, list(index.values()))

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

    async def list_sessions(
        self,
        owner: str | None,
        status: str | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SessionRow]:
        """Up to ``limit`` sessions, newest first by ``(created_at, id)``, strictly before
        ``before``; ``owner`` None = every owner's."""
        query = select(sessions)
        if owner is not None:
            query = query.where(sessions.c.owner == owner)
        if status is not None:
            query = query.where(sessions.c.status == status)
        if before is not None:
            query = query.where(tuple_(sessions.c.created_at, sessions.c.id) < tuple_(*before))
        query = query.order_by(sessions.c.created_at.desc(), sessions.c.id.desc()).limit(limit)
        async with self._db.session() as s:
            rows = (await s.execute(query)).mappings().all()
        return [
            SessionRow(
                id=r["id"],
                owner=r["owner"],
                status=r["status"],
                tags=list(r["tags"] or []),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
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
    """The index row an event implies. ``last_seq`` / ``tags_seq`` are the seqs of the events
    that set ``status`` / ``tags`` (0: this event sets neither), so rows merge in any order."""
    seq = int(event.seq or 0)
    status, status_seq = str(Status.IDLE), 0
    if event.type == Event.SESSION_CREATED:
        status_seq = seq
    elif event.type == Event.SESSION_STATUS:
        status, status_seq = str(event.data.get("status") or Status.IDLE), seq
    elif event.type == Event.SESSION_TERMINATED:
        status, status_seq = str(Status.TERMINATED), seq
    elif event.type != Event.SESSION_UPDATED:
        return None
    tags = event.data.get("tags")
    has_tags = event.type in (Event.SESSION_CREATED, Event.SESSION_UPDATED) and isinstance(
        tags, list
    )
    if not status_seq and not has_tags:
        return None
    at = _ts(event.time)
    return {
        "id": event.subject,
        "owner": event.owner or "",
        "status": status,
        "created_at": at,
        "updated_at": at,
        "last_seq": status_seq,
        "tags": [str(t) for t in tags] if has_tags and isinstance(tags, list) else [],
        "tags_seq": seq if has_tags else 0,
    }


def _merge_session_rows(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Two index rows of one session as the upsert would leave them, in either order."""
    if old is None:
        return new
    by_status = new if new["last_seq"] > old["last_seq"] else old
    by_tags = new if new["tags_seq"] > old["tags_seq"] else old
    return {
        **by_status,
        "tags": by_tags["tags"],
        "tags_seq": by_tags["tags_seq"],
        "created_at": min(old["created_at"], new["created_at"]),
        "updated_at": max(old["updated_at"], new["updated_at"]),
        "owner": by_status["owner"] or old["owner"],
    }


_INSERT_MESSAGES = insert(session_messages).on_conflict_do_nothing()


def _upsert_sessions() -> Any:
    stmt = insert(sessions)
    new = stmt.excluded
    newer = sessions.c.last_seq < new.last_seq
    newer_tags = sessions.c.tags_seq < new.tags_seq
    return stmt.on_conflict_do_update(
        index_elements=[sessions.c.id],
        set_={
            # created_at converges on the earliest event seen (session.created), whatever order
            # the events arrive in; status and tags each follow the newest event that set them.
            "created_at": func.least(sessions.c.created_at, new.created_at),
            "status": case((newer, new.status), else_=sessions.c.status),
            "updated_at": func.greatest(sessions.c.updated_at, new.updated_at),
            "last_seq": func.greatest(sessions.c.last_seq, new.last_seq),
            "tags": case((newer_tags, new.tags), else_=sessions.c.tags),
            "tags_seq": func.greatest(sessions.c.tags_seq, new.tags_seq),
        },
    )


_UPSERT_SESSIONS = _upsert_sessions()
