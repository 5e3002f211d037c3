"""Request metrics by route template, the access log, and /metrics on a port of its own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from shoal.common.errors import Unavailable
from shoal.common.service import Readiness, create_service_app
from shoal.common.settings import CommonSettings
from shoal.devtools.embedded import free_port


@asynccontextmanager
async def _nothing(app: FastAPI) -> AsyncIterator[None]:
    yield


def _count(route: str, status: str, method: str = "GET") -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("shoal_http_requests_total", labels) or 0.0


def _observed(route: str, method: str = "GET") -> float:
    labels = {"method": method, "route": route}
    return REGISTRY.get_sample_value("shoal_http_request_duration_seconds_count", labels) or 0.0


class _Records(logging.Handler):
    """The access log's records (setup_logging replaces the root's handlers, caplog's too)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    logger = logging.getLogger("shoal.access")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def _app(settings: CommonSettings) -> FastAPI:
    app = create_service_app("metered", settings, _nothing, Readiness())

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        if thing_id == "down":
            raise Unavailable("down")
        if thing_id == "crash":
            raise RuntimeError("boom")
        return {"id": thing_id}

    return app


async def test_requests_are_counted_by_route_template_status_and_timed(
    access_records: list[logging.LogRecord],
) -> None:
    app = _app(CommonSettings(log_json=False, access_log=True))
    route = "/things/{thing_id}"
    before = {s: _count(route, s) for s in ("200", "500")}
    observed, unmatched = _observed(route), _count("unmatched", "404")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://metered") as client:
        assert (await client.get("/things/a")).status_code == 200
        assert (await client.get("/things/b")).status_code == 200
        assert (await client.get("/things/crash")).status_code == 500
        assert (await client.get("/nowhere")).status_code == 404
    assert _count(route, "200") == before["200"] + 2
    assert _count(route, "500") == before["500"] + 1
    assert _observed(route) == observed + 3
    assert _count("unmatched", "404") == unmatched + 1
    lines = access_records
    assert [(r.__dict__["route"], r.__dict__["status"]) for r in lines] == [
        (route, 200),
        (route, 200),
        (route, 500),
        ("unmatched", 404),
    ]
    assert all(r.__dict__["duration_ms"] >= 0 for r in lines)


async def test_no_access_log_unless_asked(access_records: list[logging.LogRecord]) -> None:
    app = _app(CommonSettings(log_json=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://metered") as client:
        assert (await client.get("/things/a")).status_code == 200
    assert access_records == []


async def test_metrics_on_a_port_of_their_own() -> None:
    port = free_port()
    app = _app(CommonSettings(log_json=False, metrics_port=port))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://metered") as client:
            assert (await client.get("/things/a")).status_code == 200
            assert (await client.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as scraper:
            exposition = (await scraper.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'shoal_http_requests_total{method="GET",route="/things/{thing_id}"' in exposition
    async with httpx.AsyncClient() as scraper:
        with pytest.raises(httpx.ConnectError):
            await scraper.get(f"http://127.0.0.1:{port}/metrics")
