"""The session service against a real nats-server and PostgreSQL, its lifespan run in-process."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from _session_support import (
    Gateway,
    eventually,
    load_state,
    partition_consumers,
    read_events,
    running,
)
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import text

from shoal.common.clock import iso
from shoal.common.contracts import TAGS_HEADER, Event, Status, tags_from_header
from shoal.common.messaging import Envelope, Subjects, ledger_events, request
from shoal.common.storage import Database
from shoal.session import metrics
from shoal.session.app import MIGRATIONS_DIR, VERSION_TABLE
from shoal.session.config import SessionSettings
from shoal.session.ownership import assign
from shoal.session.store import HistoryStore


def _types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


async def test_a_prompt_runs_end_to_end(
    app: FastAPI, gateway: Gateway, js: JetStreamContext, subjects: Subjects
) -> None:
    sid = "ses_flow"
    created = await gateway.create(sid)
    assert created["ok"]
    assert created["data"]["seq"] == 1
    assert created["data"]["session"]["status"] == "idle"
    assert (await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "hello"}))["ok"]
    connected = await gateway.send(sid, "runner.connect", {"connection_id": "c1"})
    assert connected["data"]["session"]["status"] == "running"
    assert connected["data"]["session"]["current_prompt_id"] == "p1"
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "again"})
    await gateway.send(
        sid, "message.complete", {"prompt_id": "p1", "message_id": "m1", "content": "hi!"}
    )
    done = await gateway.send(
        sid, "message.complete", {"prompt_id": "p2", "message_id": "m2", "content": "bye"}
    )
    assert done["data"]["session"]["status"] == "idle"

    events = await read_events(js, subjects, sid)
    assert _types(events) == [
        Event.SESSION_CREATED,
        Event.PROMPT_QUEUED,
        Event.RUNNER_CONNECTED,
        Event.PROMPT_DISPATCHED,
        Event.SESSION_STATUS,
        Event.PROMPT_QUEUED,
        Event.MESSAGE_COMPLETED,
        Event.PROMPT_DISPATCHED,
        Event.MESSAGE_COMPLETED,
        Event.SESSION_STATUS,
    ]
    assert [e.seq for e in events] == list(range(1, 11))
    assert all(e.owner == "u1" and e.source == "session" for e in events)
    assert done["data"]["seq"] == 10

    state = await load_state(js, subjects, sid)
    assert state.status == Status.IDLE
    assert state.event_seq == 10
    assert state.message_count == 2
    assert state.queue == []
    assert state.current_prompt is None
    assert state.runner_connected

    # the PostgreSQL projection, through the messages RPC
    def count(n: int) -> Any:
        return lambda page: len(page["messages"]) == n

    async def page(after: int | None = None, limit: int = 50) -> Any:
        body = {"session_id": sid, "after": after, "limit": limit}
        return await request(gateway.nc, subjects.rpc("session", "messages"), body)

    history = await eventually(page, count(4))
    assert [(m["role"], m["content"], m["seq"]) for m in history["messages"]] == [
        ("user", "hello", 2),
        ("user", "again", 6),
        ("assistant", "hi!", 7),
        ("assistant", "bye", 9),
    ]
    assert history["messages"][0]["id"] == events[1].id
    assert history["messages"][2]["prompt_id"] == "p1"
    assert history["next"] is None
    first = await page(limit=3)
    assert len(first["messages"]) == 3
    assert first["next"] == 7
    rest = await page(after=first["next"], limit=3)
    assert [m["seq"] for m in rest["messages"]] == [9]
    assert rest["next"] is None


async def test_rejections_answer_and_leave_no_trace(
    app: FastAPI, gateway: Gateway, js: JetStreamContext, subjects: Subjects
) -> None:
    missing = await gateway.send("ses_nobody", "prompt.submit", {"prompt_id": "p", "content": "x"})
    assert missing["ok"] is False
    assert missing["error"]["code"] == "not_found"
    assert await read_events(js, subjects, "ses_nobody") == []

    garbage = await gateway.send("ses_garbage", "prompt.submit", raw=b"{not json")
    assert garbage["error"]["code"] == "bad_request"

    sid = "ses_rej"
    await gateway.create(sid)
    bad = await gateway.send(sid, "prompt.submit", {"content": "no prompt id"})
    assert bad["error"]["code"] == "bad_request"
    await gateway.send(sid, "session.terminate", {"reason": "done"})
    late = await gateway.send(sid, "prompt.submit", {"prompt_id": "p", "content": "x"})
    assert late["error"]["code"] == "conflict"
    assert _types(await read_events(js, subjects, sid)) == [
        Event.SESSION_CREATED,
        Event.SESSION_STATUS,
        Event.SESSION_TERMINATED,
    ]
    # the service kept going: every command above was acked, none is waiting for redelivery
    for info in await partition_consumers(js, subjects):
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0


async def test_the_same_command_twice_gives_one_set_of_events(
    app: FastAPI, gateway: Gateway, js: JetStreamContext, subjects: Subjects
) -> None:
    sid = "ses_twice"
    await gateway.create(sid)
    submit = gateway.command(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    first = await gateway.publish(submit)
    again = await gateway.publish(submit)  # same Nats-Msg-Id: the command stream drops it
    assert again.duplicate
    assert again.seq == first.seq
    # A gateway retry after the dedup window: a new stream message, the same prompt id.
    await gateway.publish(submit, msg_id=submit.id + "-retry")
    await gateway.send(sid, "runner.connect", {"connection_id": "c"})  # a barrier: in order
    events = await read_events(js, subjects, sid)
    assert _types(events) == [
        Event.SESSION_CREATED,
        Event.PROMPT_QUEUED,
        Event.RUNNER_CONNECTED,
        Event.PROMPT_DISPATCHED,
        Event.SESSION_STATUS,
    ]


async def test_sessions_run_in_parallel_each_in_order(
    app: FastAPI, gateway: Gateway, js: JetStreamContext, subjects: Subjects
) -> None:
    sessions = [f"ses_par{i}" for i in range(12)]
    prompts = [f"p{i}" for i in range(6)]
    # Interleave every session's commands without waiting for any reply.
    for sid in sessions:
        await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    for pid in prompts:
        for sid in sessions:
            await gateway.publish(
                gateway.command(sid, "prompt.submit", {"prompt_id": pid, "content": pid})
            )
    for sid in sessions:
        await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))

    async def settled(sid: str) -> None:
        await eventually(
            lambda: load_state(js, subjects, sid),
            lambda s: s.runner_connected and s.current_prompt is not None,
        )

    await asyncio.gather(*(settled(sid) for sid in sessions))
    for sid in sessions:
        events = await read_events(js, subjects, sid)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        queued = [e.data["prompt_id"] for e in events if e.type == Event.PROMPT_QUEUED]
        assert queued == prompts
        state = await load_state(js, subjects, sid)
        assert state.current_prompt is not None
        assert state.current_prompt.prompt_id == "p0"
        assert [p.prompt_id for p in state.queue] == prompts[1:]


async def test_readiness_metrics_and_the_session_index(
    app: FastAPI, gateway: Gateway, database_url: str
) -> None:
    sid = "ses_ready"
    await gateway.create(sid, owner="alice")
    await gateway.send(sid, "runner.connect", {"connection_id": "c"})
    await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://session") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {
            "nats": True,
            "consumers": True,
            "leases": True,
            "projection": True,
            "database": True,
        }
        metrics = (await client.get("/metrics")).text
    assert 'shoal_session_commands_total{outcome="applied",type="prompt.submit"}' in metrics
    assert "shoal_session_fenced_writes_total" in metrics
    assert "shoal_session_apply_seconds_bucket" in metrics

    db = Database(database_url, pool_size=1)
    try:

        async def index_row() -> Any:
            async with db.session() as s:
                query = text("SELECT owner, status, last_seq FROM sessions WHERE id = :id")
                return (await s.execute(query, {"id": sid})).first()

        row = await eventually(index_row, lambda r: r is not None and r.status == "running")
        assert row.owner == "alice"
        assert row.last_seq == 5
    finally:
        await db.close()


async def test_replicas_split_the_partitions_by_lease(
    settings: SessionSettings, gateway: Gateway, nc: NATS, js: JetStreamContext, subjects: Subjects
) -> None:
    first = settings.model_copy(update={"instance_id": "replica-a"})
    second = settings.model_copy(update={"instance_id": "replica-b", "projection_enabled": False})
    expected = assign(["replica-a", "replica-b"], settings.session_partitions)

    async def owners() -> dict[int, str | None]:
        rows = await request(nc, subjects.rpc("session", "admin.partitions"), {})
        return {row["partition"]: row["owner"] for row in rows}

    async with running(first):
        alone = await eventually(owners, lambda o: all(v == "replica-a" for v in o.values()))
        assert len(alone) == settings.session_partitions
        async with running(second):
            # replica-a hands over (drain, release) what rendezvous hashing gives replica-b
            await eventually(owners, lambda o: o == expected)
            sessions = [f"ses_split{i}" for i in range(16)]
            replies = await asyncio.gather(*(gateway.create(sid) for sid in sessions))
            assert all(r["ok"] for r in replies)
            view = await request(
                nc, subjects.rpc("session", "admin.session"), {"session_id": sessions[0]}
            )
            assert view["owner"] == expected[view["partition"]]
            assert view["applied_seq"] > 0
            assert view["status"] == "idle"
            assert view["epoch"] > 0
            assert view["revision"] > 0
    for info in await partition_consumers(js, subjects):  # nothing was left behind
        assert info.num_pending == 0
        assert info.num_ack_pending == 0


async def test_shutdown_finishes_what_it_holds_and_a_restart_resumes(
    settings: SessionSettings, gateway: Gateway, js: JetStreamContext, subjects: Subjects
) -> None:
    sid = "ses_restart"
    async with running(settings):
        await gateway.create(sid)
        for i in range(200):
            await gateway.publish(
                gateway.command(sid, "prompt.submit", {"prompt_id": f"p{i}", "content": "x"})
            )
    # stopped mid-stream: whatever was fetched was finished and acked, the rest waits
    for info in await partition_consumers(js, subjects):
        assert info.num_ack_pending == 0
    async with running(settings):
        state = await eventually(
            lambda: load_state(js, subjects, sid), lambda s: len(s.queue) == 200
        )
    events = await read_events(js, subjects, sid)
    assert [e.seq for e in events] == list(range(1, 202))
    assert [e.data["prompt_id"] for e in events[1:]] == [f"p{i}" for i in range(200)]
    assert state.event_seq == 201


async def test_projection_rebuilds_from_the_ledger(
    settings: SessionSettings, gateway: Gateway, nc: NATS, subjects: Subjects
) -> None:
    sid = "ses_rebuild"
    no_projection = settings.model_copy(update={"projection_enabled": False})
    async with running(no_projection):
        await gateway.create(sid)
        await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "one"})
        await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "two"})
        empty = await request(nc, subjects.rpc("session", "messages"), {"session_id": sid})
        assert empty == {"messages": [], "next": None}
    async with running(settings):  # a new projection consumer starts at the ledger's beginning

        async def page() -> Any:
            return await request(nc, subjects.rpc("session", "messages"), {"session_id": sid})

        history = await eventually(page, lambda p: len(p["messages"]) == 2)
    assert [m["content"] for m in history["messages"]] == ["one", "two"]


async def test_admin_rebuild_projection_restores_lost_rows(
    settings: SessionSettings, gateway: Gateway, nc: NATS, subjects: Subjects, database_url: str
) -> None:
    sid = "ses_rebuild_rpc"

    async def page() -> Any:
        return await request(nc, subjects.rpc("session", "messages"), {"session_id": sid})

    async with running(settings):
        await gateway.create(sid)
        await gateway.send(sid, "prompt.submit", {"prompt_id": "p1", "content": "one"})
        await gateway.send(sid, "prompt.submit", {"prompt_id": "p2", "content": "two"})
        await eventually(page, lambda p: len(p["messages"]) == 2)
        db = Database(database_url)
        try:
            async with db.session() as s, s.begin():
                await s.execute(text("DELETE FROM session_messages"))
        finally:
            await db.close()
        assert (await page())["messages"] == []
        report = await request(
            nc, subjects.rpc("session", "admin.rebuild_projection"), {}, timeout=30
        )
        assert report["events_in_ledger"] == 3  # created, queued p1, queued p2 (no runner)
        history = await eventually(page, lambda p: len(p["messages"]) == 2)
    assert [m["content"] for m in history["messages"]] == ["one", "two"]


async def test_a_projected_batch_leaves_what_one_event_at_a_time_leaves(database_url: str) -> None:
    """The projection merges a batch's index rows per session before one upsert: whatever the
    batch boundaries and the order inside them, the row is what applying events singly gives."""

    def status(sid: str, seq: int, value: str, at: float) -> Envelope:
        kind = Event.SESSION_CREATED if seq == 1 else Event.SESSION_STATUS
        return Envelope(
            id=f"{sid}:{seq}:0",
            type=kind,
            source="session",
            time=iso(at),
            subject=sid,
            owner="alice",
            seq=seq,
            data={} if seq == 1 else {"status": value},
        )

    def events(sid: str) -> list[Envelope]:
        return [
            status(sid, 1, "idle", 1_000.0),
            status(sid, 2, "running", 1_001.0),
            status(sid, 3, "idle", 1_002.0),
            status(sid, 4, "running", 1_003.0),
        ]

    db = Database(database_url, pool_size=1)
    try:
        await db.migrate(MIGRATIONS_DIR, VERSION_TABLE)
        history = HistoryStore(db)
        for event in events("ses_single"):
            await history.project([event])
        batched = events("ses_batched")
        await history.project([batched[2], batched[3], batched[0]])  # out of order, one batch
        await history.project([batched[1]])  # a stale one after the newest

        async with db.session() as s:
            query = text(
                "SELECT id, owner, status, created_at, updated_at, last_seq FROM sessions"
                " WHERE id IN ('ses_single', 'ses_batched') ORDER BY id DESC"
            )
            single, batch = (await s.execute(query)).all()
    finally:
        await db.close()
    assert single.status == "running"
    assert single.last_seq == 4
    assert (batch.owner, batch.status, batch.created_at, batch.updated_at, batch.last_seq) == (
        single.owner,
        single.status,
        single.created_at,
        single.updated_at,
        single.last_seq,
    )


@pytest.mark.usefixtures("app")
async def test_every_event_carries_its_sessions_tags_for_the_eventbus(
    js: JetStreamContext, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_tags"
    reply = await gateway.send(sid, "session.create", {"tags": ["team-a", "ci"]})
    assert reply["data"]["session"]["tags"] == ["team-a", "ci"]
    stream = subjects.session_evt_stream
    created = await js.get_last_msg(stream, subjects.session_commit(sid))
    assert [e.type for e in ledger_events(created.data)] == ["session.created"]
    assert tags_from_header(created.headers or {}) == ["team-a", "ci"]
    await gateway.send(sid, "session.update", {"tags": ["ci"]})
    updated = await js.get_last_msg(stream, subjects.session_commit(sid))
    assert [e.data for e in ledger_events(updated.data)] == [{"tags": ["ci"]}]
    assert tags_from_header(updated.headers or {}) == ["ci"]
    await gateway.send(sid, "session.update", {"tags": []})
    cleared = await js.get_last_msg(stream, subjects.session_events(sid))
    assert TAGS_HEADER not in (cleared.headers or {})


async def test_each_held_partition_reports_its_consumer_lag(
    settings: SessionSettings,
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shoal.session.app._LAG_SAMPLE_S", 0.1)
    async with running(settings) as app:
        await gateway.create("ses_lag", owner="alice")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://session") as client:

            async def scrape() -> str:
                return (await client.get("/metrics")).text

            def every_partition(text: str) -> bool:
                return all(
                    f'shoal_session_consumer_pending{{partition="{p}"}} 0.0' in text
                    and f'shoal_session_consumer_ack_pending{{partition="{p}"}} 0.0' in text
                    for p in range(settings.session_partitions)
                )

            await eventually(scrape, every_partition)


async def test_the_lag_gauges_follow_the_partitions_held() -> None:

    held = {90: 1, 91: 1}
    lags = {90: (7, 2), 91: (0, 0)}

    async def lag(partition: int, epoch: int) -> tuple[int, int] | None:
        return lags[partition]

    def value(gauge: Any, p: int) -> float | None:
        return next(
            (
                s.value
                for m in gauge.collect()
                for s in m.samples
                if s.labels.get("partition") == str(p)
            ),
            None,
        )

    sampler = asyncio.create_task(metrics.sample_partition_lag(lambda: held, lag, 0.01))
    try:
        await eventually(lambda: _now(value(metrics.CONSUMER_PENDING, 90)), lambda v: v == 7)
        assert value(metrics.CONSUMER_ACK_PENDING, 90) == 2
        del held[90]  # handed off: this replica stops reporting it
        await eventually(lambda: _now(value(metrics.CONSUMER_PENDING, 90)), lambda v: v is None)
        assert value(metrics.CONSUMER_ACK_PENDING, 90) is None
        assert value(metrics.CONSUMER_PENDING, 91) == 0
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        for p in (90, 91):
            for gauge in (metrics.CONSUMER_PENDING, metrics.CONSUMER_ACK_PENDING):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(p))


async def _now(value: Any) -> Any:
    return value
