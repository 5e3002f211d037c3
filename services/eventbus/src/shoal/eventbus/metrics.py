"""Prometheus metrics of the eventbus (registered once per process)."""

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

EVENTS = Counter(
    "shoal_eventbus_events_total",
    "Ledger events handled, by outcome: fanned_out, malformed (terminated), retried (nak)",
    ["outcome"],
)
DELIVERIES = Counter(
    "shoal_eventbus_deliveries_total",
    "Publishes to delivery subjects, by target (user, tag); duplicates counted separately",
    ["target"],
)
DUPLICATES = Counter(
    "shoal_eventbus_duplicate_deliveries_total",
    "Deliveries DELIVER dropped as duplicates (a redelivered event it had already stored)",
)
CONSUMER_PENDING = Gauge(
    "shoal_eventbus_consumer_pending",
    "Ledger events not yet delivered to the eventbus's consumer (its lag), sampled periodically",
)
CONSUMER_ACK_PENDING = Gauge(
    "shoal_eventbus_consumer_ack_pending",
    "Events delivered to the eventbus and not yet acknowledged, sampled periodically",
)


async def sample_consumer_lag(
    js: JetStreamContext, stream: str, consumer: str, interval: float
) -> None:
    """Copy the consumer's num_pending / num_ack_pending into gauges every ``interval`` s
    (one consumer-info request each time: cheap) until cancelled."""
    while True:
        try:
            info = await js.consumer_info(stream, consumer)
        except Exception as exc:  # NATS reconnecting: the next sample tries again
            log.debug("consumer info failed", extra={"error": repr(exc)})
        else:
            CONSUMER_PENDING.set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.set(info.num_ack_pending or 0)
        await asyncio.sleep(interval)


async def stop_sampling(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
