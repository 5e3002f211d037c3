"""The SESSION_EVT ledger's message format: one message per command, carrying its events.

A command's events are written as one *commit* on ``<prefix>.session.evt.<session>.commit``
whose body is ``{"events": [<envelope>, ...]}`` (the envelopes exactly as :func:`encode`
writes them, in seq order): one fenced publish, one fsync, one PubAck per command. Ledgers
written by older versions hold one message per event (body = the envelope, subject
``...evt.<session>.<type>``); every reader takes both shapes through :func:`ledger_events` /
:func:`ledger_raw_events`, which look at the body only (a direct get or a RePublish changes the
subject, never the body).

Headers of a commit: ``Nats-Msg-Id`` = its first event's id, ``Shoal-Seq`` = its last event's
seq (:data:`LEDGER_SEQ_HEADER`: position without decoding), the command that produced it, trace
and tags headers.

Example::

    body = encode_commit([queued, dispatched])           # one message, two events
    [e.type for e in ledger_events(body)]                # ["prompt.queued", "prompt.dispatched"]
    ledger_raw_events(body)[0] == encode(queued)         # byte for byte
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from shoal.common.errors import BadRequest
from shoal.common.messaging.envelope import Envelope, decode, encode

# The seq of a commit's last event (an old per-event message has none: decode its body).
LEDGER_SEQ_HEADER = "Shoal-Seq"


class _LedgerMessage(msgspec.Struct):
    events: list[msgspec.Raw] | None = None


class _SeqOnly(msgspec.Struct):
    seq: int | None = None


_message_decoder = msgspec.json.Decoder(_LedgerMessage)
_seq_decoder = msgspec.json.Decoder(_SeqOnly)


def encode_commit(events: Sequence[Envelope]) -> bytes:
    """The body of one commit: each event's bytes are exactly ``encode(event)``."""
    return commit_body([encode(e) for e in events])


def commit_body(encoded_events: Sequence[bytes]) -> bytes:
    """The body of one commit from its events already encoded (a writer sizing its commits)."""
    return b'{"events":[' + b",".join(encoded_events) + b"]}"


def ledger_raw_events(data: bytes) -> list[bytes]:
    """The JSON of each event of one ledger message (a commit, or an older single event), in
    order, byte for byte as written. Raises :class:`BadRequest` when it is not JSON."""
    try:
        message = _message_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"malformed ledger message: {exc}") from exc
    if message.events is None:
        return [data]
    return [bytes(raw) for raw in message.events]


def ledger_events(data: bytes) -> list[Envelope]:
    """The events of one ledger message, in order (see :func:`ledger_raw_events`)."""
    return [decode(raw) for raw in ledger_raw_events(data)]


def ledger_last_seq(data: bytes, headers: Mapping[str, str] | None = None) -> int | None:
    """The seq of the last event of one ledger message: ``Shoal-Seq`` if present, else read
    from the body; None when it has none (malformed)."""
    value = (headers or {}).get(LEDGER_SEQ_HEADER)
    if value is not None and value.isdigit():
        return int(value)
    try:
        raws = ledger_raw_events(data)
        return _seq_decoder.decode(raws[-1]).seq if raws else None
    except (BadRequest, msgspec.DecodeError, msgspec.ValidationError):
        return None
