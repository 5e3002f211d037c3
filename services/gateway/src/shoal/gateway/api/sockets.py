"""The gateway's WebSockets: a session's clients and its runner.

All frames are JSON text. A client frame may carry ``"id"``; the answer to it carries it back as
``"ref"``.

Client socket ``/v1/sessions/{id}/ws?since=<seq>`` (``Authorization: Bearer <api key>``)
    server -> client
        ``{"type":"event","seq":N,"event":{…envelope…}}`` — every event with seq > since, in seq
        order, first the ledger's history then live, with no gap and no duplicate;
        ``{"type":"pong"}``; ``{"type":"prompt.accepted","prompt_id","session_id","status"}``;
        ``{"type":"error","code","message"}`` (the socket stays open).
    client -> server
        ``{"type":"ping"}``; ``{"type":"prompt","content","idempotency_key"?}`` (as
        ``POST /v1/sessions/{id}/prompts``).

Runner socket ``/v1/sessions/{id}/runner`` (``Authorization: Bearer <runner token>`` or ``?token=``)
    server -> runner
        ``{"type":"prompt","prompt_id","content"}`` for each ``prompt.dispatched`` after connecting;
        ``{"type":"hello.ack","session_id","connection_id"}``; ``{"type":"pong"}``;
        ``{"type":"message.accepted","prompt_id","message_id"}``; ``{"type":"error",…}``.
    runner -> server
        ``{"type":"hello"}``; ``{"type":"ping"}``;
        ``{"type":"message.completed","prompt_id","content","message_id"?}``;
        ``{"type":"message.delta",…}`` (relayed to the client sockets as ``delta``);
        ``{"type":"secret.get","name","id"}`` -> ``{"type":"secret","name","value","ref"}`` for a
        name in the session's ``metadata.allowed_secrets``, else an ``error`` frame
        (``forbidden``; ``not_found`` if allowed but not stored). Values are never logged.

Close codes (the reason says what to do):

====  ==========================================================================================
1009  a frame exceeded ``max_ws_frame_bytes``
1011  unexpected gateway error — reconnect (clients: resume from the last seq you received)
1012  the gateway is restarting — ``service restart: resume from seq N`` / ``… reconnect``;
      reconnect (to another replica) with ``since=N``
1013  a dependency (NATS, keys service) is unavailable — retry with backoff
4400  bad request (e.g. ``since`` is not a non-negative integer)
4401  missing or invalid API key / runner token — do not retry with the same credentials
4403  the API key lacks the scope (``sessions``, or ``read`` to follow) — do not retry
4404  unknown session, or one the key may not see — do not retry
4408  the client fell behind its bounded send queue — ``lagging: resume from seq N``
4409  the session refused the runner (e.g. terminated)
====  ==========================================================================================

Refusals happen right after the handshake (a close frame, not an HTTP status) so browsers can
read the code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.errors import Error as NatsError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shoal.common.contracts import SessionSnapshot
from shoal.common.errors import Conflict, Forbidden, NotFound, ShoalError, Unauthorized
from shoal.common.messaging import dumps, loads, new_id
from shoal.gateway import _wire, metrics
from shoal.gateway.api.upgrade import StreamingState, streaming_state, upgrade_principal
from shoal.gateway.config import GatewaySettings
from shoal.gateway.fanout import LiveEvent, LiveFeed, frame_of, wire_of
from shoal.gateway.service import (
    EventCursor,
    EventFeed,
    GatewayService,
    Principal,
    SessionEventMsg,
    bearer_token,
)
from shoal.gateway.tickets import Tickets

log = logging.getLogger(__name__)

CLOSE_IDLE = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_LAGGING = 4408
CLOSE_CONFLICT = 4409


def close_code_for(exc: ShoalError) -> int:
    """The close code a refusal for ``exc`` gets."""
    if isinstance(exc, Unauthorized):
        return CLOSE_UNAUTHORIZED
    if isinstance(exc, NotFound):
        return CLOSE_NOT_FOUND
    if isinstance(exc, Forbidden):
        return CLOSE_FORBIDDEN
    if isinstance(exc, Conflict):
        return CLOSE_CONFLICT
    if exc.retryable:
        return CLOSE_TRY_LATER
    return CLOSE_BAD_REQUEST if exc.status < 500 else CLOSE_INTERNAL


def _reason(text: str) -> str:
    # A close reason must fit the 125-byte control frame payload with its 2-byte code.
    raw = text.encode()
    return raw[:123].decode(errors="ignore") if len(raw) > 123 else text


async def refuse(websocket: WebSocket, code: int, reason: str) -> None:
    """Complete the handshake and close at once, so the client sees ``code`` and ``reason``."""
    metrics.SOCKET_CLOSES.labels(str(code)).inc()
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.accept()
        await websocket.close(code, _reason(reason))


class SocketHub:
    """Every open socket of this gateway, so shutdown can close them with 1012 and a resume hint."""

    def __init__(self) -> None:
        self._sockets: set[ManagedSocket] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.closing = False
        metrics.SOCKETS.set_function(lambda: len(self._sockets))

    def add(self, socket: ManagedSocket) -> None:
        self._sockets.add(socket)
        self._empty.clear()

    def discard(self, socket: ManagedSocket) -> None:
        self._sockets.discard(socket)
        if not self._sockets:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._sockets)

    def key_revoked(self, key_id: str) -> None:
        """A ``keys.revoked`` broadcast: close every socket opened with that key (4401)."""
        for socket in list(self._sockets):
            principal = getattr(socket, "principal", None)
            if isinstance(principal, Principal) and principal.key_id == key_id:
                socket.finish(CLOSE_UNAUTHORIZED, "API key revoked")

    async def wait_empty(self) -> None:
        """Until no socket is open."""
        await self._empty.wait()

    async def close_all(self, grace: float) -> None:
        """Refuse new sockets, ask every open one to close with 1012, wait up to ``grace`` s."""
        self.closing = True
        for socket in list(self._sockets):
            socket.finish(CLOSE_RESTART, socket.restart_reason())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), grace)


_NO_FRAMES: deque[tuple[int | None, str]] = deque(maxlen=0)  # shared, stays empty: appends vanish


class ManagedSocket:
    """One accepted socket: a receiver task, the caller's ``work`` (a feed pump), a bounded outbox.

    Frames are written at once while nothing is queued ahead of them, from whichever task or
    callback sends them: straight to the transport as prebuilt frame bytes where uvicorn's
    sans-I/O protocol would write exactly those (``_wire``), else through the ASGI ``send``
    (which frames and writes without waiting). Only when the transport pushes back (the peer
    reads slowly) does a writer task take over; frames queue behind it in the bounded outbox,
    and a sender that finds the outbox full for ``ws_lag_grace`` cuts the socket off (4408). The
    idle timeout is a loop timer, not a task. Whichever part ends first ends the socket;
    ``finish(code, reason)`` records how to close it.
    """

    # Slots: an instance dict would cost ~1 KB more per socket, and most sockets are idle.
    __slots__ = (
        "_burst",
        "_close_timeout",
        "_close_with",
        "_direct",
        "_done",
        "_idle",
        "_idle_timer",
        "_lag_grace",
        "_last_heard",
        "_loop",
        "_max_frame",
        "_max_frames",
        "_max_queued",
        "_outbox",
        "_queued",
        "_rate",
        "_refilled",
        "_room",
        "_serving",
        "_tokens",
        "_writer",
        "deltas_dropped",
        "hub",
        "sent_seq",
        "service",
        "ws",
    )

    def __init__(self, websocket: WebSocket, service: GatewayService, hub: SocketHub) -> None:
        self.ws = websocket
        self.service = service
        self.hub = hub
        self._loop = asyncio.get_running_loop()
        settings: GatewaySettings = service.settings
        self._max_frame = settings.max_ws_frame_bytes
        self._lag_grace = settings.ws_lag_grace.total_seconds()
        self._close_timeout = settings.ws_close_timeout.total_seconds()
        # The outbox is bounded in frames and in bytes (characters: JSON text is mostly ASCII).
        # Invariant: frames are queued only while ``_writer`` runs, and it drains them all.
        self._outbox: deque[tuple[int | None, str]] = _NO_FRAMES  # a deque of its own once used
        self._max_frames = settings.ws_send_queue
        self._max_queued = settings.ws_send_queue_bytes
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None  # senders waiting for the outbox
        # Rate limit on frames from the peer: a token bucket (frames, refilled per second).
        self._rate = settings.ws_rate_limit
        self._burst = float(settings.ws_rate_burst)
        self._tokens = self._burst
        self._refilled = self._loop.time()
        self._idle = settings.ws_idle_timeout.total_seconds()
        self._last_heard = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.deltas_dropped = 0
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._serving: asyncio.Task[Any] | None = None  # serve()'s task, which runs the receiver
        self._close_with: tuple[int, str] | None = None
        self.sent_seq = 0  # last event seq written to the socket
        # The connection's protocol when frames may bypass the ASGI send (_wire), else None.
        self._direct = _wire.direct_protocol(getattr(websocket, "_send", None))

    # -- to override --
    def lag_reason(self) -> str:
        return "lagging: reconnect"

    def restart_reason(self) -> str:
        return "service restart: reconnect"

    def failure_reason(self) -> str:
        return "gateway error: reconnect"

    async def on_frame(self, frame: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- machinery --
    def finish(self, code: int | None = None, reason: str = "") -> None:
        """End the socket; the first caller's close code wins (None: the peer is already gone).

        Nothing more is written after it: the close reason's resume position stays true."""
        if self._done.done():
            return
        if code is not None:
            self._close_with = (code, _reason(reason))
        self._done.set_result(None)
        serving = self._serving
        if serving is not None and serving is not asyncio.current_task():
            # The receiver runs in serve()'s own task: interrupt it (serve() takes the
            # cancellation back, as asyncio.timeout() does; None says it was ours).
            self._serving = None
            serving.cancel()

    async def send_frame(self, frame: dict[str, Any], seq: int | None = None) -> bool:
        return await self.send_text(dumps(frame).decode(), seq)

    def _has_room(self, size: int) -> bool:
        if len(self._outbox) >= self._max_frames:
            return False
        # One frame always fits an empty outbox, however large (it is below the frame cap).
        return self._queued == 0 or self._queued + size <= self._max_queued

    async def send_text(self, text: str, seq: int | None = None, wire: bytes | None = None) -> bool:
        """Send a frame (queue it behind a slow peer); a sender stuck behind a full outbox past
        the grace cuts the socket off (4408). False: the socket is ending."""
        if self._writer is not None and not self._has_room(len(text)):
            deadline = self._loop.time() + self._lag_grace
            while self._writer is not None and not self._has_room(len(text)):
                remaining = deadline - self._loop.time()
                if remaining <= 0 or self._done.done():
                    self.finish(CLOSE_LAGGING, self.lag_reason())
                    return False
                if self._room is None:
                    self._room = self._loop.create_future()
                await asyncio.wait((self._room, self._done), timeout=remaining)
        return self._push(text, seq, wire)

    def offer_text(self, text: str) -> bool:
        """Queue an ephemeral frame (a delta) unless the outbox is half full: then drop it.

        Deltas are best-effort by contract (the durable answer is ``message.completed``); they
        must never push a socket into lagging or delay its events.
        """
        if (
            len(self._outbox) * 2 >= self._max_frames
            or (self._queued + len(text)) * 2 > self._max_queued
            or self._done.done()
        ):
            self.deltas_dropped += 1
            return False
        return self._push(text, None)

    def _push(self, text: str, seq: int | None, wire: bytes | None = None) -> bool:
        """Write now, or queue behind the writer (no bound checked here). ``wire``: ``text``
        as a complete frame already, if the caller has it."""
        if self._done.done():
            return False
        if self._writer is None:
            self._write_now(text, seq, wire)
        else:
            if self._outbox is _NO_FRAMES:
                self._outbox = deque()
            self._outbox.append((seq, text))
            self._queued += len(text)
        return True

    def _write_now(self, text: str, seq: int | None, wire: bytes | None = None) -> None:
        """Write the frame to the transport if it takes it as is (``_wire``); else run the ASGI
        send up to its first wait: usually to the end (the frame is on the transport). If the
        transport pushes back, a writer task finishes it and drains what queues behind it.
        (Python 3.12's eager tasks do this; the gateway supports 3.11.)"""
        direct = self._direct
        if direct is not None and _wire.writable(direct):
            try:
                direct.transport.write(
                    wire if wire is not None else _wire.text_frame(text.encode())
                )
            except Exception as exc:  # as the send's own failure would: ends the socket
                self._failed(exc)
                return
            if seq is not None:
                self.sent_seq = seq
            return
        send = self.ws.send({"type": "websocket.send", "text": text})
        try:
            waiting = send.send(None)
        except StopIteration:
            if seq is not None:
                self.sent_seq = seq
            return
        except BaseException as exc:  # the send's own failure ends the socket
            self._failed(exc)
            return
        self._writer = self._loop.create_task(self._drain(send, waiting, seq))

    async def _drain(
        self, send: Coroutine[Any, Any, None], waiting: object, seq: int | None
    ) -> None:
        try:
            await _finish_started(send, waiting)
            if seq is not None:
                self.sent_seq = seq
            while self._outbox and not self._done.done():
                seq, text = self._outbox.popleft()
                self._queued -= len(text)
                room = self._room
                if room is not None:
                    self._room = None
                    if not room.done():
                        room.set_result(None)
                await self.ws.send_text(text)
                if seq is not None:
                    self.sent_seq = seq
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._writer = None

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, WebSocketDisconnect | OSError):
            self.finish()
        elif isinstance(exc, Exception):
            log.error("socket send failed", exc_info=exc)
            self.finish(CLOSE_INTERNAL, self.failure_reason())
        else:
            raise exc

    async def reply(self, request: dict[str, Any], frame: dict[str, Any]) -> None:
        ref = request.get("id")
        if isinstance(ref, str | int):
            frame["ref"] = ref
        await self.send_frame(frame)

    async def reply_error(self, request: dict[str, Any], code: str, message: str) -> None:
        await self.reply(request, {"type": "error", "code": code, "message": message})

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.finish()
                return
            self._last_heard = now = self._loop.time()
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
            self._refilled = now
            if self._tokens < 1:
                self.finish(CLOSE_POLICY, f"rate limit: at most {self._rate:g} frames/s")
                return
            self._tokens -= 1
            text = message.get("text")
            if text is None:
                await self.reply_error({}, "bad_request", "binary frames are not supported")
                continue
            if len(text) > self._max_frame // 4 and len(text.encode()) > self._max_frame:
                self.finish(CLOSE_TOO_BIG, f"frame exceeds {self._max_frame} bytes")
                return
            try:
                frame = loads(text)
            except ShoalError:
                await self.reply_error({}, "bad_request", "malformed JSON")
                continue
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                await self.reply_error({}, "bad_request", 'a frame is an object with a "type"')
                continue
            if frame["type"] == "ping":
                await self.reply(frame, {"type": "pong"})
                continue
            await self.on_frame(frame)

    def _check_idle(self) -> None:
        """Close with 1001 when the peer sent no frame for ``ws_idle_timeout`` (a loop timer:
        re-armed for the last frame heard, so it fires about once per timeout)."""
        quiet = self._loop.time() - self._last_heard
        if quiet >= self._idle:
            self._idle_timer = None
            self.finish(CLOSE_IDLE, f"idle timeout: no frame for {self._idle:g} s")
            return
        self._idle_timer = self._loop.call_later(self._idle - quiet + 0.05, self._check_idle)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
            self.finish()
        except asyncio.CancelledError:
            raise
        except (WebSocketDisconnect, OSError):
            self.finish()
        except (NatsError, ShoalError) as exc:
            log.warning("socket ended: %s", exc)
            self.finish(CLOSE_TRY_LATER, self.failure_reason())
        except Exception:
            log.exception("socket failed")
            self.finish(CLOSE_INTERNAL, self.failure_reason())

    async def serve(self, *work: Coroutine[Any, Any, None]) -> None:
        """Run the receiver (in this task: one task less per socket) and ``work`` (a task each)
        until one ends, then close as recorded."""
        self.hub.add(self)
        if self._idle > 0:
            self._idle_timer = self._loop.call_later(self._idle, self._check_idle)
        tasks = [asyncio.create_task(self._guard(w)) for w in work]
        serving = asyncio.current_task()
        try:
            self._serving = serving
            try:
                await self._guard(self._receive_loop())
            except asyncio.CancelledError:
                # Ours (finish() from elsewhere) ends only the receiver; any other goes on.
                if serving is None or self._serving is not None or serving.uncancel() > 0:
                    raise
        finally:
            self._serving = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self.finish()  # nothing is written after this (e.g. serve itself was cancelled)
            if self._writer is not None:
                tasks.append(self._writer)
            for task in tasks:
                task.cancel()
            # Bounded: a part that swallows its cancellation (a library awaiting a future that
            # completed as it was cancelled) must not hold back the close frame the socket owes.
            _, stuck = await asyncio.wait(tasks, timeout=self._close_timeout)
            if stuck:
                log.warning("%d socket task(s) ignored cancellation; closing anyway", len(stuck))
            self.hub.discard(self)
            await self._close()

    async def _close(self) -> None:
        if self._close_with is None or self.ws.application_state != WebSocketState.CONNECTED:
            return
        code, reason = self._close_with
        metrics.SOCKET_CLOSES.labels(str(code)).inc()
        wait = self._close_timeout
        if code == CLOSE_LAGGING:
            # The close frame queues behind what the slow peer has not read yet: free the
            # outbox now and give the peer time to reach the frame that says where to resume.
            wait = self.service.settings.ws_lag_close_timeout.total_seconds()
        self._outbox = _NO_FRAMES
        self._queued = 0
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
            await asyncio.wait_for(self.ws.close(code, reason), wait)


