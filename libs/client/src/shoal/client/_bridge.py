"""The runner bridge: an agent process's stdin/stdout, as JSON lines, to its session's runner
socket, so an agent in any language becomes a runner without WebSocket code.

The bridge holds the socket (reconnecting by itself with backoff, re-sending completions the
gateway had not acknowledged) and hands each prompt to the agent once. Frames, one JSON object
per line (the README's "Runner bridge" section is the contract):

- to the agent (stdin): ``prompt {prompt_id, content}``; ``message.accepted {prompt_id,
  message_id, ref?}`` once a completion is recorded; ``secret {name, value, ref?}``;
  ``error {code, message, ref?, prompt_id?}``.
- from the agent (stdout): ``message.completed {prompt_id, content, message_id?, id?}``;
  ``message.delta {prompt_id, text, …}``; ``secret.get {name, id?}``.
- Any other frame passes through as it is, both ways (the gateway's answer to an agent's frame
  with an ``id`` carries it back as ``ref``). A stdout line that is not a JSON object is logged
  and skipped; the agent's stderr is passed through.

Example::

    bridge = RunnerBridge(gateway_url, session_id, runner_token, ["python", "agent.py"])
    exit_code = await bridge.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Coroutine, Sequence
from typing import Any

import stamina
from websockets.exceptions import InvalidHandshake

from shoal.client._errors import ShoalAPIError, ShoalConnectionClosed
from shoal.client._models import Prompt
from shoal.client._ws import (
    FATAL_CLOSE_CODES,
    FATAL_HTTP_STATUSES,
    RunnerConnection,
    connect_runner,
)

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 4 * 1024 * 1024  # an agent's stdout line (a completion, base64 and all)
EXIT_RUNNER_REFUSED = 1


class RunnerBridge:
    """Runs ``command`` (or, with ``command=None``, echoes every prompt) as the session's runner.

    ``run()`` returns the agent's exit code, or 1 when the gateway refuses the runner for good
    (a bad token 4401, an unknown session 4404, a terminated one 4409 or 4410, replaced by
    another runner 4409).
    """

    def __init__(
        self,
        base_url: str,
        session_id: str,
        runner_token: str,
        command: Sequence[str] | None,
        *,
        ack_timeout: float = 15.0,
    ) -> None:
        self._base_url = base_url
        self._session_id = session_id
        self._token = runner_token
        self._command = list(command) if command else None
        self._ack_timeout = ack_timeout
        self._forwarded: set[str] = set()  # prompt ids the agent was given (once each)
        self._stdin_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._agent: asyncio.subprocess.Process | None = None
        self._passed_ids: set[str] = set()  # ids of agent frames passed through to the socket

    async def run(self) -> int:
        try:
            runner = await self._connect()
        except ShoalConnectionClosed as exc:
            log.error("the gateway refused the runner: %s", exc)
            return EXIT_RUNNER_REFUSED
        try:
            if self._command is None:
                return await self._echo(runner)
            return await self._bridge(runner, self._command)
        except ShoalConnectionClosed as exc:
            log.error("the gateway refused the runner: %s", exc)
            return EXIT_RUNNER_REFUSED
        finally:
            await runner.aclose()

    async def _connect(self) -> RunnerConnection:
        """The first connection, retried while the gateway is away (not when it refuses)."""
        async for attempt in stamina.retry_context(
            on=_worth_retrying, attempts=None, timeout=None, wait_max=5.0
        ):
            with attempt:
                return await connect_runner(
                    self._base_url,
                    self._session_id,
                    self._token,
                    ack_timeout=self._ack_timeout,
                    on_frame=self._from_gateway,
                )
        raise AssertionError("unreachable: retry_context raises its last error")

    async def _echo(self, runner: RunnerConnection) -> int:
        async for prompt in runner.prompts():
            if self._first_time(prompt):
                await self._complete(runner, prompt.prompt_id, prompt.content, None)
        return 0

    async def _bridge(self, runner: RunnerConnection, command: list[str]) -> int:
        agent = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_LINE_BYTES,
        )
        self._agent = agent
        feeding = asyncio.create_task(self._feed(runner, agent))
        try:
            await self._read_agent(runner, agent)
            if self._tasks:  # completions still waiting for their acknowledgement
                await asyncio.gather(*self._tasks)
            if feeding.done():
                feeding.result()  # a refused runner surfaces here
            return await agent.wait()
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError, ShoalConnectionClosed):
                await feeding
            if agent.returncode is None:
                agent.terminate()
                await agent.wait()

    async def _feed(self, runner: RunnerConnection, agent: asyncio.subprocess.Process) -> None:
        """Prompts to the agent's stdin; a refused runner stops the agent."""
        try:
            async for prompt in runner.prompts():
                if self._first_time(prompt):
                    frame = {
                        "type": "prompt",
                        "prompt_id": prompt.prompt_id,
                        "content": prompt.content,
                    }
                    await self._to_agent(agent, frame)
        except ShoalConnectionClosed:
            if agent.returncode is None:
                agent.terminate()
            raise

    async def _read_agent(
        self, runner: RunnerConnection, agent: asyncio.subprocess.Process
    ) -> None:
        assert agent.stdout is not None
        while line := await agent.stdout.readline():
            try:
                frame = json.loads(line)
            except ValueError:
                log.warning("agent wrote a line that is not JSON; skipped")
                continue
            if not isinstance(frame, dict):
                log.warning("agent wrote JSON that is not an object; skipped")
                continue
            self._spawn(self._handle(runner, agent, frame))

    async def _handle(
        self, runner: RunnerConnection, agent: asyncio.subprocess.Process, frame: dict[str, Any]
    ) -> None:
        kind = frame.get("type")
        if kind == "message.completed":
            await self._on_completed(runner, agent, frame)
        elif kind == "message.delta":
            await self._on_delta(runner, agent, frame)
        elif kind == "secret.get":
            await self._on_secret_get(runner, agent, frame)
        else:
            if "id" in frame:
                self._passed_ids.add(str(frame["id"]))
            await runner.send(frame)

    async def _on_completed(
        self, runner: RunnerConnection, agent: asyncio.subprocess.Process, frame: dict[str, Any]
    ) -> None:
        prompt_id, content = frame.get("prompt_id"), frame.get("content")
        message_id = frame.get("message_id")
        if not isinstance(prompt_id, str) or not isinstance(content, str):
            await self._refuse(agent, frame, "message.completed needs prompt_id and content")
            return
        if message_id is not None and not isinstance(message_id, str):
            await self._refuse(agent, frame, "message_id must be a string")
            return
        try:
            message_id = await self._complete(runner, prompt_id, content, message_id)
        except ShoalAPIError as exc:
            await self._to_agent(agent, _error(frame, exc.code, exc.detail, prompt_id))
            return
        accepted = {"type": "message.accepted", "prompt_id": prompt_id, "message_id": message_id}
        await self._to_agent(agent, _reply(frame, accepted))

    async def _on_delta(
        self, runner: RunnerConnection, agent: asyncio.subprocess.Process, frame: dict[str, Any]
    ) -> None:
        prompt_id, text = frame.get("prompt_id"), frame.get("text")
        if not isinstance(prompt_id, str) or not isinstance(text, str):
            await self._refuse(agent, frame, "message.delta needs prompt_id and text")
            return
        extra = {k: v for k, v in frame.items() if k not in ("type", "prompt_id", "text")}
        await runner.send_delta(prompt_id, text, **extra)

    async def _on_secret_get(
        self, runner: RunnerConnection, agent: asyncio.subprocess.Process, frame: dict[str, Any]
    ) -> None:
        name = frame.get("name")
        if not isinstance(name, str):
            await self._refuse(agent, frame, "secret.get needs a name")
            return
        try:
            value = await runner.get_secret(name)
        except ShoalAPIError as exc:
            await self._to_agent(agent, _error(frame, exc.code, exc.detail))
            return
        except TimeoutError:
            await self._to_agent(agent, _error(frame, "timeout", "no answer from the gateway"))
            return
        await self._to_agent(agent, _reply(frame, {"type": "secret", "name": name, "value": value}))

    async def _complete(
        self, runner: RunnerConnection, prompt_id: str, content: str, message_id: str | None
    ) -> str:
        """Record the answer, however long the gateway is away: the same ``message_id`` on
        every try, so the session records it once."""
        message_id = message_id or f"msg_{secrets.token_hex(12)}"
        while True:
            try:
                return await runner.complete(prompt_id, content, message_id=message_id)
            except TimeoutError:
                log.info("no acknowledgement for %s yet; sending it again", message_id)

    def _from_gateway(self, frame: dict[str, Any]) -> None:
        """A socket frame the connection does not handle itself: to the agent, unless it is an
        answer nobody here waits for any more (a keepalive's pong, a late acknowledgement)."""
        kind, ref = frame.get("type"), frame.get("ref")
        if kind in ("message.accepted", "secret") or (kind == "pong" and ref is None):
            return
        if ref is not None:
            if str(ref) not in self._passed_ids:
                return
            self._passed_ids.discard(str(ref))
        if self._agent is None:
            log.info("a %s frame came before the agent started; dropped", kind)
            return
        self._spawn(self._to_agent(self._agent, frame))

    def _first_time(self, prompt: Prompt) -> bool:
        # The session sends the running prompt again to a runner that reconnects.
        if prompt.prompt_id in self._forwarded:
            return False
        self._forwarded.add(prompt.prompt_id)
        return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refuse(
        self, agent: asyncio.subprocess.Process, frame: dict[str, Any], message: str
    ) -> None:
        await self._to_agent(agent, _error(frame, "bad_request", message))

    async def _to_agent(self, agent: asyncio.subprocess.Process, frame: dict[str, Any]) -> None:
        assert agent.stdin is not None
        line = json.dumps(frame, ensure_ascii=False).encode() + b"\n"
        async with self._stdin_lock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                agent.stdin.write(line)
                await agent.stdin.drain()


def _worth_retrying(exc: Exception) -> bool:
    if isinstance(exc, ShoalConnectionClosed):  # a refusal, or a 502/503 during a restart
        return exc.code not in FATAL_CLOSE_CODES and exc.code not in FATAL_HTTP_STATUSES
    return isinstance(exc, (OSError, TimeoutError, InvalidHandshake))


def _reply(request: dict[str, Any], frame: dict[str, Any]) -> dict[str, Any]:
    """``frame``, carrying the request's ``id`` back as ``ref`` when it had one."""
    if "id" in request:
        frame["ref"] = request["id"]
    return frame


def _error(
    request: dict[str, Any], code: str, message: str, prompt_id: str | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if prompt_id is not None:
        frame["prompt_id"] = prompt_id
    return _reply(request, frame)
