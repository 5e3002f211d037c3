"""A reference agent for the runner bridge: answers prompts with an OpenAI-compatible
chat-completions endpoint, keeping the conversation across prompts.

The API key never touches the command line or the environment: the agent asks the bridge for
the session's secret (``secret.get``), which the session may read only if its
``metadata.allowed_secrets`` names it. Run it under the bridge::

    shoal secrets set OPENAI_API_KEY            # value from stdin
    shoal sessions create -m '{"allowed_secrets": ["OPENAI_API_KEY"]}'
    shoal runner --session ID --token T -- python -m shoal.client.runners.openai_chat \\
        --model gpt-4o-mini --base-url https://api.openai.com/v1

A failed call is answered with a one-line ``[error] …`` message, so the session goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import deque
from typing import Any, TextIO

import httpx
import stamina

log = logging.getLogger("shoal.client.runners.openai_chat")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
KEY_REQUEST_REF = "api-key"


class AgentError(Exception):
    """The endpoint could not answer (the prompt is answered with the reason)."""


class BridgeLink:
    """Frames from and to the bridge, one JSON object per line on stdin / stdout."""

    def __init__(self, reader: TextIO, writer: TextIO) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: deque[dict[str, Any]] = deque()  # prompts read while waiting for a reply

    def send(self, frame: dict[str, Any]) -> None:
        self._writer.write(json.dumps(frame, ensure_ascii=False) + "\n")
        self._writer.flush()

    def next_prompt(self) -> dict[str, Any] | None:
        """The next prompt frame, or None when the bridge closed stdin."""
        if self._pending:
            return self._pending.popleft()
        while (frame := self._read()) is not None:
            if frame.get("type") == "prompt":
                return frame
        return None

    def request(self, frame: dict[str, Any], ref: str) -> dict[str, Any]:
        """Send ``frame`` (with ``id`` = ``ref``) and return the answer carrying ``ref``."""
        self.send({**frame, "id": ref})
        while (answer := self._read()) is not None:
            if answer.get("ref") == ref:
                return answer
            if answer.get("type") == "prompt":
                self._pending.append(answer)
        raise AgentError("the bridge closed before it answered")

    def _read(self) -> dict[str, Any] | None:
        line = self._reader.readline()
        if not line:
            return None
        frame = json.loads(line)
        return frame if isinstance(frame, dict) else {}


class ChatAgent:
    """One conversation with the endpoint: every prompt and answer so far is sent each time."""

    def __init__(
        self, link: BridgeLink, http: httpx.Client, model: str, secret: str, system: str | None
    ) -> None:
        self._link = link
        self._http = http
        self._model = model
        self._secret = secret
        self._api_key: str | None = None
        self._messages: list[dict[str, str]] = []
        if system:
            self._messages.append({"role": "system", "content": system})

    def serve(self) -> None:
        while (prompt := self._link.next_prompt()) is not None:
            try:
                answer = self.answer(str(prompt.get("content", "")))
            except AgentError as exc:
                log.warning("prompt %s failed: %s", prompt.get("prompt_id"), exc)
                answer = f"[error] {exc}"
            self._link.send(
                {"type": "message.completed", "prompt_id": prompt["prompt_id"], "content": answer}
            )

    def answer(self, content: str) -> str:
        messages = [*self._messages, {"role": "user", "content": content}]
        reply = self._complete(messages)
        self._messages = [*messages, {"role": "assistant", "content": reply}]
        return reply

    def _key(self) -> str:
        if self._api_key is None:
            answer = self._link.request(
                {"type": "secret.get", "name": self._secret}, KEY_REQUEST_REF
            )
            if answer.get("type") != "secret" or not isinstance(answer.get("value"), str):
                raise AgentError(f"secret {self._secret!r}: {answer.get('message', 'refused')}")
            self._api_key = answer["value"]
        return self._api_key

    def _complete(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self._model, "messages": messages}
        headers = {"Authorization": f"Bearer {self._key()}"}
        try:
            for attempt in stamina.retry_context(on=_retryable, attempts=4, timeout=120.0):
                with attempt:
                    response = self._http.post("/chat/completions", json=body, headers=headers)
                    response.raise_for_status()
        except httpx.HTTPError as exc:
            raise AgentError(str(exc)) from exc
        try:
            return str(response.json()["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise AgentError("the endpoint's answer has no choices[0].message.content") from exc


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in RETRY_STATUSES
    return isinstance(exc, (httpx.NetworkError, httpx.TimeoutException))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.client.runners.openai_chat", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="the model name the endpoint expects")
    parser.add_argument(
        "--base-url",
        default="https://api.openai.com/v1",
        help="the endpoint's base URL, up to /chat/completions (default: %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default="OPENAI_API_KEY",
        help="the session secret holding the API key (default: %(default)s)",
    )
    parser.add_argument("--system", help="a system prompt opening the conversation")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="openai_chat: %(levelname)s %(message)s")
    link = BridgeLink(sys.stdin, sys.stdout)
    with httpx.Client(base_url=args.base_url.rstrip("/"), timeout=args.timeout) as http:
        ChatAgent(link, http, args.model, args.secret, args.system).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
