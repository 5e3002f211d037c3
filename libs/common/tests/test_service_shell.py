"""The service shell: health, readiness, metrics, and trace context from the caller."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from opentelemetry import trace

from shoal.common.service import Readiness, create_service_app
from shoal.common.settings import CommonSettings


@asynccontextmanager
async def _nothing(app: FastAPI) -> AsyncIterator[None]:
    yield


async def test_requests_continue_the_callers_trace_and_probes_answer() -> None:
    readiness = Readiness()
    ready = {"dep": False}
    readiness.add("dep", lambda: ready["dep"])
    app = create_service_app("probe", CommonSettings(log_json=False), _nothing, readiness)

    @app.get("/trace")
    async def current_trace() -> dict[str, str]:
        context = trace.get_current_span().get_span_context()
        return {"trace_id": format(context.trace_id, "032x")}

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        answer = await client.get(
            "/trace", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
        )
        assert answer.json() == {"trace_id": trace_id}
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        ready["dep"] = True
        assert (await client.get("/readyz")).json() == {
            "status": "ready",
            "checks": {"dep": True},
            "pid": os.getpid(),
        }
        assert "# HELP" in (await client.get("/metrics")).text
