"""The session verbs through real sockets, on the fleet as OS processes (real NATS, PostgreSQL,
scheduler): runner takeover and a SIGKILLed runner, questions, runner errors, terminate,
hibernation and tag streams. Runners are plain WebSocket connections (one is a process of its
own, to be SIGKILLed); assertions on the ledger read ``GET /v1/sessions/{id}/events``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.devtools.supervisor import Fleet, FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# A runner as a process of its own: prints every frame it gets, one per line.
RUNNER_PROCESS = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main():
    async with connect(sys.argv[1], compression=None) as conn:
        async for frame in conn:
            print(frame, flush=True)

asyncio.run(main())
"""


@pytest.fixture
async def running(fleet: FleetFactory) -> Fleet:
    return await fleet()


@pytest.fixture
async def api(running: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {running.admin_key}"}
    async with httpx.AsyncClient(base_url=running.gateway_url, headers=headers, timeout=15) as c:
        yield c


async def create(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def prompt(api: httpx.AsyncClient, session_id: str, content: str) -> str:
    response = await api.post(f"/v1/sessions/{session_id}/prompts", json={"content": content})
    assert response.status_code == 202, response.text
    return str(response.json()["prompt_id"])


async def ledger(api: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await api.get(f"/v1/sessions/{session_id}/events", params={"after": after})
        assert page.status_code == 200, page.text
        events += page.json()["events"]
        if page.json()["next"] is None:
            return events
        after = page.json()["next"]


def ws_url(running: Fleet, path: str) -> str:
    return running.gateway_url.replace("http://", "ws://") + path


async def runner(running: Fleet, session: dict[str, Any]) -> tuple[ClientConnection, str]:
    """A runner socket and its connection id (from ``hello.ack``)."""
    url = ws_url(running, f"/v1/sessions/{session['id']}/runner?token={session['runner_token']}")
    conn = await connect(url, compression=None)
    await conn.send(json.dumps({"type": "hello", "id": "h"}))
    frames: list[dict[str, Any]] = []
    ack = await next_of(conn, "hello.ack", frames)
    conn.early = frames  # type: ignore[attr-defined] - frames that came before the ack
    return conn, str(ack["connection_id"])


async def next_of(
    conn: ClientConnection, kind: str, skipped: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The next frame of type ``kind`` (frames of other types go to ``skipped``)."""
    for frame in getattr(conn, "early", []):
        if frame["type"] == kind:
            conn.early.remove(frame)  # type: ignore[attr-defined]
            return dict(frame)
    while True:
        frame = json.loads(await asyncio.wait_for(conn.recv(), 30))
        if frame["type"] == kind:
            return dict(frame)
        if skipped is not None:
            skipped.append(frame)


async def close_of(conn: ClientConnection) -> tuple[int, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed) as caught:
        await next_of(conn, "never", seen)
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code, caught.value.rcvd.reason, seen


async def until(check: Any, within: float = 30) -> None:
    """Poll the HTTP API until ``check()`` is true (state another process changes)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polling the HTTP API
            await asyncio.sleep(0.05)


async def test_takeover_race_and_sigkilled_runner(running: Fleet, api: httpx.AsyncClient) -> None:
    session = await create(api)
    sid = session["id"]
    c1, cid1 = await runner(running, session)
    c2, cid2 = await runner(running, session)
    code, reason, _ = await close_of(c1)
    assert (code, reason) == (4409, "replaced")
    await c1.close()  # the old connection's late close changes nothing
    first = await prompt(api, sid, "after the race")
    assert (await next_of(c2, "prompt"))["prompt_id"] == first
    state = (await api.get(f"/v1/sessions/{sid}")).json()
    assert state["runner_connected"] is True
    disconnected = [e for e in await ledger(api, sid) if e["type"] == "runner.disconnected"]
    assert [e["data"] for e in disconnected] == [{"connection_id": cid1, "reason": "replaced"}]
    await c2.close()

    # A runner process SIGKILLed mid-prompt: the prompt goes once more, to the next runner.
    url = ws_url(running, f"/v1/sessions/{sid}/runner?token={session['runner_token']}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUNNER_PROCESS, url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while True:
                frame = json.loads(await proc.stdout.readline())
                if frame["type"] == "prompt":
                    break
        assert frame["prompt_id"] == first  # requeued when c2 closed, dispatched again
        proc.kill()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    c3, cid3 = await runner(running, session)
    assert (await next_of(c3, "prompt"))["prompt_id"] == first
    await c3.send(json.dumps({"type": "message.completed", "prompt_id": first, "content": "ok"}))
    await next_of(c3, "message.accepted")
    events = await ledger(api, sid)
    dispatches = [e for e in events if e["type"] == "prompt.dispatched"]
    assert [e["data"]["prompt_id"] for e in dispatches] == [first] * 3  # c2, the process, c3
    connected = next(
        e for e in events if e["type"] == "runner.connected" and e["data"]["connection_id"] == cid3
    )
    assert dispatches[-1]["seq"] > connected["seq"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    await c3.close()


async def test_questions_errors_terminate_and_watchdog(
    running: Fleet, api: httpx.AsyncClient
) -> None:
    session = await create(api)
    sid = session["id"]
    conn, _ = await runner(running, session)
    client = await connect(
        ws_url(running, f"/v1/sessions/{sid}/ws"),
        additional_headers={"Authorization": f"Bearer {running.admin_key}"},
        compression=None,
    )
    try:
        first = await prompt(api, sid, "ask me things")
        await next_of(conn, "prompt")
        # Answered over HTTP; a second answer 409, an unknown question 404.
        await conn.send(json.dumps({"type": "question", "id": 1, "content": "colour?"}))
        q1 = (await next_of(conn, "question.accepted"))["question_id"]
        answer_url = f"/v1/sessions/{sid}/questions/{q1}/answer"
        assert (await api.post(answer_url, json={"answer": "blue"})).status_code == 202
        assert (await next_of(conn, "answer"))["answer"] == "blue"
        assert (await api.post(answer_url, json={"answer": "red"})).status_code == 409
        unknown = f"/v1/sessions/{sid}/questions/q_unknown/answer"
        assert (await api.post(unknown, json={"answer": "x"})).status_code == 404
        # Answered over the client socket.
        await conn.send(json.dumps({"type": "question", "id": 2, "content": "size?"}))
        q2 = (await next_of(conn, "question.accepted"))["question_id"]
        await client.send(
            json.dumps({"type": "answer", "id": "a", "question_id": q2, "answer": "L"})
        )
        assert (await next_of(client, "answer.accepted"))["ref"] == "a"
        assert (await next_of(conn, "answer"))["answer"] == "L"
        # Expiry (the scheduler's durable timer) reaches the runner and the client.
        await conn.send(
            json.dumps({"type": "question", "id": 3, "content": "quick?", "expires_in": 1})
        )
        q3 = (await next_of(conn, "question.accepted"))["question_id"]
        assert (await next_of(conn, "question.expired"))["question_id"] == q3
        while True:
            event = (await next_of(client, "event"))["event"]
            if event["type"] == "question.expired":
                break
        assert event["data"]["question_id"] == q3

        # A runner error fails the prompt; the next one goes on.
        second = await prompt(api, sid, "queued behind")
        await conn.send(
            json.dumps({"type": "error", "id": "e", "prompt_id": first, "message": "boom"})
        )
        early: list[dict[str, Any]] = []  # the next prompt may come before the reply
        assert (await next_of(conn, "error.accepted", early))["prompt_id"] == first
        prompts = [f for f in early if f["type"] == "prompt"] or [await next_of(conn, "prompt")]
        assert [f["prompt_id"] for f in prompts] == [second]
        failed = [e for e in await ledger(api, sid) if e["type"] == "prompt.failed"]
        assert [(e["data"]["prompt_id"], e["data"]["reason"]) for e in failed] == [
            (first, "runner_error")
        ]

        # Terminate: the runner is told and closed 4410; a prompt afterwards is refused.
        assert (await api.delete(f"/v1/sessions/{sid}")).status_code == 200
        code, _, seen = await close_of(conn)
        assert code == 4410
        assert seen[-1]["type"] == "terminated"
        refused = await api.post(f"/v1/sessions/{sid}/prompts", json={"content": "late"})
        assert refused.status_code == 409
        assert refused.headers["content-type"].startswith("application/problem+json")
    finally:
        await client.close()
        await conn.close()

    # The watchdog (a durable timer): a silent runner's prompt fails; the runner is told.
    quiet = await create(api, prompt_timeout=1)
    silent, _ = await runner(running, quiet)
    try:
        stuck = await prompt(api, quiet["id"], "no answer will come")
        await next_of(silent, "prompt")
        abort = await next_of(silent, "abort")
        assert abort == {"type": "abort", "prompt_id": stuck, "reason": "timeout"}
    finally:
        await silent.close()


async def test_hibernation_wakes_on_a_prompt_and_tag_stream_resumes(
    running: Fleet, api: httpx.AsyncClient
) -> None:
    headers = {"Authorization": f"Bearer {running.admin_key}"}
    tag_url = ws_url(running, "/v1/events/ws?tag=e2e-team")
    follower = await connect(tag_url, additional_headers=headers, compression=None)
    session = await create(api, idle_timeout=1, tags=["e2e-team"])
    sid = session["id"]
    conn, _ = await runner(running, session)
    code, _, seen = await close_of(conn)  # idle for 1 s: hibernated
    assert code == 1000
    assert seen[-1] == {"type": "hibernate"}

    async def hibernated() -> bool:
        state = (await api.get(f"/v1/sessions/{sid}")).json()
        return bool(state["status"] == "hibernated" and not state["runner_connected"])

    await until(hibernated)
    woken = await prompt(api, sid, "wake up")  # no error: it wakes
    again, _ = await runner(running, session)
    assert (await next_of(again, "prompt"))["prompt_id"] == woken
    await again.close()

    # The tag stream saw the session's events; a reconnect after any position loses nothing.
    events = await ledger(api, sid)
    seen_frames: list[dict[str, Any]] = []
    while len(seen_frames) < 3:
        seen_frames.append(await next_of(follower, "event"))
    await follower.close()
    resume = seen_frames[1]["seq"]
    follower = await connect(f"{tag_url}&since={resume}", additional_headers=headers)
    try:
        rest = [seen_frames[0], seen_frames[1]]
        while len(rest) < len(events):
            rest.append(await next_of(follower, "event"))
    finally:
        await follower.close()
    assert [f["event"]["id"] for f in rest] == [e["id"] for e in events]
    positions = [f["seq"] for f in rest]
    assert positions == sorted(set(positions))
