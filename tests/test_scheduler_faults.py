"""Fault tests of the scheduler as OS processes (``shoal run scheduler``), real NATS and PostgreSQL.

- 10,000 timers due within two seconds, two replicas, one SIGKILLed just before they are due:
  every timer's message is stored exactly once in its target stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from shoal.common.clock import iso
from shoal.common.messaging import Subjects, dumps, loads, request
from shoal.common.storage import Database
from shoal.devtools.embedded import free_port
from shoal.devtools.supervisor import ServiceProcess, ServiceSpec
from shoal.scheduler.store import timers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TIMERS = 10_000


def scheduler_spec(
    name: str, nats_url: str, database_url: str, prefix: str, extra: Mapping[str, str]
) -> ServiceSpec:
    port = free_port()
    env = {
        **os.environ,
        "SHOAL_ENVIRONMENT": "development",
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_DATABASE_URL": database_url,
        "SHOAL_SUBJECT_PREFIX": prefix,
        "SHOAL_SERVICE_NAME": "scheduler",
        "SHOAL_INSTANCE_ID": name,
        "SHOAL_HTTP_HOST": "127.0.0.1",
        "SHOAL_HTTP_PORT": str(port),
        "SHOAL_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    argv = (sys.executable, "-m", "shoal.common.cli", "run", "scheduler")
    return ServiceSpec(name=name, argv=argv, env=env, http_port=port, port_picked=True)


@pytest.fixture
async def schedulers(
    nats_url: str, database_url: str, subject_prefix: str, tmp_path: Path
) -> AsyncIterator[Callable[..., ServiceProcess]]:
    """Start scheduler replicas as processes; every one is stopped at teardown."""
    started: list[ServiceProcess] = []

    def make(name: str, **extra: str) -> ServiceProcess:
        spec = scheduler_spec(name, nats_url, database_url, subject_prefix, extra)
        proc = ServiceProcess(spec, log_dir=tmp_path, death_signal=signal.SIGKILL)
        started.append(proc)
        return proc

    yield make
    await asyncio.gather(*(p.stop(grace=10) for p in started))


async def ready(*procs: ServiceProcess, within: float = 60) -> None:
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        async with asyncio.timeout(within):
            for proc in procs:
                while not await proc.probe(client):
                    if not proc.running:
                        raise AssertionError(f"{proc.name} exited: {proc.last_probe}")
                    await asyncio.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def test_10k_timers_fire_exactly_once_when_a_replica_is_killed_near_their_due_time(
    schedulers: Callable[..., ServiceProcess],
    nc: NATS,
    js: JetStreamContext,
    subject_prefix: str,
    database_url: str,
) -> None:
    subjects = Subjects(subject_prefix)
    stream = f"{subject_prefix.upper()}_FAULT_TARGET"
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"{subject_prefix}.target.>"], duplicate_window=120)
    )
    settings = {"SHOAL_SCHEDULER_BATCH_SIZE": "500", "SHOAL_SCHEDULER_POLL_INTERVAL": "0.2"}
    first, second = schedulers("scheduler-0", **settings), schedulers("scheduler-1", **settings)
    await first.start()
    await second.start()
    await ready(first, second)

    # Arm 10,000 timers due within 2 s of T0: one through the RPC (the path users take), the
    # rest as rows in one transaction (10,000 RPCs take minutes on a loaded 2-core machine,
    # and arming is not what this test measures).
    t0 = time.time() + 8
    due = {f"t{n}": t0 + (n % 2000) / 1000 for n in range(TIMERS)}
    armed_at = time.time()
    first_id, first_at = next(iter(due.items()))
    await request(
        nc,
        subjects.rpc("scheduler", "set_timer"),
        {
            "id": first_id,
            "fire_at": iso(first_at),
            "subject": f"{subject_prefix}.target.{first_id}",
            "payload": {"id": first_id, "fire_at": first_at},
        },
    )
    db = Database(database_url, pool_size=1)
    rows = [
        {
            "id": timer_id,
            "subject": f"{subject_prefix}.target.{timer_id}",
            "payload": dumps({"id": timer_id, "fire_at": fire_at}),
            "fire_at": datetime.fromtimestamp(fire_at, UTC),
            "due_at": datetime.fromtimestamp(fire_at, UTC),
            "attempts": 0,
            "created_at": datetime.now(UTC),
        }
        for timer_id, fire_at in list(due.items())[1:]
    ]
    async with db.session() as session, session.begin():
        await session.execute(sa.insert(timers), rows)
    await db.close()
    arming_s = time.time() - armed_at
    assert time.time() < t0 - 1, f"arming took {arming_s:.1f}s: T0 passed"

    await asyncio.sleep(t0 - 0.3 - time.time())
    first.kill()  # SIGKILL, 0.3 s before the first timer is due
    await first.wait()

    sub = await js.pull_subscribe(
        f"{subject_prefix}.target.>",
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
    )
    lateness: list[float] = []
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 90
    while len(lateness) < TIMERS and time.monotonic() < deadline:
        try:
            batch = await sub.fetch(1000, timeout=1)
        except NatsTimeout:
            continue
        for msg in batch:
            body = loads(msg.data)
            seen[body["id"]] = seen.get(body["id"], 0) + 1
            stored = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
            lateness.append(stored - body["fire_at"])
    info = await js.stream_info(stream)
    await sub.unsubscribe()

    lost = TIMERS - len(seen)
    duplicated = sum(n - 1 for n in seen.values())
    p50, p99 = percentile(lateness, 50), percentile(lateness, 99)
    print(
        f"\n10k timers, 2 replicas, one SIGKILLed at T0-0.3s: armed in {arming_s:.1f}s; "
        f"fired {len(seen)}, lost {lost}, duplicated {duplicated}, stored {info.state.messages}; "
        f"lateness p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {max(lateness) * 1000:.0f} ms"
    )
    assert lost == 0
    assert duplicated == 0
    assert info.state.messages == TIMERS
