"""Scopes, owners, API keys and secrets at the gateway (real NATS and uvicorn, fake keys service).

The same batteries run against the real fleet in tests/test_tenancy_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from gateway_fakes import FakeSessionService
from nats.aio.client import Client as NATS
from tenancy_fakes import FakeTenantKeys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalAPIError, ShoalClient, connect_runner
from shoal.common.clock import ManualClock, iso
from shoal.common.messaging import Subjects
from shoal.gateway.config import GatewaySettings
from shoal.gateway.service import GatewayService, KeyCache, Principal

if TYPE_CHECKING:
    from conftest import RunningGateway

SENTINEL = "sentinel-gw-4f1c2a9e-do-not-leak"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def tkeys(nc: NATS, settings: GatewaySettings) -> AsyncIterator[FakeTenantKeys]:
    fake = FakeTenantKeys(nc, Subjects(settings.subject_prefix))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert body["status"] == status
    assert body["code"] == code
    return body


async def ws_close_code(url: str, key: str, frame: dict[str, Any] | None = None) -> Any:
    """The close code the gateway answers with, or the first reply to ``frame`` if it stays open."""
    async with connect(url, additional_headers=auth(key), compression=None) as conn:
        try:
            if frame is not None:
                await conn.send(json.dumps(frame))
                while True:
                    reply = json.loads(await asyncio.wait_for(conn.recv(), 5))
                    if reply["type"] != "event":
                        return reply
            await asyncio.wait_for(conn.recv(), 0.5)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else 1006
        except TimeoutError:
            return "open"
    return "open"


async def close_code(conn: Any) -> int:
    """Read until the server closes the socket; its close code."""
    try:
        while True:
            await asyncio.wait_for(conn.recv(), 2)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006


# -- scopes --

SCOPE_KEYS = ["key-alice-sessions", "key-alice-read", "key-alice-secrets", "key-alice-jobs"]


async def test_scope_matrix(
    tkeys: FakeTenantKeys,
    sessions: FakeSessionService,
    gateway: RunningGateway,
    http: httpx.AsyncClient,
) -> None:
    created = await http.post("/v1/sessions", headers=auth("key-alice"), json={})
    sid = created.json()["id"]
    ended = (await http.post("/v1/sessions", headers=auth("key-alice"), json={})).json()["id"]
    # (method, path, body) -> the keys (of SCOPE_KEYS, plus admin) that may use it.
    matrix: list[tuple[str, str, Any, set[str]]] = [
        ("POST", "/v1/sessions", {}, {"sessions"}),
        ("GET", f"/v1/sessions/{sid}", None, {"sessions", "read"}),
        ("POST", f"/v1/sessions/{sid}/prompts", {"content": "hi"}, {"sessions"}),
        ("GET", f"/v1/sessions/{sid}/messages", None, {"sessions", "read"}),
        ("PUT", "/v1/secrets/S1", {"value": "v"}, {"secrets"}),
        ("GET", "/v1/secrets", None, {"secrets", "read"}),
        ("DELETE", "/v1/secrets/S1", None, {"secrets"}),
        ("GET", "/v1/keys", None, {"sessions", "read", "secrets", "jobs"}),
        ("DELETE", "/v1/keys/k-missing", None, {"sessions", "secrets", "jobs"}),
        ("GET", "/v1/sessions", None, {"sessions", "read"}),
        ("GET", f"/v1/sessions/{sid}/events", None, {"sessions", "read"}),
        ("PATCH", f"/v1/sessions/{sid}", {"tags": ["t"]}, {"sessions"}),
        ("POST", f"/v1/sessions/{sid}/abort", None, {"sessions"}),
        ("POST", f"/v1/sessions/{sid}/questions/q_1/answer", {"answer": "a"}, {"sessions"}),
        ("GET", "/v1/admin/partitions", None, set()),
        ("GET", f"/v1/admin/sessions/{sid}", None, set()),
        ("DELETE", f"/v1/sessions/{ended}", None, {"sessions"}),
    ]
    for method, path, body, allowed in matrix:
        for key in [*SCOPE_KEYS, "key-admin"]:
            scope = key.rsplit("-", 1)[-1]
            response = await http.request(method, path, headers=auth(key), json=body)
            if scope in allowed or scope == "admin":
                assert response.status_code != 403, (method, path, key, response.text)
                assert response.status_code < 500, (method, path, key, response.text)
            else:
                problem = assert_problem(response, 403, "forbidden")
                assert "required_scope" in problem, problem
    # Issuing keys: a key may hand out only scopes it has; read-only keys issue nothing.
    for key in SCOPE_KEYS:
        scope = key.rsplit("-", 1)[-1]
        response = await http.post(
            "/v1/keys", headers=auth(key), json={"name": "n", "scopes": [scope]}
        )
        assert response.status_code == (403 if scope == "read" else 201), (key, response.text)

    # Sockets: following needs sessions or read; a read key's prompt frame is refused.
    ws = f"{gateway.ws_url}/v1/sessions/{sid}/ws"
    assert await ws_close_code(ws, "key-alice-sessions") == "open"
    assert await ws_close_code(ws, "key-alice-read") == "open"
    assert await ws_close_code(ws, "key-alice-secrets") == 4403
    assert await ws_close_code(ws, "key-alice-jobs") == 4403
    reply = await ws_close_code(ws, "key-alice-read", {"type": "prompt", "content": "x", "id": 1})
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", 1)
    reply = await ws_close_code(ws, "key-alice-sessions", {"type": "prompt", "content": "x"})
    assert reply["type"] == "prompt.accepted"


async def test_unknown_v1_route_needs_admin() -> None:
    from shoal.gateway.tenancy import ADMIN, is_write, route_family

    assert route_family("/v1/sessions/ses_1/proxy/index.html") == "sessions"
    assert is_write("/v1/sessions/ses_1/proxy/index.html", "GET")
    assert not is_write("/v1/sessions/ses_1/messages", "GET")
    assert not is_write("/v1/ws-tickets", "POST")
    assert route_family("/v1/sessionsX") == ADMIN
    assert route_family("/v1/brand-new") == ADMIN


# -- owners --


async def test_cross_owner_keys_and_secrets(
    tkeys: FakeTenantKeys, sessions: FakeSessionService, http: httpx.AsyncClient
) -> None:
    alice, bob, admin = auth("key-alice"), auth("key-bob"), auth("key-admin")
    assert (
        await http.put("/v1/secrets/TOKEN", headers=alice, json={"value": "a1"})
    ).status_code == 204
    # Bob's namespace is his own: he neither sees nor deletes alice's, and his write is his.
    assert (await http.get("/v1/secrets", headers=bob)).json() == {"secrets": []}
    assert_problem(await http.delete("/v1/secrets/TOKEN", headers=bob), 404, "not_found")
    assert (
        await http.put("/v1/secrets/TOKEN", headers=bob, json={"value": "b1"})
    ).status_code == 204
    assert tkeys.secrets[("alice", "TOKEN")] == (1, "a1")
    assert tkeys.secrets[("bob", "TOKEN")] == (1, "b1")
    # Acting for another owner needs admin.
    for method, path in (("GET", "/v1/secrets?owner=alice"), ("GET", "/v1/keys?owner=alice")):
        assert_problem(await http.request(method, path, headers=bob), 403, "forbidden")
    assert_problem(
        await http.post(
            "/v1/keys", headers=bob, json={"name": "x", "scopes": ["sessions"], "owner": "alice"}
        ),
        403,
        "forbidden",
    )
    assert_problem(
        await http.post("/v1/keys", headers=bob, json={"name": "x", "scopes": ["admin"]}),
        403,
        "forbidden",
    )
    listed = (await http.get("/v1/secrets?owner=alice", headers=admin)).json()["secrets"]
    assert [s["name"] for s in listed] == ["TOKEN"]
    assert all("value" not in s for s in listed)

    # Keys: each owner lists its own; bob cannot revoke alice's key (404, as if missing).
    bob_keys = (await http.get("/v1/keys", headers=bob)).json()["keys"]
    assert {k["owner"] for k in bob_keys} == {"bob"}
    assert_problem(await http.delete("/v1/keys/k-alice", headers=bob), 404, "not_found")
    assert not any(r == ("revoke", {"id": "k-alice"}) for r in tkeys.requests)
    assert (await http.get("/v1/keys", headers=alice)).status_code == 200
    everyone = (await http.get("/v1/keys", headers=admin)).json()["keys"]
    assert {"alice", "bob", "admin"} <= {k["owner"] for k in everyone}

    # Issued for the caller's own owner; revoking it cuts it off at once on this gateway.
    issued = await http.post("/v1/keys", headers=alice, json={"name": "ci", "scopes": ["secrets"]})
    assert issued.status_code == 201
    new = issued.json()
    assert (new["owner"], new["scopes"]) == ("alice", ["secrets"])
    assert new["key"]
    assert (await http.get("/v1/secrets", headers=auth(new["key"]))).status_code == 200
    assert (await http.delete(f"/v1/keys/{new['id']}", headers=alice)).status_code == 204
    assert_problem(await http.get("/v1/secrets", headers=auth(new["key"])), 401, "unauthorized")

    # Sessions: bob gets 404 on alice's session everywhere; admin sees it.
    sid = (await http.post("/v1/sessions", headers=alice, json={})).json()["id"]
    for method, path, body in (
        ("GET", f"/v1/sessions/{sid}", None),
        ("POST", f"/v1/sessions/{sid}/prompts", {"content": "x"}),
        ("GET", f"/v1/sessions/{sid}/messages", None),
    ):
        assert_problem(await http.request(method, path, headers=bob, json=body), 404, "not_found")
    assert (await http.get(f"/v1/sessions/{sid}", headers=admin)).status_code == 200


async def test_revocation_closes_open_sockets(
    tkeys: FakeTenantKeys, sessions: FakeSessionService, gateway: RunningGateway
) -> None:
    async with ShoalClient(gateway.base_url, "key-alice") as alice:
        sid = (await alice.create_session()).id
    url = f"{gateway.ws_url}/v1/sessions/{sid}/ws"
    async with (
        connect(url, additional_headers=auth("key-alice"), compression=None) as doomed,
        connect(url, additional_headers=auth("key-alice-sessions"), compression=None) as kept,
    ):
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=gateway.base_url) as http:
            revoked = await http.delete("/v1/keys/k-alice", headers=auth("key-admin"))
            assert revoked.status_code == 204
        assert await close_code(doomed) == 4401
        await kept.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(kept.recv(), 2))["type"] in ("pong", "event")


# -- bad input --


async def test_secret_bad_input_never_echoes(
    tkeys: FakeTenantKeys,
    sessions: FakeSessionService,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = auth("key-alice")
    odd_names = ["a b", "%2E%2E", "%2E", "x" * 129, "naïve", "semi;colon", "a%00b", "a@b"]
    bodies: list[str] = []
    for name in odd_names:
        response = await http.put(f"/v1/secrets/{name}", headers=alice, json={"value": SENTINEL})
        assert response.status_code in (400, 404, 405), (name, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        bodies.append(response.text)
    assert_problem(
        await http.put("/v1/secrets/BIG", headers=alice, json={"value": "x" * (64 * 1024 + 1)}),
        413,
        "payload_too_large",
    )
    multibyte = "é" * (32 * 1024 + 1)  # 65538 bytes in 32769 characters
    assert_problem(
        await http.put("/v1/secrets/BIG", headers=alice, json={"value": multibyte}),
        413,
        "payload_too_large",
    )
    exact = await http.put("/v1/secrets/EXACT", headers=alice, json={"value": "x" * 64 * 1024})
    assert exact.status_code == 204
    for body in ({"value": 5}, {"value": SENTINEL, "extra": SENTINEL}, {}, [SENTINEL]):
        response = await http.put("/v1/secrets/OK", headers=alice, json=body)
        assert_problem(response, 400, "bad_request")
        bodies.append(response.text)
    malformed = await http.put(
        "/v1/secrets/OK",
        headers={**alice, "Content-Type": "application/json"},
        content=b'{"value": "' + SENTINEL.encode() + b'"',
    )
    assert_problem(malformed, 400, "bad_request")
    bodies.append(malformed.text)
    assert (
        await http.put("/v1/secrets/OK", headers=alice, json={"value": SENTINEL})
    ).status_code == 204
    listed = await http.get("/v1/secrets", headers=alice)
    bodies.append(listed.text)
    for text in bodies:
        assert SENTINEL not in text
    assert SENTINEL not in caplog.text
    # Key creation input errors are 400 as well.
    for body in (
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": []},
        {"name": "", "scopes": ["sessions"]},
        {"name": "x", "scopes": ["sessions"], "expires_in_seconds": 0},
        {"name": "x", "scopes": ["sessions"], "owner": "bad owner"},
    ):
        response = await http.post("/v1/keys", headers=auth("key-admin"), json=body)
        assert_problem(response, 400, "bad_request")


# -- runner secret.get --


async def test_runner_reads_only_allowed_secrets(
    tkeys: FakeTenantKeys, sessions: FakeSessionService, gateway: RunningGateway
) -> None:
    async with (
        ShoalClient(gateway.base_url, "key-alice") as alice,
        ShoalClient(gateway.base_url, "key-bob") as bob,
    ):
        await alice.put_secret("GH", SENTINEL)
        await alice.put_secret("OTHER", "nope")
        await bob.put_secret("GH", "bobs")
        session = await alice.create_session({"allowed_secrets": ["GH", "MISSING"]})
        closed = await alice.create_session()
        bobs = await bob.create_session({"allowed_secrets": ["GH", "OTHER"]})
        assert session.runner_token
        assert closed.runner_token
        assert bobs.runner_token
        async with connect_runner(gateway.base_url, session.id, session.runner_token) as runner:
            assert await runner.get_secret("GH") == SENTINEL
            for name, status in (("OTHER", 403), ("MISSING", 404), ("..", 400), ("NOPE", 403)):
                with pytest.raises(ShoalAPIError) as caught:
                    await runner.get_secret(name)
                assert caught.value.status == status, (name, caught.value)
                assert SENTINEL not in str(caught.value.problem)
        async with connect_runner(gateway.base_url, closed.id, closed.runner_token) as runner:
            with pytest.raises(ShoalAPIError) as caught:
                await runner.get_secret("GH")
            assert caught.value.code == "forbidden"
        # Bob's runner reads bob's GH, never alice's; alice's OTHER is not bob's to have.
        async with connect_runner(gateway.base_url, bobs.id, bobs.runner_token) as runner:
            assert await runner.get_secret("GH") == "bobs"
            with pytest.raises(ShoalAPIError) as caught:
                await runner.get_secret("OTHER")
            assert caught.value.status == 404
        gets = [body for method, body in tkeys.requests if method == "secrets.get"]
        assert {(g["owner"], g["name"]) for g in gets} == {
            ("alice", "GH"),
            ("alice", "MISSING"),
            ("bob", "GH"),
            ("bob", "OTHER"),
        }
        assert all(g["actor"].startswith("session:") for g in gets)
        with pytest.raises(ShoalAPIError) as bad:
            await alice.create_session({"allowed_secrets": ["bad name"]})
        assert bad.value.status == 400


# -- the auth cache --


class _Bus:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def verify_key(self, key: str) -> dict[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return dict(self.answer)


async def test_cache_never_outlives_expiry_or_revocation() -> None:
    clock = ManualClock()
    settings = GatewaySettings(environment="test")
    bus = _Bus(
        {"key_id": "k1", "owner": "o", "scopes": ["read"], "expires_at": iso(clock.now() + 2)}
    )
    service = GatewayService(bus, settings, clock)  # type: ignore[arg-type]
    await service.authenticate("k")
    await service.authenticate("k")
    assert bus.calls == 1  # cached
    clock.advance(2.5)  # past expires_at, within the 5 s TTL: asked again
    await service.authenticate("k")
    assert bus.calls == 2

    # A verify answer already on its way when the revocation arrives is neither used nor cached.
    bus.answer = {"key_id": "k2", "owner": "o", "scopes": ["read"]}
    bus.gate = asyncio.Event()
    pending = asyncio.create_task(service.authenticate("k-two"))
    await asyncio.sleep(0)
    service.key_revoked("k2")
    bus.gate.set()
    with pytest.raises(Exception, match="invalid API key"):
        await pending


def test_key_cache_forgets_revoked_ids() -> None:
    clock = ManualClock()
    cache = KeyCache(5, 10, clock)
    principal = Principal(key_id="k", owner="o", scopes=("read",))
    cache.put("h", principal)
    assert cache.get("h") == principal
    assert cache.drop_key_id("k") == 1
    cache.put("h", principal)
    assert cache.get("h") is None
    cache.put("h2", Principal(key_id="other", owner="o", scopes=("read",)), ttl=0)
    assert cache.get("h2") is None
