"""``shoal jobs`` against the real fleet: submit, show, list, cancel and retry, each run as
``python -m shoal.client`` in its own process; the ``--json`` shapes are the client's ``Job``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

import pytest

from shoal.client import Job, ShoalClient, Worker, WorkerJob
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

JOB_FIELDS = {
    "id",
    "kind",
    "status",
    "input",
    "output",
    "error",
    "attempts",
    "max_attempts",
    "timeout",
    "run_at",
    "created_at",
    "updated_at",
    "idempotency_key",
    "callback_url",
    "deliveries",
    "cancel_requested",
    "schedule_id",
}


async def shoal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m shoal.client ARGS`` as a user would: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.client", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def shoal_json(*args: str, env: dict[str, str]) -> Any:
    code, stdout, stderr = await shoal(*args, "--json", env=env)
    assert code == 0, stderr
    return json.loads(stdout)


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


def test_jobs_is_a_shoal_cli_entry_point() -> None:
    jobs = {e.name: e for e in entry_points(group="shoal.cli")}["jobs"].load()
    assert jobs(["--help"]) == 0
    assert jobs(["submit", "crunch", "-i", "{not json", "--api-key", "k"]) == 2
    assert jobs(["list", "--limit", "0", "--api-key", "k"]) == 2


async def test_submit_show_list_cancel_retry(fleet: FleetFactory) -> None:
    running = await fleet()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env |= {"SHOAL_URL": running.gateway_url, "SHOAL_API_KEY": running.admin_key}

    submitted = await shoal_json(
        "jobs", "submit", "crunch", "-i", '{"n": 7}', "--max-attempts", "2",
        "--idempotency-key", "crunch-7", env=env,
    )  # fmt: skip
    assert set(submitted) == JOB_FIELDS
    assert (submitted["kind"], submitted["status"], submitted["input"]) == (
        "crunch",
        "queued",
        {"n": 7},
    )
    again = await shoal_json(
        "jobs", "submit", "crunch", "-i", '{"n": 7}', "--idempotency-key", "crunch-7", env=env
    )
    assert again["id"] == submitted["id"]

    shown = await shoal_json("jobs", "show", submitted["id"], env=env)
    assert shown["id"] == submitted["id"]
    listed = await shoal_json("jobs", "list", "--kind", "crunch", env=env)
    assert set(listed) == {"jobs", "next"}
    assert [j["id"] for j in listed["jobs"]] == [submitted["id"]]
    assert all(set(j) == JOB_FIELDS for j in listed["jobs"])

    cancelled = await shoal_json("jobs", "cancel", submitted["id"], env=env)
    assert cancelled["status"] == "cancelled"
    retried = await shoal_json("jobs", "retry", submitted["id"], env=env)
    assert retried["status"] == "queued"

    worker = Worker(running.gateway_url, running.admin_key, name="cli-test")

    @worker.handler("crunch")
    async def crunch(job: WorkerJob) -> Any:
        return {"n": job.input["n"] * 6}

    async with ShoalClient(running.gateway_url, running.admin_key) as client, working(worker):
        await until(client, submitted["id"], "succeeded")
    done = await shoal_json("jobs", "show", submitted["id"], env=env)
    assert done["output"] == {"n": 42}

    wide = env | {"COLUMNS": "200"}  # rich shortens cells to fit 80 columns when piped
    code, human, stderr = await shoal("jobs", "list", "--status", "succeeded", env=wide)
    assert code == 0, stderr
    assert submitted["id"] in human
    assert "succeeded" in human

    code, _, stderr = await shoal("jobs", "show", "job_missing", "--json", env=env)
    assert code == 1
    assert json.loads(stderr)["error"]["status"] == 404
