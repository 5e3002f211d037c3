"""The runner bridge (``shoal runner … -- CMD``) on the real fleet: an echo agent answers 100
prompts while the gateway is killed and restarted in the middle, and nothing is lost or
answered twice (the session is followed over SSE, which resumes across the restart too);
frames the bridge has no rule for pass through both ways."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import pytest

from shoal.client import Event, Message, ShoalClient
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMPTS = 100
RESTART_AFTER = 40  # completions seen before the gateway is killed


async def test_bridge_loses_nothing_across_a_gateway_restart(fleet: FleetFactory) -> None:
    running = await fleet()
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session = await client.create_session({"purpose": "bridge"})
        assert session.runner_token
        bridge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.client",
            "runner",
            "--session",
            session.id,
            "--token",
            session.runner_token,
            "--url",
            running.gateway_url,
            "--verbose",
            "--",
            sys.executable,
            "-m",
            "shoal.client.runners.echo",
        )
        try:
            receipts = [
                await client.submit_prompt(session.id, f"prompt {n}", idempotency_key=f"p-{n}")
                for n in range(PROMPTS)
            ]
            wanted = {r.prompt_id: f"prompt {n}" for n, r in enumerate(receipts)}
            completed: list[Event] = []
            seqs: list[int] = []
            restarted = False
            started = time.monotonic()
            killed_at = ready = recovered = 0.0
            async with asyncio.timeout(180), client.stream_session(session.id) as events:
                async for event in events:
                    seqs.append(event.seq)
                    if event.type == "message.completed":
                        completed.append(event)
                        if len(completed) == RESTART_AFTER + 1:
                            recovered = time.monotonic() - killed_at
                    if len(completed) == RESTART_AFTER and not restarted:
                        restarted = True
                        killed_at = time.monotonic()
                        running["gateway"].kill()
                        await running["gateway"].wait()
                        await running["gateway"].start()
                        await running.wait_ready()
                        ready = time.monotonic() - killed_at
                    if {e.data["prompt_id"] for e in completed} >= wanted.keys():
                        break
            assert events.reconnects >= 1  # the SSE stream resumed after the restart
            print(
                f"\ngateway SIGKILLed: ready again after {ready:.1f} s, next answer after "
                f"{recovered:.1f} s; {PROMPTS} prompts in {time.monotonic() - started:.1f} s"
            )
        finally:
            bridge.terminate()
            stopped = await bridge.wait()
        assert stopped == 130  # SIGTERM stops the bridge and its agent cleanly

        per_prompt = Counter(e.data["prompt_id"] for e in completed)
        assert set(per_prompt) == set(wanted)
        assert max(per_prompt.values()) == 1  # none answered twice
        assert all(e.data["content"] == wanted[e.data["prompt_id"]] for e in completed)
        assert seqs == list(range(1, len(seqs) + 1))  # SSE: every event once, in order
        # The history is a projection into PostgreSQL, a moment behind the ledger.
        async with asyncio.timeout(30):
            while True:
                answers = await _assistant_messages(client, session.id)
                if len(answers) >= PROMPTS:
                    break
                await asyncio.sleep(0.1)  # nothing to await: the projection has no signal
        assert sorted(m.prompt_id or "" for m in answers) == sorted(wanted)


async def _assistant_messages(client: ShoalClient, session_id: str) -> list[Message]:
    answers: list[Message] = []
    after: int | None = None
    while True:
        page = await client.list_messages(session_id, after=after, limit=200)
        answers += [m for m in page.messages if m.role == "assistant"]
        if page.next is None:
            return answers
        after = page.next


# An agent that first sends two frames the bridge has no rule for, waits for the gateway's
# answers (passed through with their ref), then answers its prompt with what it received.
PASS_THROUGH_AGENT = """
import json, sys
def send(frame):
    sys.stdout.write(json.dumps(frame) + "\\n")
    sys.stdout.flush()
send({"type": "ping", "id": "p-1"})
send({"type": "no.such.frame", "id": "x-1"})
send({"type": "message.delta", "prompt_id": "prm_none"})
received, prompts = [], []
for line in sys.stdin:
    frame = json.loads(line)
    (prompts if frame["type"] == "prompt" else received).append(frame)
    if prompts and len(received) >= 3:
        seen = sorted(([f["type"], f.get("ref"), f.get("code")] for f in received), key=json.dumps)
        send({"type": "message.completed", "prompt_id": prompts[0]["prompt_id"],
              "content": json.dumps(seen)})
        break
"""


async def test_bridge_passes_other_frames_through(fleet: FleetFactory) -> None:
    running = await fleet()
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session = await client.create_session()
        assert session.runner_token
        bridge = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "shoal.client", "runner", "--session", session.id),
            *("--token", session.runner_token, "--url", running.gateway_url, "--"),
            *(sys.executable, "-c", PASS_THROUGH_AGENT),
        )
        try:
            async with client.connect_session(session.id) as events:
                receipt = await client.submit_prompt(session.id, "what did you get?")
                async with asyncio.timeout(60):
                    async for event in events:
                        if event.type == "message.completed":
                            break
            assert await bridge.wait() == 0  # the agent's exit code
        finally:
            if bridge.returncode is None:
                bridge.terminate()
                await bridge.wait()
    assert event.data["prompt_id"] == receipt.prompt_id
    assert json.loads(event.data["content"]) == [  # sorted by their JSON text
        ["error", "x-1", "bad_request"],  # the gateway: unknown frame type
        ["error", None, "bad_request"],  # the bridge: message.delta without text
        ["pong", "p-1", None],
    ]
