"""The session index: ``rpc("session","list")`` pages from the PostgreSQL projection (real
nats-server and PostgreSQL), and how the projection keeps status and tags."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _session_support import Gateway, eventually
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from sqlalchemy import text

from shoal.common.clock import iso
from shoal.common.contracts import Event
from shoal.common.errors import BadRequest
from shoal.common.messaging import Envelope, Subjects, request
from shoal.common.storage import Database
from shoal.session.app import MIGRATIONS_DIR, VERSION_TABLE
from shoal.session.store import HistoryStore


async def _list(nc: NATS, subjects: Subjects, **body: Any) -> dict[str, Any]:
    reply: dict[str, Any] = await request(nc, subjects.rpc("session", "list"), body, timeout=5)
    return reply


async def _all_pages(nc: NATS, subjects: Subjects, **body: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await _list(nc, subjects, cursor=cursor, **body)
        ids += [s["id"] for s in page["sessions"]]
        cursor = page["next"]
        if cursor is None:
            return ids


async def _indexed(nc: NATS, subjects: Subjects, owner: str, count: int) -> list[str]:
    """The owner's sessions once the projection has caught up with ``count`` of them."""
    return await eventually(
        lambda: _all_pages(nc, subjects, owner=owner, limit=100), lambda ids: len(ids) >= count
    )


async def test_pages_run_newest_first_per_owner_and_stay_stable(
    app: FastAPI, gateway: Gateway, nc: NATS, subjects: Subjects
) -> None:
    first = [f"ses_a{i:02d}" for i in range(7)]
    for sid in first:  # one by one: creation times grow
        assert (await gateway.create(sid, owner="alice"))["ok"]
    await gateway.create("ses_bob", owner="bob")
    assert await _indexed(nc, subjects, "alice", 7) == first[::-1]

    page = await _list(nc, subjects, owner="alice", limit=3)
    assert [s["id"] for s in page["sessions"]] == first[::-1][:3]
    row = page["sessions"][0]
    assert (row["owner"], row["status"], row["tags"]) == ("alice", "idle", [])
    assert row["created_at"].endswith("Z")

    # Sessions created while a client pages never shift the pages it has not read yet.
    more = [f"ses_b{i:02d}" for i in range(5)]
    await asyncio.gather(*(gateway.create(sid, owner="alice") for sid in more))
    seen = [s["id"] for s in page["sessions"]]
    cursor = page["next"]
    while cursor is not None:
        page = await _list(nc, subjects, owner="alice", limit=3, cursor=cursor)
        seen += [s["id"] for s in page["sessions"]]
        cursor = page["next"]
    assert seen == first[::-1]

    everyone = await eventually(
        lambda: _all_pages(nc, subjects, limit=4), lambda ids: len(ids) == 13
    )
    assert "ses_bob" in everyone
    assert set(first + more) <= set(everyone)


async def test_status_filter_and_refusals(
    app: FastAPI, gateway: Gateway, nc: NATS, subjects: Subjects
) -> None:
    await gateway.create("ses_idle", owner="carol")
    await gateway.create("ses_ended", owner="carol")
    assert (await gateway.send("ses_ended", "session.terminate", {}, owner="carol"))["ok"]

    async def terminated() -> list[str]:
        return await _all_pages(nc, subjects, owner="carol", status="terminated")

    assert await eventually(terminated, lambda ids: ids == ["ses_ended"]) == ["ses_ended"]
    assert await _all_pages(nc, subjects, owner="carol", status="idle") == ["ses_idle"]
    for bad in ({"cursor": "not-a-cursor"}, {"status": "sleepy"}, {"limit": 0}):
        with pytest.raises(BadRequest):
            await _list(nc, subjects, owner="carol", **bad)


async def test_tags_follow_the_newest_event_that_set_them(database_url: str) -> None:
    def event(seq: int, kind: Event, data: dict[str, Any]) -> Envelope:
        return Envelope(
            id=f"ses_t:{seq}:0",
            type=kind,
            source="session",
            time=iso(1_000.0 + seq),
            subject="ses_t",
            owner="dana",
            seq=seq,
            data=data,
        )

    created = event(1, Event.SESSION_CREATED, {"metadata": {}, "tags": ["a"]})
    running = event(2, Event.SESSION_STATUS, {"status": "running"})
    retagged = event(3, Event.SESSION_UPDATED, {"tags": ["b", "c"]})
    db = Database(database_url, pool_size=1)
    try:
        await db.migrate(MIGRATIONS_DIR, VERSION_TABLE)
        history = HistoryStore(db)
        await history.project([retagged])  # the newest first, then the rest in one batch
        await history.project([running, created])
        async with db.session() as s:
            query = text("SELECT status, tags, created_at, updated_at FROM sessions")
            row = (await s.execute(query)).one()
        rows = await history.list_sessions("dana", "running", None, 10)
    finally:
        await db.close()
    assert (row.status, row.tags) == ("running", ["b", "c"])
    assert row.created_at.timestamp() == 1_001.0
    assert row.updated_at.timestamp() == 1_003.0
    assert [(r.id, r.tags) for r in rows] == [("ses_t", ["b", "c"])]
