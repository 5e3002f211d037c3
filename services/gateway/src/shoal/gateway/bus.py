"""All of the gateway's NATS I/O: commands with applied replies, snapshot reads, RPCs, event feeds.

The gateway never writes session state: it publishes commands to ``SESSION_CMD`` (durable once
JetStream acknowledged them), waits for the session service's applied reply on a per-gateway
inbox, reads snapshots from the ``session-state`` bucket and follows the ``SESSION_EVT`` ledger
through ``fanout`` (one live subscription per session per gateway, ledger reads by direct get).

Example::

    bus = Bus(nc, Subjects("shoal"), settings, encode=encode_event)
    await bus.start()
    outcome = await bus.send_command(envelope, wait=True)
    feed = await bus.follow_session(session_id)      # history, then live, in stream order
    event = await feed.next()
    await feed.close(); await bus.stop()
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from shoal.common.contracts import SessionSnapshot, decode_snapshot
from shoal.common.errors import BadRequest, ShoalError, Timeout, Unavailable, error_from_dict
from shoal.common.messaging import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    Envelope,
    Subjects,
    decode,
    dumps,
    encode,
    ledger_raw_events,
    loads,
    request,
)
from shoal.common.observability import inject_trace
from shoal.gateway.config import GatewaySettings
from shoal.gateway.fanout import SEQUENCE_HEADER, FrameEncoder, LedgerReader, LiveFeed, LiveHub
from shoal.gateway.ledger import start_sequence
from shoal.gateway.service import CommandOutcome, SessionEventMsg
from shoal.gateway.views import Applied, AppliedReply

log = logging.getLogger(__name__)

_applied_reply = msgspec.json.Decoder(AppliedReply)


def _stream_seq(msg: Msg) -> int | None:
    """The stream sequence of a direct-get answer (its ``Nats-Sequence`` header)."""
    value = (msg.headers or {}).get(SEQUENCE_HEADER)
    return int(value) if value is not None and value.isdigit() else None


class _ReplyMux:
    """One wildcard inbox subscription for every applied reply this gateway waits for."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}.cmd"
        self._waiting: dict[str, asyncio.Future[AppliedReply]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except NatsError:
                pass

    def open(self) -> tuple[str, asyncio.Future[AppliedReply]]:
        token = secrets.token_hex(8)
        future: asyncio.Future[AppliedReply] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return f"{self._prefix}.{token}", future

    def discard(self, inbox: str) -> None:
        self._waiting.pop(inbox.rsplit(".", 1)[-1], None)

    async def _on_reply(self, msg: Msg) -> None:
        # A redelivered command answers again: a token nobody waits for is simply dropped.
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is None or future.done():
            return
        try:
            future.set_result(_applied_reply.decode(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(Unavailable(f"malformed applied reply: {exc}"))


class Bus:
    """The gateway's NATS client: one per process, built in the app's lifespan."""

    def __init__(
        self, nc: NATS, subjects: Subjects, settings: GatewaySettings, *, encode: FrameEncoder
    ) -> None:
        """``encode``: how a live event's frame is built, once for every socket (``fanout``)."""
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=settings.publish_timeout.total_seconds())
        self._subjects = subjects
        self._settings = settings
        self._replies = _ReplyMux(nc)
        self._kv: KeyValue | None = None
        self._subs: list[Subscription] = []
        timeout = settings.rpc_timeout.total_seconds()
        self._live = LiveHub(
            nc,
            encode=encode,
            buffer=settings.ws_send_queue,
            buffer_bytes=max(64 * 1024, settings.ws_send_queue_bytes // 8),
            by_stream_seq=(subjects.deliver_live_all[:-1],),
        )
        self._session_ledger = LedgerReader(nc, subjects.session_evt_stream, timeout=timeout)
        self._deliver_ledger = LedgerReader(nc, subjects.deliver_stream, timeout=timeout)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def start(self) -> None:
        await self._replies.start()
        await self._live.start()

    async def stop(self) -> None:
        await self._live.stop()
        await self._replies.stop()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NatsError:
                pass
        self._subs.clear()

    # -- RPC --
    async def verify_key(self, key: str) -> dict[str, Any]:
        data = await request(
            self._nc,
            self._subjects.rpc("keys", "verify"),
            {"key": key},
            timeout=self._settings.rpc_timeout.total_seconds(),
        )
        return dict(data or {})

    async def keys_rpc(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """``rpc("keys", method)``. Bodies and replies may hold secret values: never log them."""
        data = await request(
            self._nc,
            self._subjects.rpc("keys", method),
            body,
            timeout=self._settings.rpc_timeout.total_seconds(),
        )
        return dict(data or {})

    async def list_messages(self, session_id: str, after: int | None, limit: int) -> dict[str, Any]:
        data = await request(
            self._nc,
            self._subjects.rpc("session", "messages"),
            {"session_id": session_id, "after": after, "limit": limit},
            timeout=self._settings.rpc_timeout.total_seconds(),
        )
        return dict(data or {})

    async def session_rpc(self, method: str, body: dict[str, Any]) -> Any:
        """``rpc("session", method)``: the session index (``list``) and introspection."""
        return await request(
            self._nc,
            self._subjects.rpc("session", method),
            body,
            timeout=self._settings.rpc_timeout.total_seconds(),
        )

    async def read_events(
        self, session_id: str, after: int, limit: int
    ) -> tuple[list[SessionEventMsg], bool]:
        """Up to ``limit`` ledger events of the session with seq > ``after``, in seq order, and
        whether more follow. Positioned by :func:`start_sequence`, read by batched direct gets."""
        ledger = self._subjects.session_events(session_id)
        stream = self._subjects.session_evt_stream
        position = await start_sequence(self._js, stream, ledger, after) or 1
        found: list[SessionEventMsg] = []
        last = after
        while True:
            msgs, at_end = await self._session_ledger.read(ledger, position)
            for msg in msgs:
                try:
                    raws = ledger_raw_events(msg.data)  # a commit, or an older single event
                except BadRequest:
                    raws = []
                for raw in raws:
                    try:
                        envelope = decode(raw)
                    except BadRequest:
                        log.warning("malformed event in the ledger of %s; skipped", session_id)
                        continue
                    seq = envelope.seq or 0
                    if seq <= last:
                        continue  # older events of the commit, or a copy re-published later
                    if len(found) == limit:
                        return found, True
                    found.append(SessionEventMsg(seq, envelope, raw))
                    last = seq
            stream_seq = _stream_seq(msgs[-1]) if msgs else None
            if at_end or stream_seq is None:
                return found, False
            position = stream_seq + 1

    async def on_key_revoked(self, callback: Callable[[str], Awaitable[None] | None]) -> None:
        """Call ``callback(key_id)`` for every ``keys.revoked`` broadcast."""

        async def on_msg(msg: Msg) -> None:
            try:
                body = loads(msg.data)
            except ShoalError:
                log.warning("malformed keys.revoked broadcast")
                return
            key_id = body.get("key_id") if isinstance(body, dict) else None
            if isinstance(key_id, str):
                result = callback(key_id)
                if result is not None:
                    await result

        self._subs.append(
            await self._nc.subscribe(self._subjects.broadcast("keys.revoked"), cb=on_msg)
        )

    # -- session state --
    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        """The session's snapshot, or None if it does not exist (yet)."""
        try:
            if self._kv is None:
                self._kv = await self._js.key_value(self._subjects.session_state_bucket)
            entry = await self._kv.get(session_id)
        except KeyNotFoundError:
            return None
        except BucketNotFoundError as exc:
            raise Unavailable("session state bucket is missing") from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot read session state: {exc}") from exc
        if entry.value is None:
            return None
        return decode_snapshot(entry.value)

    # -- commands --
    async def send_command(self, envelope: Envelope, *, wait: bool) -> CommandOutcome:
        """Publish a command; with ``wait``, return once the session service applied it.

        Raises :class:`Unavailable` when JetStream did not store it, :class:`Timeout` when it
        was stored but not confirmed within ``command_timeout`` (it will still be applied), or
        the error the session service answered with.
        """
        headers = inject_trace({MSG_ID_HEADER: envelope.id})
        inbox: str | None = None
        future: asyncio.Future[AppliedReply] | None = None
        if wait:
            inbox, future = self._replies.open()
            headers[REPLY_TO_HEADER] = inbox
        try:
            try:
                ack = await self._js.publish(
                    self._subjects.session_command(envelope.subject),
                    encode(envelope),
                    stream=self._subjects.session_cmd_stream,
                    headers=headers,
                )
            except (NatsError, TimeoutError) as exc:
                raise Unavailable(f"command not stored: {exc}") from exc
            duplicate = bool(ack.duplicate)
            if future is None or duplicate:
                return CommandOutcome(stream_seq=ack.seq, duplicate=duplicate, applied=None)
            try:
                reply = await asyncio.wait_for(
                    future, self._settings.command_timeout.total_seconds()
                )
            except TimeoutError as exc:
                raise Timeout(
                    "the session service did not confirm the command in time; it stays queued",
                    detail={"command_id": envelope.id, "session_id": envelope.subject},
                ) from exc
            if not reply.ok:
                raise error_from_dict(reply.error or {})
            applied = reply.data if reply.data is not None else Applied()
            return CommandOutcome(stream_seq=ack.seq, duplicate=False, applied=applied)
        finally:
            if inbox is not None:
                self._replies.discard(inbox)

    # -- events --
    async def follow_session(
        self,
        session_id: str,
        *,
        new_only: bool = False,
        event_type: str | None = None,
        since: int = 0,
    ) -> LiveFeed:
        """The session's events after ``since`` (history, then live), or only new ones.

        Live events come from this gateway's one subscription per session (``fanout``), the
        history and any repair from the ledger by batched direct gets: no consumer per socket.
        ``since`` > 0 starts the replay at the first event with a higher seq (found by
        :func:`start_sequence`), so a resume reads only what it needs, however long the ledger.
        ``event_type`` returns only events of that type.
        """
        ledger = self._subjects.session_events(session_id)
        live = self._subjects.session_live(session_id)
        if new_only:
            return await LiveFeed.open(
                self._live,
                self._session_ledger,
                live=live,
                ledger=ledger,
                last=0,
                pos=None,
                event_type=event_type,
            )
        start = await start_sequence(self._js, self._subjects.session_evt_stream, ledger, since)
        return await LiveFeed.open(
            self._live,
            self._session_ledger,
            live=live,
            ledger=ledger,
            last=since,
            pos=start or 1,
            event_type=event_type,
        )

    async def follow_user(self, owner: str, since: int) -> LiveFeed:
        """``owner``'s DELIVER subject after DELIVER stream sequence ``since`` (0: all kept)."""
        return await LiveFeed.open(
            self._live,
            self._deliver_ledger,
            live=self._subjects.deliver_live_user(owner),
            ledger=self._subjects.deliver_user(owner),
            last=since,
            pos=since + 1,
            contiguous=False,
        )

    async def follow_tag(self, owner: str, tag: str, since: int) -> LiveFeed:
        """``owner``'s tag subject after DELIVER stream sequence ``since`` (0: all kept)."""
        return await LiveFeed.open(
            self._live,
            self._deliver_ledger,
            live=self._subjects.deliver_live_tag(owner, tag),
            ledger=self._subjects.deliver_tag(owner, tag),
            last=since,
            pos=since + 1,
            contiguous=False,
        )

    async def first_sequence(self, stream: str) -> int:
        """The oldest sequence ``stream`` still holds (what retention left)."""
        try:
            info = await self._js.stream_info(stream)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot read stream info: {exc}") from exc
        return int(info.state.first_seq)

    # -- jobs, schedules and workers (the scheduler's RPCs and broadcasts) --
    async def scheduler_rpc(
        self,
        method: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - passed to the request
    ) -> Any:
        """``rpc("scheduler", method)``: the jobs, schedules and webhooks RPCs."""
        return await request(
            self._nc,
            self._subjects.rpc("scheduler", method),
            body,
            timeout=timeout or self._settings.rpc_timeout.total_seconds(),
        )

    async def subscribe_broadcast(
        self, topic: str, callback: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        """A core-NATS subscription to ``bcast.<topic>`` (the caller unsubscribes); with a
        ``queue`` group, each message reaches one member of the group."""
        return await self._nc.subscribe(self._subjects.broadcast(topic), queue=queue, cb=callback)

    async def publish_broadcast(self, topic: str, body: dict[str, Any]) -> None:
        """A core-NATS publish to ``bcast.<topic>`` (best effort)."""
        try:
            await self._nc.publish(self._subjects.broadcast(topic), dumps(body))
        except NatsError:
            pass
