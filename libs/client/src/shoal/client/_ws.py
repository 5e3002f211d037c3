"""The WebSocket half of the client: a session's event stream and the runner connection.

Both reconnect on their own after a drop, a gateway restart (1012) or a lag cut-off (4408);
the event stream resumes from the last seq it yielded, so the caller sees every event once,
in order. Closes that reconnecting cannot fix (4400, 4401, 4404, 4409, 4410, 1008, 1009) raise
:class:`ShoalConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Generator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from shoal.client._errors import ShoalAPIError, ShoalConnectionClosed
from shoal.client._models import Event, Prompt
from shoal.client._streaming import (
    DeltaCallback,
    FrameHandler,
    ProxyHandler,
    ProxyRequest,
    ProxyResponse,
)

log = logging.getLogger(__name__)

# Closes after which reconnecting with the same credentials cannot help.
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 4400, 4401, 4403, 4404, 4409, 4410})
FATAL_HTTP_STATUSES = frozenset({400, 401, 403, 404})
MAX_FRAME_BYTES = 1024 * 1024


class _Frame(msgspec.Struct, kw_only=True):
    type: str
    seq: int | None = None
    event: Event | None = None
    prompt_id: str | None = None
    content: str | None = None
    message_id: str | None = None
    ref: str | int | None = None
    code: str | None = None
    message: str | None = None
    name: str | None = None
    value: str | None = None
    # gap frames
    from_: int | None = msgspec.field(default=None, name="from")
    to: int | None = None
    # runner proxy
    id: str | int | None = None
    method: str | None = None
    path: str | None = None
    query: str | None = None
    headers: dict[str, str] | None = None
    body_b64: str | None = None


_frame_decoder = msgspec.json.Decoder(_Frame)
_encoder = msgspec.json.Encoder()


def websocket_url(base_url: str, path: str, query: dict[str, Any] | None = None) -> str:
    """``http(s)://host[/prefix]`` + ``path`` as a ``ws(s)://`` URL."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode(query or {}), "")
    )


