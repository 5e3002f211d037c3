"""The client's HTTP retry policy: which requests are repeated, on which answers.

Pure client logic, so the gateway is an httpx ``MockTransport`` answering a scripted sequence;
stamina's test mode keeps the attempts but skips the waits.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import stamina

from shoal.client import NO_RETRY, RetryPolicy, ShoalAPIError, ShoalClient

SESSION = {
    "id": "ses_1",
    "owner": "u",
    "status": "idle",
    "created_at": "2026-01-01T00:00:00Z",
}
RECEIPT = {"prompt_id": "prm_1", "session_id": "ses_1", "status": "queued"}


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=10, cap=True):
        yield


class Script:
    """Answers requests from a list of outcomes (a status with a body, or an exception)."""

    def __init__(self, *outcomes: tuple[int, object] | Exception) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        status, body = outcome
        headers = {"Retry-After": "0"} if status == 429 else {}
        if status >= 400:
            problem = {"status": status, "code": "unavailable", "detail": "busy"}
            return httpx.Response(
                status,
                json=problem,
                headers={**headers, "content-type": "application/problem+json"},
            )
        return httpx.Response(status, json=body, headers=headers)


def _client(script: Script, retry: RetryPolicy | None = None) -> ShoalClient:
    return ShoalClient(
        "http://gateway.test",
        "key",
        transport=httpx.MockTransport(script),
        **({"retry": retry} if retry is not None else {}),
    )


async def test_a_get_is_retried_on_503_429_and_connection_errors() -> None:
    script = Script(
        (503, None),
        (429, None),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        (200, SESSION),
    )
    async with _client(script) as client:
        session = await client.get_session("ses_1")
    assert session.id == "ses_1"
    assert len(script.requests) == 5


async def test_a_prompt_with_an_idempotency_key_is_retried_with_the_same_body() -> None:
    script = Script((503, None), httpx.RemoteProtocolError("cut"), (202, RECEIPT))
    async with _client(script) as client:
        receipt = await client.submit_prompt("ses_1", "hi", idempotency_key="k-1")
    assert receipt.prompt_id == "prm_1"
    assert [r.content for r in script.requests] == [script.requests[0].content] * 3


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.submit_prompt("ses_1", "hi"), id="prompt-without-key"),
        pytest.param(lambda c: c.create_session(), id="create-session"),
        pytest.param(lambda c: c.abort("ses_1"), id="abort"),
        pytest.param(lambda c: c.answer("ses_1", "q_1", "yes"), id="answer"),
    ],
)
async def test_a_post_without_idempotency_key_is_sent_once(call: object) -> None:
    script = Script((503, None), (202, RECEIPT))
    async with _client(script) as client:
        with pytest.raises(ShoalAPIError) as raised:
            await call(client)  # type: ignore[operator]
    assert raised.value.status == 503
    assert len(script.requests) == 1


async def test_client_errors_are_not_retried() -> None:
    script = Script((404, None), (200, SESSION))
    async with _client(script) as client:
        with pytest.raises(ShoalAPIError) as raised:
            await client.get_session("ses_1")
    assert raised.value.status == 404
    assert len(script.requests) == 1


async def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    script = Script(*[(503, None)] * 3, (200, SESSION))
    async with _client(script, RetryPolicy(attempts=3)) as client:
        with pytest.raises(ShoalAPIError):
            await client.get_session("ses_1")
    assert len(script.requests) == 3


async def test_no_retry_sends_once() -> None:
    script = Script((503, None), (200, SESSION))
    async with _client(script, NO_RETRY) as client:
        with pytest.raises(ShoalAPIError):
            await client.get_session("ses_1")
    assert len(script.requests) == 1


async def test_retry_after_is_read_from_the_answer() -> None:
    script = Script((429, None))
    async with _client(script, NO_RETRY) as client:
        with pytest.raises(ShoalAPIError) as raised:
            await client.get_session("ses_1")
    assert raised.value.retry_after == 0.0


async def test_session_verbs_send_the_contract_requests() -> None:
    page = {"sessions": [SESSION], "next": "c2"}
    script = Script((200, page), (200, {**SESSION, "status": "terminated"}), (202, {}), (202, {}))
    async with _client(script) as client:
        listed = await client.list_sessions(limit=10, cursor="c1", status="idle")
        ended = await client.terminate_session("ses_1")
        await client.abort("ses_1")
        await client.answer("ses_1", "q 1", "yes")
    assert listed.next == "c2"
    assert listed.sessions[0].id == "ses_1"
    assert ended.status == "terminated"
    sent = [(r.method, r.url.raw_path.decode(), r.content) for r in script.requests]
    assert sent == [
        ("GET", "/v1/sessions?limit=10&cursor=c1&status=idle", b""),
        ("DELETE", "/v1/sessions/ses_1", b""),
        ("POST", "/v1/sessions/ses_1/abort", b""),
        ("POST", "/v1/sessions/ses_1/questions/q%201/answer", b'{"answer":"yes"}'),
    ]