async def _finish_started(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive ``coro`` to its end from inside a task, after it was started by hand with
    ``coro.send(None)`` and yielded ``waiting`` (a future it waits on, or None: a bare yield).
    Does what a task's step does: wait, then resume it with the outcome (cancellation too)."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # A task takes the yielded future over by clearing this flag; so does this.
                waiting._asyncio_future_blocking = False
                await waiting
        except BaseException as exc:  # handed to the coroutine, as a task's step does
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


class ResumableSocket(ManagedSocket):
    """A socket of seq'd events for one principal, resumable after ``since``: every close
    reason tells the client where to resume."""

    __slots__ = ("cursor", "principal")

    # Positions are session seqs (one more than the last, or a gap to report) — not on a user
    # stream, whose positions are the shared DELIVER stream's.
    contiguous = True

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        principal: Principal,
        since: int,
    ) -> None:
        super().__init__(websocket, service, hub)
        self.principal = principal
        self.cursor = EventCursor(since)
        self.sent_seq = since

    def follow(self, feed: EventFeed) -> None:
        """Let a live feed write caught-up events from its subscription's callback
        (:meth:`LiveFeed.deliver_to`): no task wakes up per event."""
        if isinstance(feed, LiveFeed):
            feed.deliver_to(self._take_live)

    def _take_live(self, event: SessionEventMsg) -> bool:
        """The next live event, straight from the subscription: written now if nothing is
        queued ahead of it and it needs no ``gap`` frame first; else refused (False) and the
        pump sends it in order."""
        if self._writer is not None or self._done.done() or not isinstance(event, LiveEvent):
            return False
        cursor = self.cursor
        if self.contiguous and event.seq != cursor.last + 1:
            return False
        if not cursor.admit(event.seq):
            return False
        self._write_now(event.frame, event.seq, event.wire)
        return True

    def lag_reason(self) -> str:
        return f"lagging: resume from seq {self.sent_seq}"

    def restart_reason(self) -> str:
        return f"service restart: resume from seq {self.sent_seq}"

    def failure_reason(self) -> str:
        return f"gateway error: resume from seq {self.sent_seq}"


