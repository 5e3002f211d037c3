"""``/v1/jobs`` and ``/v1/run``: async jobs and synchronous runs (rules in ``gateway.jobs``,
the work in the scheduler service)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shoal.common.errors import Unavailable
from shoal.gateway.api.deps import Caller, Service
from shoal.gateway.api.problems import problem_responses
from shoal.gateway.jobs import MAX_RUN_WAIT_S, Jobs
from shoal.gateway.views import JobRequest, ScheduleRequest, plain

router = APIRouter(prefix="/v1", tags=["jobs"])

JobStatus = Literal["queued", "running", "succeeded", "cancelled", "dead"]

_JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_01J9Z6",
    "kind": "resize",
    "status": "succeeded",
    "input": {"url": "https://example.com/a.png", "width": 64},
    "output": {"url": "https://example.com/a-64.png"},
    "attempts": [
        {
            "n": 1,
            "worker": "w-1",
            "started_at": "2025-01-01T12:00:00.100Z",
            "ended_at": "2025-01-01T12:00:00.900Z",
        }
    ],
    "max_attempts": 3,
    "timeout": 30.0,
    "run_at": "2025-01-01T12:00:00.000Z",
    "created_at": "2025-01-01T12:00:00.000Z",
    "updated_at": "2025-01-01T12:00:00.900Z",
}


def jobs_api(request: Request) -> Jobs:
    jobs = getattr(request.app.state, "jobs", None)
    if not isinstance(jobs, Jobs):
        raise Unavailable("gateway is starting")
    return jobs


class JobFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=128, description="A-Z a-z 0-9 _ - only")
    input: Any = Field(
        default=None, description="Any JSON, at most SHOAL_SCHEDULER_JOB_MAX_INPUT_BYTES (256 KiB)"
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description="The same key: the same job"
    )
    max_attempts: int | None = Field(default=None, ge=1, le=20, description="Default 3")
    timeout: float | None = Field(
        default=None,
        ge=1,
        le=3600,
        description="Seconds a worker may hold the job without a heartbeat (default 30)",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed the job, signed, when it ends (see /v1/webhooks/signing-secret)",
    )


class SubmitJob(JobFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"kind": "resize", "input": {"width": 64}, "idempotency_key": "img-1"}]
        },
    )

    run_at: str | None = Field(default=None, description="RFC 3339: not before then")


class RunJob(JobFields):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"kind": "resize", "wait": 10}]}
    )

    wait: float = Field(
        default=30, ge=0, le=MAX_RUN_WAIT_S, description="Seconds to wait for the end (max 60)"
    )


class JobAttempt(BaseModel):
    n: int
    worker: str
    started_at: str
    ended_at: str | None = None
    error: Any = None


class Job(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    kind: str
    status: JobStatus
    input: Any = None
    output: Any = None
    error: Any = None
    attempts: list[JobAttempt]
    max_attempts: int
    timeout: float
    run_at: str
    created_at: str
    updated_at: str
    idempotency_key: str | None = None
    callback_url: str | None = None
    deliveries: list[dict[str, Any]] | None = Field(
        default=None, description="Webhook deliveries: {at, status, error?}"
    )
    cancel_requested: bool | None = None
    schedule_id: str | None = None


class JobPage(BaseModel):
    jobs: list[Job]
    next: str | None = Field(description="Pass back as ?cursor= for the next page; null: no more")


def _job(model: JobFields, *drop: str) -> JobRequest:
    """The job of a request body (members left out: the scheduler's defaults)."""
    return msgspec.convert(model.model_dump(exclude_none=True, exclude=set(drop)), JobRequest)


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses=problem_responses(400, 401, 403, 413, 503, 504),
)
async def submit_job(body: SubmitJob, caller: Caller, request: Request) -> dict[str, Any]:
    """Queue a job; the same ``idempotency_key`` returns the same job."""
    return plain(await jobs_api(request).submit(caller, _job(body)))


