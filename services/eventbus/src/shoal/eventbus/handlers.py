"""The edge of the eventbus: a durable pull consumer on SESSION_EVT (transport only).

Each ledger message (a commit: one command's events) is fanned out as one DELIVER message per
event per target, and acked only after DELIVER acknowledged every publish, so a crash
anywhere leads to a redelivery, never a loss; the redelivery's publishes carry the same
``Nats-Msg-Id`` and DELIVER drops them, so each event reaches a delivery subject once.
A pulled batch is published back to back in stream order, which keeps each user's stream in
order, and its acks are awaited together (one round trip per batch, not per event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects
from shoal.common.messaging.pull import ContinuousPull
from shoal.common.observability import start_span
from shoal.eventbus.config import EventbusSettings
from shoal.eventbus.metrics import DELIVERIES, DUPLICATES, EVENTS
from shoal.eventbus.service import DeliveryStore, EventFanout, Fanout

log = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 1.0  # pause after a failed pull (NATS reconnecting, consumer missing)


class EventConsumer:
    """Pulls SESSION_EVT and fans each event out; :meth:`start` then :meth:`stop`."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        subjects: Subjects,
        fanout: EventFanout,
        store: DeliveryStore,
        settings: EventbusSettings,
    ) -> None:
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self._fanout = fanout
        self._store = store
        self._settings = settings
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Bound to the consumer and pulling (what /readyz reports)."""
        return self._task is not None and not self._task.done()

    def consumer_config(self) -> ConsumerConfig:
        s = self._settings
        return ConsumerConfig(
            durable_name=s.eventbus_consumer,
            name=s.eventbus_consumer,
            description="Shoal eventbus: fan-out of session events to delivery subjects",
            filter_subject=self._subjects.session_evt_all,
            deliver_policy=DeliverPolicy.ALL if s.eventbus_start == "all" else DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.eventbus_ack_wait.total_seconds(),
            max_deliver=-1,  # a publish that fails is retried until DELIVER takes it
            max_ack_pending=s.eventbus_batch_size * 4,
        )

    async def start(self) -> None:
        stream = self._subjects.session_evt_stream
        # Create, or update the updatable fields of, the durable consumer (idempotent).
        await self._js.add_consumer(stream, config=self.consumer_config())
        puller = ContinuousPull(
            self._nc,
            stream=stream,
            consumer=self._settings.eventbus_consumer,
            batch=self._settings.eventbus_batch_size,
            expires=self._settings.eventbus_fetch_timeout.total_seconds(),
        )
        await puller.start()
        self._task = asyncio.create_task(self._run(puller), name="eventbus-consumer")

    async def stop(self) -> None:
        """Finish the event in hand, then stop; cancel if that takes longer than the grace."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), self._settings.shutdown_grace.total_seconds()
            )
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, puller: ContinuousPull) -> None:
        wait = self._settings.eventbus_fetch_timeout.total_seconds()
        linger = self._settings.eventbus_linger.total_seconds()
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await puller.take(wait, linger=linger)
                    if not msgs:
                        continue
                except Exception:
                    log.warning("pulling SESSION_EVT failed; retrying", exc_info=True)
                    await asyncio.sleep(_ERROR_BACKOFF_S)
                    continue
                try:
                    await self._handle_batch(msgs)
                except Exception:
                    # An ack or nak that did not reach the server: ack_wait redelivers the event.
                    log.warning("acking SESSION_EVT failed", exc_info=True)
                    await asyncio.sleep(_ERROR_BACKOFF_S)
        finally:
            await puller.stop()  # what it pulled ahead goes back at once, for another replica

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        """Fan a pulled batch out with one round trip, then ack in stream order.

        Every delivery of the batch is published back to back (DELIVER stores them in stream
        order) and the acks are awaited together. An event is acked once all its publishes
        were; at the first one that failed, it and every later event are handed back (nak with
        a delay) so they are redelivered after it, in order. Later events that did land are
        dropped on redelivery by DELIVER's duplicate window, so nothing is delivered twice; the
        one imperfection is that such an event precedes the failed one in DELIVER.
        """
        if self._stopping.is_set():
            # Hand the batch back now, so another replica takes it at once.
            await self._hand_back(msgs, delay=None)
            return
        planned: list[tuple[Msg, list[Fanout]]] = []
        for msg in msgs:
            try:
                # The event's trace (from the session that emitted it) covers its fan-out.
                with start_span(
                    "eventbus.fanout", msg.headers, **{"messaging.source": msg.subject}
                ):
                    planned.append((msg, self._fanout.prepare(msg.data, msg.headers or {})))
            except BadRequest as exc:
                # It can never be delivered; redelivering it forever would only block the stream.
                seq = msg.metadata.sequence.stream if msg.metadata else None
                log.warning(
                    "terminating malformed event", extra={"stream_seq": seq, "error": exc.message}
                )
                EVENTS.labels("malformed").inc()
                await msg.term()
        items = [
            (delivery, fanout.body, dict(fanout.headers))
            for _, fanouts in planned
            for fanout in fanouts
            for delivery in fanout.deliveries
        ]
        outcomes = iter(await self._store.publish_all(items))
        for index, (msg, fanouts) in enumerate(planned):
            results = [next(outcomes) for fanout in fanouts for _ in fanout.deliveries]
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                seq = msg.metadata.sequence.stream if msg.metadata else None
                log.warning(
                    "fan-out failed; event will be redelivered",
                    extra={"stream_seq": seq, "error": repr(errors[0])},
                )
                EVENTS.labels("retried").inc()
                delay = self._settings.eventbus_retry_delay.total_seconds()
                await self._hand_back([m for m, _ in planned[index:]], delay=delay)
                return
            await msg.ack()
            EVENTS.labels("fanned_out").inc(len(fanouts))
            for fanout in fanouts:
                for delivery in fanout.deliveries:
                    DELIVERIES.labels(delivery.target).inc()
            DUPLICATES.inc(sum(1 for r in results if r is True))

    async def _hand_back(self, msgs: list[Msg], *, delay: float | None) -> None:
        for msg in msgs:
            await msg.nak(delay=delay)