class ClientSocket(ResumableSocket):
    """A client following one session: replay after ``since``, then live; prompts and pings."""

    __slots__ = ("session_id",)

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        principal: Principal,
        session_id: str,
        since: int,
    ) -> None:
        super().__init__(websocket, service, hub, principal, since)
        self.session_id = session_id

    async def pump(self, feed: EventFeed) -> None:
        self.follow(feed)
        try:
            # No local holds the last event while waiting for the next (an idle socket would).
            while await self._send_event(await feed.next()):
                pass
        finally:
            await feed.close()

    async def _send_event(self, event: SessionEventMsg) -> bool:
        gap = self.cursor.gap_before(event.seq)
        if gap is not None and not await self.send_frame(gap_frame(*gap)):
            return False
        return not self.cursor.admit(event.seq) or await self.send_text(
            event_frame(event), event.seq, wire_of(event)
        )

    async def on_frame(self, frame: dict[str, Any]) -> None:
        if frame["type"] != "prompt":
            await self.reply_error(frame, "bad_request", f"unknown frame type {frame['type']!r}")
            return
        content, key = frame.get("content"), frame.get("idempotency_key")
        if not isinstance(content, str) or not (key is None or isinstance(key, str)):
            await self.reply_error(frame, "bad_request", "content must be a string")
            return
        try:
            receipt = await self.service.submit_prompt(
                self.principal, self.session_id, content, key
            )
        except ShoalError as exc:
            await self.reply_error(frame, exc.code, exc.message)
            return
        await self.reply(frame, {"type": "prompt.accepted", **receipt})


