"""Event streams over server-sent events, for clients that cannot open a WebSocket.

The gateway sends each event as ``id: <position>`` + ``data: <the WebSocket frame>``, a range
that retention dropped as ``event: gap``, and ends a stream whose reader fell behind with
``event: lagging``. :class:`SseEventStream` reconnects after any drop with ``Last-Event-ID``
set to the last position it yielded, so the caller sees every event once, in order.

Example::

    async with client.stream_session(session_id) as events:
        async for event in events:
            print(event.seq, event.type)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType

import httpx
import msgspec
import stamina
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from shoal.client._errors import ShoalAPIError
from shoal.client._models import Event
from shoal.client._retry import CONNECTION_ERRORS, parse_retry_after

log = logging.getLogger(__name__)

# Answers before the stream starts that reconnecting cannot fix (problem+json).
FATAL_STATUSES = frozenset({400, 401, 403, 404, 405})
RECONNECT_PAUSE = 1.0  # seconds, the stream's own "retry: 1000", after a connection with no event


class _EventFrame(msgspec.Struct, kw_only=True):
    type: str
    seq: int | None = None
    event: Event | None = None
    from_: int | None = msgspec.field(default=None, name="from")
    to: int | None = None


_frame_decoder = msgspec.json.Decoder(_EventFrame)


def _reconnectable(exc: Exception) -> bool:
    if isinstance(exc, ShoalAPIError):
        return exc.status not in FATAL_STATUSES
    return isinstance(exc, (*CONNECTION_ERRORS, _StreamEnded))


class _StreamEnded(Exception):
    """The server ended the stream (a restart, a lagging reader): resume where it stopped."""


class SseEventStream:
    """The events of one SSE stream after ``since``, resuming after drops by ``Last-Event-ID``.

    ``last_seq`` is the last position yielded (a session's seq, or the user stream's DELIVER
    position); ``gaps`` the ``(from, to)`` ranges the server said are gone; ``reconnects`` how
    many connections were opened after the first. Closes the server refuses for good (400,
    401, 403, 404) raise :class:`ShoalAPIError`.
    """

    def __init__(
        self, http: httpx.AsyncClient, path: str, since: int, *, reconnect: bool = True
    ) -> None:
        self._http = http
        self._path = path
        self._reconnect = reconnect
        self._events: AsyncGenerator[Event, None] | None = None
        self.last_seq = since
        self.reconnects = -1
        self.gaps: list[tuple[int, int]] = []

    async def __aenter__(self) -> SseEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._events is None:
            self._events = self._follow()
        return self._events

    async def _follow(self) -> AsyncGenerator[Event, None]:
        while True:
            before = self.last_seq
            try:
                async with contextlib.AsyncExitStack() as stack:
                    source = await self._open(stack)
                    async for sse in source.aiter_sse():
                        event = self._read(sse)
                        if event is not None:
                            yield event
                raise _StreamEnded("the server ended the stream")
            except Exception as exc:
                if isinstance(exc, _StreamEnded) and not self._reconnect:
                    return  # the caller resumes from last_seq, if it wants more
                if not self._reconnect or not _reconnectable(exc):
                    raise
                log.info("SSE stream dropped (%s); resuming after %d", exc, self.last_seq)
                if self.last_seq == before:
                    await asyncio.sleep(RECONNECT_PAUSE)  # no progress: do not spin

    async def _open(self, stack: contextlib.AsyncExitStack) -> EventSource:
        """Open the stream after ``last_seq``, retrying with backoff while it may succeed."""
        async for attempt in stamina.retry_context(
            on=_reconnectable,
            attempts=None if self._reconnect else 1,
            timeout=None,
            wait_max=5.0,
        ):
            with attempt:
                opening = contextlib.AsyncExitStack()
                async with opening:
                    source = await opening.enter_async_context(
                        aconnect_sse(
                            self._http,
                            "GET",
                            self._path,
                            headers={"Last-Event-ID": str(self.last_seq)},
                        )
                    )
                    await _check(source.response)
                    stack.push_async_exit(opening.pop_all())
                self.reconnects += 1
                return source
        raise AssertionError("unreachable: retry_context raises its last error")

    def _read(self, sse: ServerSentEvent) -> Event | None:
        if sse.event == "lagging":
            raise _StreamEnded("fell behind (lagging)")
        if not sse.data:
            return None
        frame = _frame_decoder.decode(sse.data)
        if frame.type == "gap" and frame.from_ is not None and frame.to is not None:
            self.gaps.append((frame.from_, frame.to))
            return None
        if frame.type != "event" or frame.event is None or frame.seq is None:
            return None
        if frame.seq <= self.last_seq:
            return None  # already yielded before a reconnect
        self.last_seq = frame.seq
        return frame.event


async def _check(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    await response.aread()
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"code": "http_error", "detail": response.text[:200]}
    raise ShoalAPIError(
        response.status_code,
        str(problem.get("code") or "http_error"),
        str(problem.get("detail") or problem.get("title") or ""),
        problem,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )
