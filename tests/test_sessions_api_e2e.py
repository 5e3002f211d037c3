"""The session verbs over HTTP on the real fleet (services as OS processes, real nats-server and
PostgreSQL): list pages stay stable under concurrent creates, DELETE, abort, PATCH tags, ledger
events pages, runner files and the admin routes, each with its refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from shoal.client import connect_runner
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

T = TypeVar("T")


async def _until(probe: Callable[[], Awaitable[T]], holds: Callable[[T], bool]) -> T:
    """Poll ``probe`` (the session index follows the ledger asynchronously: no event to await)."""
    async with asyncio.timeout(20):
        while True:
            value = await probe()
            if holds(value):
                return value
            await asyncio.sleep(0.05)


async def _key(http: httpx.AsyncClient, admin: dict[str, str], owner: str) -> dict[str, str]:
    made = await http.post(
        "/v1/keys", json={"name": owner, "scopes": ["sessions"], "owner": owner}, headers=admin
    )
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['key']}"}


async def _create(http: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    created = await http.post("/v1/sessions", json=body, headers=headers)
    assert created.status_code == 201, created.text
    session: dict[str, Any] = created.json()
    return session


async def _pages(http: httpx.AsyncClient, headers: dict[str, str], **params: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = await http.get("/v1/sessions", params=query, headers=headers)
        assert page.status_code == 200, page.text
        ids += [s["id"] for s in page.json()["sessions"]]
        cursor = page.json()["next"]
        if cursor is None:
            return ids


async def test_session_verbs_on_the_fleet(fleet: FleetFactory) -> None:
    running = await fleet()
    admin = {"Authorization": f"Bearer {running.admin_key}"}
    async with httpx.AsyncClient(base_url=running.gateway_url, timeout=20) as http:
        alice = await _key(http, admin, "alice")
        bob = await _key(http, admin, "bob")

        # -- list: newest first, the caller's own, pages stable while others create --
        originals = [(await _create(http, alice))["id"] for _ in range(10)]
        bobs = (await _create(http, bob))["id"]
        listed = await _until(lambda: _pages(http, alice, limit=100), lambda ids: len(ids) >= 10)
        assert listed == originals[::-1]
        first = (await http.get("/v1/sessions", params={"limit": 3}, headers=alice)).json()
        assert [s["id"] for s in first["sessions"]] == originals[::-1][:3]
        creating = asyncio.gather(*(_create(http, alice) for _ in range(10)))
        seen = [s["id"] for s in first["sessions"]]
        cursor = first["next"]
        while cursor is not None:
            page = (
                await http.get("/v1/sessions", params={"limit": 3, "cursor": cursor}, headers=alice)
            ).json()
            seen += [s["id"] for s in page["sessions"]]
            cursor = page["next"]
        await creating
        assert seen == originals[::-1]  # none repeated, none skipped
        everyone = await _until(lambda: _pages(http, admin, limit=50), lambda ids: len(ids) >= 21)
        assert bobs in everyone
        assert await _pages(http, admin, owner="bob") == [bobs]
        forbidden = await http.get("/v1/sessions", params={"owner": "bob"}, headers=alice)
        assert forbidden.status_code == 403

        # -- abort: the running prompt stops, the next one is dispatched --
        session = await _create(http, alice)
        sid = session["id"]
        prompts = []
        for content in ("one", "two"):
            sent = await http.post(
                f"/v1/sessions/{sid}/prompts", json={"content": content}, headers=alice
            )
            prompts.append(sent.json()["prompt_id"])
        async with connect_runner(running.gateway_url, sid, session["runner_token"]) as runner:
            async with asyncio.timeout(20):
                async for prompt in runner.prompts():
                    assert prompt.prompt_id == prompts[0]
                    break
                aborted = await http.post(f"/v1/sessions/{sid}/abort", headers=alice)
                assert aborted.status_code == 202, aborted.text
                async for prompt in runner.prompts():
                    assert prompt.prompt_id == prompts[1]
                    break

        # -- events: the ledger, paged --
        events: list[dict[str, Any]] = []
        after = None
        while True:
            params = {"limit": 2, **({"after": after} if after is not None else {})}
            page = (
                await http.get(f"/v1/sessions/{sid}/events", params=params, headers=alice)
            ).json()
            events += page["events"]
            after = page["next"]
            if after is None:
                break
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        kinds = [(e["type"], e["data"].get("prompt_id")) for e in events]
        assert kinds.index(("prompt.aborted", prompts[0])) < kinds.index(
            ("prompt.dispatched", prompts[1])
        )
        assert (await http.get(f"/v1/sessions/{sid}/events", headers=bob)).status_code == 404

        # -- files: the session's runner token reaches its own session's files only --
        runner_auth = {"Authorization": f"Bearer {session['runner_token']}"}
        stored = await http.put(
            f"/v1/sessions/{sid}/files/out.txt", content=b"42", headers=runner_auth
        )
        assert stored.status_code == 201, stored.text
        read = await http.get(f"/v1/sessions/{sid}/files/out.txt", headers=alice)
        assert read.content == b"42"
        foreign = await http.get(f"/v1/sessions/{bobs}/files/out.txt", headers=runner_auth)
        assert foreign.status_code == 401

        # -- terminate: 200 terminated, idempotent, then prompts get 409 --
        ended = await http.delete(f"/v1/sessions/{sid}", headers=alice)
        assert ended.status_code == 200, ended.text
        assert ended.json()["status"] == "terminated"
        assert (await http.delete(f"/v1/sessions/{sid}", headers=alice)).json()["status"] == (
            "terminated"
        )
        late = await http.post(f"/v1/sessions/{sid}/prompts", json={"content": "x"}, headers=alice)
        assert late.status_code == 409
        assert late.headers["content-type"].startswith("application/problem+json")
        assert (await http.delete(f"/v1/sessions/{sid}", headers=bob)).status_code == 404
        terminated = await _until(
            lambda: _pages(http, alice, status="terminated"), lambda ids: ids == [sid]
        )
        assert terminated == [sid]

        # -- admin: the JSON of `shoal admin`, admin keys only --
        partitions = await http.get("/v1/admin/partitions", headers=admin)
        assert partitions.status_code == 200, partitions.text
        assert all(row["owner"] for row in partitions.json())  # one replica holds them all
        placed = (await http.get(f"/v1/admin/sessions/{sid}", headers=admin)).json()
        assert (placed["session_id"], placed["status"], placed["session_owner"]) == (
            sid,
            "terminated",
            "alice",
        )
        assert (await http.get("/v1/admin/partitions", headers=alice)).status_code == 403
        assert (await http.get(f"/v1/admin/sessions/{sid}", headers=alice)).status_code == 403
        assert (await http.get("/v1/admin/sessions/ses_nope", headers=admin)).status_code == 404


async def test_patch_tags_and_timeouts_on_the_fleet(fleet: FleetFactory) -> None:
    running = await fleet()
    admin = {"Authorization": f"Bearer {running.admin_key}"}
    async with httpx.AsyncClient(base_url=running.gateway_url, timeout=20) as http:
        session = await _create(http, admin, tags=["a"], idle_timeout=60)
        assert (session["tags"], session["idle_timeout"], session["prompt_timeout"]) == (
            ["a"],
            60,
            600,
        )
        sid = session["id"]
        patched = await http.patch(f"/v1/sessions/{sid}", json={"tags": ["b", "c"]}, headers=admin)
        assert patched.status_code == 200, patched.text
        assert patched.json()["tags"] == ["b", "c"]
        assert (await http.get(f"/v1/sessions/{sid}", headers=admin)).json()["tags"] == ["b", "c"]
        await http.delete(f"/v1/sessions/{sid}", headers=admin)
        refused = await http.patch(f"/v1/sessions/{sid}", json={"tags": []}, headers=admin)
        assert refused.status_code == 409
