"""``shoal sessions create|list|show|prompt|watch|abort|rm``."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Annotated

import typer

from shoal.client._errors import ShoalConnectionClosed
from shoal.client._http import ShoalClient
from shoal.client._models import Event, Session
from shoal.client._ws import EventStream
from shoal.client.cli._command import Call, gateway_command
from shoal.client.cli._output import Output
from shoal.client.cli._watch import follow, watch_live

app = typer.Typer(help="Create, follow and end sessions.", no_args_is_help=True)

PROMPT_ENDINGS = ("message.completed", "prompt.aborted", "prompt.failed")

SessionId = Annotated[str, typer.Argument(help="the session id (ses_…)")]


def _show(out: Output, session: Session) -> None:
    out.fields(
        [
            ("id", session.id),
            ("status", _status(session.status)),
            ("owner", session.owner),
            ("runner", "connected" if session.runner_connected else "not connected"),
            ("running", session.current_prompt_id or "-"),
            ("queued", session.queued_prompts),
            ("last seq", session.last_seq),
            ("created", session.created_at),
            ("metadata", json.dumps(session.metadata) if session.metadata else "-"),
        ]
    )


_STATUS_COLOURS = {
    "idle": "green",
    "running": "yellow",
    "waiting_input": "magenta",
    "hibernated": "blue",
    "terminated": "dim",
    "error": "red",
}


def _status(status: str) -> str:
    colour = _STATUS_COLOURS.get(status, "white")
    return f"[{colour}]{status}[/{colour}]"


@gateway_command(app)
def create(
    call: Call,
    metadata: Annotated[
        str | None, typer.Option("--metadata", "-m", help='a JSON object, e.g. \'{"repo": "a/b"}\'')
    ] = None,
) -> None:
    """Create a session; its runner token is shown only now."""
    out = call.out
    try:
        parsed = json.loads(metadata) if metadata is not None else None
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--metadata")

    async def work(client: ShoalClient) -> None:
        session = await client.create_session(parsed)
        if out.as_json:
            out.json(session)
            return
        _show(out, session)
        out.console.print(f"[bold]runner token[/bold]  {session.runner_token}")
        out.console.print("[dim]keep the runner token: it is shown only once[/dim]")

    call.run(work)


@gateway_command(app, "list")
def list_(
    call: Call,
    limit: Annotated[int | None, typer.Option(help="page size")] = None,
    cursor: Annotated[str | None, typer.Option(help="the `next` of the previous page")] = None,
    status: Annotated[str | None, typer.Option(help="only sessions in this status")] = None,
) -> None:
    """This owner's sessions, newest first (one page)."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        page = await client.list_sessions(limit=limit, cursor=cursor, status=status)
        if out.as_json:
            out.json(page)
            return
        out.table(
            ["ID", "STATUS", "RUNNER", "QUEUED", "LAST SEQ", "CREATED"],
            (
                [
                    s.id,
                    _status(s.status),
                    "yes" if s.runner_connected else "no",
                    s.queued_prompts,
                    s.last_seq,
                    s.created_at,
                ]
                for s in page.sessions
            ),
        )
        if page.next:
            out.console.print(f"[dim]more: --cursor {page.next}[/dim]")

    call.run(work)


@gateway_command(app)
def show(
    call: Call,
    session_id: SessionId,
) -> None:
    """One session's state."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        session = await client.get_session(session_id)
        if out.as_json:
            out.json(session)
        else:
            _show(out, session)

    call.run(work)


@gateway_command(app)
def prompt(
    call: Call,
    session_id: SessionId,
    content: Annotated[str, typer.Argument(help="the prompt ('-' reads it from stdin)")],
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="the same key queues the prompt once"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the runner's answer and print it")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="with --wait: give up after SECONDS")
    ] = None,
) -> None:
    """Queue a prompt (retried safely: a key is generated unless given)."""
    out = call.out
    text = typer.get_text_stream("stdin").read() if content == "-" else content
    key = idempotency_key or f"cli-{secrets.token_hex(8)}"

    async def work(client: ShoalClient) -> None:
        if not wait:
            receipt = await client.submit_prompt(session_id, text, idempotency_key=key)
            if out.as_json:
                out.json(receipt)
            else:
                out.console.print(f"queued [bold]{receipt.prompt_id}[/bold]")
            return
        since = (await client.get_session(session_id)).last_seq
        async with client.connect_session(session_id, since=since) as events:
            receipt = await client.submit_prompt(session_id, text, idempotency_key=key)
            async with asyncio.timeout(timeout):
                event = await _outcome(events, receipt.prompt_id)
        answer = _answer_of(event)
        if out.as_json:
            out.json({"prompt": receipt, "event": event})
        elif event.type == "message.completed":
            out.console.print(answer, markup=False)
        else:
            out.console.print(f"[yellow]{event.type}[/yellow] {answer}")

    call.run(work)


async def _outcome(events: EventStream, prompt_id: str) -> Event:
    """The event that ends ``prompt_id``: its answer, or its abort or failure."""
    async for event in events:
        if event.type in PROMPT_ENDINGS and event.data.get("prompt_id") == prompt_id:
            return event
    raise ShoalConnectionClosed(1000, "the event stream ended before the answer")


def _answer_of(event: Event) -> str:
    return str(event.data.get("content") or event.data.get("message") or "")


@gateway_command(app)
def watch(
    call: Call,
    session_id: SessionId,
    since: Annotated[int, typer.Option(help="start after this seq (0: the whole history)")] = 0,
    max_events: Annotated[
        int | None, typer.Option("--max-events", help="stop after this many events")
    ] = None,
    sse: Annotated[
        bool, typer.Option("--sse", help="follow over server-sent events, not a WebSocket")
    ] = False,
) -> None:
    """Follow a session's events live (Ctrl-C stops); --json prints one event per line."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        session = await client.get_session(session_id)
        if out.as_json:
            seen = 0
            async with follow(client, session_id, since, sse=sse) as events:
                async for event in events:
                    out.json(event)
                    seen += 1
                    if max_events is not None and seen >= max_events:
                        return
        else:
            await watch_live(out, client, session, since, max_events, sse=sse)

    call.run(work)


@gateway_command(app)
def abort(
    call: Call,
    session_id: SessionId,
) -> None:
    """Stop the running prompt (queued prompts keep their turn)."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        await client.abort(session_id)
        if out.as_json:
            out.json({"session_id": session_id, "abort": "requested"})
        else:
            out.console.print(f"abort requested for [bold]{session_id}[/bold]")

    call.run(work)


@gateway_command(app)
def rm(
    call: Call,
    session_id: SessionId,
) -> None:
    """Terminate a session for good."""
    out = call.out

    async def work(client: ShoalClient) -> None:
        session = await client.terminate_session(session_id)
        if out.as_json:
            out.json(session)
        else:
            out.console.print(f"{session.id} {_status(session.status)}")

    call.run(work)
