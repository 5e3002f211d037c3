"""The live view of ``shoal sessions watch``: the session's state, its latest events, and the
runner's answer as it streams in (``delta`` frames)."""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shoal.client._http import ShoalClient
from shoal.client._models import Event, Session
from shoal.client._sse import SseEventStream
from shoal.client._streaming import DeltaCallback
from shoal.client._ws import EventStream
from shoal.client.cli._output import Output

RECENT_EVENTS = 15
MAX_STREAMING_CHARS = 2000


class SessionView:
    """What the live view shows, updated event by event."""

    def __init__(self, session: Session) -> None:
        self.session_id = session.id
        self.status = session.status
        self.runner_connected = session.runner_connected
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self.streaming = ""  # the running answer's deltas, until its message.completed
        self.last_seq = 0

    def on_event(self, event: Event) -> None:
        self.recent.append(event)
        self.last_seq = event.seq
        if event.type == "session.status":
            self.status = str(event.data.get("status", self.status))
        elif event.type == "session.terminated":
            self.status = "terminated"
        elif event.type == "runner.connected":
            self.runner_connected = True
        elif event.type == "runner.disconnected":
            self.runner_connected = False
        elif event.type in ("message.completed", "prompt.dispatched"):
            self.streaming = ""

    def on_delta(self, frame: dict[str, Any]) -> None:
        self.streaming = (self.streaming + str(frame.get("text", "")))[-MAX_STREAMING_CHARS:]

    def render(self) -> RenderableType:
        runner = "[green]connected[/green]" if self.runner_connected else "[red]no runner[/red]"
        header = Text.from_markup(
            f"[bold]{self.session_id}[/bold]  status [bold]{self.status}[/bold]  runner {runner}"
            f"  seq {self.last_seq}"
        )
        events = Table("SEQ", "TIME", "TYPE", "DETAIL", box=None, header_style="bold cyan")
        for event in self.recent:
            events.add_row(str(event.seq), event.time[11:19], event.type, _detail(event))
        parts: list[RenderableType] = [header, events]
        if self.streaming:
            parts.append(Panel(Text(self.streaming), title="streaming", border_style="dim"))
        return Panel(Group(*parts), title="shoal sessions watch", border_style="cyan")


def _detail(event: Event) -> str:
    data = event.data
    text = data.get("content") or data.get("status") or data.get("prompt_id") or ""
    line = str(text).replace("\n", " ")
    return line if len(line) <= 60 else line[:59] + "…"


def follow(
    client: ShoalClient,
    session_id: str,
    since: int,
    *,
    sse: bool,
    on_delta: DeltaCallback | None = None,
) -> EventStream | SseEventStream:
    """The session's events over a WebSocket, or over SSE (which carries no deltas)."""
    if sse:
        return client.stream_session(session_id, since)
    return client.connect_session(session_id, since, on_delta=on_delta)


async def watch_live(
    out: Output,
    client: ShoalClient,
    session: Session,
    since: int,
    max_events: int | None,
    *,
    sse: bool,
) -> None:
    """Follow the session until interrupted (or ``max_events``), redrawing on every change."""
    view = SessionView(session)
    with Live(view.render(), console=out.console, auto_refresh=False) as live:

        def on_delta(frame: dict[str, Any]) -> None:
            view.on_delta(frame)
            live.update(view.render(), refresh=True)

        seen = 0
        async with follow(client, session.id, since, sse=sse, on_delta=on_delta) as events:
            async for event in events:
                view.on_event(event)
                live.update(view.render(), refresh=True)
                seen += 1
                if max_events is not None and seen >= max_events:
                    return
