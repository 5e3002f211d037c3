"""Who opens a socket or an SSE stream: the Origin allowlist, then a ticket or a Bearer key.

Shared by the client socket, the user socket and the SSE routes (WebSocket refusals become close
codes, HTTP ones problem+json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from shoal.common.errors import Forbidden
from shoal.gateway.config import GatewaySettings
from shoal.gateway.realtime import Realtime
from shoal.gateway.service import GatewayService, Principal, bearer_token
from shoal.gateway.streams import EventStreams
from shoal.gateway.tickets import Tickets


def origin_allowed(conn: HTTPConnection, settings: GatewaySettings) -> bool:
    """No Origin (not a browser), same origin, or one of ``ws_allowed_origins`` ("*": any)."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    allowed = settings.ws_allowed_origins
    if "*" in allowed or origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    host = conn.headers.get("host")
    return host is not None and urlsplit(origin).netloc == host


async def upgrade_principal(
    conn: HTTPConnection, service: GatewayService, tickets: Tickets | None
) -> Principal:
    """The caller of a socket/stream: ``?ticket=`` (browsers) or ``Authorization: Bearer``.

    Raises :class:`Forbidden` for a foreign Origin, :class:`Unauthorized` for a bad credential.
    """
    if not origin_allowed(conn, service.settings):
        raise Forbidden("origin not allowed", detail={"origin": conn.headers.get("origin")})
    ticket = conn.query_params.get("ticket")
    if ticket is not None and tickets is not None:
        return await tickets.redeem(ticket)
    return await service.authenticate(bearer_token(conn.headers.get("authorization")))


@dataclass(frozen=True, slots=True)
class StreamingState:
    """What the streaming parts share (``app.state.streaming``, set by the lifespan)."""

    realtime: Realtime
    tickets: Tickets
    streams: EventStreams


def streaming_state(app: Any) -> StreamingState | None:
    """The app's streaming state, or None (an app built without it, e.g. in a unit test)."""
    state = getattr(getattr(app, "state", None), "streaming", None)
    return state if isinstance(state, StreamingState) else None
