"""The pulling side: one durable consumer per *held* partition, feeding per-session lanes.

The :class:`~shoal.session.coordinator.Coordinator` decides which partitions this replica
holds (leases); this worker runs them. For a partition granted under lease epoch ``e`` it
replaces the partition's consumer by ``session-p<p>-e<e>`` on SESSION_CMD (filtered on
``<prefix>.session.cmd.<p>.*``; see ``store.partition_consumer`` for why a fresh consumer per
epoch), and a fetch loop hands each message to its session's lane. Lanes run sessions
concurrently and each session's commands one at a time, in stream order, each acked only after
its events are published and its state written (handlers.py). At most ``max_in_flight``
commands are held at once across partitions.

Leaving a partition, two ways:
- **drain** (rebalance, SIGTERM): stop fetching, let its lanes finish what they hold, return;
  the coordinator then releases the lease. The next owner starts from the ack floor.
- **drop** (lease lost or expired, a fenced write): at once — stop fetching, cancel its lanes,
  ack nothing more. Before every fetch and every command the lease's local deadline is checked,
  so a replica waking from a pause stops before touching anything; the fences catch the rest.

Example::

    worker = CommandWorker(settings, nc, handler, consumers, clock)
    await worker.start_partition(lease, existing_consumers.get(p, []))
    await worker.drain_partition(p)     # or worker.drop_partition(p, reason="lease lost")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shoal.common.clock import Clock
from shoal.common.errors import Fenced
from shoal.common.messaging import Subjects
from shoal.common.messaging.pull import ContinuousPull
from shoal.session import metrics
from shoal.session.config import SessionSettings
from shoal.session.handlers import CommandHandler, ProjectionHandler, SessionCache
from shoal.session.lanes import Lanes
from shoal.session.ownership import HeldLease
from shoal.session.store import PartitionConsumers

log = logging.getLogger(__name__)

PROJECTION_CONSUMER = "session-projection"


class _Budget:
    """Counts commands held in this replica; fetch loops wait for room before pulling.

    Only messages that arrived count (``take``), not pulls that are waiting: an idle
    partition's long poll must not hold budget that busy partitions need (counting pulls
    starved every partition beyond ``limit / fetch_batch``). The bound is therefore ``limit``
    plus at most one batch per held partition.
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


class _Partition:
    """One held partition: its lease, consumer subscription, fetch loop and lanes."""

    def __init__(self, lease: HeldLease) -> None:
        self.lease = lease
        self.lanes: Lanes[SessionCache, Msg] | None = None
        self.fetcher: asyncio.Task[None] | None = None
        self.fetching = True  # False once draining or dropped: no more fetches
        self.in_hand = 0  # commands fetched and not finished
        self.dropped = False  # True: nothing more is committed or acked
        self.lease_lost = False  # dropped because its lease expired or went to another owner

    @property
    def number(self) -> int:
        return self.lease.partition


