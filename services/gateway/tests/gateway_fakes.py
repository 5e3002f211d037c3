"""Stand-ins for the keys and session services, speaking the real protocols over the real NATS.

The session stand-in consumes ``SESSION_CMD``, keeps state in the real ``session-state`` bucket,
publishes to the real ``SESSION_EVT`` ledger and answers on ``Shoal-Reply-To`` exactly as
docs/CONTRACTS.md says, with just enough rules (queue, dispatch, complete) for the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from shoal.common.contracts import (
    QueuedPrompt,
    SessionSnapshot,
    decode_snapshot,
    encode_snapshot,
    public_session,
)
from shoal.common.errors import Conflict, NotFound, ShoalError, Unauthorized
from shoal.common.messaging import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    Catalog,
    Envelope,
    Subjects,
    decode,
    dumps,
    encode,
    provision,
    serve,
)
from shoal.common.settings import CommonSettings
from shoal.gateway.ws import SocketHub

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


class FakeSessionService:
    """A minimal single-writer session service (one process, one consumer, no partitions)."""

    def __init__(self, nc: NATS, settings: CommonSettings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.commands: list[Envelope] = []
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._rpc: Subscription | None = None
        self._psub: Any = None

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
        self._rpc = await serve(
            self.nc, self.subjects.rpc("session", "messages"), "session", self._list_messages
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._rpc is not None:
            await self._rpc.unsubscribe()
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
        await self._publish_event(snap, event_type, data, f"{session_id}:emit:{snap.event_seq}")
        await self._save(snap)
        return snap.event_seq

    async def _run(self, psub: Any) -> None:
        while True:
            try:
                msgs = await psub.fetch(10, timeout=0.2)
            except TimeoutError:  # nats-py raises its own and asyncio's
                continue
            for msg in msgs:
                await self._handle(msg)
                await msg.ack()

    async def _handle(self, msg: Any) -> None:
        env = decode(msg.data)
        self.commands.append(env)
        reply_to = (msg.headers or {}).get(REPLY_TO_HEADER)
        try:
            snap = await self._apply(env, msg.metadata.sequence.stream)
            reply: dict[str, Any] = {
                "ok": True,
                "data": {"session": public_session(snap), "seq": snap.event_seq},
            }
        except ShoalError as exc:
            reply = {"ok": False, "error": exc.to_dict()}
        if reply_to:
            await self.nc.publish(reply_to, dumps(reply))

    async def _apply(self, env: Envelope, stream_seq: int) -> SessionSnapshot:
        sid = env.subject
        snap = await self.snapshot(sid)
        out: list[tuple[str, dict[str, Any]]] = []
        if env.type == "session.create":
            if snap is not None:
                return snap
            snap = SessionSnapshot(
                id=sid,
                owner=env.owner or "",
                created_at=env.time,
                updated_at=env.time,
                metadata=env.data.get("metadata") or {},
                runner_token_hash=env.data["runner_token_hash"],
            )
            out.append(("session.created", {"metadata": snap.metadata}))
        elif snap is None:
            raise NotFound("session not found", detail={"session_id": sid})
        elif env.type == "prompt.submit":
            if snap.status == "terminated":
                raise Conflict("session terminated")
            pid = env.data["prompt_id"]
            if pid in snap.prompt_ids:
                return snap
            snap.prompt_ids.append(pid)
            out.append(("prompt.queued", {"prompt_id": pid, "content": env.data["content"]}))
            snap.queue.append(
                QueuedPrompt(prompt_id=pid, content=env.data["content"], queued_at=env.time)
            )
            self._dispatch(snap, out)
        elif env.type == "runner.connect":
            snap.runner_connected = True
            out.append(("runner.connected", {"connection_id": env.data["connection_id"]}))
            if snap.current_prompt is not None:
                cur = snap.current_prompt
                out.append(
                    ("prompt.dispatched", {"prompt_id": cur.prompt_id, "content": cur.content})
                )
            self._dispatch(snap, out)
        elif env.type == "runner.disconnect":
            snap.runner_connected = False
            out.append(("runner.disconnected", {"connection_id": env.data["connection_id"]}))
        elif env.type == "message.complete":
            data = {
                "message_id": env.data["message_id"],
                "prompt_id": env.data["prompt_id"],
                "role": "assistant",
                "content": env.data["content"],
            }
            out.append(("message.completed", data))
            snap.current_prompt = None
            snap.status = "idle"
            self._dispatch(snap, out)
        snap.updated_at = env.time
        snap.applied_seq = stream_seq
        for n, (event_type, data) in enumerate(out):
            snap.event_seq += 1
            await self._publish_event(snap, event_type, data, f"{sid}:{stream_seq}:{n}")
            if event_type == "message.completed":
                self.messages.setdefault(sid, []).append(
                    {
                        **data,
                        "id": data["message_id"],
                        "created_at": env.time,
                        "seq": snap.event_seq,
                    }
                )
        await self._save(snap)
        return snap

    @staticmethod
    def _dispatch(snap: SessionSnapshot, out: list[tuple[str, dict[str, Any]]]) -> None:
        if snap.runner_connected and snap.current_prompt is None and snap.queue:
            snap.current_prompt = snap.queue.pop(0)
            snap.status = "running"
            cur = snap.current_prompt
            out.append(("prompt.dispatched", {"prompt_id": cur.prompt_id, "content": cur.content}))

    async def _publish_event(
        self, snap: SessionSnapshot, event_type: str, data: dict[str, Any], msg_id: str
    ) -> None:
        env = Envelope(
            id=msg_id,
            type=event_type,
            source="session",
            time=snap.updated_at,
            subject=snap.id,
            owner=snap.owner,
            seq=snap.event_seq,
            data=data,
        )
        await self.js.publish(
            self.subjects.session_event(snap.id, event_type),
            encode(env),
            headers={MSG_ID_HEADER: msg_id},
        )

    async def _save(self, snap: SessionSnapshot) -> None:
        assert self._kv is not None
        await self._kv.put(snap.id, encode_snapshot(snap))

    async def _list_messages(self, body: dict[str, Any]) -> dict[str, Any]:
        after = body.get("after") or 0
        limit = int(body.get("limit") or 50)
        items = [m for m in self.messages.get(body["session_id"], []) if m["seq"] > after][:limit]
        return {"messages": items, "next": items[-1]["seq"] if len(items) == limit else None}


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
