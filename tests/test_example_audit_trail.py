"""examples/audit_trail against the real fleet: every event of a 400-prompt run lands in the
trail exactly once, although the consumer is SIGKILLed mid-run and started again."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from shoal.client import ShoalClient
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "audit_trail" / "audit_trail.py"
SESSIONS = 10
PROMPTS_PER_SESSION = 40


def read_trail(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    complete = path.read_bytes().rpartition(b"\n")[0]
    return [json.loads(line) for line in complete.splitlines()]


async def start_consumer(out: Path, nats_url: str, prefix: str) -> asyncio.subprocess.Process:
    with (out.parent / "audit_trail.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--out", str(out), "--nats-url", nats_url,
            "--prefix", prefix, stdout=log, stderr=log,
        )  # fmt: skip


async def until_lines(path: Path, count: int, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            if len(read_trail(path)) >= count:
                return
            await asyncio.sleep(0.1)  # the trail is a file: nothing to await but its growth


async def test_every_event_once_across_a_consumer_restart(
    fleet: FleetFactory, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    running = await fleet()
    out = tmp_path / "audit.jsonl"
    consumer = await start_consumer(out, nats_url, subject_prefix)
    runners: list[asyncio.subprocess.Process] = []
    try:
        async with ShoalClient(running.gateway_url, running.admin_key) as client:
            sessions = [await client.create_session({"n": n}) for n in range(SESSIONS)]
            for session in sessions:  # the echo runner bridge: it reconnects and resends
                runners.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "shoal.client",
                        "runner",
                        "--echo",
                        "--url",
                        running.gateway_url,
                        "--session",
                        session.id,
                        "--token",
                        session.runner_token or "",
                    )  # fmt: skip
                )

            async def submit(session_id: str) -> None:
                for n in range(PROMPTS_PER_SESSION):
                    await client.submit_prompt(session_id, f"p{n}", idempotency_key=f"p{n}")

            started = time.monotonic()
            submitting = asyncio.gather(*(submit(s.id) for s in sessions))
            await until_lines(out, 600, within=240)
            consumer.kill()  # SIGKILL mid-run: unacked events come back to the next process
            await consumer.wait()
            killed_at = len(read_trail(out))
            consumer = await start_consumer(out, nats_url, subject_prefix)
            await submitting

            async with asyncio.timeout(300):  # every prompt answered: the ledgers are final
                while True:
                    states = [await client.get_session(s.id) for s in sessions]
                    if all(s.queued_prompts == 0 and s.current_prompt_id is None for s in states):
                        break
                    await asyncio.sleep(0.2)
            expected = {s.id: s.last_seq for s in states}
            await until_lines(out, sum(expected.values()), within=180)
            took = time.monotonic() - started
    finally:
        for runner in runners:
            runner.kill()
            await runner.wait()
        consumer.kill()
        await consumer.wait()

    trail = read_trail(out)
    written = Counter((str(e["subject"]), int(str(e["seq"]))) for e in trail)
    seqs: dict[str, set[int]] = {sid: set() for sid in expected}
    for sid, seq in written:
        seqs[sid].add(seq)
    completed = sum(1 for e in trail if e["type"] == "message.completed")
    print(
        f"\naudit trail: {len(trail)} events of {SESSIONS * PROMPTS_PER_SESSION} prompts, "
        f"consumer SIGKILLed after {killed_at}; all written {took:.0f} s after the first prompt"
    )
    assert completed == SESSIONS * PROMPTS_PER_SESSION
    # Every seq up to the ledger's end, none missing (the runners' disconnects at teardown may
    # have added a few more since), and each exactly once.
    for sid, last in expected.items():
        assert seqs[sid] == set(range(1, max(seqs[sid]) + 1)), f"{sid}: lost events"
        assert max(seqs[sid]) >= last, f"{sid}: lost events"
    assert max(written.values()) == 1, "duplicated events"
