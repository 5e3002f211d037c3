"""The gateway process: ``create_app(settings)`` builds the FastAPI app; its lifespan owns NATS.

Nothing connects at import. The lifespan connects to NATS, provisions the catalog (idempotent),
starts the bus (reply inbox, key-revocation broadcasts) and, on shutdown, closes every socket
with 1012 and a resume hint before it lets go of NATS.

Serve it with permessage-deflate off (it costs memory per socket and CPU per frame)::

    app = create_app(settings)
    server = GatewayServer(uvicorn_config(app, settings), app)
    await server.serve()

``GatewayServer`` closes the sockets itself *before* uvicorn's own shutdown, which would
otherwise close them with a bare 1012 (no resume seq in the reason).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from nats.errors import Error as NatsError

from shoal.common.messaging import Catalog, Subjects, connect_nats, provision
from shoal.common.service import Readiness, create_service_app
from shoal.gateway.api import router
from shoal.gateway.api.deps import GatewayState
from shoal.gateway.api.limits import BodySizeLimit
from shoal.gateway.api.problems import install_problem_handlers
from shoal.gateway.api.sockets import SocketHub
from shoal.gateway.bus import Bus
from shoal.gateway.config import GatewaySettings
from shoal.gateway.service import GatewayService

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app (``shoal run gateway`` calls this with ``settings=None``)."""
    settings = settings or GatewaySettings()
    readiness = Readiness()
    hub = SocketHub()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect_nats(settings, name="gateway")
        try:
            await provision(nc.jetstream(), Catalog.from_settings(settings))
            bus = Bus(nc, Subjects(settings.subject_prefix), settings)
            await bus.start()
            service = GatewayService(bus, settings)
            await bus.on_key_revoked(service.key_revoked)
            app.state.gateway = GatewayState(service=service, hub=hub)
            readiness.add("nats", lambda: bool(nc.is_connected))
            yield
            await hub.close_all(settings.ws_close_timeout.total_seconds())
            await bus.stop()
        finally:
            with contextlib.suppress(NatsError, OSError):
                await nc.drain()

    app = create_service_app("gateway", settings, lifespan, readiness)
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(router)
    return app


def uvicorn_config(app: FastAPI, settings: GatewaySettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn settings the gateway needs: no permessage-deflate, frame cap above our own check."""
    options: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "ws_per_message_deflate": False,
        # The app enforces max_ws_frame_bytes with a 1009 close; uvicorn's cap sits just above.
        "ws_max_size": settings.max_ws_frame_bytes + 64 * 1024,
        "timeout_graceful_shutdown": settings.shutdown_grace.total_seconds(),
        "log_config": None,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, but sockets get 1012 *with* their resume seq before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self._app.state, "gateway", None)
        if isinstance(state, GatewayState):
            await state.hub.close_all(state.service.settings.ws_close_timeout.total_seconds())
        await super().shutdown(sockets)
