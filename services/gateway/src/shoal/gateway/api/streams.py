"""Streaming routes: the user socket, server-sent events, WebSocket tickets (transport only).

User socket ``/v1/events/ws?since=<N>[&tag=<t>]``: declared here, served by ``ws.serve_user``.

SSE ``GET /v1/sessions/{id}/events/stream`` and ``GET /v1/events/stream[?tag=<t>]`` — the same
frames as ``data:`` lines (one JSON per event), ``id:`` = seq, resume with ``Last-Event-ID`` (or
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

from shoal.common.errors import Unavailable
from shoal.common.messaging import dumps
from shoal.gateway.api.deps import Caller, gateway_state
from shoal.gateway.service import EventFeed, Gap, GatewayService, Principal, SessionEventMsg
from shoal.gateway.streams import parse_position
from shoal.gateway.ws import frames, serve_user
from shoal.gateway.ws.upgrade import StreamingState, streaming_state, upgrade_principal

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


@router.websocket("/events/ws")
async def user_socket(websocket: WebSocket) -> None:
    state = gateway_state(websocket.app)
    await serve_user(websocket, state.service, state.hub)


# -- server-sent events --
async def _sse_stream(
    feed: EventFeed,
    since: int,
    gap: tuple[int, int] | None,
    *,
    keepalive: float,
    lag_grace: float,
    queue_size: int,
) -> AsyncIterator[str]:
    """SSE text for ``feed`` after ``since``; bounded: a reader that stays behind is cut off."""
    queue: asyncio.Queue[Any] = asyncio.Queue(queue_size)
    lagging = asyncio.Event()

    async def pump() -> None:
        try:
            if gap is not None:
                await queue.put(("gap", gap))
            while True:
                event = await feed.next()
                if isinstance(event, Gap):
                    await queue.put(("gap", (event.first, event.last)))
                    continue
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
                    body = dumps(frames.lagging(sent)).decode()
                    yield f"event: lagging\ndata: {body}\n\n"
                return
            kind, value = item
            if kind == "gap":
                yield f"event: gap\ndata: {dumps(frames.gap(*value)).decode()}\n\n"
            else:
                event: SessionEventMsg = value
                sent = event.seq
                yield f"id: {event.seq}\ndata: {frames.event_frame(event)[0]}\n\n"
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
) -> StreamingResponse:
    settings = gateway_state(request.app).service.settings
    stream = _sse_stream(
        feed,
        since,
        gap,
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
    return _sse_response(request, feed, position, None)


@router.get("/events/stream", response_class=StreamingResponse, responses=_SSE_RESPONSES)
async def user_event_stream(
    request: Request,
    since: Annotated[int | None, Query(ge=0)] = None,
    ticket: Annotated[str | None, Query(description="from POST /v1/ws-tickets")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    tag: Annotated[
        str | None, Query(description="Only the caller's sessions with this tag")
    ] = None,
) -> StreamingResponse:
    """Every event of the caller's sessions (``?tag=``: those tagged so) as server-sent events
    (``id:`` = DELIVER seq)."""
    position = _position(last_event_id, since)
    _, streaming, principal = await _stream_caller(request)
    feed, gap = await streaming.streams.follow_user(principal, position, tag)
    return _sse_response(request, feed, position, gap)
