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
        ``{"type":"message.delta",…}`` (accepted and dropped for now, issue 4).

Close codes (the reason says what to do):

====  ==========================================================================================
1009  a frame exceeded ``max_ws_frame_bytes``
1011  unexpected gateway error — reconnect (clients: resume from the last seq you received)
1012  the gateway is restarting — ``service restart: resume from seq N`` / ``… reconnect``;
      reconnect (to another replica) with ``since=N``
1013  a dependency (NATS, keys service) is unavailable — retry with backoff
4400  bad request (e.g. ``since`` is not a non-negative integer)
4401  missing or invalid API key / runner token — do not retry with the same credentials
4404  unknown session, or one the key may not see — do not retry
4408  the client fell behind its bounded send queue — ``lagging: resume from seq N``
4409  the session refused the runner (e.g. terminated)
====  ==========================================================================================

Refusals happen right after the handshake (a close frame, not an HTTP status) so browsers can
read the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from nats.errors import Error as NatsError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shoal.common.contracts import SessionSnapshot
from shoal.common.errors import Conflict, NotFound, ShoalError, Unauthorized
from shoal.common.messaging import dumps, loads, new_id
from shoal.gateway.config import GatewaySettings
from shoal.gateway.service import (
    EventCursor,
    EventFeed,
    GatewayService,
    Principal,
    SessionEventMsg,
    bearer_token,
)

log = logging.getLogger(__name__)

CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_LAGGING = 4408
CLOSE_CONFLICT = 4409


def close_code_for(exc: ShoalError) -> int:
    """The close code a refusal for ``exc`` gets."""
    if isinstance(exc, Unauthorized):
        return CLOSE_UNAUTHORIZED
    if isinstance(exc, NotFound):
        return CLOSE_NOT_FOUND
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

    def add(self, socket: ManagedSocket) -> None:
        self._sockets.add(socket)
        self._empty.clear()

    def discard(self, socket: ManagedSocket) -> None:
        self._sockets.discard(socket)
        if not self._sockets:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._sockets)

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


class ManagedSocket:
    """One accepted socket: a bounded outbox drained by one sender, a receiver, a feed pump.

    Whichever part ends first ends the socket; ``finish(code, reason)`` records how to close it.
    """

    def __init__(self, websocket: WebSocket, service: GatewayService, hub: SocketHub) -> None:
        self.ws = websocket
        self.service = service
        self.hub = hub
        settings: GatewaySettings = service.settings
        self._max_frame = settings.max_ws_frame_bytes
        self._lag_grace = settings.ws_lag_grace.total_seconds()
        self._close_timeout = settings.ws_close_timeout.total_seconds()
        self._outbox: asyncio.Queue[tuple[int | None, str]] = asyncio.Queue(settings.ws_send_queue)
        self._done = asyncio.Event()
        self._close_with: tuple[int, str] | None = None
        self.sent_seq = 0  # last event seq written to the socket

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
        """End the socket; the first caller's close code wins (None: the peer is already gone)."""
        if self._done.is_set():
            return
        if code is not None:
            self._close_with = (code, _reason(reason))
        self._done.set()

    async def send_frame(self, frame: dict[str, Any], seq: int | None = None) -> bool:
        return await self.send_text(dumps(frame).decode(), seq)

    async def send_text(self, text: str, seq: int | None = None) -> bool:
        """Queue a frame; a client stuck behind a full queue past the grace is cut off (4408)."""
        item = (seq, text)
        if not self._outbox.full():
            self._outbox.put_nowait(item)
            return True
        try:
            await asyncio.wait_for(self._outbox.put(item), self._lag_grace)
        except TimeoutError:
            self.finish(CLOSE_LAGGING, self.lag_reason())
            return False
        return True

    async def reply(self, request: dict[str, Any], frame: dict[str, Any]) -> None:
        ref = request.get("id")
        if isinstance(ref, str | int):
            frame["ref"] = ref
        await self.send_frame(frame)

    async def reply_error(self, request: dict[str, Any], code: str, message: str) -> None:
        await self.reply(request, {"type": "error", "code": code, "message": message})

    async def _send_loop(self) -> None:
        while True:
            seq, text = await self._outbox.get()
            await self.ws.send_text(text)
            if seq is not None:
                self.sent_seq = seq

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.finish()
                return
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
        """Run the sender, the receiver and ``work`` until one ends, then close as recorded."""
        self.hub.add(self)
        tasks = [
            asyncio.create_task(self._guard(w))
            for w in (self._send_loop(), self._receive_loop(), *work)
        ]
        try:
            await self._done.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.hub.discard(self)
            await self._close()

    async def _close(self) -> None:
        if self._close_with is None or self.ws.application_state != WebSocketState.CONNECTED:
            return
        code, reason = self._close_with
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
            await asyncio.wait_for(self.ws.close(code, reason), self._close_timeout)


class ClientSocket(ManagedSocket):
    """A client following one session: replay after ``since``, then live; prompts and pings."""

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        principal: Principal,
        session_id: str,
        since: int,
    ) -> None:
        super().__init__(websocket, service, hub)
        self.principal = principal
        self.session_id = session_id
        self.cursor = EventCursor(since)
        self.sent_seq = since

    def lag_reason(self) -> str:
        return f"lagging: resume from seq {self.sent_seq}"

    def restart_reason(self) -> str:
        return f"service restart: resume from seq {self.sent_seq}"

    def failure_reason(self) -> str:
        return f"gateway error: resume from seq {self.sent_seq}"

    async def pump(self, feed: EventFeed) -> None:
        try:
            while True:
                event = await feed.next()
                if self.cursor.admit(event.seq) and not await self.send_text(
                    event_frame(event), event.seq
                ):
                    return
        finally:
            await feed.close()

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


def event_frame(event: SessionEventMsg) -> str:
    """``{"type":"event","seq":N,"event":<envelope>}``, splicing the ledger's JSON as it is."""
    return f'{{"type":"event","seq":{event.seq},"event":{event.raw.decode()}}}'


class RunnerSocket(ManagedSocket):
    """The session's runner: dispatched prompts out, completions in."""

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
            pass  # TODO(issue 4): stream deltas to clients; dropped until then
        else:
            await self.reply_error(frame, "bad_request", f"unknown frame type {kind!r}")


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
        principal = await service.authenticate(bearer_token(websocket.headers.get("authorization")))
        _, feed = await service.follow(principal, session_id)
    except ShoalError as exc:
        await refuse(websocket, close_code_for(exc), exc.message)
        return
    try:
        await websocket.accept()
    except (RuntimeError, OSError, WebSocketDisconnect):
        await feed.close()
        return
    socket = ClientSocket(websocket, service, hub, principal, session_id, int(since_param))
    await socket.serve(socket.pump(feed))


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
    try:
        socket = RunnerSocket(websocket, service, hub, snapshot, connection_id)
        await socket.serve(socket.pump(feed))
    finally:
        try:
            await service.runner_disconnect(snapshot, connection_id)
        except ShoalError as exc:
            log.warning("runner.disconnect for %s not published: %s", session_id, exc)
