"""The gateway's WebSockets on real NATS and a real uvicorn: refusals, replay + live, runners."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from gateway_fakes import FakeKeys, FakeSessionService, flood_until_cut_off
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalClient, ShoalConnectionClosed, connect_runner
from shoal.gateway.api.deps import gateway_state
from shoal.gateway.config import GatewaySettings

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest (no runtime import:
    # several test directories have a conftest module)
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"ws_send_queue": 8, "ws_lag_grace": timedelta(seconds=0.3)}


async def ws_connect(
    url: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> ClientConnection:
    return await connect(url, additional_headers=headers or {}, compression=None, **kwargs)


async def read_until_closed(conn: ClientConnection, frames: list[str] | None = None) -> None:
    while True:
        frame = await asyncio.wait_for(conn.recv(), 10)
        if frames is not None:
            frames.append(str(frame))


async def close_of(conn: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason."""
    with pytest.raises(ConnectionClosed) as caught:
        await read_until_closed(conn)
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code, caught.value.rcvd.reason


async def recv_json(conn: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(conn.recv(), 10)))


async def recv_events(conn: ClientConnection, count: int) -> list[dict[str, Any]]:
    frames = []
    while len(frames) < count:
        frame = await recv_json(conn)
        if frame["type"] == "event":
            frames.append(frame)
    return frames


