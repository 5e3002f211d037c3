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
from shoal.scheduler.job_handlers import NatsJobSignals, serve_jobs
from shoal.scheduler.job_service import JobService
from shoal.scheduler.job_store import JobStore
from shoal.scheduler.loops import PeriodicPass
from shoal.scheduler.schedule_handlers import serve_schedules
from shoal.scheduler.schedule_service import ScheduleService
from shoal.scheduler.schedule_store import ScheduleStore
from shoal.scheduler.service import TimerService
from shoal.scheduler.store import JetStreamTimerPublisher, TimerStore
from shoal.scheduler.webhook_handlers import serve_webhooks
from shoal.scheduler.webhook_service import DeliveryPolicy, WebhookService
from shoal.scheduler.webhook_store import SecretBox, SigningSecretStore, WebhookSender
from shoal.scheduler.webhooks import check_callback_url

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_scheduler"
SCHEMA = Schema("scheduler", MIGRATIONS, VERSION_TABLE)
_DB_PROBE_INTERVAL = timedelta(seconds=5)
_SWEEP_BATCH = 500  # rows per sweep transaction
_SCHEDULE_BATCH = 100  # schedules fired per transaction


def create_app(settings: SchedulerSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The scheduler: durable timers and jobs over PostgreSQL."""
    settings = settings or SchedulerSettings()
    clock = clock or SystemClock()
    readiness = Readiness()
    secrets_key = settings.webhook_secrets_key()  # a malformed key fails here, not on first use

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
            publisher = JetStreamTimerPublisher(
                js, settings.scheduler_publish_timeout.total_seconds()
            )
            service = TimerService(
                TimerStore(db),
                publisher,
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

            job_store = JobStore(db)
            allow_private = settings.webhooks_allow_private
            jobs = JobService(
                job_store,
                NatsJobSignals(nc, subjects),
                clock,
                max_input_bytes=settings.scheduler_job_max_input_bytes,
                backoff_base=settings.scheduler_job_backoff_base,
                backoff_max=settings.scheduler_job_backoff_max,
                check_callback_url=lambda url: check_callback_url(url, allow_private=allow_private),
            )
            leases = PeriodicPass(
                "leases", jobs.expire_leases, settings.scheduler_sweep_interval, _SWEEP_BATCH
            )
            leases.start()
            stack.push_async_callback(leases.stop)
            readiness.add("leases", lambda: leases.running)
            schedules = ScheduleService(
                ScheduleStore(db),
                jobs,
                publisher,
                subjects,
                clock,
                skip_grace=settings.scheduler_schedule_skip_grace,
                batch_size=_SCHEDULE_BATCH,
            )
            firing = PeriodicPass(
                "schedules", schedules.fire_due, settings.scheduler_sweep_interval, _SCHEDULE_BATCH
            )
            firing.start()
            stack.push_async_callback(firing.stop)
            readiness.add("schedules", lambda: firing.running)

            sender = WebhookSender(
                timeout=settings.scheduler_webhook_timeout.total_seconds(),
                allow_private=allow_private,
            )
            stack.push_async_callback(sender.close)
            webhooks = WebhookService(
                job_store,
                SigningSecretStore(db, SecretBox(secrets_key)),
                sender,
                clock,
                DeliveryPolicy(
                    timeout=settings.scheduler_webhook_timeout,
                    max_deliveries=settings.scheduler_webhook_max_deliveries,
                    backoff_base=settings.scheduler_webhook_backoff_base,
                    backoff_max=settings.scheduler_webhook_backoff_max,
                    rotation_overlap=settings.scheduler_webhook_rotation_overlap,
                ),
            )
            delivering = PeriodicPass(
                "webhooks", webhooks.deliver_due, settings.scheduler_sweep_interval, 50
            )
            delivering.start()
            stack.push_async_callback(delivering.stop)  # before the sender closes
            readiness.add("webhooks", lambda: delivering.running)

            await serve_scheduler(nc, subjects, service)
            await serve_jobs(nc, subjects, jobs, concurrency=settings.scheduler_rpc_concurrency)
            await serve_schedules(nc, subjects, schedules)
            await serve_webhooks(nc, subjects, webhooks)
            app.state.scheduler = service
            app.state.jobs = jobs
            yield

    return create_service_app("scheduler", settings, lifespan, readiness)
