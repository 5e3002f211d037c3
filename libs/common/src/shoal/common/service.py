"""What every Shoal service process shares: health, readiness, metrics, logging, graceful stop.

A service's ``create_app(settings)`` builds its FastAPI app with :func:`create_service_app`,
passing a lifespan that owns its clients. ``shoal run <service>`` serves it with
:class:`ServiceServer` (uvicorn), which turns SIGTERM/SIGINT into the lifespan's shutdown
(drain, release, close). A service that holds long-lived connections registers a
``before_server_shutdown`` hook: uvicorn's own shutdown would close WebSockets with a bare 1012
before the lifespan runs, losing the reason that tells clients where to resume.

Example::

    readiness = Readiness()
    app = create_service_app("keys", settings, lifespan, readiness)
    readiness.add("nats", lambda: nc.is_connected)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.common.observability import setup_logging, setup_tracing, start_span
from shoal.common.settings import CommonSettings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
ShutdownHook = Callable[[], Awaitable[None]]


HTTP_REQUESTS = Counter(
    "shoal_http_requests_total",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "shoal_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# The route label of a request no route matched (404s): paths themselves would be unbounded.
UNMATCHED_ROUTE = "unmatched"

access_log = logging.getLogger("shoal.access")


# (method, route, status) -> its counter and histogram children: ``labels()`` takes a lock and
# builds the label tuple on every call; routes are templates and statuses few, so this stays small.
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request (for handlers that answer ahead of :class:`ObserveRequests`)."""
    children = _REQUEST_CHILDREN.get((method, route, status))
    if children is None:
        children = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_REQUEST_SECONDS.labels(method, route),
        )
        _REQUEST_CHILDREN[(method, route, status)] = children
    children[0].inc()
    children[1].observe(seconds)


