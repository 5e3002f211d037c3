"""The session service process: ``create_app(settings)`` and the lifespan that owns its clients.

Start-up: connect NATS, provision the catalog, migrate PostgreSQL, then serve the messages and
admin RPCs, start the projection, join the members and take the free target partitions' leases
(coordinator.py). Shutdown (SIGTERM through uvicorn): leave the members, hand every partition
off (stop pulling, finish what the lanes hold, release the lease), stop the projection, then
close the clients.

Example::

    app = create_app(SessionSettings(instance_id="session-0"))
    # shoal run session   (uvicorn serves /healthz, /readyz, /metrics)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.clock import SystemClock
from shoal.common.messaging import Catalog, Subjects, connect_nats, provision, serve
from shoal.common.service import PolledCheck, Readiness, create_service_app
from shoal.common.storage import Database, Schema
from shoal.session import metrics
from shoal.session.config import SessionSettings
from shoal.session.coordinator import Coordinator
from shoal.session.handlers import (
    AdminRpc,
    CommandHandler,
    MessagesRpc,
    ProjectionHandler,
    SessionsRpc,
)
from shoal.session.store import (
    EventLedger,
    HistoryStore,
    LeaseStore,
    MemberStore,
    PartitionConsumers,
    Replier,
    SchedulerTimers,
    StateStore,
)
from shoal.session.worker import CommandWorker, ProjectionWorker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_session"
SCHEMA = Schema("session", MIGRATIONS_DIR, VERSION_TABLE)
_DB_PING_INTERVAL_S = 5.0
_LAG_SAMPLE_S = 10.0  # how often the held partitions' consumer lag is read into /metrics


@dataclass
class SessionRuntime:
    """What the lifespan built, on ``app.state.session`` (for probes and tests)."""

    nc: NATS
    db: Database
    worker: CommandWorker
    coordinator: Coordinator
    projection: ProjectionWorker | None
    rpcs: list[Subscription]


def create_app(settings: SessionSettings | None = None) -> FastAPI:
    """The session service's FastAPI app; nothing connects until its lifespan starts."""
    settings = settings or SessionSettings()
    readiness = Readiness()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        subjects = Subjects(settings.subject_prefix)
        nc = await connect_nats(settings, name="session")
        db = Database(
            settings.database_url.get_secret_value(), pool_size=settings.database_pool_size
        )
        try:
            js = nc.jetstream()
            await provision(js, Catalog.from_settings(settings))
            await db.prepare_schema(SCHEMA, migrate=settings.migrate_on_start)

            history = HistoryStore(db)
            states = StateStore(await js.key_value(subjects.session_state_bucket))
            # Lease and membership writes wait at most one renew interval for their ack (not
            # the default 5 s): one that hangs while a stream elects a new leader is retried
            # within the lease's lifetime instead of outliving it.
            coordination = nc.jetstream(timeout=settings.renew_interval.total_seconds())
            leases = LeaseStore(coordination, subjects)
            consumers = PartitionConsumers(js, subjects)
            admin = AdminRpc(states, leases, consumers, settings.session_partitions)
            rpcs = [
                await serve(
                    nc, subjects.rpc("session", "messages"), "session", MessagesRpc(history)
                ),
                await serve(
                    nc, subjects.rpc("session", "admin.partitions"), "session", admin.partitions
                ),
                await serve(nc, subjects.rpc("session", "admin.session"), "session", admin.session),
                await serve(nc, subjects.rpc("session", "list"), "session", SessionsRpc(history)),
            ]
            timers = SchedulerTimers(nc, subjects) if settings.session_timers else None
            handler = CommandHandler(
                states,
                EventLedger(js, subjects),
                Replier(nc),
                timers,
                subjects,
                lazy_snapshots=settings.session_snapshot_mode == "lazy",
            )
            clock = SystemClock()
            worker = CommandWorker(settings, nc, handler, consumers, clock)
            members = MemberStore(
                coordination, subjects, await js.key_value(subjects.session_members_bucket)
            )
            coordinator = Coordinator(settings, worker, leases, members, consumers, clock)
            projection = (
                ProjectionWorker(settings, nc, js, ProjectionHandler(history))
                if settings.projection_enabled
                else None
            )
            runtime = SessionRuntime(nc, db, worker, coordinator, projection, rpcs)
            if projection is not None:
                await projection.start()
                rebuild = projection.rebuild

                async def rebuild_projection(body: dict[str, Any]) -> dict[str, int]:
                    return await rebuild()

                # Only replicas that run the projection answer (queue group "session").
                rpcs.append(
                    await serve(
                        nc,
                        subjects.rpc("session", "admin.rebuild_projection"),
                        "session",
                        rebuild_projection,
                    )
                )
            await coordinator.start()
        except BaseException:
            await db.close()
            await nc.close()
            raise
        app.state.session = runtime
        database = PolledCheck(db.ping, interval=_DB_PING_INTERVAL_S)
        await database.start()
        sampling = asyncio.create_task(
            metrics.sample_partition_lag(
                lambda: {p: lease.epoch for p, lease in worker.held().items()},
                consumers.lag,
                _LAG_SAMPLE_S,
            ),
            name="session-consumer-lag",
        )

        readiness.add("nats", lambda: nc.is_connected)
        readiness.add("consumers", worker.running)
        readiness.add("leases", coordinator.running)
        if projection is not None:
            readiness.add("projection", projection.running)
        readiness.add("database", database)
        try:
            yield
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            worker.begin_stop()
            await coordinator.stop(settings.shutdown_grace.total_seconds())
            await worker.stop(settings.shutdown_grace)
            if projection is not None:
                await projection.stop()
            for sub in rpcs:
                await sub.unsubscribe()
            await database.stop()
            await db.close()
            await nc.drain()
            log.info("session service stopped")

    return create_service_app("session", settings, lifespan, readiness)
