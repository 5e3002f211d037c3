"""The reference runner (``shoal.client.runners.openai_chat``) under the bridge on the real
fleet, against a local stub of a chat-completions endpoint: the API key comes from the
session's secret through ``secret.get``, the conversation is carried across prompts, and a
session that may not read the secret gets an ``[error]`` answer instead of a stalled prompt.
``sessions prompt --wait`` prints each answer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shoal.client import ShoalClient
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

API_KEY = "sk-test-0123456789"


class ChatStub(ThreadingHTTPServer):
    """Answers ``POST /v1/chat/completions`` with "stub: <last user message> (<n> messages)"."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (Authorization, body)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ChatHandler(BaseHTTPRequestHandler):
    server: ChatStub

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append((self.headers.get("Authorization", ""), body))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        last = body["messages"][-1]["content"]
        answer = {"choices": [{"message": {"role": "assistant", "content": f"stub: {last}"}}]}
        answer["choices"][0]["message"]["content"] += f" ({len(body['messages'])} messages)"
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def chat_stub() -> Iterator[ChatStub]:
    server = ChatStub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


async def _bridge(url: str, session_id: str, token: str, stub: ChatStub) -> Any:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "shoal.client", "runner", "--session", session_id),
        *("--token", token, "--url", url, "--"),
        *(sys.executable, "-m", "shoal.client.runners.openai_chat", "--model", "stub-1"),
        *("--base-url", stub.base_url, "--system", "be brief"),
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _ask(url: str, key: str, session_id: str, content: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "shoal.client", "sessions", "prompt", session_id, content),
        "--wait",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env | {"SHOAL_URL": url, "SHOAL_API_KEY": key},
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def test_reference_runner_answers_with_the_sessions_secret(
    fleet: FleetFactory, chat_stub: ChatStub
) -> None:
    running = await fleet()
    url, key = running.gateway_url, running.admin_key
    async with ShoalClient(url, key) as client:
        await client.put_secret("OPENAI_API_KEY", API_KEY)
        allowed = await client.create_session({"allowed_secrets": ["OPENAI_API_KEY"]})
        refused = await client.create_session()
        assert allowed.runner_token
        assert refused.runner_token
        bridges = [
            await _bridge(url, allowed.id, allowed.runner_token, chat_stub),
            await _bridge(url, refused.id, refused.runner_token, chat_stub),
        ]
        try:
            first = await _ask(url, key, allowed.id, "hello")
            second = await _ask(url, key, allowed.id, "and again")
            denied = await _ask(url, key, refused.id, "hello")
        finally:
            for bridge in bridges:
                bridge.terminate()
                await bridge.wait()

    assert set(first) == {"prompt", "event"}
    assert first["event"]["type"] == "message.completed"
    assert first["event"]["data"]["prompt_id"] == first["prompt"]["prompt_id"]
    # system + user, then system + user + assistant + user: the conversation is carried.
    assert first["event"]["data"]["content"] == "stub: hello (2 messages)"
    assert second["event"]["data"]["content"] == "stub: and again (4 messages)"
    assert [auth for auth, _ in chat_stub.calls] == [f"Bearer {API_KEY}"] * 2
    assert chat_stub.calls[0][1]["model"] == "stub-1"
    assert denied["event"]["data"]["content"].startswith("[error] secret 'OPENAI_API_KEY'")
