"""WebSocket text frames encoded once and written straight to a socket's transport.

Why: uvicorn's ASGI ``send`` frames every message it is given (websockets' ``send_text``:
a ``Frame``, ``Frame.serialize``, a join) and writes it to the connection's transport, behind
Starlette's ``WebSocket.send`` and two coroutines. A live event goes to every socket following
its session with the same payload, so that path re-frames the same bytes once per socket —
most of the gateway's CPU per delivered frame (``python -m bench fanout``). A server's frames
are not masked (RFC 6455 §5.1), so one event's frame is the same bytes on every socket: it is
encoded once (``fanout.LiveEvent.wire``) and each socket writes it with ``transport.write``.

Only where that is exactly what uvicorn's ``send`` would have written:

- the connection is uvicorn's sans-I/O protocol (``websockets-sansio``,
  ``shoal.common.service.WS_IMPLEMENTATION``), reached as the owner of the ASGI ``send``
  callable, with no extension negotiated (permessage-deflate is off by configuration:
  ``ws_per_message_deflate=False``; with it on, frames would be compressed per connection);
- at each write: the connection is open (handshake done, no close sent or received, the peer
  still there, the transport not closing) and the transport is not pushing back (the protocol
  was not paused at its high-water mark) — a paused transport goes through ``send``, which
  waits for it, so the caller's bounded outbox and its lagging rule (4408) apply as before.

Anything else (another server or WebSocket implementation, a test client, a ``send`` wrapped by
middleware) gets ``None`` from :func:`direct_protocol` and keeps the ASGI path. Example::

    protocol = direct_protocol(send)  # once per socket, after the handshake
    if protocol is not None and writable(protocol):
        protocol.transport.write(text_frame(b'{"type":"pong"}'))
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# The protocol's attributes writable() reads, as uvicorn names them.
_PROTOCOL_STATE = (
    "writable",
    "close_sent",
    "disconnected",
    "handshake_complete",
    "conn",
    "transport",
)
_FIN_TEXT = 0x81  # FIN + opcode 0x1 (text); RSV bits clear: no extension
_header_16 = struct.Struct("!BBH").pack
_header_64 = struct.Struct("!BBQ").pack

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIOProtocol,
    )
    from websockets.protocol import State
except ImportError:  # an install without them: every socket keeps the ASGI path
    _SansIOProtocol = None  # type: ignore[assignment,misc]
    _OPEN: object = object()
else:
    _OPEN = State.OPEN


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (server to client) carrying ``payload`` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 1 << 16:
        return _header_16(_FIN_TEXT, 126, size) + payload
    return _header_64(_FIN_TEXT, 127, size) + payload


def direct_protocol(send: Callable[..., Any] | None) -> WebSocketsSansIOProtocol | None:
    """The sans-I/O protocol behind an accepted socket's ASGI ``send``, if frames may be written
    to its transport directly; None otherwise (keep using ``send``)."""
    protocol = getattr(send, "__self__", None)
    # Exactly uvicorn's class and its own send: a subclass or a wrapper may frame differently.
    if _SansIOProtocol is None or type(protocol) is not _SansIOProtocol:
        return None
    if getattr(send, "__func__", None) is not _SansIOProtocol.send:
        return None
    # Another uvicorn version may keep its state under other names: then keep its send.
    if not all(hasattr(protocol, name) for name in _PROTOCOL_STATE):
        return None
    if not protocol.handshake_complete or protocol.conn.extensions:
        return None
    return protocol


def writable(protocol: WebSocketsSansIOProtocol) -> bool:
    """Whether a frame written now goes out exactly as ``send`` would write it, at once: the
    connection is open and its transport is below its high-water mark."""
    return (
        protocol.writable.is_set()
        and not protocol.close_sent
        and not protocol.disconnected
        and protocol.conn.state is _OPEN
        and not protocol.conn.expect_continuation_frame
        and not protocol.transport.is_closing()
    )
