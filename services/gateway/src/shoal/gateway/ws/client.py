"""The client protocol: a session's client socket and an owner's user stream.

Client socket ``/v1/sessions/{id}/ws?since=<seq>`` — server -> client: ``event`` frames for every
event after ``since`` (the ledger's history, then live, in order, no gap, no duplicate), ``gap``
for what retention took, ``delta`` (the runner's streaming output, best-effort), ``pong``,
``prompt.accepted``, ``answer.accepted``, ``abort.accepted``, ``error``. Client -> server:
``ping``; ``prompt`` (as ``POST /v1/sessions/{id}/prompts``); ``answer`` {question_id, answer}
(as ``POST …/questions/{question_id}/answer``); ``abort`` {prompt_id?} (as ``POST …/abort``).

User stream ``/v1/events/ws?since=<N>`` — every event of the key owner's sessions, positioned by
the DELIVER stream sequence (increasing, not contiguous: the stream is shared); with ``&tag=<t>``
only those of the owner's sessions tagged ``t`` (same positions, same resume rules). Client
frames: ``ping`` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket

from shoal.common.errors import BadRequest, ShoalError, Unavailable
from shoal.gateway.realtime import Realtime
from shoal.gateway.service import EventFeed, Gap, GatewayService, Principal
from shoal.gateway.streams import parse_position
from shoal.gateway.ws import frames
from shoal.gateway.ws.connection import ResumableSocket, SocketHub, handshake
from shoal.gateway.ws.frames import Frame
from shoal.gateway.ws.upgrade import streaming_state, upgrade_principal


class ClientSocket(ResumableSocket):
    """A client following one session: replay after ``since``, then live; deltas relayed;
    prompts and pings answered."""

    __slots__ = ("_realtime", "_unwatch", "session_id")

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        principal: Principal,
        session_id: str,
        since: int,
        realtime: Realtime | None,
    ) -> None:
        super().__init__(websocket, service, hub, principal, since)
        self.session_id = session_id
        self._realtime = realtime
        self._unwatch: Callable[[], Awaitable[None]] | None = None

    async def on_accepted(self) -> None:
        if self._realtime is not None:
            self._unwatch = await self._realtime.watch_deltas(self.session_id, self.offer_text)

    async def stopped(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            await unwatch()

    async def on_frame(self, frame: Frame) -> None:
        kind = frame["type"]
        try:
            if kind == "prompt":
                await self.prompt(frame)
            elif kind == "answer":
                question_id, answer = frame.get("question_id"), frame.get("answer")
                if not isinstance(question_id, str) or not isinstance(answer, str):
                    raise BadRequest("an answer frame has a question_id and an answer string")
                receipt = await self.service.answer_question(
                    self.principal, self.session_id, question_id, answer
                )
                await self.reply(frame, frames.answer_accepted(receipt))
            elif kind == "abort":
                prompt_id = frame.get("prompt_id")
                if not (prompt_id is None or isinstance(prompt_id, str)):
                    raise BadRequest("prompt_id must be an id")
                receipt = await self.service.abort(self.principal, self.session_id, prompt_id)
                await self.reply(frame, frames.abort_accepted(receipt))
            else:
                await self.reply_error(frame, "bad_request", f"unknown frame type {kind!r}")
        except ShoalError as exc:
            await self.reply_error(frame, exc.code, exc.message)

    async def prompt(self, frame: Frame) -> None:
        """``prompt``: as ``POST /v1/sessions/{id}/prompts``."""
        content, key = frame.get("content"), frame.get("idempotency_key")
        if not isinstance(content, str) or not (key is None or isinstance(key, str)):
            raise BadRequest("content must be a string")
        receipt = await self.service.submit_prompt(self.principal, self.session_id, content, key)
        await self.reply(frame, frames.prompt_accepted(receipt))


class UserSocket(ResumableSocket):
    """The EventBus view of one owner: every event of their sessions, resumable by position."""

    __slots__ = ("_dropped",)

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        principal: Principal,
        since: int,
        dropped: Gap | None,
    ) -> None:
        super().__init__(websocket, service, hub, principal, since)
        self._dropped = dropped  # positions after since that retention dropped

    async def pump(self, feed: EventFeed) -> None:
        dropped, self._dropped = self._dropped, None
        if dropped is None or await self.send_frame(frames.gap(dropped.first, dropped.last)):
            await super().pump(feed)

    async def on_frame(self, frame: Frame) -> None:
        await self.reply_error(frame, "bad_request", f"unknown frame type {frame['type']!r}")


def serve_client(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> Coroutine[Any, Any, None]:
    """The client socket's life (await it): authenticate, check the session, replay + follow."""
    return handshake(websocket, hub, _admit_client(websocket, service, hub, session_id))


async def _admit_client(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> tuple[ClientSocket, EventFeed]:
    since_param = websocket.query_params.get("since", "0")
    if not since_param.isdigit():
        raise BadRequest("since must be a non-negative integer")
    since = int(since_param)
    streaming = streaming_state(websocket.app)
    tickets = streaming.tickets if streaming is not None else None
    principal = await upgrade_principal(websocket, service, tickets)
    _, feed = await service.follow(principal, session_id, since)
    realtime = streaming.realtime if streaming is not None else None
    socket = ClientSocket(websocket, service, hub, principal, session_id, since, realtime)
    return socket, feed


def serve_user(
    websocket: WebSocket, service: GatewayService, hub: SocketHub
) -> Coroutine[Any, Any, None]:
    """The user stream's life (await it): every event of the owner's sessions after ``since``
    (``?tag=``: of those tagged so)."""
    return handshake(websocket, hub, _admit_user(websocket, service, hub))


async def _admit_user(
    websocket: WebSocket, service: GatewayService, hub: SocketHub
) -> tuple[UserSocket, EventFeed]:
    since = parse_position(websocket.query_params.get("since"))
    streaming = streaming_state(websocket.app)
    if streaming is None:
        raise Unavailable("gateway is starting")
    principal = await upgrade_principal(websocket, service, streaming.tickets)
    tag = websocket.query_params.get("tag")
    feed, dropped = await streaming.streams.follow_user(principal, since, tag)
    gap = Gap(*dropped) if dropped is not None else None
    return UserSocket(websocket, service, hub, principal, since, gap), feed
