"""The scheduler process: ``create_app(settings)`` and the lifespan that owns its clients.

Example::

    app = create_app(SchedulerSettings(), clock=ManualClock())   # tests advance the clock
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from shoal.common.clock import Clock, SystemClock
from shoal.common.messaging import Catalog, Subjects, connect_nats, provision
from shoal.common.service import PolledCheck, Readiness, create_service_app
from shoal.common.storage import Database, Schema
from shoal.scheduler.config import SchedulerSettings
from shoal.scheduler.handlers import TimerLoop, serve_scheduler
from shoal.scheduler.service import TimerService
from shoal.scheduler.store import JetStreamTimerPublisher, TimerStore

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_scheduler"
SCHEMA = Schema("scheduler", MIGRATIONS, VERSION_TABLE)
_DB_PROBE_INTERVAL = timedelta(seconds=5)


def create_app(settings: SchedulerSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The scheduler: durable timers over PostgreSQL, fired into JetStream subjects."""
    settings = settings or SchedulerSettings()
    clock = clock or SystemClock()
    readiness = Readiness()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            db = Database(
                settings.database_url.get_secret_value(), pool_size=settings.database_pool_size
            )
            stack.push_async_callback(db.close)
            await db.prepare_schema(SCHEMA, migrate=settings.migrate_on_start)

            nc = await connect_nats(settings, name="scheduler")
            stack.push_async_callback(nc.drain)
            js = nc.jetstream()
            await provision(js, Catalog.from_settings(settings))

            subjects = Subjects(settings.subject_prefix)
            wake = asyncio.Event()  # set_timer wakes the loop instead of waiting for a poll
            service = TimerService(
                TimerStore(db),
                JetStreamTimerPublisher(js, settings.scheduler_publish_timeout.total_seconds()),
                subjects,
                clock,
                batch_size=settings.scheduler_batch_size,
                retry_max_delay=settings.scheduler_retry_max_delay,
                on_change=wake.set,
            )
            loop = TimerLoop(
                service, settings.scheduler_poll_interval, settings.scheduler_batch_size, wake
            )
            loop.start()
            stack.push_async_callback(loop.stop)  # before nc.drain and db.close

            database = await stack.enter_async_context(
                PolledCheck(db.ping, interval=_DB_PROBE_INTERVAL.total_seconds())
            )
            readiness.add("nats", lambda: nc.is_connected)
            readiness.add("database", database)
            readiness.add("timers", lambda: loop.running)

            await serve_scheduler(nc, subjects, service)
            app.state.scheduler = service
            yield

    return create_service_app("scheduler", settings, lifespan, readiness)