def _close_of(exc: ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    return 1006, "connection lost"


async def _close_draining(conn: ClientConnection) -> None:
    """Close, reading (and dropping) what is still queued meanwhile.

    A stream's unread frames fill the connection's queue, which pauses reading: the server's
    close frame would then sit unread until the close timeout (10 s). Draining lets it through.
    """
    closing = asyncio.create_task(conn.close())
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(10):
            while True:
                await conn.recv()
    await closing


class _Backoff:
    """Exponential delays with jitter: 0.1 s doubling up to ``cap``; ``reset`` after progress."""

    def __init__(self, cap: float = 5.0) -> None:
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> None:
        delay = min(self.cap, 0.1 * 2**self.attempt)
        self.attempt += 1
        await asyncio.sleep(delay * (0.5 + secrets.randbelow(500) / 1000))


async def _open(url: str, headers: dict[str, str]) -> ClientConnection:
    return await connect(
        url,
        additional_headers=headers,
        compression=None,  # the gateway runs without permessage-deflate
        max_size=MAX_FRAME_BYTES * 2,
        open_timeout=10,
    )


class EventStream:
    """A session's events after ``since``: replay, then live, resuming by seq after disconnects.

    Example::

        async with client.connect_session(session_id, since=41) as events:
            async for event in events:          # event.seq == 42, 43, ...
                handle(event)
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        since: int,
        reconnect: bool,
        *,
        fallback_urls: Sequence[str] = (),
        on_delta: DeltaCallback | None = None,
        ping_interval: float | None = 30.0,
    ) -> None:
        # Other gateways to resume on when this one goes away (behind a load balancer: none).
        self._urls = [url, *fallback_urls]
        self._url_index = 0
        self._headers = headers
        self._reconnect = reconnect
        self._conn: ClientConnection | None = None
        self._backoff = _Backoff()
        self._closed = False
        self._on_delta = on_delta
        self._ping_interval = ping_interval
        self._pinger: asyncio.Task[None] | None = None
        self.last_seq = since
        self.reconnects = -1  # connections made after the first
        # (from, to) seq ranges the server said are gone (older than the ledger's retention)
        self.gaps: list[tuple[int, int]] = []

    @property
    def _url(self) -> str:
        return self._urls[self._url_index % len(self._urls)]

    def drop(self) -> None:
        """Cut the connection abruptly (no close frame), as a network failure would; the
        stream resumes from ``last_seq`` on the next read."""
        conn, self._conn = self._conn, None
        self._stop_pinger()
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    def _stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None

    async def _ping(self, conn: ClientConnection, interval: float) -> None:
        # The gateway closes sockets it heard nothing from for ws_idle_timeout (1001).
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await conn.send('{"type":"ping"}')

    async def __aenter__(self) -> EventStream:
        await self._ensure()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._stop_pinger()
        if self._conn is not None:
            await _close_draining(self._conn)
            self._conn = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            conn = await self._ensure()
            try:
                raw = await conn.recv()
            except ConnectionClosed as exc:
                self._conn = None
                self._stop_pinger()
                if not await self._after_close(*_close_of(exc)):
                    break
                continue
            if isinstance(raw, str) and raw.startswith('{"type":"delta"'):
                if self._on_delta is None:
                    continue
                with contextlib.suppress(msgspec.DecodeError):
                    self._on_delta(msgspec.json.decode(raw))
                continue
            try:
                frame = _frame_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("ignoring a malformed frame")
                continue
            if frame.type == "event" and frame.event is not None and frame.seq is not None:
                if frame.seq <= self.last_seq:
                    continue  # already yielded before a reconnect
                self.last_seq = frame.seq
                self._backoff.reset()
                return frame.event
            if frame.type == "gap" and frame.from_ is not None and frame.to is not None:
                log.warning("events %d..%d are gone from the ledger", frame.from_, frame.to)
                if frame.to > self.last_seq:
                    self.gaps.append((frame.from_, frame.to))
                    self.last_seq = frame.to
            elif frame.type == "error":
                log.warning("gateway reported %s: %s", frame.code, frame.message)
        raise StopAsyncIteration

    async def _after_close(self, code: int, reason: str) -> bool:
        """Whether to go on (after the back-off) once the socket closed with ``code``."""
        if self._closed or code == 1000:
            return False
        if code in FATAL_CLOSE_CODES or not self._reconnect:
            raise ShoalConnectionClosed(code, reason)
        log.info("event stream closed (%s %s); resuming from seq %d", code, reason, self.last_seq)
        if code == 1006 and len(self._urls) > 1:
            self._url_index += 1  # that gateway is gone: resume on the next one at once
        elif code != 1012:  # a restarting gateway asks for an immediate reconnect elsewhere
            await self._backoff.sleep()
        return True

    async def _ensure(self) -> ClientConnection:
        while self._conn is None:
            url = f"{self._url}{'&' if '?' in self._url else '?'}since={self.last_seq}"
            try:
                self._conn = await _open(url, self._headers)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in FATAL_HTTP_STATUSES or not self._reconnect:
                    raise ShoalConnectionClosed(status, f"handshake refused with {status}") from exc
                await self._backoff.sleep()
            except (OSError, TimeoutError, InvalidHandshake):
                if not self._reconnect:
                    raise
                self._url_index += 1  # try the next gateway, if there is one
                await self._backoff.sleep()
            else:
                self.reconnects += 1
                if self._ping_interval:
                    self._pinger = asyncio.create_task(self._ping(self._conn, self._ping_interval))
        return self._conn


_CLOSED = object()


class RunnerConnection:
    """A runner's link to its session: dispatched prompts in, completions out.

    One background reader dispatches frames; after a drop it reconnects, says ``hello`` again and
    re-sends completions that were not yet acknowledged (the same ``message_id``, so the session
    records each once). A prompt the session re-dispatches after it was completed here is skipped.
    Frames it has no method for (neither a prompt, a proxied request nor the answer to one of its
    own requests) go to ``on_frame`` when given; :meth:`send` sends such frames.

    Example::

        async with connect_runner(base_url, session_id, runner_token) as runner:
            async for prompt in runner.prompts():
                await runner.complete(prompt.prompt_id, answer(prompt.content))
    """

    def __init__(
        self,
        url: str,
        runner_token: str,
        reconnect: bool,
        ack_timeout: float,
        on_http_request: ProxyHandler | None = None,
        on_frame: FrameHandler | None = None,
    ) -> None:
        self._url = url
        self._on_http_request = on_http_request
        self._on_frame = on_frame
        self._proxy_tasks: set[asyncio.Task[None]] = set()
        self._headers = {"Authorization": f"Bearer {runner_token}"}
        self._reconnect = reconnect
        self._ack_timeout = ack_timeout
        self._conn: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._prompts: asyncio.Queue[Prompt | object] = asyncio.Queue()
        self._acks: dict[str, asyncio.Future[_Frame]] = {}
        self._unacked: dict[str, bytes] = {}  # ref -> completion frame, re-sent on reconnect
        self._completed: set[str] = set()
        self._backoff = _Backoff()
        self._failure: BaseException | None = None
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.connection_id: str | None = None

    async def start(self) -> None:
        """Connect (raising if the token or session is refused) and start the reader."""
        await self._open()
        self._reader = asyncio.create_task(self._read_loop())
        self._pinger = asyncio.create_task(self._keepalive())

    async def _keepalive(self, interval: float = 30.0) -> None:
        # The gateway closes a socket it heard nothing from for ws_idle_timeout (1001); an idle
        # runner would otherwise reconnect (and announce itself again) every two minutes.
        while not self._closing:
            await asyncio.sleep(interval)
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(ConnectionClosed):
                    await conn.send('{"type":"ping"}')

    async def __aenter__(self) -> RunnerConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closing = True
        if self._pinger is not None:
            self._pinger.cancel()
        if self._conn is not None:
            await self._conn.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._prompts.put_nowait(_CLOSED)

    async def prompts(self) -> AsyncIterator[Prompt]:
        """Prompts as the session dispatches them; ends when the connection is closed."""
        while True:
            item = await self._prompts.get()
            if not isinstance(item, Prompt):
                self._prompts.put_nowait(item)  # wake any other iterator too
                if self._failure is not None:
                    raise self._failure
                return
            if item.prompt_id in self._completed:
                continue
            yield item

    async def complete(self, prompt_id: str, content: str, *, message_id: str | None = None) -> str:
        """Send the final answer to ``prompt_id`` and wait for the gateway to accept it.

        Returns the message id (generated unless given). Raises :class:`ShoalAPIError` when the
        session refuses it, ``TimeoutError`` when no acknowledgement came in ``ack_timeout``.
        """
        message_id = message_id or f"msg_{secrets.token_hex(12)}"
        ref = secrets.token_hex(6)
        frame = _encoder.encode(
            {
                "type": "message.completed",
                "id": ref,
                "prompt_id": prompt_id,
                "message_id": message_id,
                "content": content,
            }
        )
        future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
        self._acks[ref] = future
        self._unacked[ref] = frame
        try:
            await self._send(frame)
            ack = await asyncio.wait_for(future, self._ack_timeout)
        finally:
            self._acks.pop(ref, None)
            self._unacked.pop(ref, None)
        if ack.type == "error":
            raise ShoalAPIError.from_frame(msgspec.structs.asdict(ack))
        self._completed.add(prompt_id)
        return message_id

    async def get_secret(self, name: str) -> str:
        """The value of secret ``name``, if the session's ``metadata.allowed_secrets`` names it.

        Raises :class:`ShoalAPIError` (403 ``forbidden`` when not allowed, 404 when allowed but
        not stored), ``TimeoutError`` when no answer came in ``ack_timeout``. Do not log it.
        """
        ref = secrets.token_hex(6)
        future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
        self._acks[ref] = future
        try:
            await self._send(_encoder.encode({"type": "secret.get", "id": ref, "name": name}))
            answer = await asyncio.wait_for(future, self._ack_timeout)
        finally:
            self._acks.pop(ref, None)
        if answer.type != "secret" or answer.value is None:
            raise ShoalAPIError.from_frame({"code": answer.code, "message": answer.message})
        return answer.value

    async def send_delta(self, prompt_id: str, text: str, **extra: Any) -> None:
        """Stream a piece of the answer to the session's clients (``delta`` frames).

        Not acknowledged and not stored: deltas are ephemeral and dropped while disconnected;
        the durable answer is :meth:`complete`.
        """
        conn = self._conn
        if conn is None:
            return
        frame = {**extra, "type": "message.delta", "prompt_id": prompt_id, "text": text}
        with contextlib.suppress(ConnectionClosed):
            await conn.send(_encoder.encode(frame).decode())

    async def send(self, frame: dict[str, Any]) -> None:
        """Send a frame as it is, once connected (not acknowledged, not re-sent after a drop).

        For frames this class has no method for; the gateway's answer to one that carries an
        ``id`` comes back (with ``ref``) through ``on_frame``.
        """
        await self._send(_encoder.encode(frame))

    async def _serve_http(self, frame: _Frame) -> None:
        """Answer one proxied HTTP request with the ``on_http_request`` handler."""
        assert self._on_http_request is not None
        try:
            request = ProxyRequest(
                method=frame.method or "GET",
                path=frame.path or "/",
                query=frame.query or "",
                headers=frame.headers or {},
                body=base64.b64decode(frame.body_b64 or ""),
            )
            response = await self._on_http_request(request)
        except Exception:
            log.exception("the proxy handler failed")
            response = ProxyResponse(status=500, body=b"runner proxy handler failed")
        answer = {
            "type": "http.response",
            "ref": frame.id,
            "status": response.status,
            "headers": response.headers,
            "body_b64": base64.b64encode(response.body).decode(),
        }
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ConnectionClosed):
                await conn.send(_encoder.encode(answer).decode())

    async def _send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        await self._connected.wait()
        if self._failure is not None:
            raise self._failure
        if self._conn is None:
            return  # reconnecting: the reader re-sends every unacknowledged completion
        try:
            await self._conn.send(frame.decode())
        except ConnectionClosed:
            pass  # the reader reconnects and re-sends every unacknowledged completion

    async def _open(self) -> None:
        try:
            conn = await _open(self._url, self._headers)
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ShoalConnectionClosed(status, f"handshake refused with {status}") from exc
        # The first answer is hello.ack, or the close frame of a refusal (4401, 4404, ...).
        try:
            await conn.send(_encoder.encode({"type": "hello"}).decode())
            while True:
                raw = await conn.recv()
                frame = _frame_decoder.decode(raw)
                if frame.type == "hello.ack":
                    break
                self._dispatch(frame, raw)
        except ConnectionClosed as exc:
            raise ShoalConnectionClosed(*_close_of(exc)) from exc
        self._conn = conn
        self._connected.set()
        for frame_bytes in list(self._unacked.values()):
            await conn.send(frame_bytes.decode())

    async def _read_loop(self) -> None:
        try:
            while not self._closing:
                assert self._conn is not None
                try:
                    raw = await self._conn.recv()
                except ConnectionClosed as exc:
                    await self._reopen(*_close_of(exc))
                    continue
                try:
                    frame = _frame_decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.warning("ignoring a malformed frame")
                    continue
                self._dispatch(frame, raw)
        except ShoalConnectionClosed as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the caller informed instead of hanging
            log.exception("runner connection failed")
            self._fail(exc)

    async def _reopen(self, code: int, reason: str) -> None:
        self._connected.clear()
        self._conn = None
        if self._closing:
            return
        if code in FATAL_CLOSE_CODES or code == 1000 or not self._reconnect:
            raise ShoalConnectionClosed(code, reason)
        while not self._closing:
            if code != 1012:
                await self._backoff.sleep()
            code = 0
            try:
                await self._open()
            except ShoalConnectionClosed as exc:
                if exc.code in FATAL_CLOSE_CODES or exc.code in FATAL_HTTP_STATUSES:
                    raise
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                log.info("runner reconnect failed: %s", exc)
            else:
                self._backoff.reset()
                return

    def _dispatch(self, frame: _Frame, raw: str | bytes) -> None:
        if frame.type == "http.request":
            if self._on_http_request is not None:
                task = asyncio.create_task(self._serve_http(frame))
                self._proxy_tasks.add(task)
                task.add_done_callback(self._proxy_tasks.discard)
            return
        if frame.type == "prompt" and frame.prompt_id is not None:
            self._prompts.put_nowait(Prompt(prompt_id=frame.prompt_id, content=frame.content or ""))
        elif frame.ref is not None and str(frame.ref) in self._acks:
            future = self._acks[str(frame.ref)]
            if not future.done():
                future.set_result(frame)
        elif self._on_frame is not None:
            self._on_frame(msgspec.json.decode(raw))
        elif frame.type == "error":
            log.warning("gateway reported %s: %s", frame.code, frame.message)

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._connected.set()  # wake senders so they see the failure
        for future in self._acks.values():
            if not future.done():
                future.set_exception(exc)
        self._prompts.put_nowait(_CLOSED)


class connect_runner:  # noqa: N801 - used like a function, as websockets' connect is
    """Connect a runner to its session (``runner_token`` is what ``create_session`` returned).

    Await it (``runner = await connect_runner(...)``, then ``await runner.aclose()``) or use it
    as ``async with connect_runner(...) as runner:``. A refused token or an unknown session
    raises :class:`ShoalConnectionClosed` (4401 / 4404).
    """

    def __init__(
        self,
        base_url: str,
        session_id: str,
        runner_token: str,
        *,
        reconnect: bool = True,
        ack_timeout: float = 15.0,
        on_http_request: ProxyHandler | None = None,
        on_frame: FrameHandler | None = None,
    ) -> None:
        url = websocket_url(base_url, f"/v1/sessions/{quote(session_id, safe='')}/runner")
        self._runner = RunnerConnection(
            url,
            runner_token,
            reconnect,
            ack_timeout,
            on_http_request=on_http_request,
            on_frame=on_frame,
        )

    async def _start(self) -> RunnerConnection:
        await self._runner.start()
        return self._runner

    def __await__(self) -> Generator[Any, None, RunnerConnection]:
        return self._start().__await__()

    async def __aenter__(self) -> RunnerConnection:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._runner.aclose()