class ObserveRequests:
    """Per HTTP request: a server span continuing the caller's W3C ``traceparent`` (commands
    the request publishes carry it on to NATS, the session service and the events it emits),
    the request metrics by route template, and with ``access_log`` one log line.
    Plain ASGI (not BaseHTTPMiddleware), so streamed bodies and responses pass untouched."""

    def __init__(self, app: ASGIApp, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        attributes = {"http.request.method": method, "url.path": path}
        status = 500  # what the client sees if the app raises before it answers
        with start_span(f"{method} {path}", headers, **attributes) as span:

            async def send_with_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                await send(message)

            try:
                await self.app(scope, receive, send_with_status)
            finally:
                # The router leaves the matched route in the scope: its template is the label.
                route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
                seconds = time.perf_counter() - started
                observe_request(method, route, status, seconds)
                if self.access_log:
                    access_log.info(
                        "%s %s %s",
                        method,
                        path,
                        status,
                        extra={
                            "method": method,
                            "path": path,
                            "route": route,
                            "status": status,
                            "duration_ms": round(seconds * 1000, 3),
                            "client": (scope.get("client") or ("", 0))[0],
                        },
                    )


class PolledCheck:
    """A readiness check answered from an async probe (a database ping) that runs in the
    background every ``interval`` seconds: ``/readyz`` checks are synchronous and must not wait
    on I/O. Probes once on entry, stops on exit::

        async with PolledCheck(db.ping, interval=5.0) as database:
            readiness.add("database", database)
    """

    def __init__(self, probe: Callable[[], Awaitable[bool]], *, interval: float) -> None:
        self._probe = probe
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.ok = False

    def __call__(self) -> bool:
        return self.ok

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.ok = await self._probe()

    async def start(self) -> None:
        self.ok = await self._probe()
        self._task = asyncio.create_task(self._poll(), name="readiness-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> PolledCheck:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


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
    *,
    app_class: type[FastAPI] = FastAPI,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app (an ``app_class``) with ``/healthz``, ``/readyz`` and ``/metrics`` (on
    ``SHOAL_METRICS_PORT`` when set, instead), request metrics, logging and tracing set up."""
    setup_logging(settings)
    setup_tracing(name, settings)

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                # /metrics on a port of its own (not the public one); a thread, like the
                # Prometheus client's other exposition servers.
                server, thread = start_http_server(settings.metrics_port, settings.http_host)
                stack.callback(thread.join, 5)
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
            async with lifespan(app):
                yield
                readiness.draining = True  # stop taking traffic before the service drains

    # FastAPI's own OpenTelemetry instrumentation is off: ObserveRequests makes the one server
    # span and continues the caller's traceparent. Both together cost about 160 us per request.
    fastapi_kwargs.setdefault("telemetry", {"tracing": False, "metrics": False, "logs": False})
    app = app_class(title=f"Shoal {name}", lifespan=run, **fastapi_kwargs)
    app.state.before_server_shutdown = []
    app.state.uvicorn_options = {}

    app.add_middleware(ObserveRequests, access_log=settings.access_log)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ok, checks = readiness.report()
        return JSONResponse(
            # The pid lets a supervisor tell its child's answer from another process's on the
            # same port (shoal.devtools.supervisor).
            {"status": "ready" if ok else "not ready", "checks": checks, "pid": os.getpid()},
            status_code=200 if ok else 503,
        )

    if settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def before_server_shutdown(app: FastAPI, hook: ShutdownHook) -> None:
    """Run ``hook`` when the server starts stopping, before uvicorn closes connections."""
    app.state.before_server_shutdown.append(hook)


def freeze_startup() -> None:
    """Move everything alive after start-up (modules, models, routes, clients) to the collector's
    permanent generation, and run young collections every 10,000 net allocations, not 700.

    Start-up's objects live as long as the process; left in gen2, every full pass walks them all
    and pauses the service (bench/README.md, "Garbage collection").
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class GcPacer:
    """Collects the young generations on a clock, not only on CPython's allocation count.

    CPython's count is allocations minus deallocations, so a process in a steady state (a
    gateway whose socket timers replace themselves) keeps it low while the young generation
    grows, and the pass that finally comes walks all of it. Every ``young`` seconds a gen0 pass,
    every ``middle_every``-th one a gen1 pass; every ``full`` seconds a full pass (0: leave full
    passes to CPython), and while the pacer runs CPython starts none of its own.
    Measurements: bench/README.md, "Garbage collection".
    """

    def __init__(self, *, young: float, full: float, middle_every: int = 10) -> None:
        if young <= 0:
            raise ValueError("young must be > 0")
        self.young = young
        self.full = full
        self.middle_every = middle_every
        self.passes = [0, 0, 0]  # by generation, for tests and curiosity

    async def run(self) -> None:
        thresholds = gc.get_threshold()
        if self.full > 0:
            # Full passes on the clock only: CPython's own come at moments of its choosing and
            # walk everything since start-up.
            gc.set_threshold(thresholds[0], thresholds[1], _NEVER)
        ticks = 0
        last_full = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.young)
                ticks += 1
                generation = 1 if ticks % self.middle_every == 0 else 0
                if self.full > 0 and time.monotonic() - last_full >= self.full:
                    generation = 2
                    last_full = time.monotonic()
                gc.collect(generation)
                self.passes[generation] += 1
        finally:
            gc.set_threshold(*thresholds)


# A gen2 threshold no count of gen1 passes reaches.
_NEVER = 2**31 - 1


# uvicorn's sans-I/O WebSocket protocol: a send frames and writes to the transport at once, and
# pings are timers, so a socket costs one task (the app's) instead of the legacy ``websockets``
# implementation's four (transfer data, keepalive, close, the app's) and their buffers.
WS_IMPLEMENTATION = "websockets-sansio"


def server_config(app: FastAPI, settings: CommonSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn settings for a Shoal service: our JSON logging, the sans-I/O WebSocket protocol
    (:data:`WS_IMPLEMENTATION`), no permessage-deflate (it costs memory per socket), the
    service's own options (``app.state.uvicorn_options``), then ``overrides``."""
    options: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "lifespan": "on",
        "log_config": None,
        "ws": WS_IMPLEMENTATION,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace.total_seconds()),
    }
    options.update(getattr(app.state, "uvicorn_options", {}))
    options.update(overrides)
    return uvicorn.Config(app, **options)


class ServiceServer(uvicorn.Server):
    """uvicorn's server that runs the app's ``before_server_shutdown`` hooks first; with
    ``gc_pacer`` (a service's own process: ``shoal run``) it keeps what start-up built out of
    the garbage collector's passes once it serves (:func:`freeze_startup`) and runs the pacer
    (:class:`GcPacer`) until it stops."""

    def __init__(self, config: uvicorn.Config, *, gc_pacer: GcPacer | None = None) -> None:
        super().__init__(config)
        self._gc_pacer = gc_pacer
        self._pacing: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._gc_pacer is not None and self.started:
            freeze_startup()
            self._pacing = asyncio.create_task(self._gc_pacer.run(), name="gc pacer")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        for hook in getattr(getattr(app, "state", None), "before_server_shutdown", []):
            await hook()
        await super().shutdown(sockets)
        if self._pacing is not None:
            self._pacing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pacing
