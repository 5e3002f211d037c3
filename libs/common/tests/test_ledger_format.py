"""The ledger's message format: a commit of one command's events, and the older single event."""

from __future__ import annotations

import pytest

from shoal.common.errors import BadRequest
from shoal.common.messaging import (
    Envelope,
    encode,
    encode_commit,
    ledger_events,
    ledger_last_seq,
    ledger_raw_events,
)


def _event(seq: int, **data: object) -> Envelope:
    return Envelope(
        id=f"ses_1:9:{seq}",
        type="prompt.queued",
        source="session",
        time="2026-01-01T00:00:00Z",
        subject="ses_1",
        owner="u1",
        seq=seq,
        data={"content": 'a "quoted" ünïcode \\ text', **data},
    )


def test_a_commit_gives_each_events_bytes_as_encoded() -> None:
    events = [_event(1), _event(2, nested={"events": [1]}), _event(3)]
    body = encode_commit(events)
    assert ledger_raw_events(body) == [encode(e) for e in events]
    assert ledger_events(body) == events
    assert ledger_last_seq(body) == 3
    assert ledger_last_seq(body, {"Shoal-Seq": "7"}) == 7  # the header wins: no decoding


def test_an_older_single_event_message_is_read_as_one_event() -> None:
    raw = encode(_event(4))
    assert ledger_raw_events(raw) == [raw]
    assert ledger_events(raw) == [_event(4)]
    assert ledger_last_seq(raw) == 4


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"events": 3}'])
def test_malformed_messages_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        ledger_events(body)
    assert ledger_last_seq(body) is None


def test_a_malformed_event_inside_a_commit_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        ledger_events(b'{"events": [{"id": 1}]}')
