"""What every Shoal service process shares: health, readiness, metrics, logging, graceful stop.

A service's ``create_app(settings)`` builds its FastAPI app with :func:`create_service_app`,
passing a lifespan that owns its clients. ``shoal run <service>`` serves it with uvicorn, which
turns SIGTERM/SIGINT into the lifespan's shutdown (drain, release, close).

Example::

    readiness = Readiness()
    app = create_service_app("keys", settings, lifespan, readiness)
    readiness.add("nats", lambda: nc.is_connected)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.common.observability import setup_logging, setup_tracing
from shoal.common.settings import CommonSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class Readiness:
    """Named checks that must all pass for ``/readyz`` to answer 200."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}
        self.draining = False

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, bool]]:
        results = {}
        for name, check in self._checks.items():
            try:
                results[name] = bool(check())
            except Exception:
                results[name] = False
        ok = bool(results) and all(results.values()) and not self.draining
        return ok, results


def create_service_app(
    name: str,
    settings: CommonSettings,
    lifespan: Lifespan,
    readiness: Readiness,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with ``/healthz``, ``/readyz`` and ``/metrics``, logging and tracing set up."""
    setup_logging(settings)
    setup_tracing(name, settings)

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            yield
            readiness.draining = True  # stop taking traffic before the service drains

    app = FastAPI(title=f"Shoal {name}", lifespan=run, **fastapi_kwargs)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ok, checks = readiness.report()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
