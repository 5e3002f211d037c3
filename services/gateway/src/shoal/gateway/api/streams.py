"""Streaming routes: the user socket, server-sent events, WebSocket tickets (transport only).

User socket ``/v1/events/ws?since=<N>`` — every event of the key owner's sessions (the EventBus
view): ``{"type":"event","seq":N,"event":{…}}`` where ``seq`` is the DELIVER stream sequence
(increasing, not contiguous: the stream is shared); resume with ``since`` = the last one seen.
``{"type":"gap","from","to"}`` first when positions after ``since`` are gone (retention).

SSE ``GET /v1/sessions/{id}/events/stream`` and ``GET /v1/events/stream`` — the same frames as
``data:`` lines (one JSON per event), ``id:`` = seq, resume with ``Last-Event-ID`` (or
``?since=``), a ``: keepalive`` comment every ``sse_keepalive``; auth by Bearer header or
``?ticket=`` (``EventSource`` cannot send headers). A stream that falls behind for
``ws_lag_grace`` ends with ``event: lagging`` (``data: {"type":"lagging","seq":N}``): reconnect
with ``Last-Event-ID: N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.websockets import WebSocketDisconnect

from shoal.common.errors import ShoalError, Unavailable
from shoal.common.messaging import dumps
from shoal.gateway.api.deps import Caller, gateway_state
from shoal.gateway.api.sockets import (
    CLOSE_BAD_REQUEST,
    CLOSE_RESTART,
    ResumableSocket,
    close_code_for,
    event_frame,
    gap_frame,
    refuse,
)
from shoal.gateway.api.upgrade import StreamingState, streaming_state, upgrade_principal
from shoal.gateway.fanout import wire_of
from shoal.gateway.service import (
    EventCursor,
    EventFeed,
    GatewayService,
    Principal,
    SessionEventMsg,
)
from shoal.gateway.streams import parse_position

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

SSE_MEDIA_TYPE = "text/event-stream"
_STOP = object()


def _streaming(app: Any) -> StreamingState:
    state = streaming_state(app)
    if state is None:
        raise Unavailable("gateway is starting")
    return state


class Ticket(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ticket": "wst_3q…", "expires_at": "2025-01-01T00:00:30Z", "expires_in": 30}
            ]
        }
    )

    ticket: str = Field(description="Put it in the upgrade URL as ?ticket=; works once.")
    expires_at: str
    expires_in: int = Field(description="Seconds")


@router.post("/ws-tickets", status_code=201, response_model=Ticket)
async def create_ws_ticket(request: Request, caller: Caller) -> dict[str, Any]:
    """A short-lived, single-use ticket standing for this key on one socket or SSE stream."""
    return await _streaming(request.app).tickets.issue(caller)


class UserSocket(ResumableSocket):
    """The EventBus view of one owner: every event of their sessions, resumable by position."""

    __slots__ = ()
    contiguous = False

    async def pump(self, feed: EventFeed, gap: tuple[int, int] | None) -> None:
        try:
            if gap is not None and not await self.send_frame(gap_frame(*gap)):
                return
            self.follow(feed)
            while await self._send_event(await feed.next()):
                pass
        finally:
            await feed.close()

    async def _send_event(self, event: SessionEventMsg) -> bool:
        return not self.cursor.admit(event.seq) or await self.send_text(
            event_frame(event), event.seq, wire_of(event)
        )

    async def on_frame(self, frame: dict[str, Any]) -> None:
        await self.reply_error(frame, "bad_request", f"unknown frame type {frame['type']!r}")


@router.websocket("/events/ws")
async def user_socket(websocket: WebSocket) -> None:
    state = gateway_state(websocket.app)
    if state.hub.closing:
        await refuse(websocket, CLOSE_RESTART, "service restart: reconnect")
        return
    try:
        since = parse_position(websocket.query_params.get("since"))
    except ShoalError as exc:
        await refuse(websocket, CLOSE_BAD_REQUEST, exc.message)
        return
    try:
        streaming = _streaming(websocket.app)
        principal = await upgrade_principal(websocket, state.service, streaming.tickets)
        feed, gap = await streaming.streams.follow_user(principal, since)
    except ShoalError as exc:
        await refuse(websocket, close_code_for(exc), exc.message)
        return
    try:
        await websocket.accept()
    except (RuntimeError, OSError, WebSocketDisconnect):
        await feed.close()
        return
    socket = UserSocket(websocket, state.service, state.hub, principal, since)
    try:
        await socket.serve(socket.pump(feed, gap))
    finally:
        await feed.close()


# -- server-sent events --
async def _sse_stream(
    feed: EventFeed,
    since: int,
    gap: tuple[int, int] | None,
    *,
    contiguous: bool,
    keepalive: float,
    lag_grace: float,
    queue_size: int,
) -> AsyncIterator[str]:
    """SSE text for ``feed`` after ``since``; bounded: a reader that stays behind is cut off."""
    queue: asyncio.Queue[Any] = asyncio.Queue(queue_size)
    cursor = EventCursor(since)
    lagging = asyncio.Event()

    async def pump() -> None:
        try:
            if gap is not None:
                await queue.put(("gap", gap))
            while True:
                event = await feed.next()
                missing = cursor.gap_before(event.seq) if contiguous else None
                if missing is not None:
                    await queue.put(("gap", missing))
                if cursor.admit(event.seq):
                    try:
                        await asyncio.wait_for(queue.put(("event", event)), lag_grace)
                    except TimeoutError:
                        lagging.set()
                        await queue.put(_STOP)
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SSE feed failed")
            await queue.put(_STOP)

    task = asyncio.create_task(pump())
    sent = since
    try:
        yield f"retry: 1000\n: resume position {since}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if item is _STOP:
                if lagging.is_set():
                    body = dumps({"type": "lagging", "seq": sent}).decode()
                    yield f"event: lagging\ndata: {body}\n\n"
                return
            kind, value = item
            if kind == "gap":
                yield f"event: gap\ndata: {dumps(gap_frame(*value)).decode()}\n\n"
            else:
                sent = value.seq
                yield f"id: {value.seq}\ndata: {event_frame(value)}\n\n"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await feed.close()


def _sse_response(
    request: Request,
    feed: EventFeed,
    since: int,
    gap: tuple[int, int] | None,
    *,
    contiguous: bool,
) -> StreamingResponse:
    settings = gateway_state(request.app).service.settings
    stream = _sse_stream(
        feed,
        since,
        gap,
        contiguous=contiguous,
        keepalive=settings.sse_keepalive.total_seconds(),
        lag_grace=settings.ws_lag_grace.total_seconds(),
        queue_size=settings.ws_send_queue,
    )
    return StreamingResponse(
        stream,
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An event stream (text/event-stream)",
        "content": {
            SSE_MEDIA_TYPE: {
                "schema": {"type": "string"},
                "example": 'id: 3\ndata: {"type":"event","seq":3,"event":{}}\n\n',
            }
        },
    }
}


async def _stream_caller(request: Request) -> tuple[GatewayService, StreamingState, Principal]:
    service = gateway_state(request.app).service
    streaming = _streaming(request.app)
    return service, streaming, await upgrade_principal(request, service, streaming.tickets)


def _position(last_event_id: str | None, since: int | None) -> int:
    if last_event_id is not None:
        return parse_position(last_event_id.strip(), "Last-Event-ID")
    return since or 0


@router.get(
    "/sessions/{session_id}/events/stream",
    response_class=StreamingResponse,
    responses=_SSE_RESPONSES,
)
async def session_event_stream(
    session_id: str,
    request: Request,
    since: Annotated[int | None, Query(ge=0)] = None,
    ticket: Annotated[str | None, Query(description="from POST /v1/ws-tickets")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The session's events as server-sent events: replay after the position, then live."""
    position = _position(last_event_id, since)
    service, _, principal = await _stream_caller(request)
    _, feed = await service.follow(principal, session_id, position)
    return _sse_response(request, feed, position, None, contiguous=True)


@router.get("/events/stream", response_class=StreamingResponse, responses=_SSE_RESPONSES)
async def user_event_stream(
    request: Request,
    since: Annotated[int | None, Query(ge=0)] = None,
    ticket: Annotated[str | None, Query(description="from POST /v1/ws-tickets")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Every event of the caller's sessions as server-sent events (``id:`` = DELIVER seq)."""
    position = _position(last_event_id, since)
    _, streaming, principal = await _stream_caller(request)
    feed, gap = await streaming.streams.follow_user(principal, position)
    return _sse_response(request, feed, position, gap, contiguous=False)
