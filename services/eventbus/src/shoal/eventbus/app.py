"""The eventbus process: ``create_app(settings)`` and the lifespan that owns its clients.

Example::

    app = create_app(EventbusSettings(nats_url="nats://127.0.0.1:4222"))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from shoal.common.messaging import Catalog, Subjects, connect_nats, provision
from shoal.common.service import Readiness, create_service_app
from shoal.eventbus.config import EventbusSettings
from shoal.eventbus.handlers import EventConsumer
from shoal.eventbus.metrics import sample_consumer_lag, stop_sampling
from shoal.eventbus.service import EventFanout
from shoal.eventbus.store import JetStreamDeliveries

_LAG_SAMPLE_S = 10.0  # how often the consumer's lag is read into /metrics


def create_app(settings: EventbusSettings | None = None) -> FastAPI:
    """The eventbus: SESSION_EVT -> per-user (and later per-tag) DELIVER subjects."""
    settings = settings or EventbusSettings()
    readiness = Readiness()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            nc = await connect_nats(settings, name="eventbus")
            stack.push_async_callback(nc.drain)
            js = nc.jetstream()
            await provision(js, Catalog.from_settings(settings))

            subjects = Subjects(settings.subject_prefix)
            deliveries = JetStreamDeliveries(
                js, subjects.deliver_stream, settings.eventbus_publish_timeout
            )
            consumer = EventConsumer(nc, js, subjects, EventFanout(subjects), deliveries, settings)
            await consumer.start()
            stack.push_async_callback(consumer.stop)  # runs before nc.drain
            lag = sample_consumer_lag(
                js, subjects.session_evt_stream, settings.eventbus_consumer, _LAG_SAMPLE_S
            )
            sampling = asyncio.create_task(lag, name="eventbus-consumer-lag")
            stack.push_async_callback(stop_sampling, sampling)

            readiness.add("nats", lambda: nc.is_connected)
            readiness.add("consumer", lambda: consumer.running)
            app.state.consumer = consumer
            yield

    return create_service_app("eventbus", settings, lifespan, readiness)
