"""The keys service process: ``create_app(settings)`` and the lifespan that owns its clients.

Example::

    app = create_app(KeysSettings(dev_admin_key=SecretStr("dev-key")))
    # shoal run keys serves it with uvicorn
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from shoal.common.clock import Clock, SystemClock
from shoal.common.messaging import Catalog, Subjects, connect_nats, provision
from shoal.common.messaging.catalog import provision_stream
from shoal.common.service import PolledCheck, Readiness, create_service_app
from shoal.common.storage import Database, Schema
from shoal.keys.audit import audit_stream_config
from shoal.keys.config import KeysSettings
from shoal.keys.handlers import serve_keys
from shoal.keys.service import KeyService
from shoal.keys.store import KeyStore, NatsAudit, NatsRevocations, SecretStore
from shoal.keys.vault import SecretService

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_keys"
SCHEMA = Schema("keys", MIGRATIONS, VERSION_TABLE)
_DB_PROBE_INTERVAL = timedelta(seconds=5)


def create_app(settings: KeysSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The keys service: API key and secret RPCs over NATS plus /healthz, /readyz, /metrics."""
    settings = settings or KeysSettings()
    ring = settings.kek_ring()  # refuse to start on a bad KEK configuration, before connecting
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

            nc = await connect_nats(settings, name="keys")
            stack.push_async_callback(nc.drain)
            await provision(nc.jetstream(), Catalog.from_settings(settings))
            await provision_stream(nc.jetstream(), audit_stream_config(settings))

            subjects = Subjects(settings.subject_prefix)
            audit = NatsAudit(nc, subjects, clock)
            service = KeyService(
                KeyStore(db),
                NatsRevocations(nc, subjects),
                pepper=settings.pepper(),
                clock=clock,
                touch_interval=settings.keys_touch_interval,
                audit=audit,
                admin_audit_interval=settings.keys_admin_audit_interval,
            )
            secrets = SecretService(SecretStore(db), ring, audit, clock=clock)
            if settings.dev_admin_key is not None:
                await service.ensure_dev_admin(settings.dev_admin_key.get_secret_value())

            database = await stack.enter_async_context(
                PolledCheck(db.ping, interval=_DB_PROBE_INTERVAL.total_seconds())
            )
            readiness.add("nats", lambda: nc.is_connected)
            readiness.add("database", database)

            # nc.drain on the way out answers the requests already received, then closes;
            # it runs before db.close (the stack unwinds in reverse).
            await serve_keys(nc, subjects, service, secrets)
            app.state.keys = service
            app.state.secrets = secrets
            yield

    return create_service_app("keys", settings, lifespan, readiness)
