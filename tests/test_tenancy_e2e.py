"""Keys and tenancy end to end (issue 5): the fleet as OS processes, driven through shoal.client.

- cross-owner battery: owner B reaches none of owner A's sessions, sockets, secrets or keys;
- bad input battery: odd names, oversize secrets, expired keys, wrong scopes -> documented 4xx;
- a sentinel secret value never shows up in a log file, a NATS subject or a payload, except
  the two documented places (the ``secrets.put`` request and the ``secrets.get`` reply);
- revocation on two gateway replicas within one second, with cached keys costing no RPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shoal.client import ShoalAPIError, ShoalClient, ShoalConnectionClosed, connect_runner
from shoal.devtools.embedded import free_port
from shoal.devtools.supervisor import Fleet, FleetFactory, ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SENTINEL = "SENTINEL-e2e-9c41d7f2b8a6-never-log-me"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert (body["status"], body["code"]) == (status, code)
    return body


@dataclasses.dataclass
class Wiretap:
    """Every message on the NATS server (``>``) while the test runs."""

    messages: list[Msg] = dataclasses.field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        self.messages.append(msg)


@pytest.fixture
async def wiretap(nc: NATS) -> AsyncIterator[Wiretap]:
    tap = Wiretap()
    sub = await nc.subscribe(">", cb=tap.on_msg)
    await nc.flush()
    yield tap
    await sub.unsubscribe()


async def first_event(client: ShoalClient, session_id: str) -> object:
    async with client.connect_session(session_id) as stream:
        return await anext(aiter(stream))


def read_logs(root: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted(root.glob("fleet-*/*.log"))}


async def tenant(admin: ShoalClient, owner: str, scopes: list[str]) -> str:
    created = await admin.create_key(f"{owner} key", scopes, owner=owner)
    assert created.key
    assert (created.owner, created.scopes) == (owner, sorted(scopes))
    return created.key


async def test_cross_owner_battery_and_sentinel(
    fleet: FleetFactory, wiretap: Wiretap, nc: NATS, subject_prefix: str, tmp_path: Path
) -> None:
    running = await fleet(env={"SHOAL_LOG_LEVEL": "DEBUG"})
    url = running.gateway_url
    async with ShoalClient(url, running.admin_key) as admin:
        key_a = await tenant(admin, "tenant-a", ["sessions", "secrets"])
        key_b = await tenant(admin, "tenant-b", ["sessions", "secrets"])
    async with (
        ShoalClient(url, key_a) as a,
        ShoalClient(url, key_b) as b,
        ShoalClient(url, running.admin_key) as admin,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await a.put_secret("GH", SENTINEL)
        await a.put_secret("A_ONLY", "a-only")
        await b.put_secret("GH", "b-value")
        session_a = await a.create_session({"allowed_secrets": ["GH"]})
        session_b = await b.create_session({"allowed_secrets": ["GH", "A_ONLY"]})
        assert session_a.runner_token
        assert session_b.runner_token
        sid = session_a.id

        # -- sessions: every route answers B with 404, as for a session that does not exist --
        hb = bearer(key_b)
        for method, path, body in (
            ("GET", f"/v1/sessions/{sid}", None),
            ("POST", f"/v1/sessions/{sid}/prompts", {"content": "hijack"}),
            ("GET", f"/v1/sessions/{sid}/messages", None),
            ("GET", f"/v1/sessions/{sid}/events/stream", None),
        ):
            response = await http.request(method, path, headers=hb, json=body)
            if response.status_code == 404 and response.json().get("detail") == "Not Found":
                continue  # the route does not exist in this build (e.g. SSE not merged yet)
            problem = assert_problem(response, 404, "not_found")
            assert problem["detail"] == "session not found"
        missing = await http.get("/v1/sessions/ses_00000000000000000000000000", headers=hb)
        assert assert_problem(missing, 404, "not_found")["detail"] == "session not found"
        with pytest.raises(ShoalConnectionClosed) as closed:
            await first_event(b, sid)
        assert closed.value.code == 4404
        # B has no runner token of A's session; B's own token does not open A's runner.
        with pytest.raises(ShoalConnectionClosed) as closed:
            await connect_runner(url, sid, session_b.runner_token, reconnect=False)
        assert closed.value.code == 4401

        # -- files: every files route of A's session answers B with 404; nothing of B's lands --
        await a.put_file(sid, "notes/a.md", b"A's notes", "text/markdown")
        files = f"/v1/sessions/{sid}/files"
        for method, path in (
            ("PUT", f"{files}/notes/a.md"),
            ("PUT", f"{files}/notes/b-was-here.md"),
            ("GET", f"{files}/notes/a.md"),
            ("GET", f"{files}/notes/missing.md"),
            ("DELETE", f"{files}/notes/a.md"),
            ("GET", files),
            ("GET", f"{files}?prefix=notes/"),
            ("PUT", f"{files}/%2E%2E/escape"),
        ):
            response = await http.request(method, path, headers=hb, content=b"B's bytes")
            problem = assert_problem(response, 404, "not_found")
            assert problem["detail"] == "session not found"
        assert [f.path for f in await a.list_files(sid)] == ["notes/a.md"]
        assert (await a.get_file(sid, "notes/a.md")).data == b"A's notes"
        await b.put_file(session_b.id, "notes/a.md", b"B's own")  # same path, B's own session
        assert (await a.get_file(sid, "notes/a.md")).data == b"A's notes"
        assert (await b.get_file(session_b.id, "notes/a.md")).data == b"B's own"
        # The admin key reaches A's files on every route.
        shared = await admin.get_file(sid, "notes/a.md")
        assert (shared.data, shared.content_type) == (b"A's notes", "text/markdown")
        await admin.put_file(sid, "notes/admin.md", b"from admin")
        listed = [f.path for f in await admin.list_files(sid, "notes/")]
        assert listed == ["notes/a.md", "notes/admin.md"]
        await admin.delete_file(sid, "notes/admin.md")
        assert [f.path for f in await a.list_files(sid)] == ["notes/a.md"]

        # -- secrets: B's namespace is its own --
        assert [s.name for s in await b.list_secrets()] == ["GH"]
        with pytest.raises(ShoalAPIError) as refused:
            await b.delete_secret("A_ONLY")
        assert refused.value.status == 404
        for path in ("/v1/secrets?owner=tenant-a", "/v1/keys?owner=tenant-a"):
            assert_problem(await http.get(path, headers=hb), 403, "forbidden")
        assert_problem(
            await http.put("/v1/secrets/GH?owner=tenant-a", headers=hb, json={"value": "x"}),
            403,
            "forbidden",
        )
        async with connect_runner(url, sid, session_a.runner_token) as runner:
            assert await runner.get_secret("GH") == SENTINEL
            with pytest.raises(ShoalAPIError) as refused:
                await runner.get_secret("A_ONLY")  # A's, but not allowed for this session
            assert refused.value.code == "forbidden"
        async with connect_runner(url, session_b.id, session_b.runner_token) as runner:
            assert await runner.get_secret("GH") == "b-value"
            with pytest.raises(ShoalAPIError) as refused:
                await runner.get_secret("A_ONLY")  # allowed by B's session; B has none
            assert refused.value.status == 404

        # -- keys: B lists only its own and cannot revoke A's --
        b_keys = await b.list_keys()
        assert {k.owner for k in b_keys} == {"tenant-b"}
        assert all(k.key is None for k in b_keys)
        a_key_id = (await a.list_keys())[0].id
        with pytest.raises(ShoalAPIError) as refused:
            await b.revoke_key(a_key_id)
        assert refused.value.status == 404
        assert (await a.get_session(sid)).id == sid  # A's key still works

        # -- admin acts for any owner --
        assert (await admin.get_session(sid)).owner == "tenant-a"
        assert {s.name for s in await admin.list_secrets(owner="tenant-a")} == {"GH", "A_ONLY"}
        assert {k.owner for k in await admin.list_keys(owner="tenant-a")} == {"tenant-a"}

        # -- the sentinel in failing requests: never echoed --
        ha = bearer(key_a)
        echoes = [
            await http.put("/v1/secrets/X", headers=ha, json={"value": SENTINEL, "x": SENTINEL}),
            await http.put("/v1/secrets/X", headers=ha, json={"value": SENTINEL * 2000}),
            await http.put("/v1/secrets/X", headers=hb, json={"value": [SENTINEL]}),
            await http.post("/v1/keys", headers=ha, json={"name": SENTINEL, "scopes": ["x"]}),
        ]
        for response in echoes:
            assert 400 <= response.status_code < 500
            assert SENTINEL not in response.text
        listed = await http.get("/v1/secrets", headers=ha)
        assert SENTINEL not in listed.text

    # -- the sentinel on the wire: only the documented two places --
    await nc.flush()
    await asyncio.sleep(0.5)  # audit events and log lines of the last requests
    put_subject = f"{subject_prefix}.rpc.keys.secrets.put"
    get_subject = f"{subject_prefix}.rpc.keys.secrets.get"
    get_replies = {m.reply for m in wiretap.messages if m.subject == get_subject and m.reply}
    carriers = []
    for msg in wiretap.messages:
        assert SENTINEL not in msg.subject
        assert SENTINEL not in str(msg.headers or {})
        if SENTINEL.encode() in msg.data:
            carriers.append(msg.subject)
            assert msg.subject == put_subject or msg.subject in get_replies, msg.subject
    assert put_subject in carriers, "the wiretap saw no secrets.put: is it working?"
    assert any(s in get_replies for s in carriers), "the wiretap saw no secrets.get reply"
    assert any(m.subject.startswith(f"{subject_prefix}.audit.") for m in wiretap.messages)

    logs = await asyncio.to_thread(read_logs, tmp_path)
    assert {"gateway.log", "keys.log"} <= set(logs)
    for name, text in logs.items():
        assert SENTINEL not in text, f"{name} holds the sentinel"
        assert key_a not in text, f"{name} holds an API key"
    assert any("debug" in text.lower() for text in logs.values())


async def test_bad_input_battery(fleet: FleetFactory) -> None:
    running = await fleet()
    url = running.gateway_url
    async with ShoalClient(url, running.admin_key) as admin:
        full = await tenant(admin, "tenant-c", ["sessions", "secrets"])
        only_read = await tenant(admin, "tenant-c", ["read"])
        only_sessions = await tenant(admin, "tenant-c", ["sessions"])
        only_jobs = await tenant(admin, "tenant-c", ["jobs"])
        short = await admin.create_key("short", ["secrets"], owner="tenant-c", expires_in_seconds=2)
        short_expires = time.monotonic() + 2
        assert short.key
        assert short.expires_at
        async with ShoalClient(url, short.key) as short_client:
            await short_client.list_secrets()  # used, so the gateway caches it before expiry
        unused = await admin.create_key(
            "unused", ["secrets"], owner="tenant-c", expires_in_seconds=1
        )
        assert unused.key
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        h = bearer(full)
        # Odd names: 400 (or a route mismatch) and never echoed back.
        for name in ["a b", "%2E%2E", "%2E", "x" * 129, "na%C3%AFve", "semi;colon", "a@b", "%00"]:
            response = await http.put(f"/v1/secrets/{name}", headers=h, json={"value": "v"})
            assert response.status_code in (400, 404, 405), (name, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            if response.status_code == 400:
                assert "must match" in response.json()["detail"]
        assert (
            await http.put("/v1/secrets/ok.name-1_X", headers=h, json={"value": ""})
        ).status_code == 204
        # Size: 64 KiB of UTF-8 is fine, one byte more is 413.
        limit = 64 * 1024
        assert (
            await http.put("/v1/secrets/BIG", headers=h, json={"value": "x" * limit})
        ).status_code == 204
        too_big = await http.put("/v1/secrets/BIG", headers=h, json={"value": "x" * (limit + 1)})
        assert assert_problem(too_big, 413, "payload_too_large")["max_bytes"] == limit
        wide = await http.put("/v1/secrets/BIG", headers=h, json={"value": "€" * (limit // 3 + 1)})
        assert_problem(wide, 413, "payload_too_large")
        for body in ({}, {"value": 1}, {"value": None}, {"value": "v", "owner": "x"}):
            assert_problem(
                await http.put("/v1/secrets/S", headers=h, json=body), 400, "bad_request"
            )
        assert_problem(await http.delete("/v1/secrets/NEVER", headers=h), 404, "not_found")

        # Odd file paths: 400, a path with a control character never echoed; 413 past the cap.
        session = (await http.post("/v1/sessions", headers=h, json={})).json()["id"]
        files = f"/v1/sessions/{session}/files"
        for path in ("%2E%2E/x", "a/%2E%2E/b", "/abs", "a//b", "a%00b", "a%0Ab", "x" * 1100):
            response = await http.put(f"{files}/{path}", headers=h, content=b"x")
            problem = assert_problem(response, 400, "bad_request")
            assert "\\u0000" not in response.text
            if "%0" in path:
                assert "path" not in problem
        file_cap = 25 * 1024 * 1024

        async def over_cap() -> AsyncIterator[bytes]:
            # Streamed (no Content-Length): the gateway reads up to the cap, then answers 413.
            # A declared length over the cap is refused before the body is read, and httpx,
            # still writing, would see the connection close instead of the answer.
            chunk = b"x" * (1024 * 1024)
            for _ in range(file_cap // len(chunk)):
                yield chunk
            yield b"!"

        big_file = await http.put(f"{files}/big", headers=h, content=over_cap())
        assert assert_problem(big_file, 413, "payload_too_large")["max_bytes"] == file_cap
        assert (await http.get(files, headers=h)).json()["files"] == []

        # Wrong scope: 403 problem+json naming the scope it needs.
        wrong_scope: tuple[tuple[str, str, str, Any], ...] = (
            (only_read, "PUT", "/v1/secrets/S", {"value": "v"}),
            (only_read, "POST", "/v1/sessions", {}),
            (only_read, "POST", "/v1/keys", {"name": "n", "scopes": ["read"]}),
            (only_sessions, "GET", "/v1/secrets", None),
            (only_sessions, "PUT", "/v1/secrets/S", {"value": "v"}),
            (only_jobs, "POST", "/v1/sessions", {}),
            (only_jobs, "GET", "/v1/secrets", None),
            (only_sessions, "POST", "/v1/keys", {"name": "n", "scopes": ["secrets"]}),
            (full, "POST", "/v1/keys", {"name": "n", "scopes": ["admin"]}),
            (full, "POST", "/v1/keys", {"name": "n", "scopes": ["jobs"]}),
            (full, "POST", "/v1/keys", {"name": "n", "scopes": ["sessions"], "owner": "x"}),
        )
        for key, method, path, body in wrong_scope:
            response = await http.request(method, path, headers=bearer(key), json=body)
            assert_problem(response, 403, "forbidden")
        assert (await http.get("/v1/secrets", headers=bearer(only_read))).status_code == 200
        async with ShoalClient(url, only_jobs) as jobs:
            with pytest.raises(ShoalConnectionClosed) as closed:
                await first_event(jobs, "ses_00000000000000000000000000")
        assert closed.value.code == 4403

        # Key creation input: 400.
        admin_h = bearer(running.admin_key)
        bad_keys: tuple[dict[str, Any], ...] = (
            {"name": "n", "scopes": ["root"]},
            {"name": "n", "scopes": []},
            {"name": "", "scopes": ["read"]},
            {"name": "n", "scopes": ["read"], "expires_in_seconds": 0},
            {"name": "n", "scopes": ["read"], "expires_in_seconds": "soon"},
            {"name": "n", "scopes": ["read"], "owner": "no spaces"},
            {"name": "n", "scopes": ["read"], "extra": 1},
        )
        for body in bad_keys:
            assert_problem(
                await http.post("/v1/keys", headers=admin_h, json=body), 400, "bad_request"
            )

        # Unknown, mistyped and expired keys: 401 with WWW-Authenticate.
        mistyped = full[:-1] + ("A" if full[-1] != "A" else "B")
        for key in ("shoal_nope", mistyped, "x" * 600):
            response = await http.get("/v1/secrets", headers=bearer(key))
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
        await asyncio.sleep(max(0.0, short_expires - time.monotonic()) + 0.2)
        assert_problem(
            await http.get("/v1/secrets", headers=bearer(unused.key)), 401, "unauthorized"
        )
        # A key used (and so cached) before it expired is refused at expiry, not when the cache
        # entry would lapse: the verify reply carries expires_at and bounds the entry.
        assert_problem(
            await http.get("/v1/secrets", headers=bearer(short.key)), 401, "unauthorized"
        )


async def _closed_after(conn: ClientConnection, started: float) -> tuple[int, float]:
    """The close code of ``conn`` and when (seconds after ``started``) it came."""
    try:
        while True:
            await conn.recv()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
    return code, time.monotonic() - started


async def _extra_gateway(running: Fleet, name: str) -> ServiceProcess:
    """Another ``shoal run gateway`` on the fleet's NATS, on its own port."""
    base = running["gateway"]
    port = free_port()
    spec = dataclasses.replace(
        base.spec,
        name=name,
        http_port=port,
        env={**base.spec.env, "SHOAL_HTTP_PORT": str(port), "SHOAL_INSTANCE_ID": name},
    )
    proc = ServiceProcess(spec, log_dir=base.log_dir, death_signal=signal.SIGKILL)
    await proc.start()
    async with httpx.AsyncClient(timeout=2) as http:
        async with asyncio.timeout(60):
            while not await proc.probe(http):
                assert proc.running, proc.log_tail()
                await asyncio.sleep(0.1)
    return proc


