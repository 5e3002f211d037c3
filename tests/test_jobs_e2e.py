"""Jobs and schedules end to end: the fleet as OS processes, workers, faults (SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shoal.client import Event, Job, ShoalClient, Worker, WorkerJob
from shoal.common.messaging import Subjects, loads, request
from shoal.devtools.supervisor import FleetFactory
from shoal.scheduler.webhooks import verify

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


class _Receiver:
    """A tiny HTTP/1.1 receiver: answers each POST with the next status (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status = self.statuses.pop(0) if self.statuses else 200
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        await self.received.put((headers, body))

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_cancel_dead_retry_run_and_a_signed_webhook_retried_after_a_500(
    fleet: FleetFactory,
) -> None:
    running = await fleet(env={"SHOAL_SCHEDULER_JOB_BACKOFF_BASE": "0.2"})
    url, key = running.gateway_url, running.admin_key
    receiver = _Receiver([500])
    hook = await receiver.start()
    started = asyncio.Event()
    worker = Worker(url, key, max_in_flight=4)

    @worker.handler("slow")
    async def slow(job: WorkerJob) -> Any:
        started.set()
        await asyncio.sleep(60)

    @worker.handler("broken")
    async def broken(job: WorkerJob) -> Any:
        raise RuntimeError(f"broken {job.attempt}")

    @worker.handler("quick")
    async def quick(job: WorkerJob) -> Any:
        return {"echo": job.input}

    try:
        async with ShoalClient(url, key) as client:
            queued = await client.submit_job("nobody-works-this", run_at="2099-01-01T00:00:00Z")
            assert (await client.cancel_job(queued.id)).status == "cancelled"
            async with working(worker):
                slow_job = await client.submit_job("slow")
                await asyncio.wait_for(started.wait(), 20)
                assert (await client.cancel_job(slow_job.id)).status == "running"
                assert (await until(client, slow_job.id, "cancelled")).status == "cancelled"

                dead = await client.submit_job("broken", max_attempts=3, callback_url=hook)
                ended = await until(client, dead.id, "dead")
                starts = [datetime.fromisoformat(a.started_at) for a in ended.attempts]
                gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
                assert [a.n for a in ended.attempts] == [1, 2, 3]
                assert gaps[0] >= 0.2  # backoff 0.2 s, then 0.4 s
                assert gaps[1] >= 0.4
                # The callback of the dead job: a 500 first, then the retry gets through.
                first = await asyncio.wait_for(receiver.received.get(), 30)
                second = await asyncio.wait_for(receiver.received.get(), 30)
                assert (await client.retry_job(dead.id)).status == "queued"

                quick_run = await client._http.post(
                    "/v1/run", json={"kind": "quick", "input": 1, "wait": 20}
                )
                slow_run = await client._http.post(
                    "/v1/run", json={"kind": "slow", "input": 1, "wait": 0.5}
                )
            secret = (await client._http.get("/v1/webhooks/signing-secret")).json()["secret"]
    finally:
        await receiver.stop()
    assert quick_run.status_code == 200
    assert quick_run.json()["output"] == {"echo": 1}
    assert slow_run.status_code == 202
    for headers, body in (first, second):
        assert verify(body, headers["shoal-signature"], secret, now=time.time())
        assert headers["shoal-job-id"] == dead.id
    assert [d["status"] for d in loads(second[1])["deliveries"]] == [500]
    print(f"\ngaps between failed attempts (backoff 0.2 s base): {gaps}")


async def test_two_scheduler_replicas_fire_a_timer_once(fleet: FleetFactory) -> None:
    running = await fleet(scheduler_replicas=2, env={"SHOAL_SCHEDULER_SWEEP_INTERVAL": "0.2"})
    assert {"scheduler-0", "scheduler-1"} <= set(running)
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session = await client.create_session({"purpose": "replicas"})
        at = datetime.fromtimestamp(time.time() + 2, UTC).isoformat()
        schedule = await client.create_schedule(
            {"prompt": {"session_id": session.id, "content": "once"}}, at=at
        )
        queued: list[Event] = []
        async with client.connect_session(session.id, since=0) as events:
            with contextlib.suppress(TimeoutError):
                # The first prompt within 20 s; then 2 s more, in which a double firing would show.
                async with asyncio.timeout(20) as deadline:
                    async for event in events:
                        if event.type == "prompt.queued":
                            queued.append(event)
                            deadline.reschedule(asyncio.get_running_loop().time() + 2)
        fired = await client.get_schedule(schedule.id)
    assert [e.data["content"] for e in queued] == ["once"]
    assert len(fired.firings or []) == 1