async def test_client_socket_refusals(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/ws"
    cases = [
        (url, {}, 4401),
        (url, {"Authorization": "Bearer wrong"}, 4401),
        (f"{url}?api_key=key-alice", {}, 4401),  # header only
        (url, {"Authorization": "Bearer key-bob"}, 4404),
        (f"{gateway.ws_url}/v1/sessions/ses_missing/ws", ALICE, 4404),
        (f"{gateway.ws_url}/v1/sessions/bad.id/ws", ALICE, 4404),
        (f"{url}?since=-1", ALICE, 4400),
    ]
    for target, headers, code in cases:
        conn = await ws_connect(target, headers)
        got, reason = await close_of(conn)
        assert got == code, (target, headers, got, reason)
        assert reason


async def test_replay_then_live_in_order(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()  # seq 1
    for n in range(4):  # seq 2..5 (prompt.queued; no runner yet)
        await alice.submit_prompt(created.id, f"p{n}")
    reads, live_events = (
        _sample("shoal_gateway_ledger_reads_total"),
        _sample("shoal_gateway_live_events_total"),
    )
    conn = await ws_connect(f"{gateway.ws_url}/v1/sessions/{created.id}/ws?since=2", ALICE)
    replay = await recv_events(conn, 3)
    assert _sample("shoal_gateway_ledger_reads_total") > reads  # the replay came from the ledger
    assert _sample("shoal_gateway_sockets") == 1
    assert [f["seq"] for f in replay] == [3, 4, 5]
    assert [f["event"]["type"] for f in replay] == ["prompt.queued"] * 3
    assert replay[0]["event"]["data"]["content"] == "p1"
    assert replay[0]["event"]["seq"] == 3
    assert replay[0]["event"]["subject"] == created.id

    # Live: events published while connected follow without a gap; a re-published copy
    # (same seq) is not sent twice.
    await sessions.emit(created.id, "session.status", {"status": "idle"})  # 6
    snap = await sessions.snapshot(created.id)
    assert snap is not None
    await alice.submit_prompt(created.id, "live")  # 7
    live = await recv_events(conn, 2)
    assert [f["seq"] for f in live] == [6, 7]
    assert _sample("shoal_gateway_live_events_total") >= live_events + 2
    await conn.close()


async def test_client_frames(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    conn = await ws_connect(f"{gateway.ws_url}/v1/sessions/{created.id}/ws?since=1", ALICE)
    await conn.send(json.dumps({"type": "ping", "id": "a"}))
    assert await recv_json(conn) == {"type": "pong", "ref": "a"}
    await conn.send("{not json")
    assert (await recv_json(conn))["type"] == "error"
    await conn.send(json.dumps({"type": "dance", "id": 7}))
    error = await recv_json(conn)
    assert error["type"] == "error"
    assert error["code"] == "bad_request"
    assert error["ref"] == 7
    await conn.send(json.dumps([1, 2]))
    assert (await recv_json(conn))["type"] == "error"
    await conn.send(json.dumps({"type": "prompt", "content": "", "id": "e"}))
    assert (await recv_json(conn))["code"] == "bad_request"

    await conn.send(
        json.dumps({"type": "prompt", "content": "via ws", "id": "p", "idempotency_key": "w1"})
    )
    frames = [await recv_json(conn), await recv_json(conn)]  # the receipt and the event, any order
    accepted = next(f for f in frames if f["type"] == "prompt.accepted")
    event = next(f for f in frames if f["type"] == "event")
    assert accepted["ref"] == "p"
    assert accepted["status"] == "queued"
    assert event["event"]["data"]["prompt_id"] == accepted["prompt_id"]
    again = await alice.submit_prompt(created.id, "via ws", idempotency_key="w1")
    assert again.prompt_id == accepted["prompt_id"]  # WS and HTTP share idempotency

    await conn.send(json.dumps({"type": "ping"}))
    assert await recv_json(conn) == {"type": "pong"}  # still open after all the errors
    await conn.close()


async def test_oversize_frame_closes_1009(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    conn = await ws_connect(f"{gateway.ws_url}/v1/sessions/{created.id}/ws?since=1", ALICE)
    await conn.send(json.dumps({"type": "prompt", "content": "x" * (1024 * 1024 + 1)}))
    code, _ = await close_of(conn)
    assert code == 1009


async def test_lagging_client_is_closed_4408_with_resume_seq(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    lagging = _sample("shoal_gateway_socket_closes_total", {"code": "4408"})
    # A client that reads nothing: its buffers fill, then the gateway's queue of 8 frames.
    conn = await ws_connect(
        f"{gateway.ws_url}/v1/sessions/{created.id}/ws", ALICE, max_queue=1, max_size=None
    )
    assert (await recv_json(conn))["seq"] == 1  # served (and registered) before the flood
    await flood_until_cut_off(sessions, created.id, gateway_state(gateway.app).hub)
    frames: list[str] = []
    with pytest.raises(ConnectionClosed) as caught:
        await read_until_closed(conn, frames)
    seqs = [json.loads(f)["seq"] for f in frames]
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 4408
    assert caught.value.rcvd.reason == f"lagging: resume from seq {seqs[-1]}"
    assert _sample("shoal_gateway_socket_closes_total", {"code": "4408"}) == lagging + 1
    assert seqs == list(range(2, seqs[-1] + 1))


async def test_restart_closes_1012_and_client_resumes(
    keys: FakeKeys,
    sessions: FakeSessionService,
    alice: ShoalClient,
    gateway: RunningGateway,
    gateway_factory: Any,
) -> None:
    created = await alice.create_session()  # seq 1
    await alice.submit_prompt(created.id, "one")  # seq 2
    raw = await ws_connect(f"{gateway.ws_url}/v1/sessions/{created.id}/ws", ALICE)
    assert [f["seq"] for f in await recv_events(raw, 2)] == [1, 2]

    events = alice.connect_session(created.id, since=0)
    seen = []
    async with events:
        async for event in events:
            seen.append(event.seq)
            if event.seq == 2:
                break
        await gateway.stop()
        assert await close_of(raw) == (1012, "service restart: resume from seq 2")
        # While the gateway is down, the ledger moves on; a new gateway on the same port serves.
        await sessions.emit(created.id, "session.status", {"status": "idle"})  # 3
        replacement = await gateway_factory()
        try:
            await alice.submit_prompt(created.id, "two")  # 4
            async for event in events:
                seen.append(event.seq)
                if event.seq == 4:
                    break
            assert events.reconnects >= 1
        finally:
            await replacement.stop()
    assert seen == [1, 2, 3, 4]


async def test_runner_refusals(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    other = await alice.create_session()
    assert other.runner_token
    base = f"{gateway.ws_url}/v1/sessions"
    cases = [
        (f"{base}/{created.id}/runner", {}, 4401),
        (f"{base}/{created.id}/runner", {"Authorization": "Bearer srt_wrong"}, 4401),
        (f"{base}/{created.id}/runner?token=srt_wrong", {}, 4401),
        (f"{base}/{created.id}/runner", {"Authorization": f"Bearer {other.runner_token}"}, 4401),
        (f"{base}/ses_missing/runner", {"Authorization": f"Bearer {other.runner_token}"}, 4404),
    ]
    for target, headers, code in cases:
        conn = await ws_connect(target, headers)
        got, reason = await close_of(conn)
        assert got == code, (target, got, reason)

    with pytest.raises(ShoalConnectionClosed) as caught:
        await connect_runner(gateway.base_url, created.id, "srt_wrong")
    assert caught.value.code == 4401


async def test_runner_flow(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    queued = await alice.submit_prompt(created.id, "before the runner")
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/runner?token={created.runner_token}"
    conn = await ws_connect(url)
    await conn.send(json.dumps({"type": "hello", "id": 1}))
    frames = [await recv_json(conn), await recv_json(conn)]
    hello = next(f for f in frames if f["type"] == "hello.ack")
    assert hello["session_id"] == created.id
    assert hello["ref"] == 1
    prompt = next(f for f in frames if f["type"] == "prompt")
    assert prompt == {
        "type": "prompt",
        "prompt_id": queued.prompt_id,
        "content": "before the runner",
    }

    await conn.send(
        json.dumps({"type": "message.delta", "prompt_id": queued.prompt_id, "text": "4"})
    )
    done = {
        "type": "message.completed",
        "prompt_id": queued.prompt_id,
        "content": "4",
        "message_id": "msg_fixed",
        "id": "c",
    }
    await conn.send(json.dumps(done))
    assert await recv_json(conn) == {
        "type": "message.accepted",
        "prompt_id": queued.prompt_id,
        "message_id": "msg_fixed",
        "ref": "c",
    }
    await conn.send(json.dumps(done))  # a re-send is accepted, and recorded once
    assert (await recv_json(conn))["type"] == "message.accepted"
    await conn.send(
        json.dumps({"type": "message.completed", "prompt_id": "bad id!", "content": "x"})
    )
    assert (await recv_json(conn))["code"] == "bad_request"

    live = await alice.submit_prompt(created.id, "while connected")
    frame = await recv_json(conn)
    assert frame == {"type": "prompt", "prompt_id": live.prompt_id, "content": "while connected"}
    await conn.close()

    async with asyncio.timeout(10):
        while True:
            snap = await sessions.snapshot(created.id)
            assert snap is not None
            if not snap.runner_connected:
                break
            await asyncio.sleep(0.05)
    page = await alice.list_messages(created.id)
    assert [m.id for m in page.messages] == ["msg_fixed"]
    types = [c.type for c in sessions.commands if c.subject == created.id]
    assert types.count("runner.connect") == 1
    assert types.count("runner.disconnect") == 1
    assert types.count("message.complete") == 1  # the re-send was dropped as a duplicate


async def test_runner_client_reconnects_and_redelivers(
    keys: FakeKeys,
    sessions: FakeSessionService,
    alice: ShoalClient,
    gateway: RunningGateway,
    gateway_factory: Any,
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    first = await alice.submit_prompt(created.id, "first")
    runner = await connect_runner(gateway.base_url, created.id, created.runner_token)
    try:
        prompts = runner.prompts()
        got = await asyncio.wait_for(anext(prompts), 10)
        assert got.prompt_id == first.prompt_id
        await gateway.stop()  # the runner is cut off mid-prompt (1012)
        replacement = await gateway_factory()
        try:
            # On reconnect the session re-dispatches the unfinished prompt.
            again = await asyncio.wait_for(anext(prompts), 10)
            assert again.prompt_id == first.prompt_id
            await runner.complete(again.prompt_id, "done")
            second = await alice.submit_prompt(created.id, "second")
            nxt = await asyncio.wait_for(anext(prompts), 10)
            assert nxt.prompt_id == second.prompt_id
            page = await alice.list_messages(created.id)
            assert [m.content for m in page.messages] == ["done"]
        finally:
            await runner.aclose()
            await replacement.stop()
    finally:
        await runner.aclose()


async def test_close_frame_not_held_by_a_part_that_ignores_cancellation(
    settings: GatewaySettings,
) -> None:
    """A part that swallows its cancellation (Python 3.11's ``wait_for`` does when the awaited
    future completes as the cancel arrives) must not delay the close frame the socket owes."""
    from types import SimpleNamespace

    from starlette.websockets import WebSocketState

    from shoal.gateway.ws.connection import ManagedSocket, SocketHub
    from shoal.gateway.ws.frames import CLOSE_POLICY

    closed: list[tuple[int, str]] = []
    never: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    class FakeWebSocket:
        application_state = WebSocketState.CONNECTED

        async def receive(self) -> dict[str, Any]:
            return await never

        async def send_text(self, text: str) -> None:
            pass

        async def close(self, code: int, reason: str) -> None:
            closed.append((code, reason))

    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()  # swallowed: lives on until its feed is closed

    service: Any = SimpleNamespace(settings=settings)
    socket = ManagedSocket(FakeWebSocket(), service, SocketHub())  # type: ignore[arg-type]
    serving = asyncio.create_task(socket.serve(stubborn()))
    await asyncio.sleep(0.05)
    socket.finish(CLOSE_POLICY, "rate limit")
    async with asyncio.timeout(settings.ws_close_timeout.total_seconds() + 2):
        await serving
    assert closed == [(CLOSE_POLICY, "rate limit")]
    release.set()
    never.cancel()


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A gateway metric's value in this process (the gateway under test runs in it)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0
