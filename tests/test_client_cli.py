"""The client CLI against the real fleet: ``--json`` shapes are stable, settings resolve from
flags, environment or ``up.json``, errors are JSON on stderr with exit code 1, and ``sessions
watch`` follows a live session. Every command runs as ``python -m shoal.client`` in its own
process, as a user or a script would run it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from shoal.client import ShoalClient, connect_runner
from shoal.devtools.supervisor import Fleet, FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# The documented --json shapes (libs/client/README.md): exactly these members, always present.
SESSION_FIELDS = {
    "id",
    "owner",
    "status",
    "created_at",
    "updated_at",
    "metadata",
    "runner_connected",
    "current_prompt_id",
    "queued_prompts",
    "last_seq",
    "runner_token",
}
RECEIPT_FIELDS = {"prompt_id", "session_id", "status", "seq"}
KEY_FIELDS = {
    "id",
    "name",
    "owner",
    "scopes",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "key",
}
SECRET_FIELDS = {"name", "version", "created_at", "updated_at"}
EVENT_FIELDS = {"id", "type", "source", "time", "subject", "owner", "seq", "schemaversion", "data"}


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code = code
        self.stdout = stdout.decode()
        self.stderr = stderr.decode()

    def json(self) -> Any:
        assert self.code == 0, self.stderr
        return json.loads(self.stdout)


def _env(fleet: Fleet | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    if fleet is not None:
        env |= {"SHOAL_URL": fleet.gateway_url, "SHOAL_API_KEY": fleet.admin_key}
    return env | extra


async def shoal(*args: str, env: dict[str, str], stdin: bytes = b"") -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.client",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await proc.communicate(stdin)
    assert proc.returncode is not None
    return Result(proc.returncode, stdout, stderr)


def test_the_groups_are_shoal_cli_entry_points() -> None:
    found = {e.name: e for e in entry_points(group="shoal.cli")}
    assert {"sessions", "keys", "secrets", "runner"} <= set(found)
    for name in ("sessions", "keys", "secrets", "runner"):
        main = found[name].load()
        assert main(["--help"]) == 0
        assert main(["--no-such-flag"]) == 2
    sessions = found["sessions"].load()
    assert sessions(["create", "-m", "{not json", "--api-key", "k"]) == 2
    assert sessions(["create", "-m", "[1]", "--api-key", "k"]) == 2


async def test_json_outputs_are_stable(fleet: FleetFactory, tmp_path: Path) -> None:
    running = await fleet()
    env = _env(running)

    created = (await shoal("sessions", "create", "-m", '{"repo": "a/b"}', "--json", env=env)).json()
    assert set(created) == SESSION_FIELDS
    assert created["metadata"] == {"repo": "a/b"}
    assert created["runner_token"]
    session_id = created["id"]

    shown = (await shoal("sessions", "show", session_id, "--json", env=env)).json()
    assert set(shown) == SESSION_FIELDS
    assert shown["runner_token"] is None

    receipt = (await shoal("sessions", "prompt", session_id, "hello", "--json", env=env)).json()
    assert set(receipt) == RECEIPT_FIELDS
    assert receipt["status"] == "queued"

    key = (await shoal("keys", "create", "ci", "-s", "sessions", "--json", env=env)).json()
    assert set(key) == KEY_FIELDS
    assert key["key"]
    listed = (await shoal("keys", "list", "--json", env=env)).json()
    assert set(listed) == {"keys"}
    assert all(set(k) == KEY_FIELDS for k in listed["keys"])
    assert key["id"] in {k["id"] for k in listed["keys"]}
    revoked = (await shoal("keys", "revoke", key["id"], "--json", env=env)).json()
    assert revoked == {"id": key["id"], "revoked": True}

    stored = (
        await shoal("secrets", "set", "API_TOKEN", "--json", env=env, stdin=b"s3cr3t\n")
    ).json()
    assert stored == {"name": "API_TOKEN", "stored": True}
    secrets_listed = (await shoal("secrets", "list", "--json", env=env)).json()
    assert set(secrets_listed) == {"secrets"}
    assert [set(s) for s in secrets_listed["secrets"]] == [SECRET_FIELDS]
    assert "s3cr3t" not in json.dumps(secrets_listed)
    deleted = (await shoal("secrets", "rm", "API_TOKEN", "--json", env=env)).json()
    assert deleted == {"name": "API_TOKEN", "deleted": True}

    # Errors: JSON on stderr, exit code 1 (refused) or 2 (no settings).
    missing = await shoal("sessions", "show", "ses_missing", "--json", env=env)
    assert missing.code == 1
    assert missing.stdout == ""
    assert json.loads(missing.stderr)["error"] == {
        "status": 404,
        "code": "not_found",
        "detail": json.loads(missing.stderr)["error"]["detail"],
    }
    unset = await shoal(
        "sessions",
        "show",
        session_id,
        "--json",
        "--up",
        str(tmp_path / "none.json"),
        env=_env(None),
    )
    assert unset.code == 2
    assert json.loads(unset.stderr)["error"]["code"] == "bad_settings"

    # Without flags or environment, a running `shoal up`'s up.json supplies URL and key.
    up_json = tmp_path / "up.json"
    up_json.write_text(
        json.dumps({"gateway_url": running.gateway_url, "admin_key": running.admin_key})
    )
    via_up = await shoal(
        "sessions", "show", session_id, "--json", "--up", str(up_json), env=_env(None)
    )
    assert via_up.json()["id"] == session_id

    # `runner --echo` answers each prompt with its content; `prompt --wait` prints the answer.
    echo = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "shoal.client", "runner", "--session", session_id, "--echo"),
        *("--token", created["runner_token"]),
        env=env,
    )
    try:
        waited = await shoal("sessions", "prompt", session_id, "say this", "--wait", env=env)
    finally:
        echo.terminate()
        await echo.wait()
    assert waited.code == 0, waited.stderr
    assert waited.stdout == "say this\n"
    unanswered = await shoal(
        "sessions", "prompt", session_id, "anyone?", "--wait", "--timeout", "0.5", "--json", env=env
    )
    assert unanswered.code == 1
    assert json.loads(unanswered.stderr)["error"]["code"] == "timeout"

    # The runner bridge gives up at once on a refused token (4401), with exit code 1.
    refused = await shoal(
        "runner", "--session", session_id, "--token", "srt_wrong", "--echo", env=env
    )
    assert refused.code == 1
    assert "4401" in refused.stderr

    human = await shoal("sessions", "show", session_id, env=env)
    assert human.code == 0
    assert session_id in human.stdout


async def test_watch_follows_a_live_session(fleet: FleetFactory) -> None:
    running = await fleet()
    env = _env(running)
    async with ShoalClient(running.gateway_url, running.admin_key) as client:
        session = await client.create_session()
        assert session.runner_token
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.client",
            "sessions",
            "watch",
            session.id,
            "--json",
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert watcher.stdout is not None
        events: list[dict[str, Any]] = []

        async def next_event() -> dict[str, Any]:
            assert watcher.stdout is not None
            event: dict[str, Any] = json.loads(await watcher.stdout.readline())
            events.append(event)
            return event

        async def until(kind: str, **data: Any) -> None:
            while True:
                event = await next_event()
                if event["type"] == kind and all(
                    event["data"].get(k) == v for k, v in data.items()
                ):
                    return

        try:
            async with asyncio.timeout(60):
                await until("session.created")  # the history first, then live
                async with connect_runner(
                    running.gateway_url, session.id, session.runner_token
                ) as runner:
                    await until("runner.connected")
                    for n in range(3):
                        receipt = await client.submit_prompt(session.id, f"live {n}")
                        prompt = await anext(runner.prompts())
                        await runner.complete(prompt.prompt_id, f"answer {n}")
                        await until("message.completed", prompt_id=receipt.prompt_id)
        finally:
            watcher.terminate()
            await watcher.wait()

        assert all(set(e) == EVENT_FIELDS for e in events)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        answers = [e["data"]["content"] for e in events if e["type"] == "message.completed"]
        assert answers == ["answer 0", "answer 1", "answer 2"]

        # The owner's user stream over SSE carries the same events, in the session's order.
        async with asyncio.timeout(30), client.stream_events() as user_events:
            followed = []
            async for event in user_events:
                followed.append(event.seq)
                if len(followed) == len(events):
                    break
        assert followed == [e["seq"] for e in events]
        assert user_events.last_seq > 0

        # --sse follows the same events over server-sent events.
        over_sse = await shoal(
            "sessions",
            "watch",
            session.id,
            "--sse",
            "--json",
            "--max-events",
            str(len(events)),
            env=env,
        )
        assert [json.loads(line) for line in over_sse.stdout.splitlines()] == events

        # The live view (rich) ends after --max-events and shows what it followed.
        human = await shoal(
            "sessions", "watch", session.id, "--max-events", str(len(events)), env=env
        )
        assert human.code == 0, human.stderr
        assert "message.completed" in human.stdout
        assert session.id in human.stdout
