"""The message envelope every command and event travels in, and its fast codec (msgspec).

Attribute names follow CloudEvents (``id``, ``type``, ``source``, ``time``, ``subject``,
``specversion``); ``schemaversion`` versions ``data``. W3C ``traceparent`` travels in the NATS
headers, not the body, so a re-published event stays byte-identical.

Example::

    env = Envelope(id=new_id("cmd"), type="prompt.submit", source="gateway",
                   time=iso(clock.now()), subject="ses_1", data={"content": "hi"})
    raw = encode(env); decode(raw) == env
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from shoal.common.errors import BadRequest

SCHEMA_VERSION = 1

# Header names we set on NATS messages.
MSG_ID_HEADER = "Nats-Msg-Id"
TRACEPARENT_HEADER = "traceparent"
REPLY_TO_HEADER = "Shoal-Reply-To"


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One command or event. ``seq`` is set on session events (contiguous per session from 1)."""

    id: str
    type: str
    source: str
    time: str
    subject: str = ""
    specversion: str = "1.0"
    schemaversion: int = SCHEMA_VERSION
    owner: str | None = None
    seq: int | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(raw: bytes) -> Envelope:
    """Decode an envelope; malformed input raises :class:`BadRequest` (a dead letter on the bus)."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"malformed envelope: {exc}") from exc


def dumps(value: Any) -> bytes:
    """JSON-encode a plain value (RPC bodies, KV values)."""
    return _encoder.encode(value)


def loads(raw: bytes | str) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """A sortable, unique, token-safe id: ``<prefix>_`` + ms time + 80 random bits, base32."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
