"""The runner protocol: a session's runner socket, and the runner proxy over it.

``/v1/sessions/{id}/runner`` (``Authorization: Bearer <runner token>`` or ``?token=``).
Server -> runner: ``prompt`` for each ``prompt.dispatched`` after connecting, ``hello.ack``,
``message.accepted``, ``secret``, ``http.request`` (runner proxy), ``pong``, ``error``.
Runner -> server: ``hello``; ``ping``; ``message.completed`` (a command); ``message.delta``
(relayed on core NATS to the session's client sockets as ``delta`` frames: not acknowledged,
not stored); ``http.response`` (the answer to an ``http.request``); ``secret.get`` (only a name
in the session's ``metadata.allowed_secrets``; values are never logged).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from starlette.websockets import WebSocket

from shoal.common.contracts import SessionSnapshot
from shoal.common.errors import ShoalError
from shoal.common.messaging import dumps, loads, new_id
from shoal.gateway.service import EventFeed, Gap, GatewayService, bearer_token
from shoal.gateway.ws import frames
from shoal.gateway.ws.connection import ManagedSocket, SocketHub, handshake
from shoal.gateway.ws.frames import Frame
from shoal.gateway.ws.upgrade import StreamingState, streaming_state

log = logging.getLogger(__name__)


class RunnerSocket(ManagedSocket):
    """The session's runner: dispatched prompts out, completions, deltas and answers in."""

    __slots__ = ("_announced", "_proxied", "_proxy_sub", "connection_id", "snapshot", "streaming")

    def __init__(
        self,
        websocket: WebSocket,
        service: GatewayService,
        hub: SocketHub,
        snapshot: SessionSnapshot,
        connection_id: str,
        streaming: StreamingState | None,
    ) -> None:
        super().__init__(websocket, service, hub)
        self.snapshot = snapshot
        self.connection_id = connection_id
        settings = service.settings
        self._rate = settings.ws_runner_rate_limit
        self._burst = self._tokens = float(settings.ws_runner_rate_burst)
        self.streaming = streaming
        self._proxied: dict[str, asyncio.Future[Frame]] = {}
        self._announced = False
        self._proxy_sub: Subscription | None = None

    async def on_accepted(self) -> None:
        """Announce the runner (``runner.connect``), then answer the session's proxy requests."""
        await self.service.runner_connect(self.snapshot, self.connection_id)
        self._announced = True
        if self.streaming is not None:
            self._proxy_sub = await self.streaming.realtime.serve_proxy(
                self.snapshot.id, self.proxy
            )

    async def stopped(self) -> None:
        proxy_sub, self._proxy_sub = self._proxy_sub, None
        if proxy_sub is not None:
            with contextlib.suppress(NatsError):
                await proxy_sub.unsubscribe()
        if self._announced:
            try:
                await self.service.runner_disconnect(self.snapshot, self.connection_id)
            except ShoalError as exc:
                log.warning("runner.disconnect for %s not published: %s", self.snapshot.id, exc)

    async def pump(self, feed: EventFeed) -> None:
        while True:
            event = await feed.next()
            if isinstance(event, Gap):
                continue  # a runner is sent prompts, not positions
            data = event.envelope.data
            prompt = frames.runner_prompt(data.get("prompt_id"), data.get("content"))
            if not await self.send_frame(prompt):
                return

    async def on_frame(self, frame: Frame) -> None:
        kind = frame["type"]
        if kind == "hello":
            await self.reply(frame, frames.hello_ack(self.snapshot.id, self.connection_id))
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
            await self.reply(frame, frames.message_accepted(result))
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

    async def relay_delta(self, frame: Frame) -> None:
        """``message.delta`` -> core NATS -> the session's client sockets as ``delta`` frames.

        Not acknowledged (full rate), not a command, not in the ledger: deltas are ephemeral.
        """
        if self.streaming is None:
            return
        delta = frames.delta(self.snapshot.id, frame)
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
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._proxied[ref] = future
        try:
            if not await self.send_frame(frames.http_request(body, ref)):
                return dumps({"status": 502, "error": "runner socket is closing"})
            answer = await asyncio.wait_for(future, settings.proxy_timeout.total_seconds())
        except TimeoutError:
            return dumps({"status": 504, "error": "the runner did not answer in time"})
        finally:
            self._proxied.pop(ref, None)
        return dumps(proxy_answer(answer, settings.proxy_max_body_bytes))

    async def send_secret(self, frame: Frame) -> None:
        """``secret.get``: the value goes to this socket and nowhere else."""
        try:
            secret = await self.service.runner_secret(self.snapshot, frame.get("name"))
        except ShoalError as exc:  # messages never carry a value
            await self.reply_error(frame, exc.code, exc.message)
            return
        await self.reply(frame, frames.secret(secret))


def proxy_answer(frame: Frame, max_body: int) -> dict[str, Any]:
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


def serve_runner(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> Coroutine[Any, Any, None]:
    """The runner socket's life (await it): check the runner token, follow dispatches, announce
    the runner, relay until it leaves."""
    return handshake(websocket, hub, _admit_runner(websocket, service, hub, session_id))


async def _admit_runner(
    websocket: WebSocket, service: GatewayService, hub: SocketHub, session_id: str
) -> tuple[RunnerSocket, EventFeed]:
    token = bearer_token(websocket.headers.get("authorization"))
    snapshot = await service.authenticate_runner(
        session_id, token or websocket.query_params.get("token")
    )
    # Subscribe before announcing: the dispatch the connect triggers must not be missed.
    feed = await service.follow_dispatches(session_id)
    streaming = streaming_state(websocket.app)
    return RunnerSocket(websocket, service, hub, snapshot, new_id("rcn"), streaming), feed
