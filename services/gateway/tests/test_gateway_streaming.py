"""Streaming on a real uvicorn and real NATS: positioned replay and gaps, deltas, the user stream,
SSE, tickets, Origin, rate and idle limits, the runner proxy."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeKeys, FakeSessionService
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ProxyRequest, ProxyResponse, ShoalClient, connect_runner
from shoal.common.messaging import Envelope, encode, encode_commit, ledger_events
from shoal.gateway.ledger import start_sequence

if TYPE_CHECKING:
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "ws_rate_limit": 20.0,
        "ws_rate_burst": 40,
        "proxy_timeout": timedelta(seconds=1),
        "sse_keepalive": timedelta(seconds=0.3),
        "ws_allowed_origins": ["https://app.example.com"],
    }


async def ws(url: str, headers: dict[str, str] | None = None, **kw: Any) -> ClientConnection:
    return await connect(url, additional_headers=headers or {}, compression=None, **kw)


async def recv_json(conn: ClientConnection, within: float = 10) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(conn.recv(), within)))


async def drain(conn: ClientConnection) -> None:
    while True:
        await asyncio.wait_for(conn.recv(), 10)


async def close_of(conn: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as caught:
        await drain(conn)
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code, caught.value.rcvd.reason


async def test_start_sequence_binary_search(nc: NATS, sessions: FakeSessionService) -> None:
    """Two interleaved sessions: the start is the first event above ``since``, wherever."""
    js = nc.jetstream()
    subjects = sessions.subjects
    stream = subjects.session_evt_stream
    for seq in range(1, 201):
        for sid in ("ses_a", "ses_b"):
            env = Envelope(id=f"{sid}:{seq}", type="x.y", source="t", time="t", seq=seq, data={})
            await js.publish(subjects.session_event(sid, "x.y"), encode(env), stream=stream)
    sa = subjects.session_events("ses_a")
    assert await start_sequence(js, stream, sa, 0) is None
    for since in (1, 2, 57, 199):
        start = await start_sequence(js, stream, sa, since)
        assert start is not None
        msg = await js.get_msg(stream, seq=start, subject=sa, next=True, direct=True)
        assert json.loads(msg.data or b"")["seq"] == since + 1
    last = (await js.stream_info(stream)).state.last_seq
    # Nothing newer yet: a position past ses_a's last event (399), at most one past the end.
    assert 399 < (await start_sequence(js, stream, sa, 200) or 0) <= last + 1
    assert await start_sequence(js, stream, subjects.session_events("ses_none"), 5) == last + 1


async def test_start_sequence_over_older_events_then_commits(
    nc: NATS, sessions: FakeSessionService
) -> None:
    """A ledger an older version wrote (one message per event) followed by commits (one per
    command, several events): the start is the message holding the first seq above ``since``."""
    js = nc.jetstream()
    subjects = sessions.subjects
    stream = subjects.session_evt_stream
    sa = subjects.session_events("ses_mix")

    def env(seq: int) -> Envelope:
        return Envelope(id=f"ses_mix:{seq}", type="x.y", source="t", time="t", seq=seq)

    for seq in range(1, 11):
        await js.publish(subjects.session_event("ses_mix", "x.y"), encode(env(seq)), stream=stream)
    for first in range(11, 41, 3):  # commits of 11..13, 14..16, ..., 38..40
        events = [env(seq) for seq in range(first, first + 3)]
        await js.publish(subjects.session_commit("ses_mix"), encode_commit(events), stream=stream)
    for since in (1, 9, 10, 11, 12, 13, 25, 39):
        start = await start_sequence(js, stream, sa, since)
        assert start is not None
        msg = await js.get_msg(stream, seq=start, subject=sa, next=True, direct=True)
        seqs = [e.seq for e in ledger_events(msg.data or b"")]
        assert since + 1 in seqs, (since, seqs)
    last = (await js.stream_info(stream)).state.last_seq
    assert await start_sequence(js, stream, sa, 40) == last + 1


async def test_older_events_then_commits_stream_byte_identical_frames(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    """Each event of a commit becomes one frame, the same bytes a one-event-per-message ledger
    gave: replay, live (the RePublish of a commit), a resume inside a commit, and the pages."""
    created = await alice.create_session()  # seq 1, a commit of the fake session service
    sid = created.id
    js, subjects = sessions.js, sessions.subjects

    def env(seq: int) -> Envelope:
        return Envelope(
            id=f"{sid}:x:{seq}",
            type="session.status",
            source="session",
            time="2026-01-01T00:00:00Z",
            subject=sid,
            seq=seq,
            data={"status": "idle", "n": seq},
        )

    def frame(seq: int) -> str:
        return f'{{"type":"event","seq":{seq},"event":{encode(env(seq)).decode()}}}'

    async def commit(*seqs: int) -> None:
        events = [env(seq) for seq in seqs]
        await js.publish(
            subjects.session_commit(sid),
            encode_commit(events),
            headers={"Shoal-Seq": str(seqs[-1])},
            stream=subjects.session_evt_stream,
        )

    for seq in (2, 3, 4):  # an older version's ledger
        await js.publish(
            subjects.session_event(sid, "session.status"),
            encode(env(seq)),
            stream=subjects.session_evt_stream,
        )
    await commit(5, 6, 7)
    await commit(8)
    url = f"{gateway.ws_url}/v1/sessions/{sid}/ws"
    conn = await ws(f"{url}?since=1", ALICE)
    assert [await asyncio.wait_for(conn.recv(), 10) for _ in range(7)] == [
        frame(seq) for seq in range(2, 9)
    ]
    await commit(9, 10, 11)  # live
    assert [await asyncio.wait_for(conn.recv(), 10) for _ in range(3)] == [
        frame(seq) for seq in (9, 10, 11)
    ]
    await conn.close()
    conn = await ws(f"{url}?since=9", ALICE)  # inside the commit of 9..11
    assert [(await recv_json(conn))["seq"] for _ in range(2)] == [10, 11]
    await conn.close()
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(
            f"{gateway.base_url}/v1/sessions/{sid}/events?after=3&limit=5", headers=ALICE
        )
    assert page.status_code == 200, page.text
    body = page.json()
    assert [e["seq"] for e in body["events"]] == [4, 5, 6, 7, 8]
    assert body["events"][2] == json.loads(encode(env(6)))


async def test_resume_starts_at_position_and_reports_gap(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()  # seq 1
    for _ in range(60):
        await sessions.emit(created.id, "session.status", {"status": "idle"})  # 2..61
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/ws"
    conn = await ws(f"{url}?since=50", ALICE)
    assert [(await recv_json(conn))["seq"] for _ in range(11)] == list(range(51, 62))
    await conn.close()

    # Retention takes seqs 1..20 away: asking for them yields a gap frame, then the rest.
    js = sessions.js
    info = await js.stream_info(sessions.subjects.session_evt_stream)
    first = int(info.state.first_seq)
    await js.purge_stream(
        sessions.subjects.session_evt_stream,
        subject=sessions.subjects.session_events(created.id),
        seq=first + 20,
    )
    conn = await ws(f"{url}?since=5", ALICE)
    assert await recv_json(conn) == {"type": "gap", "from": 6, "to": 20}
    assert (await recv_json(conn))["seq"] == 21
    await conn.close()
    events = alice.connect_session(created.id, since=0)
    async with events:
        async for event in events:
            assert event.seq == 21
            break
    assert events.gaps == [(1, 20)]


async def test_deltas_reach_clients_without_touching_the_ledger(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    deltas: list[dict[str, Any]] = []
    got_all = asyncio.Event()

    def on_delta(frame: dict[str, Any]) -> None:
        deltas.append(frame)
        if len(deltas) == 200:
            got_all.set()

    events = alice.connect_session(created.id, on_delta=on_delta)
    async with events, connect_runner(gateway.base_url, created.id, created.runner_token) as r:
        async for event in events:
            if event.type == "runner.connected":
                break
        info = await sessions.js.stream_info(sessions.subjects.session_evt_stream)
        for n in range(200):
            await r.send_delta("prm_1", f"t{n}", index=n)
        reader = asyncio.create_task(anext(events))  # deltas arrive while waiting for events
        await asyncio.wait_for(got_all.wait(), 10)
        reader.cancel()
    assert [d["index"] for d in deltas] == list(range(200))
    assert deltas[0] == {
        "type": "delta",
        "session_id": created.id,
        "prompt_id": "prm_1",
        "text": "t0",
        "index": 0,
    }
    after = await sessions.js.stream_info(sessions.subjects.session_evt_stream)
    assert after.state.last_seq == info.state.last_seq  # no ledger write for a delta


async def test_user_stream_resumes_by_deliver_position(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    subjects = sessions.subjects
    js = sessions.js

    async def deliver(owner: str, n: int) -> None:
        env = Envelope(id=f"e{owner}{n}", type="x.y", source="t", time="t", owner=owner, seq=n)
        await js.publish(subjects.deliver_user(owner), encode(env), stream=subjects.deliver_stream)

    for n in range(1, 6):
        await deliver("alice", n)
        await deliver("bob", n)  # never reaches alice
    conn = await ws(f"{gateway.ws_url}/v1/events/ws", ALICE)
    frames = [await recv_json(conn) for _ in range(5)]
    assert [f["event"]["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert all(f["event"]["owner"] == "alice" for f in frames)
    positions = [f["seq"] for f in frames]
    assert positions == sorted(positions)
    await conn.close()
    conn = await ws(f"{gateway.ws_url}/v1/events/ws?since={positions[2]}", ALICE)
    assert [(await recv_json(conn))["event"]["seq"] for _ in range(2)] == [4, 5]
    await deliver("alice", 6)  # live
    assert (await recv_json(conn))["event"]["seq"] == 6
    await conn.close()

    # The client library resumes the user stream the same way.
    async with alice.connect_events(since=positions[3]) as stream:
        got = [(await anext(stream)).seq for _ in range(2)]
    assert got == [5, 6]


async def test_tag_stream_follows_the_owners_tag_and_resumes(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    subjects = sessions.subjects
    js = sessions.js

    async def deliver(owner: str, tag: str, n: int) -> None:
        env = Envelope(id=f"e{owner}{tag}{n}", type="x.y", source="t", time="t", owner=owner, seq=n)
        subject = subjects.deliver_tag(owner, tag)
        await js.publish(subject, encode(env), stream=subjects.deliver_stream)

    for n in range(1, 5):
        await deliver("alice", "team-a", n)
        await deliver("alice", "team-b", n)  # another tag
        await deliver("bob", "team-a", n)  # another owner's tag of the same name
    conn = await ws(f"{gateway.ws_url}/v1/events/ws?tag=team-a", ALICE)
    frames = [await recv_json(conn) for _ in range(4)]
    assert [f["event"]["id"] for f in frames] == [f"ealiceteam-a{n}" for n in range(1, 5)]
    await conn.close()
    conn = await ws(f"{gateway.ws_url}/v1/events/ws?tag=team-a&since={frames[1]['seq']}", ALICE)
    assert [(await recv_json(conn))["event"]["seq"] for _ in range(2)] == [3, 4]
    await deliver("alice", "team-a", 5)  # live
    assert (await recv_json(conn))["event"]["seq"] == 5
    await conn.close()
    refused = await ws(f"{gateway.ws_url}/v1/events/ws?tag=no.dots", ALICE)
    assert (await close_of(refused))[0] == 4400

    url = f"{gateway.base_url}/v1/events/stream?tag=team-a"
    async with httpx.AsyncClient(timeout=10) as http:
        headers = {**ALICE, "Last-Event-ID": str(frames[2]["seq"])}
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            seqs: list[int] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seqs.append(json.loads(line[6:])["event"]["seq"])
                if len(seqs) == 2:
                    break
        assert seqs == [4, 5]
        bad = await http.get(f"{gateway.base_url}/v1/events/stream?tag=a%20b", headers=ALICE)
        assert bad.status_code == 400
        assert bad.headers["content-type"].startswith("application/problem+json")


async def test_sse_session_stream_resumes_with_last_event_id(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()  # 1
    for _ in range(4):
        await sessions.emit(created.id, "session.status", {"status": "idle"})  # 2..5
    url = f"{gateway.base_url}/v1/sessions/{created.id}/events/stream"
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", url, headers={**ALICE, "Last-Event-ID": "2"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            ids: list[int] = []
            keepalive = False
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                elif line.startswith("data: "):
                    assert json.loads(line[6:])["seq"] == ids[-1]
                elif line == ": keepalive":
                    keepalive = True
                if len(ids) == 3 and keepalive:
                    break
        assert ids == [3, 4, 5]
        refused = await http.get(url)
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        user = await http.get(
            f"{gateway.base_url}/v1/events/stream", headers={**ALICE, "Last-Event-ID": "x"}
        )
        assert user.status_code == 400


async def test_sse_session_stream_reports_what_retention_took(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()  # 1
    for _ in range(24):
        await sessions.emit(created.id, "session.status", {"status": "idle"})  # 2..25
    js = sessions.js
    first = int((await js.stream_info(sessions.subjects.session_evt_stream)).state.first_seq)
    await js.purge_stream(
        sessions.subjects.session_evt_stream,
        subject=sessions.subjects.session_events(created.id),
        seq=first + 20,  # seqs 1..20 gone
    )
    url = f"{gateway.base_url}/v1/sessions/{created.id}/events/stream"
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", url, headers={**ALICE, "Last-Event-ID": "5"}) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith(("event: ", "data: ", "id: ")):
                lines.append(line)
            if line == "id: 22":
                break
    assert lines[:2] == ["event: gap", 'data: {"type":"gap","from":6,"to":20}']
    assert [line for line in lines if line.startswith("id: ")] == ["id: 21", "id: 22"]


async def test_tickets_are_single_use(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    ticket = await alice.create_ws_ticket()
    assert ticket.ticket.startswith("wst_")
    assert ticket.expires_in > 0
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/ws?ticket={ticket.ticket}"
    conn = await ws(url)
    assert (await recv_json(conn))["seq"] == 1
    await conn.close()
    again = await ws(url)
    assert (await close_of(again))[0] == 4401
    bogus = await ws(f"{gateway.ws_url}/v1/events/ws?ticket=wst_nope")
    assert (await close_of(bogus))[0] == 4401
    # SSE takes tickets too (EventSource cannot send headers).
    sse_ticket = (await alice.create_ws_ticket()).ticket
    async with httpx.AsyncClient(timeout=10) as http:
        sse = f"{gateway.base_url}/v1/sessions/{created.id}/events/stream?ticket={sse_ticket}"
        async with http.stream("GET", sse) as response:
            assert response.status_code == 200


async def test_origin_rate_and_idle_limits(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/ws?since=1"
    foreign = await ws(url, {**ALICE, "Origin": "https://evil.example"})
    assert (await close_of(foreign))[0] == 4403
    allowed = await ws(url, {**ALICE, "Origin": "https://app.example.com"})
    await allowed.send('{"type":"ping"}')
    assert (await recv_json(allowed))["type"] == "pong"

    for _ in range(200):  # a flood: far past the burst of 40 at 20 frames/s
        try:
            await allowed.send('{"type":"ping"}')
        except ConnectionClosed:
            break
    code, reason = await close_of(allowed)
    assert code == 1008
    assert "rate limit" in reason


@pytest.mark.parametrize(
    "settings_overrides", [{"ws_idle_timeout": timedelta(seconds=0.5)}], indirect=False
)
async def test_idle_socket_is_closed_1001(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    conn = await ws(f"{gateway.ws_url}/v1/sessions/{created.id}/ws?since=1", ALICE)
    code, reason = await close_of(conn)
    assert code == 1001
    assert "idle" in reason


async def test_runner_proxy(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    proxy = f"{gateway.base_url}/v1/sessions/{created.id}/proxy"
    seen: list[ProxyRequest] = []

    async def handler(request: ProxyRequest) -> ProxyResponse:
        seen.append(request)
        if request.path == "/slow":
            await asyncio.sleep(3)
        return ProxyResponse(
            status=201, headers={"content-type": "text/plain"}, body=b"ok:" + request.body
        )

    async with httpx.AsyncClient(timeout=10) as http:
        none = await http.get(f"{proxy}/x", headers=ALICE)
        assert none.status_code == 502
        assert none.json()["code"] == "runner_unavailable"
        assert (await http.get(f"{proxy}/x")).status_code == 401
        bob = await http.get(f"{proxy}/x", headers={"Authorization": "Bearer key-bob"})
        assert bob.status_code == 404

        async with connect_runner(
            gateway.base_url, created.id, created.runner_token, on_http_request=handler
        ):
            answer = await http.post(
                f"{proxy}/api/run?x=1", headers={**ALICE, "X-Test": "1"}, content=b"body"
            )
            assert answer.status_code == 201, answer.text
            assert answer.content == b"ok:body"
            assert answer.headers["content-type"] == "text/plain"
            request = seen[-1]
            assert (request.method, request.path, request.query) == ("POST", "/api/run", "x=1")
            assert request.headers["x-test"] == "1"
            assert "authorization" not in request.headers  # the caller's key stays here
            slow = await http.get(f"{proxy}/slow", headers=ALICE)
            assert slow.status_code == 504
            big = await http.post(f"{proxy}/big", headers=ALICE, content=b"x" * (513 * 1024))
            assert big.status_code == 413
