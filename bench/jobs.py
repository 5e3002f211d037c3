"""``python -m bench jobs``: jobs/s through submit -> worker -> succeeded, and timer lateness.

One fleet (every service as a process, ``running_fleet``), then, in the same run:
- *raw work queue* (baseline): ``jobs`` messages published to a JetStream work-queue stream
  and taken by ``workers`` pull consumers that ack each: the floor of a queue on this machine.
- *Shoal jobs*: ``workers`` SDK workers (``/v1/workers/ws``, ``max_in_flight`` each) on one
  kind; ``jobs`` jobs submitted over HTTP (``concurrency`` at once); jobs/s from the first
  submit until the last job is ``succeeded``, and the latency from its submit to its handler.
- *raw publish* (baseline): ``timers`` JetStream publishes, each awaited, one after another
  (what firing costs when nothing else is done).
- *Shoal timers*: ``timers`` timers due at the same instant (rows in one transaction), fired
  by the scheduler into a stream; lateness = stored time - due time, p50 / p99 / max.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import sqlalchemy as sa
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from bench._report import Latency, fmt, table
from bench.command_path import DATABASE
from shoal.client import Worker, WorkerJob
from shoal.common.messaging import dumps, loads
from shoal.common.storage import Database
from shoal.devtools.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from shoal.devtools.supervisor import Fleet, FleetConfig, fleet_specs
from shoal.scheduler.store import timers as timers_table

PREFIX = "shoal"


@dataclass(frozen=True)
class JobsOptions:
    jobs: int = 2_000
    workers: int = 10
    max_in_flight: int = 8
    concurrency: int = 32
    timers: int = 10_000
    sync_always: bool = True
    keep_dir: bool = False


@dataclass(frozen=True)
class JobsResult:
    raw_queue_rate: float
    jobs_rate: float
    jobs_latency: Latency
    jobs_done: int
    raw_publish_rate: float
    timer_lateness: Latency
    timers_fired: int
    options: JobsOptions


def _say(message: str) -> None:
    print(f"[bench jobs] {message}", file=sys.stderr, flush=True)


async def _raw_queue(nats_url: str, options: JobsOptions) -> float:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = "BENCH_RAW_QUEUE"
    await js.add_stream(
        StreamConfig(name=stream, subjects=["bench.rawq.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    done = asyncio.Event()
    taken = 0

    async def consume(n: int) -> None:
        nonlocal taken
        sub = await js.pull_subscribe("bench.rawq.k", durable="w", stream=stream)
        while not done.is_set():
            try:
                msgs = await sub.fetch(options.max_in_flight, timeout=0.5)
            except NatsTimeout:
                continue
            for msg in msgs:
                await msg.ack()
                taken += 1
                if taken >= options.jobs:
                    done.set()

    consumers = [asyncio.create_task(consume(n)) for n in range(options.workers)]
    started = time.perf_counter()
    for start in range(0, options.jobs, options.concurrency):
        count = min(options.concurrency, options.jobs - start)
        await asyncio.gather(*(js.publish("bench.rawq.k", b"{}") for _ in range(count)))
    await asyncio.wait_for(done.wait(), 120)
    seconds = time.perf_counter() - started
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    await js.delete_stream(stream)
    await nc.close()
    return options.jobs / seconds


async def _shoal_jobs(url: str, key: str, options: JobsOptions) -> tuple[float, Latency, int]:
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    handled = asyncio.Event()
    workers = [
        Worker(url, key, max_in_flight=options.max_in_flight, name=f"bench-{n}")
        for n in range(options.workers)
    ]
    for worker in workers:

        @worker.handler("bench")
        async def handle(job: WorkerJob) -> Any:
            latencies.append(time.perf_counter() - submitted.get(job.job_id, time.perf_counter()))
            if len(latencies) >= options.jobs:
                handled.set()
            return job.input

    tasks = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.gather(*(asyncio.wait_for(w.connected.wait(), 30) for w in workers))
    ids: list[str] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:

        async def submit(n: int) -> None:
            sent = time.perf_counter()
            response = await http.post("/v1/jobs", json={"kind": "bench", "input": n})
            response.raise_for_status()
            job_id = response.json()["id"]
            submitted.setdefault(job_id, sent)
            ids.append(job_id)

        started = time.perf_counter()
        for start in range(0, options.jobs, options.concurrency):
            count = min(options.concurrency, options.jobs - start)
            await asyncio.gather(*(submit(start + i) for i in range(count)))
        await asyncio.wait_for(handled.wait(), 300)
        # Reports reach the scheduler after their handlers returned: wait until none is left
        # queued or running.
        while True:
            busy = [
                (await http.get("/v1/jobs", params={"status": status, "limit": 1})).json()
                for status in ("queued", "running")
            ]
            if not any(page["jobs"] for page in busy):
                break
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        succeeded = 0
        cursor = None
        while True:
            params: dict[str, Any] = {"status": "succeeded", "limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/v1/jobs", params=params)).json()
            succeeded += len(page["jobs"])
            cursor = page["next"]
            if not cursor:
                break
    for worker in workers:
        await worker.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    return options.jobs / seconds, Latency.of(latencies), succeeded


async def _raw_publish(nats_url: str, count: int) -> float:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_RAW_PUB", subjects=["bench.rawpub.>"]))
    started = time.perf_counter()
    for n in range(count):
        await js.publish(f"bench.rawpub.{n}", b"{}", headers={"Nats-Msg-Id": f"m{n}"})
    seconds = time.perf_counter() - started
    await js.delete_stream("BENCH_RAW_PUB")
    await nc.close()
    return count / seconds


async def _timers(nats_url: str, database_url: str, count: int) -> tuple[Latency, int]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = "BENCH_TIMER_TARGET"
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"{PREFIX}.benchtarget.>"], duplicate_window=120)
    )
    due = time.time() + 5
    at = datetime.fromtimestamp(due, UTC)
    rows = [
        {
            "id": f"bt{n}",
            "subject": f"{PREFIX}.benchtarget.t{n}",
            "payload": dumps({"n": n, "due": due}),
            "fire_at": at,
            "due_at": at,
            "attempts": 0,
            "created_at": datetime.now(UTC),
        }
        for n in range(count)
    ]
    db = Database(database_url, pool_size=1)
    async with db.session() as session, session.begin():
        await session.execute(sa.insert(timers_table), rows)
    await db.close()
    sub = await js.pull_subscribe(
        f"{PREFIX}.benchtarget.>",
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
    )
    lateness: list[float] = []
    deadline = time.monotonic() + 120
    while len(lateness) < count and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(1000, timeout=1)
        except NatsTimeout:
            continue
        for msg in msgs:
            stored = msg.metadata.timestamp
            if stored is not None:
                lateness.append(stored.timestamp() - loads(msg.data)["due"])
    await nc.close()
    return Latency.of(lateness), len(lateness)


async def run_jobs(options: JobsOptions) -> JobsResult:
    home = Path(tempfile.mkdtemp(prefix="shoal-bench-jobs-"))
    try:
        async with jobs_fleet(options.sync_always, home) as fleet:
            _say(f"raw work queue: {options.jobs} messages, {options.workers} consumers")
            raw_queue = await _raw_queue(fleet.nats_url, options)
            _say(f"Shoal jobs: {options.jobs} jobs, {options.workers} workers")
            rate, latency, done = await _shoal_jobs(fleet.gateway_url, fleet.admin_key, options)
            _say(f"raw publish: {options.timers} awaited publishes")
            raw_publish = await _raw_publish(fleet.nats_url, options.timers)
            _say(f"Shoal timers: {options.timers} due at once")
            lateness, fired = await _timers(fleet.nats_url, fleet.database_url, options.timers)
    finally:
        if not options.keep_dir:
            shutil.rmtree(home, ignore_errors=True)
    return JobsResult(raw_queue, rate, latency, done, raw_publish, lateness, fired, options)


@dataclass(frozen=True)
class _JobsFleet:
    gateway_url: str
    admin_key: str
    nats_url: str
    database_url: str


@contextlib.asynccontextmanager
async def jobs_fleet(sync_always: bool, home: Path) -> AsyncIterator[_JobsFleet]:
    """NATS + PostgreSQL + every service as a process, on free ports; stopped on exit."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    nats_server = EmbeddedNats(
        port=free_port(),
        store_dir=home / "nats",
        sync_always=sync_always,
        log_file=logs / "nats.log",
    )
    postgres = EmbeddedPostgres(
        data_dir=home / "postgres", port=free_port(), log_file=logs / "postgres.log"
    )
    try:
        await asyncio.to_thread(nats_server.start)
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(postgres.create_database, DATABASE)
        config = FleetConfig(
            nats_url=nats_server.url,
            database_url=postgres.url(DATABASE),
            admin_key="shoal_dev_" + secrets.token_urlsafe(24),
            object_store_path=home / "objects",
            extra_env={"SHOAL_SCHEDULER_BATCH_SIZE": "500", "SHOAL_LOG_LEVEL": "WARNING"},
            base_env={k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
        )
        fleet = Fleet(fleet_specs(config), config=config, log_dir=logs)
        async with fleet:
            await fleet.wait_ready(90)
            yield _JobsFleet(
                fleet.gateway_url, fleet.admin_key, nats_server.url, postgres.url(DATABASE)
            )
    finally:
        await asyncio.shield(asyncio.to_thread(postgres.stop))
        await asyncio.shield(asyncio.to_thread(nats_server.stop))


def render_jobs(result: JobsResult) -> str:
    o = result.options
    lat = result.jobs_latency
    tl = result.timer_lateness
    rows = [
        (
            f"raw work queue ({o.workers} pull consumers)",
            f"{fmt(result.raw_queue_rate, 0)} msg/s",
            "-",
            "1.00x",
        ),
        (
            f"Shoal jobs ({o.workers} workers x {o.max_in_flight} in flight)",
            f"{fmt(result.jobs_rate, 0)} jobs/s ({result.jobs_done}/{o.jobs} succeeded)",
            f"submit -> handler {fmt(lat.p50, 1)} / {fmt(lat.p99, 1)} ms (p50 / p99)",
            f"{result.jobs_rate / result.raw_queue_rate:.2f}x",
        ),
        (
            "raw awaited publishes, one at a time",
            f"{fmt(result.raw_publish_rate, 0)} msg/s",
            f"{o.timers} in {fmt(o.timers / result.raw_publish_rate, 2)} s",
            "-",
        ),
        (
            f"Shoal timers, {o.timers} due at once",
            f"{result.timers_fired}/{o.timers} fired",
            f"lateness {fmt(tl.p50, 0)} / {fmt(tl.p99, 0)} / {fmt(tl.max, 0)} ms (p50 / p99 / max)",
            "-",
        ),
    ]
    return table("Jobs and timers", ("path", "rate", "latency", "vs raw"), rows)
