"""Stand-ins for the keys and session services, speaking the real protocols over the real NATS.

The session stand-in consumes ``SESSION_CMD``, applies the session service's own rules, keeps
state in the real ``session-state`` bucket, publishes to the real ``SESSION_EVT`` ledger and
answers on ``Shoal-Reply-To`` exactly as docs/CONTRACTS.md says.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from shoal.common.contracts import (
    SessionSnapshot,
    Status,
    decode_snapshot,
    encode_snapshot,
    public_session,
)
from shoal.common.errors import Conflict, NotFound, ShoalError, Unauthorized
from shoal.common.messaging import (
    LEDGER_SEQ_HEADER,
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    Catalog,
    Envelope,
    Subjects,
    decode,
    dumps,
    encode_commit,
    provision,
    serve,
)
from shoal.common.settings import CommonSettings
from shoal.gateway.ws import SocketHub
from shoal.session.listing import parse_sessions_query, sessions_page
from shoal.session.service import apply

KEYS: dict[str, dict[str, Any]] = {
    "key-alice": {"key_id": "k-alice", "owner": "alice", "scopes": ["sessions"], "name": "alice"},
    "key-bob": {"key_id": "k-bob", "owner": "bob", "scopes": ["sessions"], "name": "bob"},
    "key-admin": {"key_id": "k-admin", "owner": "admin", "scopes": ["admin"], "name": "admin"},
}


class FakeKeys:
    """``rpc("keys","verify")`` over a dict; counts calls so tests can see the cache work."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self.keys = {k: dict(v) for k, v in KEYS.items()}
        self.calls = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await serve(self.nc, self.subjects.rpc("keys", "verify"), "keys", self.verify)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def verify(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        found = self.keys.get(str(body.get("key")))
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    async def revoke(self, key: str) -> None:
        entry = self.keys.pop(key)
        await self.nc.publish(
            self.subjects.broadcast("keys.revoked"), dumps({"key_id": entry["key_id"]})
        )
        await self.nc.flush()


Script = Callable[[SessionSnapshot | None, Envelope], ShoalError | None]


class FakeSessionService:
    """The real session rules (``shoal.session.service.apply``) behind one consumer: no
    partitions, leases or ledger fence, so gateway tests run against what the session service
    decides without starting it.

    ``scripts`` stands in for rules a test needs before the session service has them: a
    command type mapped to a function that may change the snapshot it is given (the fake saves
    it) and returns the error to answer with, or None for an applied reply.
    """

    def __init__(self, nc: NATS, settings: CommonSettings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.commands: list[Envelope] = []
        self.scripts: dict[str, Script] = {}
        self._took = asyncio.Condition()
        self.admin_calls: list[tuple[str, dict[str, Any]]] = []
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._rpcs: list[Subscription] = []
        self._psub: Any = None
        self._stopping = False

    async def start(self) -> None:
        await provision(self.js, Catalog.from_settings(self.settings))
        self._kv = await self.js.key_value(self.subjects.session_state_bucket)
        psub = await self.js.pull_subscribe(
            f"{self.subjects.prefix}.session.cmd.>",
            durable="fake-session",
            stream=self.subjects.session_cmd_stream,
        )
        self._psub = psub
        self._task = asyncio.create_task(self._run(psub))
        handlers: dict[str, Any] = {
            "messages": self._list_messages,
            "list": self._list_sessions,
            "admin.partitions": self._admin_partitions,
            "admin.session": self._admin_session,
        }
        for method, handler in handlers.items():
            self._rpcs.append(
                await serve(self.nc, self.subjects.rpc("session", method), "session", handler)
            )

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11, asyncio.wait_for (inside nats-py's
        # next_msg) swallows a cancel that lands as its message arrives, and the loop would go on.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._rpcs:
            await sub.unsubscribe()
        if self._psub is not None:
            await self._psub.unsubscribe()

    async def snapshot(self, session_id: str) -> SessionSnapshot | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(session_id)
        except Exception:
            return None
        return decode_snapshot(entry.value) if entry.value else None

    async def emit(self, session_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Append an event to the session's ledger (bumps its seq), as the session service would."""
        snap = await self.snapshot(session_id)
        assert snap is not None
        snap.event_seq += 1
        await self._publish(
            [self._event(snap, event_type, data, f"{session_id}:emit:{snap.event_seq}")]
        )
        await self._save(snap)
        return snap.event_seq

    async def took(self, kind: str) -> Envelope:
        """The first command of ``kind`` taken (waits up to 5 s: some are sent without a reply)."""
        async with asyncio.timeout(5), self._took:
            await self._took.wait_for(lambda: any(c.type == kind for c in self.commands))
            return next(c for c in self.commands if c.type == kind)

    async def _run(self, psub: Any) -> None:
        while not self._stopping:
            try:
                msgs = await psub.fetch(10, timeout=0.2)
            except TimeoutError:  # nats-py raises its own and asyncio's
                continue
            for msg in msgs:
                await self._handle(msg)
                await msg.ack()

    async def _handle(self, msg: Any) -> None:
        env = decode(msg.data)
        async with self._took:
            self.commands.append(env)
            self._took.notify_all()
        reply_to = (msg.headers or {}).get(REPLY_TO_HEADER)
        snap = await self.snapshot(env.subject)
        script = self.scripts.get(env.type)
        if script is not None:
            reply = await self._scripted(script, snap, env)
        else:
            result = apply(snap, env, msg.metadata.sequence.stream)
            if result.events:
                await self._publish(result.events)
            if result.changed and result.new_state is not None:
                await self._save(result.new_state)
            reply = result.reply
        if reply_to:
            await self.nc.publish(reply_to, dumps(reply))

    async def _scripted(
        self, script: Script, snap: SessionSnapshot | None, env: Envelope
    ) -> dict[str, Any]:
        if snap is None:  # what the rules answer before any command's own rule runs
            error: ShoalError | None = NotFound("session not found")
        elif snap.status == Status.TERMINATED:
            error = Conflict("session is terminated", detail={"session_id": snap.id})
        else:
            error = script(snap, env)
        if error is not None:
            return {"ok": False, "error": error.to_dict()}
        assert snap is not None
        snap.updated_at = env.time
        await self._save(snap)
        return {"ok": True, "data": {"session": public_session(snap), "seq": snap.event_seq}}

    @staticmethod
    def _event(
        snap: SessionSnapshot, event_type: str, data: dict[str, Any], msg_id: str
    ) -> Envelope:
        return Envelope(
            id=msg_id,
            type=event_type,
            source="session",
            time=snap.updated_at,
            subject=snap.id,
            owner=snap.owner,
            seq=snap.event_seq,
            data=data,
        )

    async def _publish(self, events: list[Envelope]) -> None:
        """One commit per command, as the session service writes the ledger."""
        for event in events:
            if event.type == "message.completed":
                self.messages.setdefault(event.subject, []).append(
                    {
                        **event.data,
                        "id": event.data["message_id"],
                        "created_at": event.time,
                        "seq": event.seq,
                    }
                )
        await self.js.publish(
            self.subjects.session_commit(events[0].subject),
            encode_commit(events),
            headers={MSG_ID_HEADER: events[0].id, LEDGER_SEQ_HEADER: str(events[-1].seq)},
        )

    async def _save(self, snap: SessionSnapshot) -> None:
        assert self._kv is not None
        await self._kv.put(snap.id, encode_snapshot(snap))

    async def _list_messages(self, body: dict[str, Any]) -> dict[str, Any]:
        after = body.get("after") or 0
        limit = int(body.get("limit") or 50)
        items = [m for m in self.messages.get(body["session_id"], []) if m["seq"] > after][:limit]
        return {"messages": items, "next": items[-1]["seq"] if len(items) == limit else None}

    async def _list_sessions(self, body: dict[str, Any]) -> dict[str, Any]:
        """The index from the state bucket, paged by the session service's own listing rules."""
        assert self._kv is not None
        query = parse_sessions_query(body)
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            keys = []
        rows = []
        for key in keys:
            snap = await self.snapshot(key)
            if snap is None or (query.owner is not None and snap.owner != query.owner):
                continue
            if query.status is not None and snap.status != query.status:
                continue
            row = _IndexRow(snap.id, datetime.fromisoformat(snap.created_at), snap)
            if query.before is None or (row.created_at, row.id) < query.before:
                rows.append(row)
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        page, next_cursor = sessions_page(rows[: query.limit + 1], query.limit)
        return {
            "sessions": [
                {
                    "id": r.snapshot.id,
                    "owner": r.snapshot.owner,
                    "status": r.snapshot.status,
                    "tags": r.snapshot.tags,
                    "created_at": r.snapshot.created_at,
                    "updated_at": r.snapshot.updated_at,
                }
                for r in page
            ],
            "next": next_cursor,
        }

    async def _admin_partitions(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        self.admin_calls.append(("admin.partitions", body))
        return [
            {
                "partition": p,
                "owner": "fake",
                "epoch": 1,
                "lease_revision": 1,
                "lag": 0,
                "in_flight": 0,
            }
            for p in range(self.settings.session_partitions)
        ]

    async def _admin_session(self, body: dict[str, Any]) -> dict[str, Any]:
        self.admin_calls.append(("admin.session", body))
        snap = await self.snapshot(str(body.get("session_id")))
        if snap is None:
            raise NotFound("session not found", detail={"session_id": body.get("session_id")})
        return {
            "session_id": snap.id,
            "partition": 0,
            "owner": "fake",
            "epoch": 1,
            "revision": 1,
            "applied_seq": snap.applied_seq,
            "event_seq": snap.event_seq,
            "ledger_seq": snap.ledger_seq,
            "status": snap.status,
            "session_owner": snap.owner,
        }


@dataclass(frozen=True)
class _IndexRow:
    id: str
    created_at: datetime
    snapshot: SessionSnapshot


async def flood_until_cut_off(
    sessions: FakeSessionService, session_id: str, hub: SocketHub
) -> None:
    """Emit 48 KiB deltas to ``session_id`` until the gateway has cut off every socket (a
    client that stopped reading gets 4408), then wait for the hub to be empty."""
    big = "y" * (48 * 1024)
    for _ in range(400):
        await sessions.emit(session_id, "message.delta", {"text": big})
        if len(hub) == 0:
            break
    async with asyncio.timeout(20):
        await hub.wait_empty()
