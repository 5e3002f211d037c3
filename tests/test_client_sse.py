"""The SSE stream's resume rules, against scripted answers (an httpx ``MockTransport``): gaps
are recorded, a ``lagging`` end or a cut stream reconnects with ``Last-Event-ID``, events the
server repeats are not yielded twice, refusals raise; without ``reconnect`` the iteration ends
with the stream. The real gateway restart is in
tests/test_client_bridge.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import stamina

from shoal.client import ShoalAPIError, ShoalClient, SseEventStream


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=10, cap=True):
        yield


def _event(seq: int) -> str:
    envelope = {"id": f"e{seq}", "type": "prompt.queued", "seq": seq, "data": {"n": seq}}
    frame = {"type": "event", "seq": seq, "event": envelope}
    return f"id: {seq}\ndata: {json.dumps(frame)}\n\n"


class Server:
    """Answers each GET with the next scripted body (or a problem status)."""

    def __init__(self, *answers: str | int) -> None:
        self.answers = list(answers)
        self.last_event_ids: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.last_event_ids.append(request.headers.get("last-event-id"))
        answer = self.answers.pop(0)
        if isinstance(answer, int):
            problem = {"status": answer, "code": "not_found", "detail": "session not found"}
            return httpx.Response(
                answer, json=problem, headers={"content-type": "application/problem+json"}
            )
        return httpx.Response(
            200, content=answer.encode(), headers={"content-type": "text/event-stream"}
        )


def _client(server: Server) -> ShoalClient:
    return ShoalClient("http://gateway.test", "key", transport=httpx.MockTransport(server))


async def test_resumes_after_lagging_and_a_cut_stream_without_repeats() -> None:
    gap = 'event: gap\ndata: {"type":"gap","from":2,"to":3}\n\n'
    lagging = 'event: lagging\ndata: {"type":"lagging","seq":4}\n\n'
    server = Server(
        "retry: 1000\n: resume position 0\n\n" + _event(1) + gap + _event(4) + lagging,
        503,  # the gateway is restarting: retried
        _event(4) + _event(5) + ": keepalive\n\n",  # a repeat, then new; then the stream is cut
        _event(6),
    )
    async with _client(server) as client, client.stream_session("ses_1") as events:
        seqs = []
        async for event in events:
            seqs.append(event.seq)
            if event.seq == 6:
                break
    assert seqs == [1, 4, 5, 6]
    assert events.gaps == [(2, 3)]
    assert server.last_event_ids == ["0", "4", "4", "5"]
    assert events.reconnects == 2


async def test_starts_after_since_and_raises_refusals() -> None:
    server = Server(_event(8), 404)
    seqs: list[int] = []
    async with _client(server) as client, client.stream_events(since=7) as events:
        with pytest.raises(ShoalAPIError) as refused:
            await _collect(events, seqs)
    assert seqs == [8]
    assert refused.value.status == 404
    assert server.last_event_ids == ["7", "8"]


async def test_without_reconnect_the_iteration_ends_with_the_stream() -> None:
    server = Server(_event(1) + _event(2))
    seqs: list[int] = []
    async with _client(server) as client, client.stream_session("ses_1", reconnect=False) as s:
        await _collect(s, seqs)
    assert seqs == [1, 2]
    assert s.last_seq == 2


async def _collect(events: SseEventStream, seqs: list[int]) -> None:
    async for event in events:
        seqs.append(event.seq)