class CommandWorker:
    """Runs the partitions the coordinator grants: consumers, pull loops, per-session lanes."""

    def __init__(
        self,
        settings: SessionSettings,
        nc: NATS,
        handler: CommandHandler,
        consumers: PartitionConsumers,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._nc = nc
        self._handler = handler
        self._consumers = consumers
        self._clock = clock
        self._subjects = Subjects(settings.subject_prefix)
        self._budget = _Budget(settings.max_in_flight)
        self._partitions: dict[int, _Partition] = {}
        self._ttl = settings.lease_ttl.total_seconds()
        # Stop trusting a lease this long before the server would expire it.
        self._margin = min(0.5, self._ttl / 4)
        self._stopping = False
        metrics.LANES.set_function(
            lambda: sum(len(part.lanes or ()) for part in self._partitions.values())
        )
        # Told about every dropped partition's lease (the coordinator releases it if still ours).
        self.on_drop: Callable[[HeldLease], None] = lambda lease: None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def held(self) -> dict[int, HeldLease]:
        """The leases of the partitions this worker runs (draining ones included)."""
        return {p: part.lease for p, part in self._partitions.items() if not part.dropped}

    def running(self) -> bool:
        """No held partition's fetch loop died unexpectedly (readiness)."""
        return not self._stopping and all(
            part.fetcher is None or not part.fetcher.done() or not part.fetching
            for part in self._partitions.values()
        )

    def lease_valid(self, lease: HeldLease) -> bool:
        return lease.valid(self._clock.monotonic(), ttl=self._ttl, margin=self._margin)

    def _config(self, p: int) -> ConsumerConfig:
        return ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._settings.ack_wait.total_seconds(),
            max_ack_pending=self._settings.max_ack_pending,
            max_deliver=-1,  # a command is never dropped for being slow; poison is termed
            description=f"session commands of partition {p}",
        )

    async def start_partition(self, lease: HeldLease, existing: list[str]) -> None:
        """Replace the partition's consumer by this epoch's and start pulling it."""
        p = lease.partition
        if p in self._partitions:
            raise RuntimeError(f"partition {p} is already running")
        name = await self._consumers.open(p, lease.epoch, self._config(p), existing)
        puller = ContinuousPull(
            self._nc,
            stream=self._subjects.session_cmd_stream,
            consumer=name,
            batch=self._settings.fetch_batch,
            expires=self._settings.fetch_timeout.total_seconds(),
        )
        await puller.start()
        part = _Partition(lease)
        part.lanes = Lanes(
            self._processor(part),
            context=SessionCache,
            idle=self._idle,
            dormant=lambda cache: cache.dormant,
        )
        self._partitions[p] = part
        part.fetcher = asyncio.create_task(self._fetch_loop(part, puller), name=f"fetch:p{p}")
        metrics.PARTITIONS.set(len(self._partitions))
        log.info("partition %d started", p, extra={"partition": p, "epoch": lease.epoch})

    @property
    def _idle(self) -> float:
        return self._settings.lane_idle.total_seconds()

    def _processor(self, part: _Partition) -> Callable[[SessionCache, Msg], Awaitable[None]]:
        # Bound to this grant of the partition, not its number: a lane of a dropped grant can
        # never act under a later one.
        async def process(cache: SessionCache, msg: Msg) -> None:
            try:
                if part.dropped:
                    return  # left unacked: the partition's next consumer redelivers it
                if not self.lease_valid(part.lease):
                    self._drop(part, "lease expired")
                    return
                try:
                    await self._handler.handle(cache, msg)
                except Fenced:
                    self._drop(part, "fenced write")
            finally:
                part.in_hand -= 1
                self._budget.release()

        return process

    async def _fetch_loop(self, part: _Partition, puller: ContinuousPull) -> None:
        p = part.number
        wait = self._settings.fetch_timeout.total_seconds()
        failures = 0
        try:
            while part.fetching:
                await self._budget.wait_for_room()
                if not part.fetching:
                    break
                if not self.lease_valid(part.lease):
                    self._drop(part, "lease expired")
                    break
                try:
                    msgs = await puller.take(wait)
                except Exception as exc:  # NATS closed or its pending buffer full
                    failures += 1
                    log.warning("pulling partition %d failed: %r", p, exc)
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                failures = 0
                if part.dropped:
                    break  # unacked: the partition's next owner gets them redelivered
                self._budget.take(len(msgs))
                part.in_hand += len(msgs)
                assert part.lanes is not None
                for msg in msgs:
                    session_id = msg.subject.rsplit(".", 1)[-1]
                    part.lanes.submit(session_id, msg)
        finally:
            returned = await puller.stop()
            if returned and part.lease_lost:
                # Pulled when the lease went, never taken: not written here either.
                metrics.FENCED_WRITES.labels("lease").inc(returned)

    async def _stop_fetching(self, part: _Partition) -> None:
        part.fetching = False
        if part.fetcher is None or part.fetcher.done():
            return
        # A fetch in flight returns within fetch_timeout; its messages still go to lanes.
        fetch_wait = self._settings.fetch_timeout.total_seconds() + 1.0
        _, pending = await asyncio.wait({part.fetcher}, timeout=fetch_wait)
        for task in pending:
            task.cancel()
        await asyncio.gather(part.fetcher, return_exceptions=True)

    async def drain_partition(self, p: int, grace: timedelta | None = None) -> bool:
        """Stop fetching ``p``, finish what its lanes hold, forget it. False if it was dropped
        meanwhile (its lease must then not be released as if drained)."""
        part = self._partitions.get(p)
        if part is None:
            return False
        await self._stop_fetching(part)
        limit = (grace or self._settings.shutdown_grace).total_seconds()
        assert part.lanes is not None
        try:
            await asyncio.wait_for(part.lanes.drain(), limit)
        except TimeoutError:
            log.warning("partition %d: lanes did not finish within %.1fs; cancelling", p, limit)
            part.dropped = True
            self._budget.release(len(await part.lanes.cancel()))
        # Lazy snapshots in flight land before the lease goes, so the next owner reads them.
        await self._handler.snapshots.settle_all()
        if self._partitions.get(p) is part:
            del self._partitions[p]
        metrics.PARTITIONS.set(len(self._partitions))
        log.info("partition %d drained", p, extra={"partition": p})
        return not part.dropped

    def drop_partition(self, p: int, *, reason: str) -> None:
        """Leave ``p`` at once: no more fetches, commits or acks (safe to call from a lane)."""
        part = self._partitions.get(p)
        if part is None or part.dropped:
            return
        self._drop(part, reason)

    def _drop(self, part: _Partition, reason: str) -> None:
        if part.dropped:
            return
        p = part.number
        part.dropped = True
        part.lease_lost = reason.startswith("lease")
        part.fetching = False
        if self._partitions.get(p) is part:
            del self._partitions[p]
        metrics.PARTITIONS.set(len(self._partitions))
        metrics.PARTITIONS_DROPPED.labels(reason).inc()
        if part.lease_lost and part.in_hand > 0:
            # Commands in hand when the lease went: none of them will be written here.
            metrics.FENCED_WRITES.labels("lease").inc(part.in_hand)
        log.warning("partition %d dropped: %s", p, reason, extra={"partition": p})
        asyncio.get_running_loop().create_task(self._cancel(part), name=f"drop:p{p}")
        self.on_drop(part.lease)

    async def _cancel(self, part: _Partition) -> None:
        if part.fetcher is not None:
            part.fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(part.fetcher, return_exceptions=True)
        if part.lanes is not None:
            self._budget.release(len(await part.lanes.cancel()))

    def renewed(self, p: int, revision: int, sent_at: float) -> None:
        """The coordinator renewed ``p``'s lease: trust it until ``sent_at + ttl``."""
        part = self._partitions.get(p)
        if part is not None:
            part.lease.revision = revision
            part.lease.sent_at = sent_at

    def begin_stop(self) -> None:
        """Shutdown starts: a command whose I/O fails is left unacked for the next owner."""
        self._stopping = True
        self._handler.stop_retrying()

    async def stop(self, grace: timedelta) -> None:
        """Drain whatever partition is still running (the coordinator hands them off first)."""
        self.begin_stop()
        await asyncio.gather(*(self.drain_partition(p, grace) for p in list(self._partitions)))