def gap_frame(first: int, last: int) -> dict[str, Any]:
    """Seqs ``first``..``last`` are gone from the ledger (older than its retention): said, never
    skipped silently. The client cannot get them from the gateway any more."""
    return {"type": "gap", "from": first, "to": last}


def event_frame(event: SessionEventMsg) -> str:
    """``{"type":"event","seq":N,"event":<envelope>}``, splicing the ledger's JSON as it is.

    A live event was encoded once for every socket of the gateway (``fanout.LiveEvent``).
    """
    frame = frame_of(event)
    if frame is not None:
        return frame
    return f'{{"type":"event","seq":{event.seq},"event":{event.raw.decode()}}}'


class RunnerSocket(ManagedSocket):
    """The session's runner: dispatched prompts out, completions in."""

    __slots__ = ("_proxied", "connection_id", "snapshot", "streaming")

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        snapshot: SessionSnapshot,
        connection_id: str,
    ) -> None:
        super().__init__(websocket, service, hub)
        self.snapshot = snapshot
        self.connection_id = connection_id
        settings = service.settings
        self._rate = settings.ws_runner_rate_limit
        self._burst = self._tokens = float(settings.ws_runner_rate_burst)
        self.streaming: StreamingState | None = None
        self._proxied: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def pump(self, feed: EventFeed) -> None:
        try:
            while True:
                event = await feed.next()
                data = event.envelope.data
                frame = {
                    "type": "prompt",
                    "prompt_id": data.get("prompt_id"),
                    "content": data.get("content"),
                }
                if not await self.send_frame(frame):
                    return
        finally:
            await feed.close()

    async def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "hello":
            await self.reply(
                frame,
                {
                    "type": "hello.ack",
                    "session_id": self.snapshot.id,
                    "connection_id": self.connection_id,
                },
            )
        elif kind == "message.completed":
            try:
                result = await self.service.complete_message(
                    self.snapshot,
                    frame.get("prompt_id"),
                    frame.get("content"),
                    frame.get("message_id"),
                )
            except ShoalError as exc:
                await self.reply_error(frame, exc.code, exc.message)
                return
            await self.reply(frame, {"type": "message.accepted", **result})
        elif kind == "message.delta":
            await self.relay_delta(frame)
        elif kind == "http.response":
            future = self._proxied.pop(str(frame.get("ref")), None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif kind == "secret.get":
            await self.send_secret(frame)
        else:
            await self.reply_error(frame, "bad_request", f"unknown frame type {kind!r}")

    async def relay_delta(self, frame: dict[str, Any]) -> None:
        """``message.delta`` -> core NATS -> the session's client sockets as ``delta`` frames.

        Not acknowledged (full rate), not a command, not in the ledger: deltas are ephemeral.
        """
        if self.streaming is None:
            return
        # "type" first: clients can tell a delta from an event by the frame's first bytes.
        delta = {"type": "delta", "session_id": self.snapshot.id}
        delta.update((k, v) for k, v in frame.items() if k not in ("type", "id", "session_id"))
        try:
            await self.streaming.realtime.publish_delta(self.snapshot.id, dumps(delta))
        except ShoalError as exc:
            log.warning("delta dropped: %s", exc)

    async def proxy(self, request: bytes) -> bytes:
        """One proxied HTTP request (see api/proxy.py): an ``http.request`` frame out, the
        runner's ``http.response`` (same ``ref``) back, or a 504 after ``proxy_timeout``."""
        settings = self.service.settings
        try:
            body = loads(request)
        except ShoalError:
            return dumps({"status": 502, "error": "malformed proxy request"})
        ref = new_id("req")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._proxied[ref] = future
        try:
            if not await self.send_frame({**body, "type": "http.request", "id": ref}):
                return dumps({"status": 502, "error": "runner socket is closing"})
            answer = await asyncio.wait_for(future, settings.proxy_timeout.total_seconds())
        except TimeoutError:
            return dumps({"status": 504, "error": "the runner did not answer in time"})
        finally:
            self._proxied.pop(ref, None)
        return dumps(proxy_answer(answer, settings.proxy_max_body_bytes))

    async def send_secret(self, frame: dict[str, Any]) -> None:
        """``secret.get``: the value goes to this socket and nowhere else."""
        try:
            secret = await self.service.runner_secret(self.snapshot, frame.get("name"))
        except ShoalError as exc:  # messages never carry a value
            await self.reply_error(frame, exc.code, exc.message)
            return
        await self.reply(frame, {"type": "secret", **secret})


def proxy_answer(frame: dict[str, Any], max_body: int) -> dict[str, Any]:
    """The runner's ``http.response`` frame, checked, as the proxy route's reply."""
    status = frame.get("status")
    if not isinstance(status, int) or not 100 <= status <= 599:
        return {"status": 502, "error": "the runner answered without a valid status"}
    raw_headers = frame.get("headers")
    headers = (
        {str(k): str(v) for k, v in raw_headers.items()} if isinstance(raw_headers, dict) else {}
    )
    text, encoded = frame.get("body"), frame.get("body_b64")
    try:
        if isinstance(encoded, str):
            body = base64.b64decode(encoded, validate=True)
        else:
            body = text.encode() if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        return {"status": 502, "error": "the runner sent a malformed body"}
    if len(body) > max_body:
        return {"status": 502, "error": f"the runner's response exceeds {max_body} bytes"}
    return {"status": status, "headers": headers, "body_b64": base64.b64encode(body).decode()}


async def _watch_deltas(
    streaming: StreamingState | None, session_id: str, socket: ManagedSocket
) -> Callable[[], Awaitable[None]] | None:
    if streaming is None:
        return None
    return await streaming.realtime.watch_deltas(session_id, socket.offer_text)


def _tickets(websocket: WebSocket) -> Tickets | None:
    streaming = streaming_state(websocket.app)
    return streaming.tickets if streaming is not None else None


async def serve_client(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> None:
    """Authenticate, check the session, replay + follow; see the module docstring for codes."""
    if hub.closing:
        await refuse(websocket, CLOSE_RESTART, "service restart: reconnect")
        return
    since_param = websocket.query_params.get("since", "0")
    if not since_param.isdigit():
        await refuse(websocket, CLOSE_BAD_REQUEST, "since must be a non-negative integer")
        return
    try:
        principal = await upgrade_principal(websocket, service, _tickets(websocket))
        feed = (await service.follow(principal, session_id, int(since_param)))[1]
    except ShoalError as exc:
        await refuse(websocket, close_code_for(exc), exc.message)
        return
    try:
        await websocket.accept()
    except (RuntimeError, OSError, WebSocketDisconnect):
        await feed.close()
        return
    socket = ClientSocket(websocket, service, hub, principal, session_id, int(since_param))
    unwatch = None
    try:
        unwatch = await _watch_deltas(streaming_state(websocket.app), session_id, socket)
        await socket.serve(socket.pump(feed))
    finally:
        if unwatch is not None:
            await unwatch()
        await feed.close()


async def serve_runner(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> None:
    """Check the runner token, follow dispatches, announce the runner, relay until it leaves."""
    if hub.closing:
        await refuse(websocket, CLOSE_RESTART, "service restart: reconnect")
        return
    token = bearer_token(websocket.headers.get("authorization")) or websocket.query_params.get(
        "token"
    )
    connection_id = new_id("rcn")
    try:
        snapshot = await service.authenticate_runner(session_id, token)
        # Subscribe before announcing: the dispatch the connect triggers must not be missed.
        feed = await service.follow_dispatches(session_id)
    except ShoalError as exc:
        await refuse(websocket, close_code_for(exc), exc.message)
        return
    try:
        await websocket.accept()
    except (RuntimeError, OSError, WebSocketDisconnect):
        await feed.close()
        return
    try:
        await service.runner_connect(snapshot, connection_id)
    except ShoalError as exc:
        await feed.close()
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close(close_code_for(exc), _reason(exc.message))
        return
    streaming = streaming_state(websocket.app)
    proxy_sub = None
    try:
        socket = RunnerSocket(websocket, service, hub, snapshot, connection_id)
        socket.streaming = streaming
        if streaming is not None:
            proxy_sub = await streaming.realtime.serve_proxy(session_id, socket.proxy)
        await socket.serve(socket.pump(feed))
    finally:
        if proxy_sub is not None:
            with contextlib.suppress(NatsError):
                await proxy_sub.unsubscribe()
        try:
            await service.runner_disconnect(snapshot, connection_id)
        except ShoalError as exc:
            log.warning("runner.disconnect for %s not published: %s", session_id, exc)
