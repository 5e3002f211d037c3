"""The runner socket follows its session (abort, answers, expiry, terminate, hibernate,
takeover, heartbeats) and the client socket's answer / abort frames, on real NATS and uvicorn
with the session's real rules (``FakeSessionService``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeKeys, FakeSessionService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalClient

if TYPE_CHECKING:
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=ALICE) as client:
        yield client


async def open_runner(gateway: RunningGateway, session_id: str, token: str) -> ClientConnection:
    """A runner socket, returned once the session has it as its runner (hello answered after
    runner.connect was applied)."""
    url = f"{gateway.ws_url}/v1/sessions/{session_id}/runner?token={token}"
    conn = await connect(url, compression=None)
    await conn.send(json.dumps({"type": "hello", "id": "h"}))
    assert (await next_of(conn, "hello.ack"))["ref"] == "h"
    return conn


async def recv_json(conn: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(conn.recv(), 10)))


async def next_of(conn: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (others are skipped)."""
    while True:
        frame = await recv_json(conn)
        if frame["type"] == kind:
            return frame


async def read_all(conn: ClientConnection, seen: list[dict[str, Any]]) -> None:
    while True:
        seen.append(await recv_json(conn))


async def close_of(conn: ClientConnection, seen: list[dict[str, Any]] | None = None) -> int:
    """Read until the server closes; its close code (frames read on the way go to ``seen``)."""
    with pytest.raises(ConnectionClosed) as caught:
        await read_all(conn, seen if seen is not None else [])
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code


async def disconnects(sessions: FakeSessionService, session_id: str) -> list[dict[str, Any]]:
    return [
        dict(c.data)
        for c in sessions.commands
        if c.subject == session_id and c.type == "runner.disconnect"
    ]


