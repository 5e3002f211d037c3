"""Fixtures every test directory shares: a real nats-server and a real PostgreSQL per test run.

- ``nats_server`` / ``nats_url``: one JetStream server on a free port, temp store (session).
- ``nc``: a connected nats client (per test), ``js``: its JetStream context.
- ``subject_prefix``: a fresh prefix per test, so tests share the server without colliding.
- ``postgres``: one embedded PostgreSQL (session); ``database_url``: a fresh database per test.
- ``spans``: every span ``start_span`` makes during the test, recorded in memory.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal.common import observability
from shoal.devtools.embedded import EmbeddedNats, EmbeddedPostgres, free_port


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    root = tmp_path_factory.mktemp("nats")
    server = EmbeddedNats(port=free_port(), store_dir=root / "store", log_file=root / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def subject_prefix() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    root: Path = tmp_path_factory.mktemp("pg")
    server = EmbeddedPostgres(data_dir=root / "data", port=free_port(), log_file=root / "pg.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: EmbeddedPostgres) -> str:
    name = "t" + secrets.token_hex(4)
    postgres.create_database(name)
    return postgres.url(name)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port (session); any access key works against it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span ``start_span`` makes in this test process, recorded in memory (whatever tracer
    provider an earlier test installed)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(observability, "_TRACER", provider.get_tracer("shoal"))
    monkeypatch.setattr(observability, "_recording", True)
    yield exporter
    provider.shutdown()
