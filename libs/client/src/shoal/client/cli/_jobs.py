"""``shoal jobs submit|show|list|cancel|retry``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shoal.client._http import ShoalClient
from shoal.client._models import Job
from shoal.client.cli._command import Call, gateway_command
from shoal.client.cli._output import Output

app = typer.Typer(help="Submit, follow, cancel and retry async jobs.", no_args_is_help=True)

JobId = Annotated[str, typer.Argument(help="the job id (job_…)")]

_STATUS_COLOURS = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "cancelled": "dim",
    "dead": "red",
}


def _status(status: str) -> str:
    colour = _STATUS_COLOURS.get(status, "white")
    return f"[{colour}]{status}[/{colour}]"


def _compact(value: Any) -> str:
    return "-" if value is None else json.dumps(value, ensure_ascii=False)


def _show(out: Output, job: Job) -> None:
    out.fields(
        [
            ("id", job.id),
            ("kind", job.kind),
            ("status", _status(job.status)),
            ("attempts", f"{len(job.attempts)} of {job.max_attempts}"),
            ("run at", job.run_at),
            ("created", job.created_at),
            ("updated", job.updated_at),
            ("input", _compact(job.input)),
            ("output", _compact(job.output)),
            ("error", _compact(job.error)),
        ]
    )


def _print_job(out: Output, job: Job) -> None:
    if out.as_json:
        out.json(job)
    else:
        _show(out, job)


def _parse_input(raw: str | None) -> Any:
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--input") from None


@gateway_command(app)
def submit(
    call: Call,
    kind: Annotated[str, typer.Argument(help="the job kind a worker takes, e.g. thumbnail")],
    input_: Annotated[
        str | None, typer.Option("--input", "-i", help="the job input as JSON, e.g. '{\"n\": 1}'")
    ] = None,
    run_at: Annotated[
        str | None, typer.Option("--run-at", help="not before this ISO 8601 time")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="the same key queues the job once")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", min=1, help="attempts before dead")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.1, help="seconds a worker may hold it")
    ] = None,
    callback_url: Annotated[
        str | None, typer.Option("--callback-url", help="POSTed (signed) when the job ends")
    ] = None,
) -> None:
    """Queue a job for a worker of KIND."""
    out = call.out
    job_input = _parse_input(input_)

    async def work(client: ShoalClient) -> None:
        job = await client.submit_job(
            kind,
            job_input,
            run_at=run_at,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            timeout=timeout,
            callback_url=callback_url,
        )
        _print_job(out, job)

    call.run(work)


@gateway_command(app)
def show(
    call: Call,
    job_id: JobId,
) -> None:
    """A job: status, attempts, input, output or error."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        job = await client.get_job(job_id)
        _print_job(out, job)

    call.run(work)


@gateway_command(app, "list")
def list_(
    call: Call,
    status: Annotated[
        str | None,
        typer.Option("--status", help="queued, running, succeeded, cancelled or dead"),
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="only this kind")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="at most this many")] = None,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="the `next` of the previous page")
    ] = None,
) -> None:
    """A page of this owner's jobs, newest first."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        page = await client.list_jobs(status=status, kind=kind, limit=limit, cursor=cursor)
        if out.as_json:
            out.json({"jobs": page.jobs, "next": page.next})
            return
        out.table(
            ["ID", "KIND", "STATUS", "ATTEMPTS", "CREATED"],
            ([j.id, j.kind, _status(j.status), len(j.attempts), j.created_at] for j in page.jobs),
        )
        if page.next:
            out.console.print(f"more: --cursor {page.next}")

    call.run(work)


@gateway_command(app)
def cancel(
    call: Call,
    job_id: JobId,
) -> None:
    """Cancel a job: a queued one at once, a running one when its worker stops."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        job = await client.cancel_job(job_id)
        _print_job(out, job)

    call.run(work)


@gateway_command(app)
def retry(
    call: Call,
    job_id: JobId,
) -> None:
    """Put a dead or cancelled job back in the queue."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        job = await client.retry_job(job_id)
        _print_job(out, job)

    call.run(work)