async def wait_for_disconnect(sessions: FakeSessionService, session_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while not (found := await disconnects(sessions, session_id)):
            await sessions.took("runner.disconnect")
            await asyncio.sleep(0.02)
    return found[0]


async def test_runner_follows_its_session(
    keys: FakeKeys,
    sessions: FakeSessionService,
    alice: ShoalClient,
    gateway: RunningGateway,
    http: httpx.AsyncClient,
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    runner = await open_runner(gateway, created.id, created.runner_token)

    first = await alice.submit_prompt(created.id, "one")
    assert (await next_of(runner, "prompt"))["prompt_id"] == first.prompt_id
    assert (await http.post(f"/v1/sessions/{created.id}/abort", json={})).status_code == 202
    assert await next_of(runner, "abort") == {"type": "abort", "prompt_id": first.prompt_id}

    second = await alice.submit_prompt(created.id, "two")
    assert (await next_of(runner, "prompt"))["prompt_id"] == second.prompt_id
    await runner.send(
        json.dumps({"type": "question", "id": 7, "content": "sure?", "options": ["y", "n"]})
    )
    accepted = await next_of(runner, "question.accepted")
    assert accepted["ref"] == 7
    question_id = accepted["question_id"]
    answered = await http.post(
        f"/v1/sessions/{created.id}/questions/{question_id}/answer", json={"answer": "y"}
    )
    assert answered.status_code == 202
    assert answered.json()["question_id"] == question_id
    assert await next_of(runner, "answer") == {
        "type": "answer",
        "question_id": question_id,
        "answer": "y",
    }

    await sessions.emit(created.id, "question.expired", {"question_id": "q_gone"})
    assert (await next_of(runner, "question.expired"))["question_id"] == "q_gone"
    await sessions.emit(
        created.id, "prompt.failed", {"prompt_id": second.prompt_id, "reason": "timeout"}
    )
    assert await next_of(runner, "abort") == {
        "type": "abort",
        "prompt_id": second.prompt_id,
        "reason": "timeout",
    }

    await runner.send(json.dumps({"type": "error", "id": "e", "prompt_id": second.prompt_id}))
    assert (await next_of(runner, "error"))["code"] == "bad_request"  # no message
    await runner.send(
        json.dumps({"type": "error", "id": "e", "prompt_id": second.prompt_id, "message": "x"})
    )
    assert (await next_of(runner, "error.accepted"))["prompt_id"] == second.prompt_id
    third = await alice.submit_prompt(created.id, "three")
    assert (await next_of(runner, "prompt"))["prompt_id"] == third.prompt_id

    assert (await http.delete(f"/v1/sessions/{created.id}")).status_code == 200
    seen: list[dict[str, Any]] = []
    assert await close_of(runner, seen) == 4410
    assert seen[-1]["type"] == "terminated"
    await asyncio.sleep(0.2)  # a disconnect would have been published at the close
    assert await disconnects(sessions, created.id) == []


async def test_takeover_closes_the_old_socket_4409(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    old = await open_runner(gateway, created.id, created.runner_token)
    new = await open_runner(gateway, created.id, created.runner_token)
    with pytest.raises(ConnectionClosed) as caught:
        await next_of(old, "never")
    assert caught.value.rcvd is not None
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4409, "replaced")
    prompt = await alice.submit_prompt(created.id, "to the new one")
    assert (await next_of(new, "prompt"))["prompt_id"] == prompt.prompt_id
    snap = await sessions.snapshot(created.id)
    assert snap is not None
    assert snap.runner_connected
    assert await disconnects(sessions, created.id) == []  # the session already knew
    await new.close()
    assert (await wait_for_disconnect(sessions, created.id))["reason"] == "closed"


async def test_hibernation_closes_1000_after_telling_the_runner(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    runner = await open_runner(gateway, created.id, created.runner_token)
    await sessions.emit(created.id, "session.status", {"status": "hibernated"})
    seen: list[dict[str, Any]] = []
    assert await close_of(runner, seen) == 1000
    assert seen[-1] == {"type": "hibernate"}
    disconnect = await wait_for_disconnect(sessions, created.id)
    assert disconnect["reason"] == "hibernated"


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "ws_runner_idle_timeout": timedelta(seconds=1.5),
            "ws_runner_heartbeat_interval": timedelta(seconds=60),
        }
    ],
)
async def test_silent_runner_is_declared_gone_and_heartbeats_are_throttled(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    prompt = await alice.submit_prompt(created.id, "work")  # dispatched as the runner connects
    url = f"{gateway.ws_url}/v1/sessions/{created.id}/runner?token={created.runner_token}"
    runner = await connect(url, compression=None)
    await next_of(runner, "prompt")
    for _ in range(20):
        await runner.send(json.dumps({"type": "heartbeat", "prompt_id": prompt.prompt_id}))
        await runner.send(
            json.dumps({"type": "message.delta", "prompt_id": prompt.prompt_id, "text": "."})
        )
    await runner.send(json.dumps({"type": "heartbeat", "prompt_id": "not an id!"}))
    assert await close_of(runner) == 1001  # then silence past the grace
    disconnect = await wait_for_disconnect(sessions, created.id)
    assert disconnect["reason"] == "heartbeat"
    beats = [c for c in sessions.commands if c.type == "runner.heartbeat"]
    assert len(beats) == 1
    assert beats[0].data["prompt_id"] == prompt.prompt_id
    snap = await sessions.snapshot(created.id)
    assert snap is not None
    assert not snap.runner_connected
    assert [p.prompt_id for p in snap.queue] == [prompt.prompt_id]  # requeued for the next


async def test_client_socket_answer_and_abort_frames(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    runner = await open_runner(gateway, created.id, created.runner_token)
    prompt = await alice.submit_prompt(created.id, "ask me")
    await next_of(runner, "prompt")
    await runner.send(json.dumps({"type": "question", "id": 1, "content": "which?"}))
    question_id = (await next_of(runner, "question.accepted"))["question_id"]

    client = await connect(
        f"{gateway.ws_url}/v1/sessions/{created.id}/ws", additional_headers=ALICE
    )
    try:
        cases: list[tuple[dict[str, Any], str, str | None]] = [
            ({"type": "answer", "question_id": "q_unknown", "answer": "a"}, "error", "not_found"),
            ({"type": "answer", "question_id": question_id}, "error", "bad_request"),
            (
                {"type": "answer", "question_id": question_id, "answer": "b"},
                "answer.accepted",
                None,
            ),
            ({"type": "answer", "question_id": question_id, "answer": "c"}, "error", "conflict"),
            ({"type": "abort", "prompt_id": 5}, "error", "bad_request"),
            ({"type": "abort"}, "abort.accepted", None),
        ]
        for n, (frame, kind, code) in enumerate(cases):
            await client.send(json.dumps({**frame, "id": n}))
            reply = await next_of(client, kind)
            assert reply["ref"] == n, (frame, reply)
            assert reply.get("code") == code, (frame, reply)
        assert (await next_of(runner, "answer"))["answer"] == "b"
        assert (await next_of(runner, "abort"))["prompt_id"] == prompt.prompt_id
    finally:
        await client.close()
        await runner.close()
