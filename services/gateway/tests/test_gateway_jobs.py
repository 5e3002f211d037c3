"""``/v1/jobs`` and ``/v1/run`` through a real gateway and the real scheduler (NATS, PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from jobs_fixtures import job_keys, scheduler  # noqa: F401 - fixtures
from nats.aio.client import Client as NATS

from shoal.client import ShoalAPIError, ShoalClient
from shoal.common.messaging import Subjects, request

if TYPE_CHECKING:
    from conftest import RunningGateway

pytestmark = [pytest.mark.usefixtures("scheduler", "job_keys"), pytest.mark.timeout(60)]


@pytest.fixture
async def alice(gateway: RunningGateway) -> AsyncIterator[ShoalClient]:
    async with ShoalClient(gateway.base_url, "key-jobs-alice") as client:
        yield client


@pytest.fixture
async def bob(gateway: RunningGateway) -> AsyncIterator[ShoalClient]:
    async with ShoalClient(gateway.base_url, "key-jobs-bob") as client:
        yield client


async def test_submit_get_list_and_idempotency(alice: ShoalClient, bob: ShoalClient) -> None:
    job = await alice.submit_job("resize", {"w": 64}, idempotency_key="img-1", max_attempts=5)
    assert job.status == "queued"
    assert job.max_attempts == 5
    again = await alice.submit_job("resize", {"w": 64}, idempotency_key="img-1")
    assert again.id == job.id
    assert (await alice.get_job(job.id)).input == {"w": 64}
    page = await alice.list_jobs(kind="resize", status="queued")
    assert [j.id for j in page.jobs] == [job.id]
    assert (await bob.list_jobs()).jobs == []
    with pytest.raises(ShoalAPIError) as missing:
        await bob.get_job(job.id)
    assert missing.value.status == 404


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"kind": "k", "surprise": 1}, 400),
        ({"kind": "a.b"}, 400),
        ({"kind": "k", "max_attempts": 0}, 400),
        ({"kind": "k", "max_attempts": 21}, 400),
        ({"kind": "k", "run_at": "soon"}, 400),
        ({"kind": "k", "input": "x" * 5000}, 413),
        ({"kind": "k", "wait": 61}, 400),
    ],
)
async def test_bad_input_is_a_problem_and_creates_nothing(
    gateway: RunningGateway, alice: ShoalClient, body: dict[str, object], status: int
) -> None:
    path = "/v1/run" if "wait" in body else "/v1/jobs"
    response = await alice._http.post(path, json=body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (await alice.list_jobs()).jobs == []


async def test_scopes(gateway: RunningGateway) -> None:
    async with ShoalClient(gateway.base_url, "key-alice") as sessions_only:
        with pytest.raises(ShoalAPIError) as refused:
            await sessions_only.submit_job("k")
    assert refused.value.status == 403
    async with ShoalClient(gateway.base_url, "key-read-alice") as reader:
        assert (await reader.list_jobs()).jobs == []


async def test_run_answers_200_when_the_job_ends_within_wait_else_202(
    alice: ShoalClient, nc: NATS, subject_prefix: str
) -> None:
    rpc = Subjects(subject_prefix).rpc

    async def one_worker() -> None:
        while True:
            claimed = await request(
                nc,
                rpc("scheduler", "jobs.claim"),
                {"kinds": ["quick"], "owner": "alice", "worker": "t", "limit": 1},
            )
            for offer in claimed["jobs"]:
                await request(
                    nc,
                    rpc("scheduler", "jobs.complete"),
                    {"job_id": offer["job_id"], "attempt": 1, "output": offer["input"] * 2},
                )
                return
            await asyncio.sleep(0.02)  # a stand-in worker polling; the SDK waits on a signal

    worker = asyncio.create_task(one_worker())
    quick = await alice._http.post("/v1/run", json={"kind": "quick", "input": 21, "wait": 10})
    await worker
    assert quick.status_code == 200
    assert quick.json()["status"] == "succeeded"
    assert quick.json()["output"] == 42
    slow = await alice._http.post("/v1/run", json={"kind": "slow", "input": 1, "wait": 0.3})
    assert slow.status_code == 202
    assert slow.json()["status"] == "queued"


async def test_cancel_and_retry_over_http(alice: ShoalClient) -> None:
    job = await alice.submit_job("later")
    cancelled = await alice.cancel_job(job.id)
    assert cancelled.status == "cancelled"
    assert (await alice.retry_job(job.id)).status == "queued"
    with pytest.raises(ShoalAPIError) as conflict:
        await alice.retry_job(job.id)
    assert conflict.value.status == 409


async def test_schedules_over_http(alice: ShoalClient, bob: ShoalClient) -> None:
    created = await alice.create_schedule(
        {"job": {"kind": "nightly", "input": {"full": True}}},
        cron="0 3 * * *",
        timezone="Europe/Paris",
        catch_up="skip",
    )
    assert created.next_fire_at is not None
    assert created.cron == "0 3 * * *"
    assert (await alice.get_schedule(created.id)).firings == []
    assert [s.id for s in (await alice.list_schedules()).schedules] == [created.id]
    assert (await bob.list_schedules()).schedules == []
    with pytest.raises(ShoalAPIError) as missing:
        await bob.delete_schedule(created.id)
    assert missing.value.status == 404
    await alice.delete_schedule(created.id)
    assert (await alice.list_schedules()).schedules == []


@pytest.mark.parametrize(
    "body",
    [
        {"cron": "nope", "target": {"job": {"kind": "k"}}},
        {"every": 0, "target": {"job": {"kind": "k"}}},
        {"at": "2001-01-01T00:00:00Z", "target": {"job": {"kind": "k"}}},
        {"every": 5, "target": {"job": {"kind": "k", "max_attempts": 50}}},
        {"every": 5, "target": {"mail": {}}},
        {"every": 5, "target": {"job": {"kind": "k"}}, "colour": "red"},
    ],
)
async def test_bad_schedules_are_400_and_create_nothing(
    alice: ShoalClient, body: dict[str, object]
) -> None:
    response = await alice._http.post("/v1/schedules", json=body)
    assert response.status_code == 400
    assert (await alice.list_schedules()).schedules == []


async def test_signing_secret_and_rotation(gateway: RunningGateway, alice: ShoalClient) -> None:
    first = (await alice._http.get("/v1/webhooks/signing-secret")).json()
    assert first["secret"].startswith("whsec_")
    rotated = await alice._http.post("/v1/webhooks/signing-secret/rotate")
    assert rotated.status_code == 200
    assert rotated.json()["secret"] != first["secret"]
    assert "previous_expires_at" in rotated.json()
    async with ShoalClient(gateway.base_url, "key-read-alice") as reader:
        refused = await reader._http.get("/v1/webhooks/signing-secret")
    assert refused.status_code == 403
