"""The real scheduler service in-process (real NATS and PostgreSQL) and API keys for jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from gateway_fakes import FakeKeys
from pydantic import SecretStr

from shoal.scheduler.app import create_app as create_scheduler
from shoal.scheduler.config import SchedulerSettings

JOB_KEYS = {
    "key-jobs-alice": {"key_id": "k-ja", "owner": "alice", "scopes": ["jobs"], "name": "ja"},
    "key-jobs-bob": {"key_id": "k-jb", "owner": "bob", "scopes": ["jobs"], "name": "jb"},
    "key-work-alice": {"key_id": "k-wa", "owner": "alice", "scopes": ["jobs:work"], "name": "wa"},
    "key-read-alice": {"key_id": "k-ra", "owner": "alice", "scopes": ["read"], "name": "ra"},
}


@pytest.fixture
async def scheduler(nats_url: str, database_url: str, subject_prefix: str) -> AsyncIterator[None]:
    settings = SchedulerSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        log_json=False,
        session_partitions=8,  # as the gateway tests provision the streams
        scheduler_poll_interval=timedelta(milliseconds=50),
        scheduler_sweep_interval=timedelta(milliseconds=50),
        scheduler_job_backoff_base=timedelta(milliseconds=100),
        scheduler_job_max_input_bytes=4096,
    )
    app = create_scheduler(settings)
    async with app.router.lifespan_context(app):
        yield


@pytest.fixture
def job_keys(keys: FakeKeys) -> FakeKeys:
    keys.keys.update({k: dict(v) for k, v in JOB_KEYS.items()})
    return keys
