"""Secrets, expiry and audit through the RPCs, rotation online — real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from _keys_support import DEV_KEY, audit_events, call
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shoal.common.clock import ManualClock, iso
from shoal.common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ShoalError,
    Unauthorized,
    Unavailable,
)
from shoal.common.messaging import Subjects
from shoal.common.storage import Database
from shoal.keys.admin import rotate_kek
from shoal.keys.app import MIGRATIONS, VERSION_TABLE
from shoal.keys.crypto import DEV_KEK_ID, KekRing, dev_kek
from shoal.keys.store import SecretStore, data_keys, secrets_table
from shoal.keys.vault import MAX_VALUE_BYTES, SecretService

pytestmark = pytest.mark.timeout(60)


# -- the secret RPCs ------------------------------------------------------------------------------


@pytest.mark.usefixtures("keys_app")
async def test_put_list_get_delete(nc: NATS, subjects: Subjects, clock: ManualClock) -> None:
    put = await call(nc, subjects, "secrets.put", {"owner": "alice", "name": "GH", "value": "v1"})
    assert put == {"name": "GH", "version": 1, "updated_at": iso(clock.now())}
    clock.advance(5)
    put = await call(nc, subjects, "secrets.put", {"owner": "alice", "name": "GH", "value": "v2"})
    assert put["version"] == 2
    await call(nc, subjects, "secrets.put", {"owner": "alice", "name": "a.b-c_D", "value": ""})

    listed = (await call(nc, subjects, "secrets.list", {"owner": "alice"}))["secrets"]
    assert [s["name"] for s in listed] == ["GH", "a.b-c_D"]
    assert set(listed[0]) == {"name", "version", "created_at", "updated_at"}
    assert listed[0]["version"] == 2
    assert listed[0]["created_at"] < listed[0]["updated_at"]

    got = await call(nc, subjects, "secrets.get", {"owner": "alice", "name": "GH"})
    assert got == {"name": "GH", "value": "v2"}
    got = await call(nc, subjects, "secrets.get", {"owner": "alice", "name": "a.b-c_D"})
    assert got["value"] == ""

    assert await call(nc, subjects, "secrets.delete", {"owner": "alice", "name": "GH"}) == {
        "deleted": True
    }
    assert await call(nc, subjects, "secrets.delete", {"owner": "alice", "name": "GH"}) == {
        "deleted": False
    }
    with pytest.raises(NotFound):
        await call(nc, subjects, "secrets.get", {"owner": "alice", "name": "GH"})


@pytest.mark.usefixtures("keys_app")
async def test_unicode_values_round_trip_and_the_limit_counts_bytes(
    nc: NATS, subjects: Subjects
) -> None:
    value = "é🔑\u0000\n" * 10
    await call(nc, subjects, "secrets.put", {"owner": "u", "name": "uni", "value": value})
    got = await call(nc, subjects, "secrets.get", {"owner": "u", "name": "uni"})
    assert got["value"] == value
    exact = "x" * MAX_VALUE_BYTES
    await call(nc, subjects, "secrets.put", {"owner": "u", "name": "max", "value": exact})
    assert (await call(nc, subjects, "secrets.get", {"owner": "u", "name": "max"}))[
        "value"
    ] == exact
    # 16 Ki four-byte characters are 64 KiB + 4: under the limit in characters, over in bytes.
    body = {"owner": "u", "name": "wide", "value": "🔑" * (MAX_VALUE_BYTES // 4 + 1)}
    with pytest.raises(PayloadTooLarge):
        await call(nc, subjects, "secrets.put", body)


@pytest.mark.usefixtures("keys_app")
async def test_another_owners_secret_is_not_found_like_a_missing_one(
    nc: NATS, subjects: Subjects
) -> None:
    await call(nc, subjects, "secrets.put", {"owner": "alice", "name": "K", "value": "a"})
    errors = []
    for owner, name in (("bob", "K"), ("alice", "NOPE"), ("nobody", "K")):
        with pytest.raises(NotFound) as caught:
            await call(nc, subjects, "secrets.get", {"owner": owner, "name": name})
        errors.append(caught.value.to_dict())
    assert errors[0] == errors[1] == errors[2]  # no existence leak
    assert (await call(nc, subjects, "secrets.list", {"owner": "bob"}))["secrets"] == []
    deleted = await call(nc, subjects, "secrets.delete", {"owner": "bob", "name": "K"})
    assert deleted == {"deleted": False}
    got = await call(nc, subjects, "secrets.get", {"owner": "alice", "name": "K"})
    assert got["value"] == "a"


ODD_NAMES: list[Any] = [
    "",
    ".",
    "..",
    "a" * 129,
    "a/b",
    "a b",
    "a\x00b",
    "a\nb",
    "*",
    ">",
    "ключ",
    "name%2F",
    "a:b",
    None,
    12,
    ["x"],
]


@pytest.mark.usefixtures("keys_app")
async def test_bad_input_battery(nc: NATS, subjects: Subjects) -> None:
    """Every malformed request gets its documented error, and none echoes the value."""
    value = "battery-value-" + os.urandom(8).hex()
    for name in ODD_NAMES:
        for method, body in (
            ("secrets.put", {"owner": "u", "name": name, "value": value}),
            ("secrets.get", {"owner": "u", "name": name}),
            ("secrets.delete", {"owner": "u", "name": name}),
        ):
            with pytest.raises(BadRequest) as caught:
                await call(nc, subjects, method, body)
            assert value not in str(caught.value.to_dict())
    for owner in ("", "a.b", "a b", "*", ">", "o" * 129, None, 5):
        for method, body in (
            ("secrets.put", {"owner": owner, "name": "n", "value": value}),
            ("secrets.get", {"owner": owner, "name": "n"}),
            ("secrets.list", {"owner": owner}),
            ("secrets.delete", {"owner": owner, "name": "n"}),
        ):
            with pytest.raises(BadRequest):
                await call(nc, subjects, method, body)
    for bad_value in (None, 5, ["v"], {"v": 1}, True):
        with pytest.raises(BadRequest):
            await call(nc, subjects, "secrets.put", {"owner": "u", "name": "n", "value": bad_value})
    oversize = {"owner": "u", "name": "n", "value": value * (MAX_VALUE_BYTES // len(value) + 1)}
    with pytest.raises(PayloadTooLarge) as too_large:
        await call(nc, subjects, "secrets.put", oversize)
    assert too_large.value.detail == {"limit": MAX_VALUE_BYTES}
    assert value not in str(too_large.value.to_dict())
    for actor in ("", 5, "a" * 201):
        with_actor = {"owner": "u", "name": "n", "value": "v", "actor": actor}
        with pytest.raises(BadRequest):
            await call(nc, subjects, "secrets.put", with_actor)
    with pytest.raises(BadRequest):
        await call(nc, subjects, "admin.rotate_kek", {"to_kek_id": 5})
    # Nothing of the above was stored.
    assert (await call(nc, subjects, "secrets.list", {"owner": "u"}))["secrets"] == []


# -- key expiry ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("keys_app")
async def test_create_with_expiry_and_expired_keys_are_refused(
    nc: NATS, subjects: Subjects, clock: ManualClock
) -> None:
    base = {"name": "tmp", "owner": "u", "scopes": ["read"]}
    by_seconds = await call(nc, subjects, "create", {**base, "expires_in_seconds": 60})
    assert by_seconds["expires_at"] == iso(clock.now() + 60)
    at = datetime.fromtimestamp(clock.now(), tz=UTC) + timedelta(seconds=120)
    by_time = await call(nc, subjects, "create", {**base, "expires_at": at.isoformat()})
    assert by_time["expires_at"] == iso(at.timestamp())
    listed = (await call(nc, subjects, "list", {"owner": "u"}))["keys"]
    assert sorted(k["expires_at"] for k in listed) == sorted(
        [by_seconds["expires_at"], by_time["expires_at"]]
    )

    await call(nc, subjects, "verify", {"key": by_seconds["key"]})
    clock.advance(60)
    with pytest.raises(Unauthorized):
        await call(nc, subjects, "verify", {"key": by_seconds["key"]})
    await call(nc, subjects, "verify", {"key": by_time["key"]})
    clock.advance(60)
    with pytest.raises(Unauthorized):
        await call(nc, subjects, "verify", {"key": by_time["key"]})

    past = (datetime.fromtimestamp(clock.now(), tz=UTC) - timedelta(seconds=1)).isoformat()
    for bad in (
        {"expires_in_seconds": 0},
        {"expires_in_seconds": -5},
        {"expires_in_seconds": "60"},
        {"expires_in_seconds": True},
        {"expires_in_seconds": 10**12},
        {"expires_at": past},
        {"expires_at": "2999-01-01T00:00:00"},  # no offset
        {"expires_at": "tomorrow"},
        {"expires_at": 5},
        {"expires_at": at.isoformat(), "expires_in_seconds": 60},
    ):
        with pytest.raises(BadRequest):
            await call(nc, subjects, "create", {**base, **bad})


# -- audit ---------------------------------------------------------------------------------------


async def test_audit_events_for_keys_and_secrets(
    keys_app: FastAPI, nc: NATS, js: JetStreamContext, subjects: Subjects, clock: ManualClock
) -> None:
    created = await call(nc, subjects, "create", {"name": "ops", "owner": "o", "scopes": ["admin"]})
    for _ in range(5):  # five verifications inside a minute: one admin-use event per key
        await call(nc, subjects, "verify", {"key": created["key"]})
        await call(nc, subjects, "verify", {"key": DEV_KEY})
    clock.advance(61)
    await call(nc, subjects, "verify", {"key": created["key"]})
    plain = await call(nc, subjects, "create", {"name": "p", "owner": "o", "scopes": ["read"]})
    await call(nc, subjects, "verify", {"key": plain["key"]})  # not admin: no event
    body = {"owner": "o", "name": "S", "value": "audit-value-xyz", "actor": "key:" + plain["id"]}
    await call(nc, subjects, "secrets.put", body)
    await call(nc, subjects, "secrets.get", {"owner": "o", "name": "S", "actor": "session:ses_1"})
    await call(nc, subjects, "secrets.delete", {"owner": "o", "name": "S"})
    await call(nc, subjects, "revoke", {"id": created["id"]})

    events = await audit_events(js, subjects)
    summary = [(e.type, e.owner, e.subject) for e in events]
    assert summary == [
        ("key.created", "o", created["id"]),
        ("key.admin_used", "o", created["id"]),
        ("key.admin_used", "admin", "dev-admin"),
        ("key.admin_used", "o", created["id"]),
        ("key.created", "o", plain["id"]),
        ("secret.put", "o", "S"),
        ("secret.read", "o", "S"),
        ("secret.deleted", "o", "S"),
        ("key.revoked", "o", created["id"]),
    ]
    assert events[0].data == {"name": "ops", "scopes": ["admin"], "expires_at": None}
    assert events[5].data == {"version": 1, "actor": "key:" + plain["id"]}
    assert events[6].data == {"version": 1, "actor": "session:ses_1"}
    assert all(e.source == "keys" and e.id.startswith("aud_") for e in events)
    assert "audit-value-xyz" not in repr(events)
    assert created["key"] not in repr(events)


async def test_a_read_that_cannot_be_audited_is_refused(
    keys_app: FastAPI, database_url: str, clock: ManualClock
) -> None:
    class DownAudit:
        async def emit(self, kind: str, **_: Any) -> None:
            raise ConnectionError("audit stream down")

    db = Database(database_url)
    try:
        service = SecretService(
            SecretStore(db), KekRing({"dev": dev_kek()}, active="dev"), DownAudit(), clock=clock
        )
        await service.put("o", "n", "value")  # committed; the failure is logged, not raised
        with pytest.raises(Unavailable):
            await service.get("o", "n")
    finally:
        await db.close()


# -- tampering in the database ---------------------------------------------------------------


async def test_moved_ciphertexts_and_wrapped_keys_fail_closed(
    keys_app: FastAPI, nc: NATS, subjects: Subjects, database_url: str
) -> None:
    for owner in ("alice", "bob"):
        for name in ("A", "B"):
            body = {"owner": owner, "name": name, "value": f"{owner}-{name}"}
            await call(nc, subjects, "secrets.put", body)
    db = Database(database_url)
    try:
        async with db.session() as s, s.begin():
            c = secrets_table.c
            row = (await s.execute(sa.select(secrets_table).where(c.owner == "alice"))).first()
            assert row is not None
            # alice's A ciphertext copied over bob's A, and over alice's B.
            for owner, name in (("bob", "A"), ("alice", "B")):
                await s.execute(
                    sa.update(secrets_table)
                    .where(c.owner == owner, c.name == name)
                    .values(nonce=row.nonce, ciphertext=row.ciphertext, version=row.version)
                )
        for owner, name in (("bob", "A"), ("alice", "B")):
            with pytest.raises(ShoalError) as caught:
                await call(nc, subjects, "secrets.get", {"owner": owner, "name": name})
            assert caught.value.code == "internal"
            assert "alice-A" not in str(caught.value.to_dict())
        assert (await call(nc, subjects, "secrets.get", {"owner": "alice", "name": "A"}))[
            "value"
        ] == "alice-A"
        # bob's data key replaced by alice's wrapped one: bob's secrets no longer open.
        async with db.session() as s, s.begin():
            alice_dk = (
                await s.execute(sa.select(data_keys).where(data_keys.c.owner == "alice"))
            ).first()
            assert alice_dk is not None
            await s.execute(
                sa.update(data_keys)
                .where(data_keys.c.owner == "bob")
                .values(wrapped_key=alice_dk.wrapped_key, kek_id=alice_dk.kek_id)
            )
        with pytest.raises(ShoalError) as caught:
            await call(nc, subjects, "secrets.get", {"owner": "bob", "name": "B"})
        assert caught.value.code == "internal"
    finally:
        await db.close()


# -- KEK rotation --------------------------------------------------------------------------------


class ListAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str, dict[str, Any]]] = []

    async def emit(
        self, kind: str, *, owner: str | None, subject: str, data: dict[str, Any]
    ) -> None:
        self.events.append((kind, owner, subject, data))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.migrate(MIGRATIONS, VERSION_TABLE)
    yield database
    await database.close()


async def test_rotation_with_a_mix_of_keks_keeps_every_secret_readable(
    db: Database, clock: ManualClock
) -> None:
    keks = {"dev": dev_kek(), "k1": os.urandom(32), "k2": os.urandom(32), "k3": os.urandom(32)}
    audit = ListAudit()
    store = SecretStore(db)
    expected: dict[tuple[str, str], str] = {}
    # Deployment history: data keys created while dev, then k1, then k2 were active.
    for era, active in enumerate(("dev", "k1", "k2")):
        service = SecretService(store, KekRing(keks, active=active), audit, clock=clock)
        for i in range(4):
            owner = f"o{era}_{i}"
            for name in ("A", "B"):
                value = f"{owner}/{name}/{os.urandom(4).hex()}"
                await service.put(owner, name, value)
                expected[(owner, name)] = value
    assert await store.count_by_kek() == {"dev": 4, "k1": 4, "k2": 4}

    async def all_readable(service: SecretService) -> None:
        for (owner, name), value in expected.items():
            assert (await service.get(owner, name))[1] == value

    rotating = SecretService(store, KekRing(keks, active="k3"), audit, clock=clock)
    await all_readable(rotating)
    report = await rotating.rotate_kek("k3")
    assert (report.rewrapped, report.remaining, report.by_kek, report.failed) == (
        12,
        0,
        {"k3": 12},
        [],
    )
    # Only the wrapped keys changed; the new KEK alone now reads everything.
    await all_readable(
        SecretService(store, KekRing({"k3": keks["k3"]}, active="k3"), audit, clock=clock)
    )
    again = await rotating.rotate_kek()
    assert (again.rewrapped, again.remaining) == (0, 0)  # idempotent
    async with db.session() as s:
        versions = (await s.execute(sa.select(data_keys.c.version))).scalars().all()
    assert set(versions) == {2}
    assert audit.events[-1] == (
        "kek.rotated",
        None,
        "k3",
        {"rewrapped": 0, "remaining": 0, "failed": 0},
    )


async def test_rotation_runs_online_with_concurrent_reads_writes_and_rotations(
    db: Database, clock: ManualClock
) -> None:
    keks = {"k1": os.urandom(32), "k2": os.urandom(32)}
    store = SecretStore(db)
    old = SecretService(store, KekRing(keks, active="k1"), ListAudit(), clock=clock)
    owners = [f"own{i:03d}" for i in range(150)]  # more than one rotation batch
    for owner in owners:
        await old.put(owner, "S", f"{owner}-v")
    new = SecretService(store, KekRing(keks, active="k2"), ListAudit(), clock=clock)
    stop = asyncio.Event()
    seen_errors: list[BaseException] = []

    async def churn(service: SecretService, worker: int) -> int:
        n = 0
        while not stop.is_set():
            owner = owners[(n * 7 + worker) % len(owners)]
            try:
                assert (await service.get(owner, "S"))[1].startswith(owner)
                await service.put(owner, f"W{worker}", f"{owner}-w{n}")
                await service.put(f"fresh{worker}_{n}", "S", "new")  # a new owner mid-rotation
            except BaseException as exc:  # collected and asserted below
                seen_errors.append(exc)
                raise
            n += 1
        return n

    workers = [asyncio.create_task(churn(s, w)) for w, s in enumerate((old, new, new, old))]
    reports = await asyncio.gather(new.rotate_kek("k2"), new.rotate_kek("k2"))
    stop.set()
    done = await asyncio.gather(*workers)
    assert not seen_errors
    assert all(n > 0 for n in done)
    # Two rotations at once: together they re-wrapped each k1 key once (row locks).
    total_k1 = len(owners) + sum(done[i] for i in (0, 3))
    assert sum(r.rewrapped for r in reports) <= total_k1
    # Replicas still on k1 kept creating k1 data keys; a re-run finishes the job.
    final = await new.rotate_kek("k2")
    assert final.remaining == 0
    assert await store.count_by_kek() == {"k2": final.by_kek["k2"]}
    only_k2 = SecretService(
        store, KekRing({"k2": keks["k2"]}, active="k2"), ListAudit(), clock=clock
    )
    for owner in owners:
        assert (await only_k2.get(owner, "S"))[1] == f"{owner}-v"


async def test_rotation_reports_a_data_key_it_cannot_unwrap(
    db: Database, clock: ManualClock
) -> None:
    keks = {"k1": os.urandom(32), "lost": os.urandom(32), "k2": os.urandom(32)}
    store = SecretStore(db)
    await SecretService(store, KekRing(keks, active="lost"), ListAudit(), clock=clock).put(
        "x", "S", "v"
    )
    await SecretService(store, KekRing(keks, active="k1"), ListAudit(), clock=clock).put(
        "y", "S", "v"
    )
    without_lost = KekRing({"k1": keks["k1"], "k2": keks["k2"]}, active="k2")
    report = await SecretService(store, without_lost, ListAudit(), clock=clock).rotate_kek()
    assert report.rewrapped == 1
    assert report.failed == [{"owner": "x", "kek_id": "lost", "reason": "KeyError"}]
    assert report.remaining == 1


@pytest.mark.usefixtures("keys_app")
async def test_rotate_kek_rpc(nc: NATS, subjects: Subjects) -> None:
    await call(nc, subjects, "secrets.put", {"owner": "o", "name": "S", "value": "v"})
    report = await rotate_kek(nc, subjects, DEV_KEK_ID, timeout=10)
    assert report == {
        "to_kek_id": DEV_KEK_ID,
        "rewrapped": 0,
        "remaining": 0,
        "by_kek": {DEV_KEK_ID: 1},
        "failed": [],
    }
    assert (await rotate_kek(nc, subjects, timeout=10))["to_kek_id"] == DEV_KEK_ID
    with pytest.raises(BadRequest):
        await rotate_kek(nc, subjects, "nope", timeout=10)


async def test_rotation_to_a_kek_that_is_not_active_is_refused(
    db: Database, clock: ManualClock
) -> None:
    ring = KekRing({"k1": os.urandom(32), "k2": os.urandom(32)}, active="k1")
    with pytest.raises(Conflict):
        await SecretService(SecretStore(db), ring, ListAudit(), clock=clock).rotate_kek("k2")
