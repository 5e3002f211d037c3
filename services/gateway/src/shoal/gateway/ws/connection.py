"""Connection machinery shared by every socket kind: the hub, the managed socket, the handshake.

A :class:`ManagedSocket` runs its receiver in the ASGI task and the caller's ``work`` (a feed
pump) in a task of its own; whichever ends first ends the socket, and :meth:`finish` records the
close code. Frames go out at once while nothing is queued ahead of them: as prebuilt wire bytes
on the transport where uvicorn would write exactly those (``frames.direct_protocol``), else
through the ASGI ``send`` in a writer task, behind which later frames queue in a bounded
outbox; a sender stuck behind a full outbox for ``ws_lag_grace`` cuts the socket off (4408).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shoal.common.errors import RateLimited, ShoalError
from shoal.common.messaging import dumps, loads
from shoal.gateway import metrics
from shoal.gateway.config import GatewaySettings
from shoal.gateway.fanout import LiveEvent, LiveFeed
from shoal.gateway.quotas import OwnerCounts
from shoal.gateway.service import EventFeed, Gap, GatewayService, Principal, SessionEventMsg
from shoal.gateway.ws import frames
from shoal.gateway.ws.frames import (
    CLOSE_IDLE,
    CLOSE_INTERNAL,
    CLOSE_LAGGING,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
    Frame,
    close_reason,
)

if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger(__name__)


class DirectWebSocket(WebSocket):
    """A socket dispatched straight from the server (``GatewayApp``): ``server_send`` is the
    server's own ASGI ``send``, which frames may bypass (``frames.direct_protocol``)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(scope, receive, send)
        self.server_send = send


async def refuse(websocket: WebSocket, code: int, reason: str) -> None:
    """Complete the handshake and close at once, so the client sees ``code`` and ``reason``."""
    metrics.SOCKET_CLOSES.labels(str(code)).inc()
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.accept()
        await websocket.close(code, close_reason(reason))


async def close_now(websocket: WebSocket, code: int, reason: str) -> None:
    """Close an accepted socket that never started serving."""
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.close(code, close_reason(reason))


async def handshake(
    websocket: WebSocket,
    hub: SocketHub,
    admit: Coroutine[Any, Any, tuple[ManagedSocket, EventFeed]],
) -> None:
    """Every socket's life, whatever its kind: refused at once while the gateway closes;
    ``admit`` (authenticate, check, open the feed, build the socket; a :class:`ShoalError`
    becomes the refusal's close code); accept; the socket's own start (a ShoalError closes it
    with its code); serve until it ends; and the feed closed however it ends.

    ``admit`` is a coroutine and a kind's start and end are methods, not callbacks: an idle
    socket parks one frame for this (memory per idle socket) and no closure.
    """
    if hub.closing:
        admit.close()
        await refuse(websocket, CLOSE_RESTART, frames.RESTART_RECONNECT)
        return
    try:
        socket, feed = await admit
    except ShoalError as exc:
        await refuse(websocket, frames.close_code_for(exc), exc.message)
        return
    del admit  # done: an idle socket keeps no reference to it
    try:
        owner = hub.claim_owner_slot(socket)
    except RateLimited as exc:  # the owner's socket cap
        await feed.close()
        await refuse(websocket, frames.close_code_for(exc), exc.message)
        return
    try:
        try:
            await websocket.accept()
        except (RuntimeError, OSError, WebSocketDisconnect):
            return
        try:
            await socket.start()
            await socket.serve(socket.pump(feed))
        except ShoalError as exc:  # from start(): serve() ends the socket itself
            await close_now(websocket, frames.close_code_for(exc), exc.message)
        finally:
            await socket.stopped()
    finally:
        hub.release_owner_slot(owner)
        await feed.close()


