"""Every frame the gateway sends on a socket, and every close code, defined once.

Frames are JSON text. A reply to a peer's frame carries the frame's ``"id"`` back as ``"ref"``
(:meth:`ManagedSocket.reply`). An event's frame is ``{"type":"event","seq":N,"event":<envelope>}``
with the ledger's JSON spliced in as it is; the feeds have it encoded once per event
(:func:`encode_event`, handed to ``fanout.LiveHub``), as text and as a complete WebSocket frame.

Wire bytes: a server's frames are not masked (RFC 6455 §5.1), so an event's frame is the same
bytes on every socket following it, and each socket may write them to its transport itself
instead of having uvicorn's ``send`` frame the same payload again. Only where that is exactly
what the ``send`` would have written (:func:`direct_protocol`, :func:`writable`): uvicorn's
sans-I/O protocol with no extension negotiated (permessage-deflate is off), an open connection,
a transport below its high-water mark. Anything else keeps the ASGI ``send``.
uvicorn's attributes are read by name, so uvicorn's version is pinned (pyproject.toml) and
``tests/test_gateway_wire.py`` proves the bytes against websockets' own parser. Example::

    text, wire = encode_event(7, b'{"id":"evt_1",...}', shared=True)
    protocol = direct_protocol(send)  # once per socket, after the handshake
    if protocol is not None and writable(protocol):
        protocol.transport.write(wire)
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.common.errors import Conflict, Forbidden, NotFound, ShoalError, Unauthorized
from shoal.gateway.fanout import LiveEvent
from shoal.gateway.service import SessionEventMsg
from shoal.gateway.views import CommandReceipt, MessageAccepted, PromptReceipt, SecretValue

if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

Frame = dict[str, Any]

# -- close codes (README "Close codes"; the reason says what to do) --
CLOSE_IDLE = 1001  # no frame from the peer for ws_idle_timeout
CLOSE_POLICY = 1008  # rate limit
CLOSE_TOO_BIG = 1009  # a frame above max_ws_frame_bytes
CLOSE_INTERNAL = 1011  # unexpected gateway error: resume from the seq in the reason
CLOSE_RESTART = 1012  # the gateway is restarting: reconnect (another replica), resume
CLOSE_TRY_LATER = 1013  # NATS or the keys service is unavailable: retry with backoff
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403  # the key lacks the scope, or the Origin is not allowed
CLOSE_NOT_FOUND = 4404  # unknown session, or one the key may not see
CLOSE_LAGGING = 4408  # fell behind the bounded outbox: resume from the seq in the reason
CLOSE_CONFLICT = 4409  # the session refused the runner (e.g. terminated)
# Runner sockets, as the session's ledger decides:
CLOSE_HIBERNATED = 1000  # after {"type":"hibernate"}: release the sandbox; connect to wake it
CLOSE_REPLACED = 4409  # another runner connection took over the session: do not reconnect
CLOSE_TERMINATED = 4410  # after {"type":"terminated"}: the session is over, do not reconnect

REPLACED_REASON = "replaced"
TERMINATED_REASON = "session terminated"
HIBERNATED_REASON = "hibernated: connect again to resume"

RESTART_RECONNECT = "service restart: reconnect"


def close_code_for(exc: ShoalError) -> int:
    """The close code a refusal for ``exc`` gets."""
    if isinstance(exc, Unauthorized):
        return CLOSE_UNAUTHORIZED
    if isinstance(exc, NotFound):
        return CLOSE_NOT_FOUND
    if isinstance(exc, Forbidden):
        return CLOSE_FORBIDDEN
    if isinstance(exc, Conflict):
        return CLOSE_CONFLICT
    if exc.retryable:
        return CLOSE_TRY_LATER
    return CLOSE_BAD_REQUEST if exc.status < 500 else CLOSE_INTERNAL


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (125 bytes of payload, 2 of them the code)."""
    raw = text.encode()
    return raw[:123].decode(errors="ignore") if len(raw) > 123 else text


def lagging_reason(seq: int) -> str:
    return f"lagging: resume from seq {seq}"


def restart_reason(seq: int) -> str:
    return f"service restart: resume from seq {seq}"


def failure_reason(seq: int) -> str:
    return f"gateway error: resume from seq {seq}"


# -- server -> client frames --
def encode_event(seq: int, event_json: bytes, shared: bool = False) -> tuple[str, bytes | None]:
    """An event's frame at position ``seq``: as text (for the ASGI send), and as wire bytes
    when ``shared`` by every socket following it (a socket frames its own text at write)."""
    text = f'{{"type":"event","seq":{seq},"event":{event_json.decode()}}}'
    return text, text_frame(text.encode()) if shared else None