class ProjectionWorker:
    """Pulls SESSION_EVT into PostgreSQL through one shared durable consumer."""

    def __init__(
        self,
        settings: SessionSettings,
        nc: NATS,
        js: JetStreamContext,
        handler: ProjectionHandler,
    ) -> None:
        self._settings = settings
        self._nc = nc
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
        puller = ContinuousPull(
            self._nc,
            stream=stream,
            consumer=PROJECTION_CONSUMER,
            batch=self._settings.projection_batch,
            expires=self._settings.fetch_timeout.total_seconds(),
        )
        await puller.start()
        self._task = asyncio.create_task(self._loop(puller), name="projection")

    async def _loop(self, puller: ContinuousPull) -> None:
        wait = self._settings.fetch_timeout.total_seconds()
        linger = self._settings.projection_linger.total_seconds()
        failures = 0
        try:
            while not self._stopping:
                try:
                    msgs = await puller.take(wait, linger=linger)
                except Exception as exc:  # NATS closed or its pending buffer full
                    failures += 1
                    log.warning("projection pull failed: %r", exc)
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                failures = 0
                if msgs:
                    # One batch at a time, in the background of nothing: shutdown waits for it.
                    await self._handler.handle(msgs)
        finally:
            await puller.stop()

    async def rebuild(self) -> dict[str, int]:
        """Replay the whole ledger into PostgreSQL (``shoal admin rebuild-projection``): the
        durable consumer is recreated from the ledger's start. Rows are written idempotently,
        so what is there stays and what is missing comes back; other replicas' pulls bound to
        the same consumer name carry on with the new one."""
        stream = self._subjects.session_evt_stream
        await self.stop()
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(stream, PROJECTION_CONSUMER)
        ledger = await self._js.stream_info(stream)
        self._stopping = False
        await self.start()
        return {"events_in_ledger": int(ledger.state.messages)}

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