async def test_revocation_reaches_two_gateways_within_a_second(
    fleet: FleetFactory, nc: NATS, subject_prefix: str
) -> None:
    running = await fleet()
    second = await _extra_gateway(running, "gateway-2")
    try:
        urls = [running.gateway_url, second.url]
        async with ShoalClient(urls[0], running.admin_key) as admin:
            doomed = await admin.create_key("doomed", ["sessions"], owner="tenant-r")
            kept = await admin.create_key("kept", ["sessions"], owner="tenant-r")
        assert doomed.key
        assert kept.key
        verifies: dict[str, int] = {doomed.key: 0, kept.key: 0}

        async def count(msg: Msg) -> None:
            for key in verifies:
                if key.encode() in msg.data:
                    verifies[key] += 1

        sub = await nc.subscribe(f"{subject_prefix}.rpc.keys.verify", cb=count)
        await nc.flush()
        clients = [
            httpx.AsyncClient(base_url=u, headers=bearer(k), timeout=5)
            for u in urls
            for k in (doomed.key, kept.key)
        ]
        try:
            async with ShoalClient(urls[0], doomed.key) as owner:
                sid = (await owner.create_session()).id
            path = f"/v1/sessions/{sid}"
            for http in clients:  # first use on each gateway: one verify per key and gateway
                assert (await http.get(path)).status_code == 200
            await nc.flush()
            assert verifies == {doomed.key: 2, kept.key: 2}
            for _ in range(25):  # cached: no RPC per request
                for http in clients:
                    assert (await http.get(path)).status_code == 200
            await nc.flush()
            assert verifies == {doomed.key: 2, kept.key: 2}

            sockets = [
                await connect(
                    u.replace("http://", "ws://") + f"{path}/ws",
                    additional_headers=bearer(doomed.key),
                    compression=None,
                )
                for u in urls
            ]
            await asyncio.sleep(0.3)  # both sockets are following the session
            async with httpx.AsyncClient(base_url=urls[0], timeout=5) as http:
                started = time.monotonic()
                revoked = await http.delete(
                    f"/v1/keys/{doomed.id}", headers=bearer(running.admin_key)
                )
                assert revoked.status_code == 204, revoked.text
                answered = time.monotonic()

            async def refused_after(http: httpx.AsyncClient) -> float:
                while True:
                    if (await http.get(path)).status_code == 401:
                        return time.monotonic() - started
                    await asyncio.sleep(0.005)

            doomed_clients = [clients[0], clients[2]]
            took = await asyncio.wait_for(
                asyncio.gather(*(refused_after(h) for h in doomed_clients)), 5
            )
            print(
                f"\nrevocation: DELETE answered in {answered - started:.3f}s; refused on "
                f"gateway-1 after {took[0]:.3f}s, gateway-2 after {took[1]:.3f}s"
            )
            assert max(took) < 1.0
            socket_closes = await asyncio.wait_for(
                asyncio.gather(*(_closed_after(s, started) for s in sockets)), 5
            )
            print(f"open sockets of the revoked key closed: {socket_closes}")
            assert all(code == 4401 and after < 1.0 for code, after in socket_closes)
            for http in (clients[1], clients[3]):  # the other key of the owner is untouched
                assert (await http.get(path)).status_code == 200
            await nc.flush()
            assert verifies[kept.key] == 2
        finally:
            for http in clients:
                await http.aclose()
            await sub.unsubscribe()
    finally:
        await second.stop(grace=5)