def event_frame(event: SessionEventMsg) -> tuple[str, bytes | None]:
    """The event's frame, as the feed encoded it (with its wire bytes, when live)."""
    if isinstance(event, LiveEvent):
        return event.frame, event.wire
    return encode_event(event.seq, event.raw)


def gap(first: int, last: int) -> Frame:
    """Positions ``first``..``last`` are gone from the ledger (retention): said, never skipped."""
    return {"type": "gap", "from": first, "to": last}


def lagging(seq: int) -> Frame:
    """The end of an SSE stream whose reader fell behind: reconnect after ``seq``."""
    return {"type": "lagging", "seq": seq}


def pong() -> Frame:
    return {"type": "pong"}


def error(code: str, message: str) -> Frame:
    """A refused frame; the socket stays open."""
    return {"type": "error", "code": code, "message": message}


def prompt_accepted(receipt: PromptReceipt) -> Frame:
    """A client's ``prompt`` was queued: the receipt ``POST …/prompts`` answers."""
    return {"type": "prompt.accepted", **msgspec.structs.asdict(receipt)}


def delta(session_id: str, runner_frame: dict[str, Any]) -> Frame:
    """A runner's ``message.delta`` as its session's clients get it (not seq'd, best-effort).

    ``type`` first, so a client can tell a delta from an event by the frame's first bytes."""
    frame: Frame = {"type": "delta", "session_id": session_id}
    frame.update((k, v) for k, v in runner_frame.items() if k not in ("type", "id", "session_id"))
    return frame


def hello_ack(session_id: str, connection_id: str) -> Frame:
    return {"type": "hello.ack", "session_id": session_id, "connection_id": connection_id}


def runner_prompt(prompt_id: object, content: object) -> Frame:
    """A dispatched prompt, to the session's runner."""
    return {"type": "prompt", "prompt_id": prompt_id, "content": content}


def runner_abort(prompt_id: object, reason: str | None = None) -> Frame:
    """Stop working on ``prompt_id`` (aborted by the user; ``reason`` "timeout": the watchdog)."""
    frame: Frame = {"type": "abort", "prompt_id": prompt_id}
    if reason is not None:
        frame["reason"] = reason
    return frame


def runner_answer(question_id: object, answer: object) -> Frame:
    """The user answered the runner's question."""
    return {"type": "answer", "question_id": question_id, "answer": answer}


def question_expired(question_id: object) -> Frame:
    """The runner's question will not be answered (it expired, or its prompt ended)."""
    return {"type": "question.expired", "question_id": question_id}


def terminated(reason: object) -> Frame:
    """The session was terminated; the socket closes next (CLOSE_TERMINATED)."""
    return {"type": "terminated", "reason": reason}


def hibernate() -> Frame:
    """The session hibernated: release the sandbox; the socket closes next (CLOSE_HIBERNATED)."""
    return {"type": "hibernate"}


def question_accepted(question_id: str, expires_at: str | None) -> Frame:
    """The runner's ``question`` was recorded (``question.asked``) under ``question_id``."""
    return {"type": "question.accepted", "question_id": question_id, "expires_at": expires_at}


def error_accepted(prompt_id: str) -> Frame:
    """The runner's ``error`` was recorded (``prompt_id`` "": the session's own failure)."""
    return {"type": "error.accepted", "prompt_id": prompt_id}


def answer_accepted(receipt: CommandReceipt) -> Frame:
    """A client's ``answer`` was recorded: the receipt ``POST …/questions/{id}/answer`` answers."""
    return {"type": "answer.accepted", **msgspec.structs.asdict(receipt)}


def abort_accepted(receipt: CommandReceipt) -> Frame:
    """A client's ``abort`` was applied: the receipt ``POST …/abort`` answers."""
    return {"type": "abort.accepted", **msgspec.structs.asdict(receipt)}


def message_accepted(accepted: MessageAccepted) -> Frame:
    """The runner's ``message.completed`` was applied: ``prompt_id``, ``message_id``."""
    return {"type": "message.accepted", **msgspec.structs.asdict(accepted)}


def secret(value: SecretValue) -> Frame:
    """A secret the runner asked for (``name``, ``value``): to that socket and nowhere else."""
    return {"type": "secret", **msgspec.structs.asdict(value)}


def http_request(request: dict[str, Any], ref: str) -> Frame:
    """A proxied HTTP request (``method``, ``path``, ``query``, ``headers``, ``body_b64``)."""
    return {**request, "type": "http.request", "id": ref}


# -- wire bytes --
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
