"""The pulling side: one durable consumer per owned partition, feeding per-session lanes.

Each owned partition ``p`` has a durable pull consumer ``session-p<p>`` on SESSION_CMD filtered
on ``<prefix>.session.cmd.<p>.*`` (work-queue filters never overlap). A fetch loop per
partition pulls batches and hands each message to its session's lane; lanes run sessions
concurrently and each session's commands one at a time, in stream order, each acked only after
its events are published and its state written (see handlers.py). At most ``max_in_flight``
commands are held at once, so a slow session cannot make a replica buffer without bound.

Order across redeliveries: a lane never starts a session's next command before the previous
one is committed (it retries I/O in place, signalling progress), so a command can only be
redelivered behind a later one of the same session if this replica lost it — the lease issue's
concern, where the KV fence catches it.

Example::

    worker = CommandWorker(settings, js, handler)
    await worker.start()        # consumers created (or updated) and pulling
    await worker.stop()         # stop pulling, finish what the lanes hold
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal.common.messaging import Subjects
from shoal.session import metrics
from shoal.session.config import SessionSettings
from shoal.session.handlers import CommandHandler, ProjectionHandler, SessionCache
from shoal.session.lanes import Lanes

log = logging.getLogger(__name__)

PROJECTION_CONSUMER = "session-projection"


def partition_consumer(partition: int) -> str:
    return f"session-p{partition}"


class _Budget:
    """Counts commands held in this replica; fetch loops wait for room before pulling.

    Only messages that arrived count (``take``), not pulls that are waiting: an idle
    partition's long poll must not hold budget that busy partitions need. Counting pulls
    starved every partition beyond ``limit / fetch_batch`` (found by bench/command_path.py:
    with 64 partitions only 20 ever pulled). The bound is therefore ``limit`` plus at most
    one batch per held partition.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._room = asyncio.Event()
        self._room.set()

    async def wait_for_room(self) -> None:
        while self._used >= self._limit:
            self._room.clear()
            await self._room.wait()

    def take(self, count: int) -> None:
        self._used += count
        metrics.IN_FLIGHT.set(self._used)

    def release(self, count: int = 1) -> None:
        self._used -= count
        metrics.IN_FLIGHT.set(self._used)
        self._room.set()


class CommandWorker:
    """Pulls this replica's partitions and applies their commands through per-session lanes."""

    def __init__(
        self, settings: SessionSettings, js: JetStreamContext, handler: CommandHandler
    ) -> None:
        self._settings = settings
        self._js = js
        self._handler = handler
        self._subjects = Subjects(settings.subject_prefix)
        self._budget = _Budget(settings.max_in_flight)
        self._lanes: Lanes[SessionCache, Msg] = Lanes(
            self._process, context=SessionCache, idle=settings.lane_idle.total_seconds()
        )
        self._fetchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def running(self) -> bool:
        """Every partition's fetch loop is alive (readiness)."""
        return (
            bool(self._fetchers)
            and not self._stopping
            and all(not t.done() for t in self._fetchers)
        )

    async def start(self) -> None:
        for p in self._settings.owned_partitions():
            sub = await self._subscribe(p)
            self._fetchers.append(asyncio.create_task(self._fetch_loop(p, sub), name=f"fetch:p{p}"))
        log.info(
            "pulling %d partitions", len(self._fetchers), extra={"partitions": len(self._fetchers)}
        )

    async def _subscribe(self, p: int) -> JetStreamContext.PullSubscription:
        name = partition_consumer(p)
        stream = self._subjects.session_cmd_stream
        # Create-or-update: a new release's ack_wait or max_ack_pending takes effect on start.
        await self._js.add_consumer(
            stream,
            ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=self._subjects.session_partition_filter(p),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._settings.ack_wait.total_seconds(),
                max_ack_pending=self._settings.max_ack_pending,
                max_deliver=-1,  # a command is never dropped for being slow; poison is termed
                description=f"session commands of partition {p}",
            ),
        )
        return await self._js.pull_subscribe_bind(durable=name, stream=stream)

    async def _fetch_loop(self, p: int, sub: JetStreamContext.PullSubscription) -> None:
        timeout = self._settings.fetch_timeout.total_seconds()
        failures = 0
        try:
            while not self._stopping:
                await self._budget.wait_for_room()
                if self._stopping:
                    break
                try:
                    msgs = await sub.fetch(self._settings.fetch_batch, timeout=timeout)
                except (NatsTimeout, TimeoutError):
                    msgs = []
                except Exception as exc:  # reconnecting, consumer gone, ...
                    failures += 1
                    log.warning("fetch on partition %d failed: %r", p, exc)
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                failures = 0
                self._budget.take(len(msgs))
                for msg in msgs:
                    session_id = msg.subject.rsplit(".", 1)[-1]
                    self._lanes.submit(session_id, msg)
                metrics.LANES.set(len(self._lanes))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe of partition %d failed", p, exc_info=True)

    async def _process(self, cache: SessionCache, msg: Msg) -> None:
        try:
            await self._handler.handle(cache, msg)
        finally:
            self._budget.release()

    async def stop(self, grace: timedelta) -> None:
        """Stop pulling, let the lanes finish what they hold (up to ``grace``), then return."""
        self._stopping = True
        self._handler.stop_retrying()
        if self._fetchers:
            # A fetch in flight returns within fetch_timeout; its messages still go to lanes.
            fetch_wait = self._settings.fetch_timeout.total_seconds() + 1.0
            _, pending = await asyncio.wait(self._fetchers, timeout=fetch_wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._fetchers, return_exceptions=True)
        try:
            await asyncio.wait_for(self._lanes.drain(), grace.total_seconds())
        except TimeoutError:
            log.warning("lanes did not finish within %s; cancelling", grace)
            await self._lanes.cancel()
        metrics.LANES.set(0)


class ProjectionWorker:
    """Pulls SESSION_EVT into PostgreSQL through one shared durable consumer."""

    def __init__(
        self, settings: SessionSettings, js: JetStreamContext, handler: ProjectionHandler
    ) -> None:
        self._settings = settings
        self._js = js
        self._handler = handler
        self._subjects = Subjects(settings.subject_prefix)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    async def start(self) -> None:
        stream = self._subjects.session_evt_stream
        await self._js.add_consumer(
            stream,
            ConsumerConfig(
                name=PROJECTION_CONSUMER,
                durable_name=PROJECTION_CONSUMER,
                filter_subject=self._subjects.session_evt_all,
                ack_policy=AckPolicy.EXPLICIT,
                # A new consumer starts from the beginning: the projection rebuilds itself.
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._settings.ack_wait.total_seconds(),
                max_ack_pending=self._settings.projection_batch * 4,
                description="PostgreSQL projection of session events",
            ),
        )
        sub = await self._js.pull_subscribe_bind(durable=PROJECTION_CONSUMER, stream=stream)
        self._task = asyncio.create_task(self._loop(sub), name="projection")

    async def _loop(self, sub: JetStreamContext.PullSubscription) -> None:
        timeout = self._settings.fetch_timeout.total_seconds()
        failures = 0
        try:
            while not self._stopping:
                try:
                    msgs = await sub.fetch(self._settings.projection_batch, timeout=timeout)
                except (NatsTimeout, TimeoutError):
                    continue
                except Exception as exc:
                    failures += 1
                    log.warning("projection fetch failed: %r", exc)
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                failures = 0
                # One batch at a time, in the background of nothing: shutdown waits for it.
                await self._handler.handle(msgs)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe of the projection failed", exc_info=True)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), self._settings.fetch_timeout.total_seconds() + 5.0
            )
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
