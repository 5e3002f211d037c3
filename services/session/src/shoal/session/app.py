"""The session service process: ``create_app(settings)`` and the lifespan that owns its clients.

Start-up: connect NATS, provision the catalog, migrate PostgreSQL, then serve the messages RPC,
start the projection and pull the owned partitions. Shutdown (SIGTERM through uvicorn): stop
pulling, finish the commands the lanes hold, stop the projection, then close the clients.

Example::

    app = create_app(SessionSettings(replica_index=0, replica_count=2))
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

from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.messaging import Catalog, Subjects, connect_nats, provision, serve
from shoal.common.service import Readiness, create_service_app
from shoal.common.storage import Database
from shoal.session.config import SessionSettings
from shoal.session.handlers import CommandHandler, MessagesRpc, ProjectionHandler
from shoal.session.store import EventLedger, HistoryStore, Replier, StateStore
from shoal.session.worker import CommandWorker, ProjectionWorker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_session"
_DB_PING_INTERVAL_S = 5.0


@dataclass
class SessionRuntime:
    """What the lifespan built, on ``app.state.session`` (for probes and tests)."""

    nc: NATS
    db: Database
    worker: CommandWorker
    projection: ProjectionWorker | None
    rpc: Subscription
    db_ok: bool = False


async def _watch_database(runtime: SessionRuntime) -> None:
    # /readyz checks are synchronous; the ping result is refreshed here instead.
    while True:
        runtime.db_ok = await runtime.db.ping()
        await asyncio.sleep(_DB_PING_INTERVAL_S)


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
            await db.migrate(MIGRATIONS_DIR, VERSION_TABLE)

            history = HistoryStore(db)
            rpc = await serve(
                nc, subjects.rpc("session", "messages"), "session", MessagesRpc(history)
            )
            states = StateStore(await js.key_value(subjects.session_state_bucket))
            handler = CommandHandler(states, EventLedger(js, subjects), Replier(nc))
            worker = CommandWorker(settings, js, handler)
            projection = (
                ProjectionWorker(settings, js, ProjectionHandler(history))
                if settings.projection_enabled
                else None
            )
            runtime = SessionRuntime(nc, db, worker, projection, rpc, db_ok=await db.ping())
            if projection is not None:
                await projection.start()
            await worker.start()
        except BaseException:
            await db.close()
            await nc.close()
            raise
        app.state.session = runtime
        watcher = asyncio.create_task(_watch_database(runtime), name="db-ping")

        readiness.add("nats", lambda: nc.is_connected)
        readiness.add("consumers", worker.running)
        if projection is not None:
            readiness.add("projection", projection.running)
        readiness.add("database", lambda: runtime.db_ok)
        try:
            yield
        finally:
            await worker.stop(settings.shutdown_grace)
            if projection is not None:
                await projection.stop()
            await rpc.unsubscribe()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await db.close()
            await nc.drain()
            log.info("session service stopped")

    return create_service_app("session", settings, lifespan, readiness)
