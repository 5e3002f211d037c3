"""Fixtures of the session service's tests (real nats-server and PostgreSQL from the root)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from _session_support import Gateway, running
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import SecretStr

from shoal.common.messaging import Subjects
from shoal.session.config import SessionSettings


@pytest.fixture
def settings(nats_url: str, database_url: str, subject_prefix: str) -> SessionSettings:
    return SessionSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        session_partitions=4,
        fetch_timeout=timedelta(seconds=0.25),
        shutdown_grace=timedelta(seconds=5),
        lease_ttl=timedelta(seconds=2),
        member_ttl=timedelta(seconds=2),
        renew_interval=timedelta(seconds=0.25),
        log_json=False,
        session_timers=False,  # no scheduler here; the tests that run one turn timers on
    )


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(subject_prefix)


@pytest.fixture
async def app(settings: SessionSettings) -> AsyncIterator[FastAPI]:
    async with running(settings) as started:
        yield started


@pytest.fixture
def gateway(nc: NATS, js: JetStreamContext, subjects: Subjects) -> Gateway:
    return Gateway(nc, js, subjects)
