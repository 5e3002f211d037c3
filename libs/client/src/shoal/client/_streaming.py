"""Models of the streaming protocol beyond events: gaps, deltas, the runner proxy, tickets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec


class ProxyRequest(msgspec.Struct, kw_only=True):
    """An HTTP request a UI sent to ``/v1/sessions/{id}/proxy/{path}``, for the runner to serve."""

    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""


class ProxyResponse(msgspec.Struct, kw_only=True):
    """The runner's answer to a :class:`ProxyRequest`."""

    status: int = 200
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""


class WsTicket(msgspec.Struct, kw_only=True):
    """A single-use ticket for a browser socket or SSE stream (``?ticket=``)."""

    ticket: str
    expires_at: str
    expires_in: int


ProxyHandler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]
DeltaCallback = Callable[[dict[str, Any]], None]
# A runner frame the connection does not handle itself (decoded JSON object).
FrameHandler = Callable[[dict[str, Any]], None]
