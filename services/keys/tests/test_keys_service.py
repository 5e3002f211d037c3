"""The keys service running in-process (its lifespan) against real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _keys_support import DEV_KEY, call
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shoal.common.clock import ManualClock, iso
from shoal.common.errors import BadRequest, NotFound, Unauthorized
from shoal.common.messaging import Subjects, loads
from shoal.keys.app import create_app
from shoal.keys.config import KeysSettings
from shoal.keys.keyformat import generate_key
from shoal.keys.service import KeyService


@pytest.mark.usefixtures("keys_app")
async def test_create_verify_list_revoke(nc: NATS, subjects: Subjects) -> None:
    created = await call(
        nc, subjects, "create", {"name": "ci", "owner": "user_1", "scopes": ["sessions", "read"]}
    )
    assert set(created) == {"id", "key", "name", "owner", "scopes", "created_at", "expires_at"}
    assert created["expires_at"] is None
    assert created["key"].startswith("shoal_" + created["id"] + "_")
    assert created["scopes"] == ["read", "sessions"]

    verified = await call(nc, subjects, "verify", {"key": created["key"]})
    assert verified == {
        "key_id": created["id"],
        "owner": "user_1",
        "scopes": ["read", "sessions"],
        "name": "ci",
        "expires_at": None,
    }

    listed = (await call(nc, subjects, "list", {"owner": "user_1"}))["keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert listed[0]["last_used_at"] is not None
    assert listed[0]["revoked_at"] is None
    assert "key_hash" not in listed[0]
    assert "key" not in listed[0]

    revoked: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def on_revoked(msg: Msg) -> None:
        if not revoked.done():
            revoked.set_result(loads(msg.data))

    sub = await nc.subscribe(subjects.broadcast("keys.revoked"), cb=on_revoked)
    await nc.flush()
    assert await call(nc, subjects, "revoke", {"id": created["id"]}) == {}
    assert await asyncio.wait_for(revoked, 5) == {"key_id": created["id"]}
    await sub.unsubscribe()

    with pytest.raises(Unauthorized):
        await call(nc, subjects, "verify", {"key": created["key"]})
    listed = (await call(nc, subjects, "list", {"owner": "user_1"}))["keys"]
    assert listed[0]["revoked_at"] is not None


@pytest.mark.usefixtures("keys_app")
async def test_list_all_owners_includes_the_dev_admin(nc: NATS, subjects: Subjects) -> None:
    await call(nc, subjects, "create", {"name": "a", "owner": "alice", "scopes": ["read"]})
    await call(nc, subjects, "create", {"name": "b", "owner": "bob", "scopes": ["jobs"]})
    listed = (await call(nc, subjects, "list", {"owner": None}))["keys"]
    assert sorted(k["owner"] for k in listed) == ["admin", "alice", "bob"]
    assert (await call(nc, subjects, "list", {"owner": "nobody"}))["keys"] == []


@pytest.mark.usefixtures("keys_app")
async def test_dev_admin_key_is_accepted_as_is(nc: NATS, subjects: Subjects) -> None:
    verified = await call(nc, subjects, "verify", {"key": DEV_KEY})
    assert verified == {
        "key_id": "dev-admin",
        "owner": "admin",
        "scopes": ["admin"],
        "name": "development admin",
        "expires_at": None,
    }
    for near in (DEV_KEY + "x", DEV_KEY[:-1], DEV_KEY.upper()):
        with pytest.raises(Unauthorized):
            await call(nc, subjects, "verify", {"key": near})


@pytest.mark.usefixtures("keys_app")
async def test_every_bad_key_gets_the_same_unauthorized(nc: NATS, subjects: Subjects) -> None:
    created = await call(nc, subjects, "create", {"name": "k", "owner": "u", "scopes": ["read"]})
    key = created["key"]
    unknown = generate_key()[1]  # well formed, checksum fine, no such id
    wrong_secret = key[: len("shoal_") + 13] + generate_key()[1][len("shoal_") + 13 :]
    typo = key[:20] + ("a" if key[20] != "a" else "b") + key[21:]
    messages = set()
    for bad in (unknown, wrong_secret, typo, "", "garbage", "x" * 10_000):
        with pytest.raises(Unauthorized) as caught:
            await call(nc, subjects, "verify", {"key": bad})
        assert caught.value.detail == {}
        messages.add(caught.value.message)
    assert len(messages) == 1


@pytest.mark.usefixtures("keys_app")
async def test_create_validates_its_input(nc: NATS, subjects: Subjects) -> None:
    bad_bodies: list[dict[str, Any]] = [
        {"name": "x", "owner": "u", "scopes": ["root"]},
        {"name": "x", "owner": "u", "scopes": []},
        {"name": "x", "owner": "user.1", "scopes": ["read"]},
        {"name": "", "owner": "u", "scopes": ["read"]},
        {"name": "x", "owner": "u", "scopes": "read"},
        {"owner": "u", "scopes": ["read"]},
    ]
    for body in bad_bodies:
        with pytest.raises(BadRequest):
            await call(nc, subjects, "create", body)
    with pytest.raises(NotFound):
        await call(nc, subjects, "revoke", {"id": "nosuchkey123"})


async def test_last_used_is_written_at_most_once_a_minute(
    keys_app: FastAPI, nc: NATS, subjects: Subjects, clock: ManualClock
) -> None:
    created = await call(nc, subjects, "create", {"name": "k", "owner": "u2", "scopes": ["read"]})

    async def last_used() -> str | None:
        keys = (await call(nc, subjects, "list", {"owner": "u2"}))["keys"]
        value: str | None = keys[0]["last_used_at"]
        return value

    assert await last_used() is None
    await call(nc, subjects, "verify", {"key": created["key"]})
    first = await last_used()
    assert first is not None
    clock.advance(30)
    await call(nc, subjects, "verify", {"key": created["key"]})
    assert await last_used() == first
    clock.advance(31)
    await call(nc, subjects, "verify", {"key": created["key"]})
    later = await last_used()
    assert later is not None
    assert later > first


async def test_expired_key_is_unauthorized(
    keys_app: FastAPI, nc: NATS, subjects: Subjects, clock: ManualClock
) -> None:
    service: KeyService = keys_app.state.keys
    expires = datetime.fromtimestamp(clock.now(), tz=UTC) + timedelta(seconds=10)
    _, key = await service.create(name="temp", owner="u3", scopes=["read"], expires_at=expires)
    verified = await call(nc, subjects, "verify", {"key": key})
    # Verifiers (the gateways) bound their cache by it.
    assert verified["expires_at"] == iso(expires.timestamp())
    clock.advance(10)
    with pytest.raises(Unauthorized):
        await call(nc, subjects, "verify", {"key": key})


async def test_keys_survive_a_restart_and_migrations_are_idempotent(
    settings: KeysSettings, clock: ManualClock, nc: NATS, subjects: Subjects
) -> None:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        created = await call(
            nc, subjects, "create", {"name": "k", "owner": "u", "scopes": ["read"]}
        )
        await call(nc, subjects, "revoke", {"id": "dev-admin"})
        with pytest.raises(Unauthorized):
            await call(nc, subjects, "verify", {"key": DEV_KEY})
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        assert (await call(nc, subjects, "verify", {"key": created["key"]}))["owner"] == "u"
        # Start-up re-ensures the configured dev admin key.
        assert (await call(nc, subjects, "verify", {"key": DEV_KEY}))["key_id"] == "dev-admin"


async def test_readiness_reports_nats_and_database(keys_app: FastAPI) -> None:
    import httpx

    transport = httpx.ASGITransport(app=keys_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keys") as client:
        assert (await client.get("/healthz")).status_code == 200
        for _ in range(100):
            ready = await client.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert ready.json()["checks"] == {"nats": True, "database": True}
        assert (await client.get("/metrics")).status_code == 200
