"""Fixtures of the keys service tests: settings over the run's NATS and PostgreSQL, the app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from _keys_support import DEV_KEY
from fastapi import FastAPI
from pydantic import SecretStr

from shoal.common.clock import ManualClock
from shoal.common.messaging import Subjects
from shoal.keys.app import create_app
from shoal.keys.config import KeysSettings


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=time.time())


@pytest.fixture
def settings(nats_url: str, database_url: str, subject_prefix: str) -> KeysSettings:
    return KeysSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        dev_admin_key=SecretStr(DEV_KEY),
        log_json=False,
    )


@pytest.fixture
async def keys_app(settings: KeysSettings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(subject_prefix)
