"""The gateway process: ``create_app(settings)`` builds the FastAPI app; its lifespan owns NATS.

Nothing connects at import. The lifespan connects to NATS, provisions the catalog (idempotent),
starts the bus (reply inbox, key-revocation broadcasts) and, on shutdown, closes every socket
with 1012 and a resume hint before it lets go of NATS.

Serve it like every service (``shoal run gateway`` does this)::

    app = create_app(settings)
    await ServiceServer(server_config(app, settings)).serve()

The app registers a ``before_server_shutdown`` hook that closes the sockets *before* uvicorn's
own shutdown, which would otherwise close them with a bare 1012 (no resume seq in the reason),
and raises uvicorn's frame cap just above the app's own 1009 check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from nats.errors import Error as NatsError

from shoal.common.messaging import Catalog, Subjects, connect_nats, provision
from shoal.common.service import Readiness, before_server_shutdown, create_service_app
from shoal.common.storage.objects import object_storage_from_settings
from shoal.gateway.api import router
from shoal.gateway.api.deps import GatewayState
from shoal.gateway.api.files import router as files_router
from shoal.gateway.api.files import upload_limit
from shoal.gateway.api.jobs import router as jobs_router
from shoal.gateway.api.limits import BodySizeLimit
from shoal.gateway.api.openapi import install_openapi, operation_id
from shoal.gateway.api.problems import install_problem_handlers, problem_responses
from shoal.gateway.api.prompt_route import PromptRoute
from shoal.gateway.api.proxy import router as proxy_router
from shoal.gateway.api.request_id import RequestIdMiddleware, install_request_id_logging
from shoal.gateway.api.socket_routes import GatewayApp
from shoal.gateway.api.streams import router as streams_router
from shoal.gateway.api.workers import router as workers_router
from shoal.gateway.bus import Bus
from shoal.gateway.config import GatewaySettings
from shoal.gateway.files import SessionFiles
from shoal.gateway.jobs import Jobs
from shoal.gateway.realtime import Realtime
from shoal.gateway.service import GatewayService
from shoal.gateway.streams import EventStreams
from shoal.gateway.tickets import Tickets
from shoal.gateway.ws import SocketHub
from shoal.gateway.ws.frames import encode_event
from shoal.gateway.ws.upgrade import StreamingState

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app (``shoal run gateway`` calls this with ``settings=None``)."""
    settings = settings or GatewaySettings()
    readiness = Readiness()
    hub = SocketHub(settings.max_sockets_per_owner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        objects = object_storage_from_settings(settings)  # session files; connects on first use
        nc = await connect_nats(settings, name="gateway")
        try:
            await provision(nc.jetstream(), Catalog.from_settings(settings))
            bus_subjects = Subjects(settings.subject_prefix)
            bus = Bus(nc, bus_subjects, settings, encode=encode_event)
            await bus.start()
            service = GatewayService(bus, settings)
            await bus.on_key_revoked(service.key_revoked)
            await bus.on_key_revoked(hub.key_revoked)  # open sockets of a revoked key: 4401
            app.state.gateway = GatewayState(service=service, hub=hub)
            app.state.files = SessionFiles(service, objects, settings.max_file_bytes)
            realtime = Realtime(nc, bus_subjects, settings)  # deltas, tickets, runner proxy
            await realtime.start()
            app.state.streaming = StreamingState(
                realtime=realtime,
                tickets=Tickets(realtime, settings),
                streams=EventStreams(bus, service, bus_subjects.deliver_stream),
            )
            app.state.jobs = jobs = Jobs(bus)
            readiness.add("nats", lambda: bool(nc.is_connected))
            yield
            await jobs.stop()
            await hub.close_all(settings.ws_close_timeout.total_seconds())
            await realtime.stop()
            await bus.stop()
        finally:
            with contextlib.suppress(NatsError, OSError):
                await nc.drain()
            await objects.close()

    app = create_service_app(
        "gateway",
        settings,
        lifespan,
        readiness,
        app_class=GatewayApp,  # the event sockets skip the framework's stack (socket_routes)
        generate_unique_id_function=operation_id,
    )
    install_request_id_logging()
    install_problem_handlers(app)
    # Middleware added last runs first: request id, then CORS, then the body cap.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        limit_for=upload_limit(settings.max_file_bytes),
    )
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=settings.cors_allow_methods,
            allow_headers=settings.cors_allow_headers,
            expose_headers=settings.cors_expose_headers,
            allow_credentials=settings.cors_allow_credentials,
            max_age=int(settings.cors_max_age.total_seconds()),
        )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(router, generate_unique_id_function=operation_id)
    app.include_router(
        streams_router,
        tags=["streaming"],
        responses=problem_responses(400, 401, 403, 404, 503),
        generate_unique_id_function=operation_id,
    )
    app.include_router(proxy_router, generate_unique_id_function=operation_id)
    app.include_router(files_router, generate_unique_id_function=operation_id)
    app.include_router(jobs_router, generate_unique_id_function=operation_id)
    app.include_router(workers_router)
    # Outermost: the command path's hot route skips the framework's stack (its CPU per prompt
    # request).
    app.add_middleware(PromptRoute, max_body_bytes=settings.max_body_bytes)
    install_openapi(app)
    # The app enforces max_ws_frame_bytes with a 1009 close; uvicorn's cap sits just above.
    app.state.uvicorn_options["ws_max_size"] = settings.max_ws_frame_bytes + 64 * 1024
    # Protocol-level keepalive: a peer that stops answering pings is dropped.
    app.state.uvicorn_options["ws_ping_interval"] = settings.ws_ping_interval.total_seconds()
    app.state.uvicorn_options["ws_ping_timeout"] = settings.ws_ping_timeout.total_seconds()

    async def close_sockets() -> None:
        await hub.close_all(settings.ws_close_timeout.total_seconds())

    before_server_shutdown(app, close_sockets)
    return app
