"""The runner protocol: a session's runner socket, and the runner proxy over it.

``/v1/sessions/{id}/runner`` (``Authorization: Bearer <runner token>`` or ``?token=``).
The socket follows its session's ledger from its own ``runner.connected`` on (what happened
before, the session re-dispatches on connect) and tells the runner what concerns it:
``prompt`` (``prompt.dispatched``), ``abort`` (``prompt.aborted``; ``prompt.failed`` with reason
timeout, as ``"reason":"timeout"``), ``answer`` (``question.answered``), ``question.expired``,
``terminated`` then close 4410, ``hibernate`` then close 1000 (release the sandbox; connecting
again wakes the session), and close 4409 "replaced" when another connection took over.
Replies: ``hello.ack``, ``message.accepted``, ``question.accepted``, ``error.accepted``,
``secret``, ``pong``, ``error``; and ``http.request`` (runner proxy).
Runner -> server: ``hello``; ``ping``; ``message.completed`` (a command); ``message.delta``
(relayed on core NATS to the session's client sockets as ``delta`` frames: not acknowledged,
not stored); ``question`` / ``error`` (commands); ``heartbeat`` (activity: at most one
``runner.heartbeat`` command per ``ws_runner_heartbeat_interval``; deltas count too);
``http.response`` (the answer to an ``http.request``); ``secret.get`` (only a name in the
session's ``metadata.allowed_secrets``; values are never logged).
A runner silent for ``ws_runner_idle_timeout`` is declared gone: 1001 and ``runner.disconnect``
{reason: "heartbeat"}. Every ``runner.disconnect`` carries this socket's connection id, so the
session ignores one from a connection it no longer has.
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
from shoal.common.errors import BadRequest, ShoalError
from shoal.common.messaging import dumps, loads, new_id
from shoal.gateway.service import EventFeed, Gap, GatewayService, bearer_token
from shoal.gateway.ws import frames
from shoal.gateway.ws.connection import ManagedSocket, SocketHub, handshake
from shoal.gateway.ws.frames import Frame
from shoal.gateway.ws.upgrade import StreamingState, streaming_state

log = logging.getLogger(__name__)


class RunnerSocket(ManagedSocket):
    """The session's runner: its session's instructions out; completions, deltas, questions,
    errors, heartbeats and proxy answers in."""

    __slots__ = (
        "_announced",
        "_attached",
        "_beat_every",
        "_last_beat",
        "_proxied",
        "_proxy_sub",
        "connection_id",
        "snapshot",
        "streaming",
    )

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
        self._idle = settings.ws_runner_idle_timeout.total_seconds()  # the heartbeat grace
        # Often enough that the session's watchdog (prompt_timeout) always sees the activity.
        self._beat_every = min(
            settings.ws_runner_heartbeat_interval.total_seconds(), snapshot.prompt_timeout / 4
        )
        self._last_beat = float("-inf")
        self.streaming = streaming
        self._proxied: dict[str, asyncio.Future[Frame]] = {}
        self._announced = False
        self._attached = False  # this connection's runner.connected seen on the feed
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
        reason = self.disconnect_reason()
        if self._announced and reason is not None:
            try:
                await self.service.runner_disconnect(self.snapshot, self.connection_id, reason)
            except ShoalError as exc:
                log.warning("runner.disconnect for %s not published: %s", self.snapshot.id, exc)

    def disconnect_reason(self) -> str | None:
        """The ``runner.disconnect`` reason for how the socket ended; None: the session already
        knows (it replaced or terminated this connection)."""
        code = self._close_with[0] if self._close_with is not None else None
        if code in (frames.CLOSE_REPLACED, frames.CLOSE_TERMINATED):
            return None
        if code == frames.CLOSE_IDLE:
            return "heartbeat"
        if code == frames.CLOSE_HIBERNATED:
            return "hibernated"
        return "closed"

    async def pump(self, feed: EventFeed) -> None:
        while True:
            event = await feed.next()
            if isinstance(event, Gap):
                continue  # a runner is sent instructions, not positions
            kind, data = event.envelope.type, event.envelope.data
            if not self._attached:
                # Before this connection's runner.connected the ledger spoke to another one;
                # whatever still concerns the runner is re-dispatched after it.
                self._attached = (
                    kind == "runner.connected" and data.get("connection_id") == self.connection_id
                )
                continue
            if not await self.instruct(kind, data):
                return

    async def instruct(self, kind: str, data: dict[str, Any]) -> bool:
        """Tell the runner what the session's event ``kind`` means for it; False: the socket
        ends (closed by the event, or already closing)."""
        if kind == "prompt.dispatched":
            return await self.send_frame(
                frames.runner_prompt(data.get("prompt_id"), data.get("content"))
            )
        if kind == "prompt.aborted":
            return await self.send_frame(frames.runner_abort(data.get("prompt_id")))
        if kind == "prompt.failed" and data.get("reason") == "timeout":
            return await self.send_frame(frames.runner_abort(data.get("prompt_id"), "timeout"))
        if kind == "question.answered":
            frame = frames.runner_answer(data.get("question_id"), data.get("answer"))
            return await self.send_frame(frame)
        if kind == "question.expired":
            return await self.send_frame(frames.question_expired(data.get("question_id")))
        if kind == "session.terminated":
            await self.send_last(
                frames.terminated(data.get("reason")),
                frames.CLOSE_TERMINATED,
                frames.TERMINATED_REASON,
            )
            return False
        if kind == "session.status" and data.get("status") == "hibernated":
            await self.send_last(
                frames.hibernate(), frames.CLOSE_HIBERNATED, frames.HIBERNATED_REASON
            )
            return False
        if kind == "runner.disconnected" and data.get("connection_id") == self.connection_id:
            # The ledger says this connection is gone (another one took over).
            self.finish(frames.CLOSE_REPLACED, frames.REPLACED_REASON)
            return False
        return True

    async def send_last(self, frame: Frame, code: int, reason: str) -> None:
        """Send ``frame``, let it reach the transport, then close with ``code``."""
        if await self.send_frame(frame):
            writer = self._writer
            if writer is not None:
                await asyncio.wait((writer,), timeout=self._close_timeout)
        self.finish(code, reason)

    async def on_frame(self, frame: Frame) -> None:
        kind = frame["type"]
        try:
            if kind == "hello":
                await self.reply(frame, frames.hello_ack(self.snapshot.id, self.connection_id))
            elif kind == "message.completed":
                result = await self.service.complete_message(
                    self.snapshot,
                    frame.get("prompt_id"),
                    frame.get("content"),
                    frame.get("message_id"),
                )
                await self.reply(frame, frames.message_accepted(result))
            elif kind == "message.delta":
                await self.relay_delta(frame)
                await self.heartbeat(frame.get("prompt_id"))
            elif kind == "heartbeat":
                await self.heartbeat(frame.get("prompt_id"))
            elif kind == "question":
                question = await self.service.runner_question(
                    self.snapshot, self.connection_id, frame
                )
                accepted = frames.question_accepted(question.question_id, question.expires_at)
                await self.reply(frame, accepted)
            elif kind == "error":
                prompt_id, message = frame.get("prompt_id") or "", frame.get("message")
                if not isinstance(prompt_id, str) or not isinstance(message, str):
                    raise BadRequest("an error frame has a message and an optional prompt_id")
                error = await self.service.runner_error(
                    self.snapshot, self.connection_id, prompt_id, message
                )
                await self.reply(frame, frames.error_accepted(error.prompt_id))
            elif kind == "http.response":
                future = self._proxied.pop(str(frame.get("ref")), None)
                if future is not None and not future.done():
                    future.set_result(frame)
            elif kind == "secret.get":
                await self.send_secret(frame)
            else:
                await self.reply_error(frame, "bad_request", f"unknown frame type {kind!r}")
        except ShoalError as exc:
            await self.reply_error(frame, exc.code, exc.message)

    async def heartbeat(self, prompt_id: object) -> None:
        """Runner activity: a ``runner.heartbeat`` command, at most one per ``_beat_every`` s
        (the session records one per half prompt_timeout; more would only load the stream)."""
        now = self._loop.time()
        if now - self._last_beat < self._beat_every:
            return
        if prompt_id is not None and not isinstance(prompt_id, str):
            raise BadRequest("prompt_id must be an id")
        self._last_beat = now
        await self.service.runner_heartbeat(self.snapshot, self.connection_id, prompt_id or "")

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
    feed = await service.follow_runner_events(session_id)
    streaming = streaming_state(websocket.app)
    return RunnerSocket(websocket, service, hub, snapshot, new_id("rcn"), streaming), feed
