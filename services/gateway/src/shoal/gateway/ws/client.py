"""The client protocol: a session's client socket and an owner's user stream.

Client socket ``/v1/sessions/{id}/ws?since=<seq>`` — server -> client: ``event`` frames for every
event after ``since`` (the ledger's history, then live, in order, no gap, no duplicate), ``gap``
for what retention took, ``delta`` (the runner's streaming output, best-effort), ``pong``,
``prompt.accepted``, ``error``. Client -> server: ``ping``; ``prompt`` (as
``POST /v1/sessions/{id}/prompts``).

User stream ``/v1/events/ws?since=<N>`` — every event of the key owner's sessions, positioned by
the DELIVER stream sequence (increasing, not contiguous: the stream is shared). Client frames:
``ping`` only.
"""

from __future__ import annotations

from starlette.websockets import WebSocket

from shoal.common.errors import BadRequest, ShoalError, Unavailable
from shoal.gateway.service import EventFeed, Gap, GatewayService, Principal
from shoal.gateway.streams import parse_position
from shoal.gateway.ws import frames
from shoal.gateway.ws.connection import ResumableSocket, SocketHub, handshake
from shoal.gateway.ws.frames import Frame
from shoal.gateway.ws.upgrade import streaming_state, upgrade_principal


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

    async def on_frame(self, frame: Frame) -> None:
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
        await self.reply(frame, frames.prompt_accepted(receipt))


class UserSocket(ResumableSocket):
    """The EventBus view of one owner: every event of their sessions, resumable by position."""

    __slots__ = ()

    async def on_frame(self, frame: Frame) -> None:
        await self.reply_error(frame, "bad_request", f"unknown frame type {frame['type']!r}")


async def serve_client(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> None:
    """Authenticate, check the session, replay + follow, relay the session's deltas."""
    streaming = streaming_state(websocket.app)

    async def admit() -> tuple[tuple[Principal, int], EventFeed]:
        since_param = websocket.query_params.get("since", "0")
        if not since_param.isdigit():
            raise BadRequest("since must be a non-negative integer")
        since = int(since_param)
        tickets = streaming.tickets if streaming is not None else None
        principal = await upgrade_principal(websocket, service, tickets)
        _, feed = await service.follow(principal, session_id, since)
        return (principal, since), feed

    async def serve(admitted: tuple[Principal, int], feed: EventFeed) -> None:
        principal, since = admitted
        socket = ClientSocket(websocket, service, hub, principal, session_id, since)
        unwatch = None
        try:
            if streaming is not None:
                unwatch = await streaming.realtime.watch_deltas(session_id, socket.offer_text)
            await socket.serve(socket.pump(feed))
        finally:
            if unwatch is not None:
                await unwatch()

    await handshake(websocket, hub, admit, serve)


async def serve_user(websocket: WebSocket, service: GatewayService, hub: SocketHub) -> None:
    """Authenticate, then every event of the owner's sessions after ``since``."""

    async def admit() -> tuple[tuple[Principal, int, Gap | None], EventFeed]:
        since = parse_position(websocket.query_params.get("since"))
        streaming = streaming_state(websocket.app)
        if streaming is None:
            raise Unavailable("gateway is starting")
        principal = await upgrade_principal(websocket, service, streaming.tickets)
        feed, dropped = await streaming.streams.follow_user(principal, since)
        return (principal, since, Gap(*dropped) if dropped is not None else None), feed

    async def serve(admitted: tuple[Principal, int, Gap | None], feed: EventFeed) -> None:
        principal, since, dropped = admitted
        socket = UserSocket(websocket, service, hub, principal, since)
        await socket.serve(socket.pump(feed, dropped))

    await handshake(websocket, hub, admit, serve)
