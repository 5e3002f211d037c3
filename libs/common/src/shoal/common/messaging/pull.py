"""Continuous pulls from a JetStream consumer: pull requests kept outstanding, messages taken
as they arrive.

nats-py's ``PullSubscription.fetch`` costs two requests per call when a consumer is quiet (a
``no_wait`` probe, its 404, then a lingering request), and a quiet consumer is the common case
for a partition of a busy service: 64 partitions at a few hundred commands per second see about
one message per fetch. That made pull requests the most frequent thing the session service
sent. nats-py has no ``consume()`` (the newer clients' continuous pull), so this is the small
piece: a pull request for ``batch`` messages that lives ``expires`` seconds, topped up when fewer
than half of ``batch`` are still requested, so a steady stream costs one request per half batch.

Accounting: the server fills waiting requests in order, so each arriving message counts
against the oldest open request. A ``408 Request Timeout`` (or ``409``) status ends the oldest
one; a request is also forgotten locally a little after its expiry, so a status lost across a
reconnect cannot stall the flow.

Example::

    puller = ContinuousPull(nc, stream="S", consumer="c", batch=100, expires=2.0)
    await puller.start()
    msgs = await puller.take(wait=2.0)   # [] after the wait, else what has arrived
    msgs = await puller.take(wait=2.0, linger=0.005)  # and up to 5 ms more to fill the batch
    await puller.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STATUS_HEADER = "Status"
_HEARTBEAT = "100"
_EXPIRED = "408"  # a request reached its expiry (with what it still owed)


class ContinuousPull:
    """One consumer's messages, pulled ahead of need (at most ``batch`` requested at once)."""

    def __init__(
        self,
        nc: NATS,
        *,
        stream: str,
        consumer: str,
        batch: int,
        expires: float,
        api_prefix: str = "$JS.API",
    ) -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = max(1, batch)
        self._expires = max(0.1, expires)
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._arrived: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._expired = False
        # Open requests, oldest first: [messages still owed, local deadline].
        self._open: deque[list[float]] = deque()
        self.requests = 0  # pull requests sent (a figure for tests and metrics)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> int:
        """Stop pulling. Messages that arrived and were never taken are handed back at once
        (nak), so the consumer redelivers them now rather than after its ack wait; how many."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe of %s failed", self._next, exc_info=True)
        returned = len(self._arrived)
        while self._arrived:
            msg = self._arrived.popleft()
            with contextlib.suppress(Exception):
                await msg.nak()
        self._wake.set()
        return returned

    @property
    def requested(self) -> int:
        """Messages requested and not yet arrived (open requests only)."""
        return int(sum(owed for owed, _ in self._open))

    async def take(self, wait: float, limit: int | None = None, linger: float = 0.0) -> list[Msg]:
        """What has arrived (at most ``limit``), waiting up to ``wait`` seconds for the first.

        ``linger`` > 0: once something arrived, wait up to that many seconds more while fewer
        than ``limit`` (default: the batch) are in hand. A consumer whose cost is per batch (a
        database transaction, a round of acks) trades that much latency for fuller batches.
        """
        deadline = time.monotonic() + wait
        await self._top_up()
        await self._wait_for(lambda: bool(self._arrived), deadline)
        want = self._batch if limit is None else limit
        if linger > 0 and 0 < len(self._arrived) < want:
            await self._wait_for(lambda: len(self._arrived) >= want, time.monotonic() + linger)
        count = len(self._arrived) if limit is None else min(limit, len(self._arrived))
        msgs = [self._arrived.popleft() for _ in range(count)]
        if msgs:
            await self._top_up()
        return msgs

    async def _wait_for(self, enough: Callable[[], bool], deadline: float) -> None:
        while not enough() and self._sub is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return
            if self._expired:  # a request ran its course: keep one open
                self._expired = False
                await self._top_up()

    async def _top_up(self) -> None:
        if self._sub is None:
            return
        now = time.monotonic()
        while self._open and self._open[0][1] <= now:
            self._open.popleft()  # its 408 never came (a reconnect): forget it
        # Messages that arrived and were not taken yet count too: they are in hand.
        wanted = self._batch - self.requested - len(self._arrived)
        if wanted < (self._batch + 1) // 2:
            return
        request = {"batch": wanted, "expires": int(self._expires * 1e9)}
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        # A second past the server's expiry: by then its 408 has arrived, or never will.
        self._open.append([float(wanted), now + self._expires + 1.0])
        self.requests += 1

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get(STATUS_HEADER) if not msg.data else None
        if status is not None:
            if status == _HEARTBEAT:
                return
            if self._open:
                self._open.popleft()  # the server fills and ends requests in order
            if status == _EXPIRED:
                self._expired = True
                self._wake.set()
            else:
                # 409: the server ended the request (consumer deleted, too many waiting, ...).
                # Not re-requested until the next take: a deleted consumer must not spin.
                log.warning(
                    "pull from %s ended: %s %s",
                    self._next,
                    status,
                    (msg.headers or {}).get("Description", ""),
                )
            return
        if self._open:
            self._open[0][0] -= 1
            if self._open[0][0] <= 0:
                self._open.popleft()
        self._arrived.append(msg)
        self._wake.set()
