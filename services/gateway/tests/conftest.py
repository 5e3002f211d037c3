"""Gateway fixtures: the app on a real uvicorn (free port), fake keys and session services.

Each test gets a fresh subject prefix (own streams and buckets on the shared nats-server).
``keys`` and ``sessions`` are separate fixtures so a test can leave either service out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from gateway_fakes import FakeKeys, FakeSessionService
from nats.aio.client import Client as NATS

from shoal.client import ShoalClient
from shoal.common.messaging import Subjects
from shoal.common.service import ServiceServer, server_config
from shoal.devtools.embedded import free_port
from shoal.gateway.app import create_app
from shoal.gateway.config import GatewaySettings


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or parametrize) to change the gateway's settings."""
    return {}


@pytest.fixture
def settings(
    nats_url: str, subject_prefix: str, settings_overrides: dict[str, Any]
) -> GatewaySettings:
    values: dict[str, Any] = {
        "environment": "test",
        "nats_url": nats_url,
        "subject_prefix": subject_prefix,
        "session_partitions": 8,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "log_json": False,
        "log_level": "WARNING",
        "command_timeout": timedelta(seconds=3),
        "rpc_timeout": timedelta(seconds=2),
        "shutdown_grace": timedelta(seconds=3),
    }
    values.update(settings_overrides)
    return GatewaySettings(**values)


@pytest.fixture
async def keys(nc: NATS, settings: GatewaySettings) -> AsyncIterator[FakeKeys]:
    fake = FakeKeys(nc, Subjects(settings.subject_prefix))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def sessions(nc: NATS, settings: GatewaySettings) -> AsyncIterator[FakeSessionService]:
    fake = FakeSessionService(nc, settings)
    await fake.start()
    yield fake
    await fake.stop()


@dataclass
class RunningGateway:
    app: FastAPI
    server: ServiceServer
    task: asyncio.Task[None]
    base_url: str
    ws_url: str

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 15)


async def start_gateway(settings: GatewaySettings) -> RunningGateway:
    app = create_app(settings)
    server = ServiceServer(server_config(app, settings, log_level="warning"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            if task.done():
                task.result()  # surface the start-up error
            await asyncio.sleep(0.02)
    base = f"http://{settings.http_host}:{settings.http_port}"
    return RunningGateway(app, server, task, base, base.replace("http://", "ws://"))


@pytest.fixture
async def gateway(settings: GatewaySettings) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(settings)
    yield running
    await running.stop()


@pytest.fixture
def gateway_factory(settings: GatewaySettings) -> Callable[[], Any]:
    """Start (another) gateway with the test's settings; the test stops it."""

    async def start() -> RunningGateway:
        return await start_gateway(settings)

    return start


@pytest.fixture
async def alice(gateway: RunningGateway) -> AsyncIterator[ShoalClient]:
    """A client with alice's key (FakeKeys knows it)."""
    async with ShoalClient(gateway.base_url, "key-alice") as client:
        yield client