class SocketHub:
    """Every open socket of this gateway, so shutdown can close them with 1012 and a resume hint."""

    def __init__(self, max_per_owner: int = 0) -> None:
        self._sockets: set[ManagedSocket] = set()
        self._per_owner = OwnerCounts(max_per_owner, "sockets")
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

    def claim_owner_slot(self, socket: ManagedSocket) -> str | None:
        """Count an admitted socket against its owner's cap (:class:`RateLimited` past it).
        Sockets opened with a runner token have no principal: one runner per session."""
        principal = getattr(socket, "principal", None)
        if not isinstance(principal, Principal):
            return None
        self._per_owner.claim(principal.owner)
        return principal.owner

    def release_owner_slot(self, owner: str | None) -> None:
        if owner is not None:
            self._per_owner.release(owner)

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
    """One accepted socket: a receiver, the caller's ``work``, a bounded outbox, an idle timer.

    Subclasses answer the peer's frames (:meth:`on_frame`); ``ping`` is answered here.
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
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._serving: asyncio.Task[Any] | None = None  # serve()'s task, which runs the receiver
        self._close_with: tuple[int, str] | None = None
        self.sent_seq = 0  # last event position written to the socket
        # The connection's protocol when frames may bypass the ASGI send, else None (start()).
        self._direct: WebSocketsSansIOProtocol | None = None

    async def start(self) -> None:
        """Once accepted, before serving: may frames bypass the ASGI send? Then the kind's own
        start (:meth:`on_accepted`)."""
        if isinstance(self.ws, DirectWebSocket):
            self._direct = frames.direct_protocol(self.ws.server_send)
        await self.on_accepted()

    # -- to override --
    async def on_accepted(self) -> None:
        """The kind's start, once accepted (subscriptions, announcements)."""

    async def stopped(self) -> None:
        """The kind's end, however the socket ended (even if :meth:`on_accepted` failed)."""

    async def pump(self, feed: EventFeed) -> None:
        """Send the feed's events until it or the socket ends."""
        raise NotImplementedError

    def lag_reason(self) -> str:
        return "lagging: reconnect"

    def restart_reason(self) -> str:
        return frames.RESTART_RECONNECT

    def failure_reason(self) -> str:
        return "gateway error: reconnect"

    async def on_frame(self, frame: Frame) -> None:
        raise NotImplementedError

    # -- sending --
    def finish(self, code: int | None = None, reason: str = "") -> None:
        """End the socket; the first caller's close code wins (None: the peer is already gone).

        Nothing more is written after it: the close reason's resume position stays true."""
        if self._done.done():
            return
        if code is not None:
            self._close_with = (code, close_reason(reason))
        self._done.set_result(None)
        serving = self._serving
        if serving is not None and serving is not asyncio.current_task():
            # The receiver runs in serve()'s own task: interrupt it (serve() takes the
            # cancellation back, as asyncio.timeout() does; None says it was ours).
            self._serving = None
            serving.cancel()

    async def send_frame(self, frame: Frame, seq: int | None = None) -> bool:
        return await self.send_text(dumps(frame).decode(), seq)

    async def reply(self, request: Frame, frame: Frame) -> None:
        """Answer the peer's ``request``, carrying its ``id`` back as ``ref``."""
        ref = request.get("id")
        if isinstance(ref, str | int):
            frame["ref"] = ref
        await self.send_frame(frame)

    async def reply_error(self, request: Frame, code: str, message: str) -> None:
        await self.reply(request, frames.error(code, message))

    def _has_room(self, size: int) -> bool:
        if len(self._outbox) >= self._max_frames:
            return False
        # One frame always fits an empty outbox, however large (it is below the frame cap).
        return self._queued == 0 or self._queued + size <= self._max_queued

    async def send_text(self, text: str, seq: int | None = None, wire: bytes | None = None) -> bool:
        """Send a frame (queue it behind a slow peer); a sender stuck behind a full outbox past
        the grace cuts the socket off (4408). ``wire``: ``text`` as wire bytes, if the caller
        has them. False: the socket is ending."""
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
            return False
        return self._push(text, None)

    def _push(self, text: str, seq: int | None, wire: bytes | None = None) -> bool:
        """Write now, or queue behind the writer (no bound checked here)."""
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
        """Write the frame to the transport if it takes it as is; else start the writer task
        on the ASGI send (a closing connection, a transport pushing back, another server)."""
        direct = self._direct
        if direct is not None and frames.writable(direct):
            try:
                direct.transport.write(
                    wire if wire is not None else frames.text_frame(text.encode())
                )
            except Exception as exc:  # as the send's own failure would: ends the socket
                self._failed(exc)
                return
            if seq is not None:
                self.sent_seq = seq
            return
        self._writer = self._loop.create_task(self._drain(text, seq))

    async def _drain(self, text: str, seq: int | None) -> None:
        """Send ``text`` through the ASGI send, then whatever queued behind it, in order."""
        try:
            while True:
                await self.ws.send_text(text)
                if seq is not None:
                    self.sent_seq = seq
                if not self._outbox or self._done.done():
                    return
                seq, text = self._outbox.popleft()
                self._queued -= len(text)
                room = self._room
                if room is not None:
                    self._room = None
                    if not room.done():
                        room.set_result(None)
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

    # -- receiving --
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
                await self.reply(frame, frames.pong())
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

    # -- lifetime --
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


class ResumableSocket(ManagedSocket):
    """A socket of positioned events for one principal, resumable after ``since``: every close
    reason tells the client where to resume."""

    __slots__ = ("principal",)

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
        self.sent_seq = since

    async def pump(self, feed: EventFeed) -> None:
        """Send the feed's events, and its gaps as ``gap`` frames."""
        if isinstance(feed, LiveFeed):
            # Caught up, the feed writes live events from its subscription's callback: no task
            # wakes up per event.
            feed.deliver_to(self._take_live)
        # No local holds the last event while waiting for the next (an idle socket would).
        while await self._send(await feed.next()):
            pass

    async def _send(self, item: SessionEventMsg | Gap) -> bool:
        if isinstance(item, Gap):
            return await self.send_frame(frames.gap(item.first, item.last))
        text, wire = frames.event_frame(item)
        return await self.send_text(text, item.seq, wire)

    def _take_live(self, event: LiveEvent) -> bool:
        """The feed's next event, from its subscription: written now if nothing is queued ahead
        of it; else refused (False) and the pump sends it in order."""
        if self._writer is not None or self._done.done():
            return False
        self._write_now(event.frame, event.seq, event.wire)
        return True

    def lag_reason(self) -> str:
        return frames.lagging_reason(self.sent_seq)

    def restart_reason(self) -> str:
        return frames.restart_reason(self.sent_seq)

    def failure_reason(self) -> str:
        return frames.failure_reason(self.sent_seq)
