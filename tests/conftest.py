"""Cross-service fixtures: the five services as separate OS processes (``shoal run``).

- ``fleet``: a factory. ``await fleet()`` starts every service against the run's nats-server
  and this test's fresh database, under this test's subject prefix, waits until each
  ``/readyz`` answers 200, and returns a :class:`~shoal.devtools.supervisor.Fleet`::

      async def test_failover(fleet: FleetFactory) -> None:
          running = await fleet(session_replicas=2)
          client = ShoalClient(running.gateway_url, api_key=running.admin_key)
          running["session-0"].kill()            # SIGKILL; it stays down (no autorestart)
          await running["session-0"].wait()
          await running["session-0"].start()     # a new process on the same port
          running["eventbus"].pause()            # SIGSTOP ... .resume() for SIGCONT
          await running["keys"].stop()           # SIGTERM, grace, SIGKILL

  Each service writes its output to ``<tmp_path>/fleet-<n>/<name>.log``; a service that does
  not become ready fails the test with its last log lines. Everything is stopped at teardown,
  and a killed pytest takes the services with it (parent-death signal).
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from shoal.devtools.embedded import free_port
from shoal.devtools.supervisor import Fleet, FleetConfig, FleetFactory, fleet_specs


@pytest.fixture
async def fleet(
    nats_url: str, database_url: str, subject_prefix: str, tmp_path: Path
) -> AsyncIterator[FleetFactory]:
    started: list[Fleet] = []

    async def start(
        *,
        subject_prefix: str | None = subject_prefix,
        session_replicas: int = 1,
        scheduler_replicas: int = 1,
        env: Mapping[str, str] | None = None,
        nats_url: str = nats_url,
        database_url: str = database_url,
        ready_within: float = 60.0,
    ) -> Fleet:
        config = FleetConfig(
            nats_url=nats_url,
            database_url=database_url,
            admin_key="shoal_dev_" + secrets.token_urlsafe(24),
            gateway_port=free_port(),
            session_replicas=session_replicas,
            scheduler_replicas=scheduler_replicas,
            subject_prefix=subject_prefix,
            object_store_path=tmp_path / "objects",
            extra_env=dict(env or {}),
        )
        running = Fleet(
            fleet_specs(config),
            config=config,
            log_dir=tmp_path / f"fleet-{len(started)}",
            death_signal=signal.SIGKILL,  # test services hold nothing worth a graceful stop
        )
        started.append(running)
        await running.start()
        await running.wait_ready(ready_within)
        return running

    try:
        yield start
    finally:
        for running in started:
            await running.stop(grace=10.0)
