"""The gateway's NATS I/O outside the ledger: streaming deltas, WebSocket tickets, runner proxy.

- **Deltas** travel on core NATS (``Subjects.session_delta``), never through JetStream or the
  session's state: a runner may stream hundreds per second. A gateway subscribes once per
  session it holds client sockets for (interest-based) and fans each delta out in-process.
- **Tickets** live in the ``ws-tickets`` KV bucket under the SHA-256 of the ticket, so any
  replica can redeem one, and only once (a compare-and-set delete).
- **Proxy** requests are core-NATS request/reply on ``Subjects.session_proxy``; the gateway that
  holds the session's runner socket answers (a queue group, so one runner answers).

Example::

    realtime = Realtime(nc, Subjects("shoal"), settings)
    await realtime.start()
    unwatch = await realtime.watch_deltas("ses_1", socket.offer_text)
    await realtime.publish_delta("ses_1", b'{"type":"delta",...}')
    await unwatch(); await realtime.stop()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shoal.common.errors import ShoalError, Timeout, Unavailable
from shoal.common.messaging import Subjects
from shoal.gateway.config import GatewaySettings

log = logging.getLogger(__name__)

DeltaSink = Callable[[str], object]
ProxyHandler = Callable[[bytes], Awaitable[bytes]]


class RunnerUnavailable(ShoalError):
    """No runner is connected to the session (anywhere in the fleet): 502."""

    code = "runner_unavailable"
    status = 502
    retryable = True


class Realtime:
    """One per gateway process, built in the app's lifespan."""

    def __init__(self, nc: NATS, subjects: Subjects, settings: GatewaySettings) -> None:
        self._nc = nc
        self._subjects = subjects
        self._settings = settings
        self._kv: KeyValue | None = None
        self._delta_sinks: dict[str, set[DeltaSink]] = {}
        self._delta_subs: dict[str, Subscription] = {}
        self._proxy_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._kv = await self._nc.jetstream().key_value(self._subjects.ws_tickets_bucket)

    async def stop(self) -> None:
        for sub in list(self._delta_subs.values()):
            await _unsubscribe(sub)
        self._delta_subs.clear()
        self._delta_sinks.clear()

    # -- deltas --
    async def publish_delta(self, session_id: str, body: bytes) -> None:
        """Fire and forget (core NATS): deltas are ephemeral, ``message.completed`` is durable."""
        try:
            await self._nc.publish(self._subjects.session_delta(session_id), body)
        except NatsError as exc:
            raise Unavailable(f"delta not published: {exc}") from exc

    async def watch_deltas(self, session_id: str, sink: DeltaSink) -> Callable[[], Awaitable[None]]:
        """Call ``sink(frame_text)`` for each delta of the session; returns the unwatch."""
        sinks = self._delta_sinks.setdefault(session_id, set())
        sinks.add(sink)
        if session_id not in self._delta_subs:
            subject = self._subjects.session_delta(session_id)

            async def on_delta(msg: Msg) -> None:
                text = msg.data.decode(errors="replace")
                for each in list(self._delta_sinks.get(session_id, ())):
                    each(text)

            try:
                self._delta_subs[session_id] = await self._nc.subscribe(subject, cb=on_delta)
            except NatsError as exc:
                sinks.discard(sink)
                raise Unavailable(f"cannot follow deltas: {exc}") from exc

        async def unwatch() -> None:
            current = self._delta_sinks.get(session_id)
            if current is None:
                return
            current.discard(sink)
            if not current:
                del self._delta_sinks[session_id]
                sub = self._delta_subs.pop(session_id, None)
                if sub is not None:
                    await _unsubscribe(sub)

        return unwatch

    # -- tickets --
    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise Unavailable("ticket store is not ready")
        return self._kv

    async def put_ticket(self, ticket_hash: str, value: bytes) -> None:
        try:
            await self._bucket().create(ticket_hash, value)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot store ticket: {exc}") from exc

    async def take_ticket(self, ticket_hash: str) -> bytes | None:
        """The ticket's value, deleting it (CAS: of two redeemers only one gets it), or None."""
        kv = self._bucket()
        try:
            entry = await kv.get(ticket_hash)
            if entry.value is None or entry.revision is None:
                return None
            await kv.delete(ticket_hash, last=entry.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):
            return None
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot redeem ticket: {exc}") from exc
        return entry.value

    # -- runner proxy --
    async def proxy_request(self, session_id: str, body: bytes) -> bytes:
        """Send one proxied HTTP request to the session's runner; its encoded response."""
        # The runner side answers 504 itself at proxy_timeout; this waits a little longer.
        wait = self._settings.proxy_timeout.total_seconds() + 2.0
        try:
            msg = await self._nc.request(
                self._subjects.session_proxy(session_id), body, timeout=wait
            )
        except NoRespondersError as exc:
            raise RunnerUnavailable(
                "no runner is connected to this session", detail={"session_id": session_id}
            ) from exc
        except (NatsTimeout, TimeoutError) as exc:
            raise Timeout(
                "the runner did not answer in time", detail={"session_id": session_id}
            ) from exc
        except NatsError as exc:
            raise Unavailable(f"proxy request failed: {exc}") from exc
        return bytes(msg.data)

    async def serve_proxy(self, session_id: str, handler: ProxyHandler) -> Subscription:
        """Answer the session's proxy requests with ``handler`` (the runner socket's)."""

        async def answer(msg: Msg) -> None:
            try:
                reply = await handler(msg.data)
            except Exception:
                log.exception("proxy handler failed")
                return  # the caller times out (504)
            try:
                await msg.respond(reply)
            except NatsError as exc:
                log.warning("proxy answer not sent: %s", exc)

        async def on_request(msg: Msg) -> None:
            # A callback runs one message at a time: answer each in its own task, so one slow
            # request does not hold the others back (the runner answers them concurrently).
            if msg.reply:
                task = asyncio.create_task(answer(msg))
                self._proxy_tasks.add(task)
                task.add_done_callback(self._proxy_tasks.discard)

        try:
            return await self._nc.subscribe(
                self._subjects.session_proxy(session_id),
                queue="runner-proxy",
                cb=on_request,
                pending_msgs_limit=256,
            )
        except NatsError as exc:
            raise Unavailable(f"cannot serve the runner proxy: {exc}") from exc


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except NatsError:
        pass
