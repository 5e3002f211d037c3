"""The foundation slice end to end: five services as OS processes (``shoal run``), real
nats-server and PostgreSQL, driven through the client library the way users drive it."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from shoal.client import Event, ShoalAPIError, ShoalClient, connect_runner
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


async def _next_of(events: asyncio.Queue[Event], wanted: str, within: float = 20) -> Event:
    async with asyncio.timeout(within):
        while True:
            event = await events.get()
            if event.type == wanted:
                return event


async def test_prompt_travels_runner_to_client_and_history(fleet: FleetFactory) -> None:
    running = await fleet()
    async with ShoalClient(running.gateway_url, api_key=running.admin_key) as client:
        session = await client.create_session({"purpose": "e2e"})
        assert session.status == "idle"
        assert session.runner_token
        fetched = await client.get_session(session.id)
        assert fetched.id == session.id

        received: asyncio.Queue[Event] = asyncio.Queue()
        seen: list[int] = []

        async def read_client_socket() -> None:
            async with client.connect_session(session.id, since=0) as stream:
                async for event in stream:
                    seen.append(event.seq)
                    await received.put(event)

        async def answer_prompts() -> None:
            async with connect_runner(client.base_url, session.id, session.runner_token) as runner:
                async for prompt in runner.prompts():
                    await runner.complete(prompt.prompt_id, f"echo: {prompt.content}")

        reader = asyncio.create_task(read_client_socket())
        runner = asyncio.create_task(answer_prompts())
        try:
            await _next_of(received, "runner.connected")
            started = time.perf_counter()
            receipt = await client.submit_prompt(session.id, "hello shoal")
            completed = await _next_of(received, "message.completed")
            latency_ms = (time.perf_counter() - started) * 1000
            print(f"\nprompt -> runner reply at the client: {latency_ms:.1f} ms")
            assert completed.data["prompt_id"] == receipt.prompt_id
            assert completed.data["content"] == "echo: hello shoal"
            # Events arrive in seq order, contiguous from 1.
            assert seen == list(range(1, len(seen) + 1))

            # History comes from the PostgreSQL projection, which follows the ledger.
            async with asyncio.timeout(15):
                while True:
                    page = await client.list_messages(session.id)
                    if len(page.messages) >= 2:
                        break
                    await asyncio.sleep(0.05)
            assert [(m.role, m.content) for m in page.messages] == [
                ("user", "hello shoal"),
                ("assistant", "echo: hello shoal"),
            ]

            # A second client resuming from seq 2 gets exactly the rest, in order.
            async with client.connect_session(session.id, since=2) as stream:
                replayed = []
                async with asyncio.timeout(10):
                    async for event in stream:
                        replayed.append(event.seq)
                        if event.seq == seen[-1]:
                            break
            assert replayed == list(range(3, seen[-1] + 1))
        finally:
            for task in (reader, runner):
                task.cancel()
            await asyncio.gather(reader, runner, return_exceptions=True)


async def test_bad_input_gets_problem_json(fleet: FleetFactory) -> None:
    running = await fleet()
    auth = {"Authorization": f"Bearer {running.admin_key}"}
    async with httpx.AsyncClient(base_url=running.gateway_url, timeout=10) as http:
        cases = [
            ("POST", "/v1/sessions", {}, None, 401),  # missing key
            ("POST", "/v1/sessions", {"Authorization": "Bearer shoal_nope"}, None, 401),
            ("GET", "/v1/sessions/ses_unknown", auth, None, 404),
            ("GET", "/v1/sessions/not.a.token", auth, None, 404),
            ("POST", "/v1/sessions/ses_unknown/prompts", auth, {"content": "x"}, 404),
            ("GET", "/v1/sessions/ses_unknown/messages", auth, None, 404),
            ("GET", "/v1/nowhere", auth, None, 404),
        ]
        for method, path, headers, body, status in cases:
            response = await http.request(method, path, headers=headers, json=body)
            assert response.status_code == status, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["status"] == status

        malformed = await http.post(
            "/v1/sessions", headers={**auth, "Content-Type": "application/json"}, content=b"{nope"
        )
        assert malformed.status_code == 400
        assert malformed.headers["content-type"].startswith("application/problem+json")

        created = await http.post("/v1/sessions", headers=auth, json={"metadata": {}})
        assert created.status_code == 201
        sid = created.json()["id"]
        for body in ({}, {"content": ""}, {"content": 5}):
            response = await http.post(f"/v1/sessions/{sid}/prompts", headers=auth, json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")

        # Every service is still up and ready after the battery.
        for name, ready in (
            await _readiness({p.spec.name: p.url for p in running.processes})
        ).items():
            assert ready, f"{name} not ready after bad input"

    async with ShoalClient(running.gateway_url, api_key=running.admin_key) as client:
        with pytest.raises(ShoalAPIError) as excinfo:
            await client.get_session("ses_missing")
        assert excinfo.value.status == 404


async def _readiness(urls: dict[str, str]) -> dict[str, bool]:
    async with httpx.AsyncClient(timeout=5) as http:
        return {
            name: (await http.get(f"{url}/readyz")).status_code == 200 for name, url in urls.items()
        }
