"""Jobs and schedules end to end: the fleet as OS processes, workers, faults (SIGKILL)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shoal.client import Event, Job, ShoalClient, Worker, WorkerJob
from shoal.common.messaging import Subjects, request
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKER_SCRIPT = Path(__file__).with_name("job_worker.py")


@asynccontextmanager
async def working(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 20)
    try:
        yield worker
    finally:
        await worker.stop()
        await asyncio.wait_for(task, 10)


async def until(client: ShoalClient, job_id: str, wanted: str, within: float = 30) -> Job:
    async with asyncio.timeout(within):
        while True:
            job = await client.get_job(job_id)
            if job.status == wanted:
                return job
            await asyncio.sleep(0.1)  # the HTTP API has no push for one job but /run


async def test_a_worker_killed_mid_job_is_redriven_and_its_late_completion_is_refused(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    running = await fleet()
    url, key = running.gateway_url, running.admin_key
    async with ShoalClient(url, key) as client:
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER_SCRIPT), url, key, "crunch",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            job = await client.submit_job("crunch", {"n": 7}, timeout=2, max_attempts=3)
            assert doomed.stdout is not None
            line = await asyncio.wait_for(doomed.stdout.readline(), 30)
            assert line.decode().split() == ["started", job.id, "1"]
        finally:
            doomed.kill()  # SIGKILL mid-job: no report, the socket just drops
            await doomed.wait()
        killed_at = time.monotonic()

        survivor = Worker(url, key, name="survivor")

        @survivor.handler("crunch")
        async def crunch(job: WorkerJob) -> Any:
            return {"n": job.input["n"] * 6, "attempt": job.attempt}

        async with working(survivor):
            done = await until(client, job.id, "succeeded")
        redriven_after = time.monotonic() - killed_at

        # The first attempt's completion arrives late: refused, the result stays.
        late = await request(
            nc,
            Subjects(subject_prefix).rpc("scheduler", "jobs.complete"),
            {"job_id": job.id, "attempt": 1, "output": {"n": -1}},
        )
        after = await client.get_job(job.id)
    print(f"\nworker SIGKILLed mid-job (lease 2 s): succeeded {redriven_after:.1f} s later")
    assert late == {"accepted": False}
    assert done.output == {"n": 42, "attempt": 2}
    assert after.output == done.output
    assert [(a.n, a.worker, a.error) for a in after.attempts] == [
        (1, "doomed", "lease expired"),
        (2, "survivor", None),
    ]


def fire_times(jobs: list[Job], schedule_id: str) -> list[float]:
    """The firing time (s) of each job a schedule started, from its idempotency key."""
    prefix = f"schedule:{schedule_id}:"
    return sorted(
        int((j.idempotency_key or "")[len(prefix) :]) / 1000
        for j in jobs
        if (j.idempotency_key or "").startswith(prefix)
    )


async def test_schedules_fire_on_time_across_a_scheduler_restart_honouring_catch_up(
    fleet: FleetFactory,
) -> None:
    running = await fleet(
        env={
            "SHOAL_SCHEDULER_SCHEDULE_SKIP_GRACE": "1",
            "SHOAL_SCHEDULER_SWEEP_INTERVAL": "0.2",
        }
    )
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session = await client.create_session({"purpose": "cron"})
        every_all = await client.create_schedule({"job": {"kind": "all"}}, every=1, catch_up="all")
        every_skip = await client.create_schedule(
            {"job": {"kind": "skip"}}, every=1, catch_up="skip"
        )
        cron_once = await client.create_schedule({"job": {"kind": "once"}}, cron="* * * * * *")
        prompts = await client.create_schedule(
            {"prompt": {"session_id": session.id, "content": "nightly report"}}, every=1
        )

        queued: list[Event] = []
        async with client.connect_session(session.id, since=0) as events:
            async with asyncio.timeout(30):
                async for event in events:
                    if event.type == "prompt.queued":
                        queued.append(event)
                        if len(queued) == 2:
                            break
        assert all(e.data["content"] == "nightly report" for e in queued)
        assert len({e.data["prompt_id"] for e in queued}) == 2
        await client.delete_schedule(prompts.id)

        await asyncio.sleep(2)  # a few on-time firings
        scheduler = running["scheduler"]
        scheduler.kill()
        await scheduler.wait()
        down_from = time.time()
        await asyncio.sleep(4)  # four firings of each schedule are missed
        await scheduler.start()
        await running.wait_ready(60)
        ready_at = time.time()
        await asyncio.sleep(3)  # the catch-up pass, then on-time firings again

        jobs = (await client.list_jobs(limit=200)).jobs
        all_times = fire_times(jobs, every_all.id)
        skip_times = fire_times(jobs, every_skip.id)
        once_times = fire_times(jobs, cron_once.id)
        late = [
            job_created - fired
            for j in jobs
            if j.idempotency_key and j.idempotency_key.startswith("schedule:")
            for fired in [int(j.idempotency_key.rsplit(":", 1)[1]) / 1000]
            for job_created in [_ts(j.created_at)]
            if not down_from - 1 <= fired <= ready_at
        ]
    gaps_all = [round(b - a, 3) for a, b in zip(all_times, all_times[1:], strict=False)]
    # Firings due while the scheduler was down (its restart included), less the skip grace.
    missed_skip = [t for t in skip_times if down_from <= t <= ready_at - 1.5]
    missed_once = [t for t in once_times if down_from <= t <= ready_at - 1.5]
    print(
        f"\nschedules across a 4 s scheduler outage: all {len(all_times)} firings (gaps "
        f"{sorted(set(gaps_all))}), skip fired {len(missed_skip)} missed, once fired "
        f"{len(missed_once)} missed; on-time lateness max {max(late) * 1000:.0f} ms"
    )
    assert gaps_all == [1.0] * len(gaps_all)  # catch_up all: every second, none twice
    assert missed_skip == []  # skip: nothing from the outage
    assert len(missed_once) <= 1  # once: only the latest missed firing
    assert len(set(all_times)) == len(all_times)
    assert max(late) < 2.0


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()
