"""The gateway's HTTP API against real NATS, through the client library and raw httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from gateway_fakes import FakeKeys, FakeSessionService

from shoal.client import ShoalAPIError, ShoalClient, connect_runner
from shoal.gateway.api.problems import install_problem_handlers

if TYPE_CHECKING:  # the fixture's type, from this directory's conftest (no runtime import:
    # several test directories have a conftest module)
    from conftest import RunningGateway

ALICE = {"Authorization": "Bearer key-alice"}


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:shoal:problem:{code}"
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["instance"].startswith("/")
    return dict(body)


async def test_create_and_get_session(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient
) -> None:
    created = await alice.create_session({"repo": "acme/api"})
    assert created.id.startswith("ses_")
    assert created.owner == "alice"
    assert created.status == "idle"
    assert created.metadata == {"repo": "acme/api"}
    assert created.runner_token is not None
    assert created.runner_token.startswith("srt_")

    fetched = await alice.get_session(created.id)
    assert fetched.id == created.id
    assert fetched.runner_token is None
    assert fetched.last_seq == 1  # session.created

    # Only the hash reached the session service.
    snap = await sessions.snapshot(created.id)
    assert snap is not None
    assert created.runner_token not in snap.runner_token_hash


async def test_auth_failures_are_401_problems(keys: FakeKeys, http: httpx.AsyncClient) -> None:
    missing = assert_problem(await http.post("/v1/sessions", json={}), 401, "unauthorized")
    assert "Bearer" in missing["detail"]
    bad = await http.post("/v1/sessions", json={}, headers={"Authorization": "Bearer nope"})
    assert_problem(bad, 401, "unauthorized")
    assert bad.headers["www-authenticate"].startswith("Bearer")
    basic = await http.get("/v1/sessions/ses_x", headers={"Authorization": "Basic a2V5"})
    assert_problem(basic, 401, "unauthorized")


async def test_keys_service_down_is_503(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/v1/sessions/ses_x", headers=ALICE), 503, "unavailable")


async def test_unknown_foreign_and_invalid_sessions_are_404(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, http: httpx.AsyncClient
) -> None:
    created = await alice.create_session()
    assert_problem(await http.get("/v1/sessions/ses_nope", headers=ALICE), 404, "not_found")
    assert_problem(await http.get("/v1/sessions/a.b*c", headers=ALICE), 404, "not_found")
    bob = {"Authorization": "Bearer key-bob"}
    assert_problem(await http.get(f"/v1/sessions/{created.id}", headers=bob), 404, "not_found")
    foreign = await http.post(
        f"/v1/sessions/{created.id}/prompts", json={"content": "x"}, headers=bob
    )
    assert_problem(foreign, 404, "not_found")
    # the gateway now remembers the session's owner (alice prompts): still not bob's
    await alice.submit_prompt(created.id, "mine")
    foreign = await http.post(
        f"/v1/sessions/{created.id}/prompts", json={"content": "x"}, headers=bob
    )
    assert_problem(foreign, 404, "not_found")
    admin = await http.get(
        f"/v1/sessions/{created.id}", headers={"Authorization": "Bearer key-admin"}
    )
    assert admin.status_code == 200
    assert admin.json()["owner"] == "alice"

    with pytest.raises(ShoalAPIError) as caught:
        await alice.submit_prompt("ses_nope", "hi")
    assert (caught.value.status, caught.value.code) == (404, "not_found")


async def test_malformed_and_invalid_bodies_are_400(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, http: httpx.AsyncClient
) -> None:
    created = await alice.create_session()
    path = f"/v1/sessions/{created.id}/prompts"
    headers = {**ALICE, "Content-Type": "application/json"}
    malformed = assert_problem(
        await http.post(path, content=b'{"content": ', headers=headers), 400, "bad_request"
    )
    assert malformed["detail"] == "malformed JSON body"
    empty = assert_problem(
        await http.post(path, json={"content": ""}, headers=ALICE), 400, "bad_request"
    )
    assert empty["errors"][0]["loc"] == ["body", "content"]
    assert "input" not in empty["errors"][0]
    assert_problem(
        await http.post(path, json={"content": "x", "extra": 1}, headers=ALICE), 400, "bad_request"
    )
    assert_problem(await http.post(path, json=["x"], headers=ALICE), 400, "bad_request")
    limit = await http.get(f"/v1/sessions/{created.id}/messages?limit=0", headers=ALICE)
    assert_problem(limit, 400, "bad_request")
    too_many = await http.get(f"/v1/sessions/{created.id}/messages?limit=100000", headers=ALICE)
    assert_problem(too_many, 400, "bad_request")


async def test_oversize_bodies_are_413(
    keys: FakeKeys,
    sessions: FakeSessionService,
    alice: ShoalClient,
    http: httpx.AsyncClient,
    gateway: RunningGateway,
) -> None:
    created = await alice.create_session()
    path = f"/v1/sessions/{created.id}/prompts"
    huge = b'{"content": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    declared = await http.post(
        path, content=huge, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_problem(declared, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(huge), 64 * 1024):
            yield huge[start : start + 64 * 1024]

    streamed = await http.post(
        path, content=chunks(), headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_problem(streamed, 413, "payload_too_large")

    # Under the body cap but over the prompt cap (64 KiB): 413 from the rules.
    prompt = await http.post(path, json={"content": "x" * (64 * 1024 + 1)}, headers=ALICE)
    assert_problem(prompt, 413, "payload_too_large")


async def test_unknown_route_and_method_are_problems(
    keys: FakeKeys, http: httpx.AsyncClient
) -> None:
    assert_problem(await http.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await http.delete("/v1/sessions", headers=ALICE), 405, "method_not_allowed")
    assert (await http.get("/healthz")).status_code == 200
    ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_prompt_idempotency_key_gives_one_prompt(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient
) -> None:
    created = await alice.create_session()
    first = await alice.submit_prompt(created.id, "hello", idempotency_key="k-1")
    second = await alice.submit_prompt(created.id, "hello", idempotency_key="k-1")
    other = await alice.submit_prompt(created.id, "hello")
    assert first.prompt_id == second.prompt_id
    assert other.prompt_id != first.prompt_id
    assert first.status == "queued"
    assert first.session_id == created.id
    snap = await sessions.snapshot(created.id)
    assert snap is not None
    assert [q.prompt_id for q in snap.queue] == [first.prompt_id, other.prompt_id]
    # The retry was dropped by JetStream's duplicate window: the session saw it once.
    submits = [c for c in sessions.commands if c.type == "prompt.submit"]
    assert len(submits) == 2


async def test_messages_after_runner_completes(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, gateway: RunningGateway
) -> None:
    created = await alice.create_session()
    assert created.runner_token
    receipt = await alice.submit_prompt(created.id, "2+2?")
    async with connect_runner(gateway.base_url, created.id, created.runner_token) as runner:
        async for prompt in runner.prompts():
            assert (prompt.prompt_id, prompt.content) == (receipt.prompt_id, "2+2?")
            message_id = await runner.complete(prompt.prompt_id, "4")
            break
    page = await alice.list_messages(created.id)
    assert [(m.id, m.prompt_id, m.role, m.content) for m in page.messages] == [
        (message_id, receipt.prompt_id, "assistant", "4")
    ]
    assert page.next is None
    later = await alice.list_messages(created.id, after=page.messages[0].seq, limit=10)
    assert later.messages == []


async def test_session_service_silent_is_504_with_token(
    keys: FakeKeys, http: httpx.AsyncClient, settings_overrides: dict[str, Any]
) -> None:
    # No session service runs: the command is stored, nobody applies it.
    response = await http.post("/v1/sessions", json={"metadata": {}}, headers=ALICE)
    body = assert_problem(response, 504, "timeout")
    assert body["session_id"].startswith("ses_")
    assert body["runner_token"].startswith("srt_")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"command_timeout": timedelta(seconds=1), "auth_cache_ttl": timedelta(seconds=60)}


async def test_auth_cache_and_revocation(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, http: httpx.AsyncClient
) -> None:
    created = await alice.create_session()
    calls = keys.calls
    for _ in range(3):
        assert (await http.get(f"/v1/sessions/{created.id}", headers=ALICE)).status_code == 200
    assert keys.calls == calls  # served from the cache (TTL 60 s here)

    await keys.revoke("key-alice")
    # The broadcast drops the cached entry; poll briefly for it to arrive.
    for _ in range(50):
        response = await http.get(f"/v1/sessions/{created.id}", headers=ALICE)
        if response.status_code == 401:
            break
        await asyncio.sleep(0.02)
    assert_problem(response, 401, "unauthorized")


async def test_requests_missing_the_key_cache_together_verify_once(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, http: httpx.AsyncClient
) -> None:
    """A busy key's cache entry expiring must not send every request in flight to the keys
    service: they share one verification."""
    created = await alice.create_session()
    calls = keys.calls
    bob = {"Authorization": "Bearer key-bob"}  # not cached yet
    answers = await asyncio.gather(
        *(http.get(f"/v1/sessions/{created.id}", headers=bob) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {404}  # verified; alice's session is not bob's
    assert keys.calls == calls + 1


async def test_unexpected_errors_are_500_without_internals() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    body = assert_problem(response, 500, "internal")
    assert "secret" not in response.text
    assert body["detail"] == "internal error"


@pytest.mark.parametrize(
    "settings_overrides", [{"rate_limit_per_key": 0.01, "rate_limit_burst": 40}]
)
async def test_direct_prompt_route_answers_as_the_framework_route(
    keys: FakeKeys, sessions: FakeSessionService, alice: ShoalClient, http: httpx.AsyncClient
) -> None:
    """``api/prompt_route.py`` serves prompts ahead of FastAPI; a request with an ``Origin``
    goes through the framework's route. Both must answer alike, receipts and problems."""
    created = await alice.create_session()
    path = f"/v1/sessions/{created.id}/prompts"
    framework = {"Origin": "http://ui.example"}

    async def both(
        headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[httpx.Response, httpx.Response]:
        direct = await http.post(path, json=body, headers=headers)
        routed = await http.post(path, json=body, headers={**headers, **framework})
        return direct, routed

    def same_shape(direct: httpx.Response, routed: httpx.Response) -> None:
        assert direct.status_code == routed.status_code, (direct.text, routed.text)
        assert direct.headers["content-type"] == routed.headers["content-type"]
        assert direct.headers["x-request-id"].startswith("req_")
        assert routed.headers["x-request-id"].startswith("req_")
        a, b = direct.json(), routed.json()
        for volatile in ("prompt_id", "request_id", "seq", "retry_after"):
            a.pop(volatile, None), b.pop(volatile, None)
        assert a == b
        assert direct.headers.get("www-authenticate") == routed.headers.get("www-authenticate")
        assert ("retry-after" in direct.headers) == ("retry-after" in routed.headers)

    direct, routed = await both(ALICE, {"content": "hi", "idempotency_key": "k-direct"})
    same_shape(direct, routed)
    assert direct.status_code == 202
    assert set(direct.json()) == {"prompt_id", "session_id", "status", "seq"}
    # The same idempotency key on either path is the same prompt.
    assert direct.json()["prompt_id"] == routed.json()["prompt_id"]

    same_shape(*await both({"Authorization": "Bearer nope"}, {"content": "x"}))  # 401
    same_shape(*await both({"Authorization": "Bearer key-bob"}, {"content": "x"}))  # 404
    keys.keys["key-alice-read"] = {"key_id": "k-alice-read", "owner": "alice", "scopes": ["read"]}
    direct, routed = await both({"Authorization": "Bearer key-alice-read"}, {"content": "x"})
    same_shape(direct, routed)
    assert direct.status_code == 403  # the scope, checked once, by the service
    same_shape(*await both(ALICE, {"content": "x" * (64 * 1024 + 1)}))  # 413 from the rules
    same_shape(*await both(ALICE, {"content": ""}))  # 400: replayed to the framework

    # The caller's request id is echoed, in the header and in a problem body.
    echoed = await http.post(
        path, json={"content": "x"}, headers={"Authorization": "Bearer nope", "X-Request-ID": "r-1"}
    )
    assert echoed.headers["x-request-id"] == "r-1"
    assert echoed.json()["request_id"] == "r-1"

    # 429 once alice's key has spent its burst (a bucket that barely refills here).
    for _ in range(40):
        if (await http.post(path, json={"content": "x"}, headers=ALICE)).status_code == 429:
            break
    direct, routed = await both(ALICE, {"content": "x"})
    same_shape(direct, routed)
    assert direct.status_code == 429
    assert int(direct.headers["retry-after"]) >= 1