@router.get("/jobs", response_model=JobPage, responses=problem_responses(400, 401, 403, 503))
async def list_jobs(
    caller: Caller,
    request: Request,
    status: Annotated[JobStatus | None, Query()] = None,
    kind: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    limit: Annotated[int | None, Query(ge=1, le=200, description="Default 50")] = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> dict[str, Any]:
    """The caller's jobs, newest first."""
    page = await jobs_api(request).page(
        caller, status=status, kind=kind, limit=limit, cursor=cursor
    )
    return plain(page)


@router.get("/jobs/{job_id}", response_model=Job, responses=problem_responses(401, 403, 404, 503))
async def get_job(job_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    """A job with its attempts (another owner's job is 404)."""
    return plain(await jobs_api(request).get(caller, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    response_model=Job,
    responses=problem_responses(401, 403, 404, 409, 503),
)
async def cancel_job(job_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    """Queued: cancelled at once. Running: its worker gets a ``cancel`` frame, and the job ends
    ``cancelled`` when the worker stops or its lease runs out — unless its completion came
    first (then it stays ``succeeded``). An ended job: 409."""
    return plain(await jobs_api(request).cancel(caller, job_id))


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    response_model=Job,
    responses=problem_responses(401, 403, 404, 409, 503),
)
async def retry_job(job_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    """Put a ``dead`` or ``cancelled`` job back in the queue with a fresh attempt budget."""
    return plain(await jobs_api(request).retry(caller, job_id))


@router.post(
    "/run",
    response_model=Job,
    responses={
        202: {"model": Job, "description": "Not finished within wait: poll GET /v1/jobs/{id}"},
        **problem_responses(400, 401, 403, 413, 503, 504),
    },
)
async def run_job(body: RunJob, caller: Caller, request: Request) -> Response:
    """Run a job and answer 200 with it if it ends within ``wait`` seconds, else 202."""
    finished, job = await jobs_api(request).run(caller, _job(body, "wait"), body.wait)
    return JSONResponse(plain(job), status_code=200 if finished else 202)


# -- schedules --
class JobTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: dict[str, Any] | None = Field(
        default=None, description="A job body as for POST /v1/jobs (without run_at)"
    )
    prompt: dict[str, Any] | None = Field(
        default=None, description="{session_id, content}: a prompt into one of your sessions"
    )


class CreateSchedule(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "cron": "0 9 * * 1-5",
                    "timezone": "Europe/Paris",
                    "target": {"prompt": {"session_id": "ses_01J9Z3", "content": "Daily triage"}},
                },
                {"every": 300, "catch_up": "skip", "target": {"job": {"kind": "sync"}}},
            ]
        },
    )

    cron: str | None = Field(
        default=None, max_length=200, description="5 fields (or 6, seconds first)"
    )
    every: float | None = Field(
        default=None, ge=1, le=316_224_000, description="Seconds (at most ten years), from creation"
    )
    at: str | None = Field(default=None, description="RFC 3339, in the future: fires once")
    timezone: str | None = Field(default=None, description="IANA name for cron (default UTC)")
    catch_up: Literal["once", "all", "skip"] | None = Field(
        default=None,
        description="Firings missed while the scheduler was down: all of them, the latest "
        "once (default), or none (skip)",
    )
    target: JobTarget


class Schedule(BaseModel):
    id: str
    cron: str | None = None
    every: float | None = None
    at: str | None = None
    timezone: str
    catch_up: str
    target: dict[str, Any]
    next_fire_at: str | None = Field(description="null: it will not fire again")
    created_at: str
    firings: list[dict[str, Any]] | None = Field(
        default=None, description="The latest firings: {at, fired_at, job_id | prompt_id}"
    )


class SchedulePage(BaseModel):
    schedules: list[Schedule]
    next: str | None


@router.post(
    "/schedules",
    status_code=201,
    response_model=Schedule,
    responses=problem_responses(400, 401, 403, 404, 413, 503),
)
async def create_schedule(
    body: CreateSchedule, caller: Caller, service: Service, request: Request
) -> dict[str, Any]:
    """Run a job or send a prompt on a cron, every N seconds, or once at a time."""
    schedule = msgspec.convert(body.model_dump(exclude_none=True), ScheduleRequest)
    owner = caller.owner
    prompt = body.target.prompt
    if prompt is not None and isinstance(prompt.get("session_id"), str):
        # The prompt goes to the session's owner's session: it must be visible to the caller.
        owner = await service.visible_owner(caller, prompt["session_id"])
    return plain(await jobs_api(request).create_schedule(caller, schedule, owner))


@router.get(
    "/schedules", response_model=SchedulePage, responses=problem_responses(400, 401, 403, 503)
)
async def list_schedules(
    caller: Caller,
    request: Request,
    limit: Annotated[int | None, Query(ge=1, le=200, description="Default 50")] = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> dict[str, Any]:
    """The caller's schedules, newest first."""
    return plain(await jobs_api(request).schedules(caller, limit, cursor))


@router.get(
    "/schedules/{schedule_id}",
    response_model=Schedule,
    responses=problem_responses(401, 403, 404, 503),
)
async def get_schedule(schedule_id: str, caller: Caller, request: Request) -> dict[str, Any]:
    """A schedule with its latest firings."""
    return plain(await jobs_api(request).get_schedule(caller, schedule_id))


@router.delete(
    "/schedules/{schedule_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 403, 404, 503),
)
async def delete_schedule(schedule_id: str, caller: Caller, request: Request) -> Response:
    """Stop a schedule (jobs it already started are not touched)."""
    await jobs_api(request).delete_schedule(caller, schedule_id)
    return Response(status_code=204)


# -- webhooks --
class SigningSecret(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "secret": "whsec_Zm9vYmFy…",
                    "created_at": "2025-01-01T12:00:00.000Z",
                    "previous_expires_at": "2025-01-02T12:00:00.000Z",
                }
            ]
        }
    )

    secret: str = Field(description="HMAC-SHA256 key of Shoal-Signature's v1")
    created_at: str
    previous_expires_at: str | None = Field(
        default=None, description="Until then callbacks carry a second v1 with the old secret"
    )


@router.get(
    "/webhooks/signing-secret",
    response_model=SigningSecret,
    responses=problem_responses(401, 403, 503),
)
async def get_signing_secret(caller: Caller, request: Request) -> dict[str, Any]:
    """The secret job callbacks are signed with (created on first use; not for read keys)."""
    return plain(await jobs_api(request).signing_secret(caller))


@router.post(
    "/webhooks/signing-secret/rotate",
    response_model=SigningSecret,
    responses=problem_responses(401, 403, 503),
)
async def rotate_signing_secret(caller: Caller, request: Request) -> dict[str, Any]:
    """Replace the secret; the old one keeps signing (a second v1) for the overlap (24 h)."""
    return plain(await jobs_api(request).rotate_signing_secret(caller))
