"""The eventbus in-process (its lifespan) against a real nats-server: fan-out, dedup, restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY

from shoal.common.clock import iso
from shoal.common.contracts import TAGS_HEADER
from shoal.common.errors import BadRequest
from shoal.common.messaging import (
    MSG_ID_HEADER,
    TRACEPARENT_HEADER,
    Catalog,
    Envelope,
    Subjects,
    decode,
    encode,
    encode_commit,
    provision,
)
from shoal.eventbus.app import create_app
from shoal.eventbus.config import EventbusSettings
from shoal.eventbus.service import EventFanout


@pytest.fixture
def settings(nats_url: str, subject_prefix: str) -> EventbusSettings:
    return EventbusSettings(
        environment="test",
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        log_json=False,
        eventbus_batch_size=10,
        eventbus_fetch_timeout=timedelta(milliseconds=200),
        eventbus_retry_delay=timedelta(milliseconds=200),
    )


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(subject_prefix)


@pytest.fixture
async def provisioned(js: JetStreamContext, settings: EventbusSettings) -> None:
    await provision(js, Catalog.from_settings(settings))


@asynccontextmanager
async def running(settings: EventbusSettings) -> AsyncIterator[None]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield


def event(session: str, seq: int, owner: str = "alice") -> Envelope:
    return Envelope(
        id=f"{session}:{seq}:0",
        type="message.completed",
        source="session",
        time=iso(time.time()),
        subject=session,
        owner=owner,
        seq=seq,
        data={"content": f"message {seq}"},
    )


async def publish(js: JetStreamContext, subjects: Subjects, env: Envelope) -> None:
    await js.publish(
        subjects.session_event(env.subject, env.type), encode(env), headers={MSG_ID_HEADER: env.id}
    )


async def delivered(
    js: JetStreamContext, subjects: Subjects, owner: str, expected: int
) -> list[Msg]:
    """Every message DELIVER holds for ``owner``: waits for ``expected``, then proves no more."""
    sub = await js.pull_subscribe(
        subjects.deliver_user(owner),
        stream=subjects.deliver_stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
    )
    msgs: list[Msg] = []
    deadline = time.monotonic() + 15
    while len(msgs) < expected and time.monotonic() < deadline:
        try:
            msgs += await sub.fetch(expected - len(msgs), timeout=1)
        except NatsTimeout:
            continue
    with pytest.raises(NatsTimeout):
        msgs += await sub.fetch(1, timeout=0.5)
    await sub.unsubscribe()
    return msgs


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (server-side state: there is no event to await) for up to 10 s."""
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail("condition not met within 10 s")


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.usefixtures("provisioned")
async def test_events_reach_their_owner_exactly_once_across_a_restart(
    js: JetStreamContext, nc: NATS, settings: EventbusSettings, subjects: Subjects
) -> None:
    for seq in range(1, 31):
        await publish(js, subjects, event("ses_a", seq))
        other = event("ses_b", seq, owner="bob") if seq <= 10 else event("ses_c", seq)
        await publish(js, subjects, other)

    seen = asyncio.Event()
    count = 0

    async def on_deliver(_: Msg) -> None:
        nonlocal count
        count += 1
        if count >= 15:
            seen.set()

    # Core NATS sees the raw publishes as they happen (duplicates included).
    sub = await nc.subscribe(subjects.deliver_all, cb=on_deliver)
    async with running(settings):
        await asyncio.wait_for(seen.wait(), 10)
    # Stopped mid-way: the rest of the batch in hand went back to the stream unacked.
    await sub.unsubscribe()
    first_run = (await js.stream_info(subjects.deliver_stream)).state.messages
    assert 15 <= first_run < 60
    for seq in range(31, 41):
        await publish(js, subjects, event("ses_a", seq))

    async with running(settings):
        alice = await delivered(js, subjects, "alice", expected=60)
        bob = await delivered(js, subjects, "bob", expected=10)

    alice_events = [decode(m.data) for m in alice]
    assert len({e.id for e in alice_events}) == 60
    ses_a = [e.seq for e in alice_events if e.subject == "ses_a"]
    assert ses_a == list(range(1, 41))  # in order, no gap, no duplicate
    assert [decode(m.data).seq for m in bob] == list(range(1, 11))
    assert all(m.headers and m.headers[MSG_ID_HEADER] == f"u:{decode(m.data).id}" for m in alice)
    info = await js.stream_info(subjects.deliver_stream)
    assert info.state.messages == 70


@pytest.mark.usefixtures("provisioned")
async def test_an_event_published_before_a_crash_is_not_delivered_twice(
    js: JetStreamContext, settings: EventbusSettings, subjects: Subjects
) -> None:
    events = [event("ses_x", seq) for seq in range(1, 6)]
    for env in events:
        await publish(js, subjects, env)
    # What a replica that crashed between the DELIVER publish and the ack left behind.
    for env in events[:3]:
        await js.publish(
            subjects.deliver_user("alice"), encode(env), headers={MSG_ID_HEADER: f"u:{env.id}"}
        )
    duplicates = counter("shoal_eventbus_duplicate_deliveries_total")

    async with running(settings):
        msgs = await delivered(js, subjects, "alice", expected=5)

    assert [decode(m.data).seq for m in msgs] == [1, 2, 3, 4, 5]
    assert counter("shoal_eventbus_duplicate_deliveries_total") == duplicates + 3


@pytest.mark.usefixtures("provisioned")
async def test_delivery_is_byte_identical_and_keeps_the_trace(
    js: JetStreamContext, settings: EventbusSettings, subjects: Subjects
) -> None:
    env = event("ses_t", 1)
    raw = encode(env)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await js.publish(
        subjects.session_event("ses_t", env.type),
        raw,
        headers={MSG_ID_HEADER: env.id, TRACEPARENT_HEADER: traceparent},
    )
    fanned_out = counter("shoal_eventbus_events_total", outcome="fanned_out")
    async with running(settings):
        (msg,) = await delivered(js, subjects, "alice", expected=1)
    assert msg.data == raw
    assert msg.headers is not None
    assert msg.headers[TRACEPARENT_HEADER] == traceparent
    assert counter("shoal_eventbus_events_total", outcome="fanned_out") == fanned_out + 1
    assert counter("shoal_eventbus_deliveries_total", target="user") >= 1


@pytest.mark.usefixtures("provisioned")
async def test_commits_fan_out_as_one_delivery_per_event_after_an_older_per_event_ledger(
    js: JetStreamContext, settings: EventbusSettings, subjects: Subjects
) -> None:
    events = [event("ses_k", seq) for seq in range(1, 8)]
    for env in events[:2]:  # written by an older version: one message per event
        await publish(js, subjects, env)
    for commit in (events[2:5], events[5:6], events[6:]):  # one message per command
        await js.publish(
            subjects.session_commit("ses_k"),
            encode_commit(commit),
            headers={MSG_ID_HEADER: commit[0].id, TAGS_HEADER: "blue"},
        )
    fanned_out = counter("shoal_eventbus_events_total", outcome="fanned_out")
    async with running(settings):
        msgs = await delivered(js, subjects, "alice", expected=7)
        tagged = await js.pull_subscribe(
            subjects.deliver_tag("alice", "blue"),
            stream=subjects.deliver_stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
        )
        blue = await tagged.fetch(5, timeout=5)
        await tagged.unsubscribe()
    assert [m.data for m in msgs] == [encode(e) for e in events]  # byte for byte, in order
    assert [m.headers[MSG_ID_HEADER] for m in msgs if m.headers] == [f"u:{e.id}" for e in events]
    assert [decode(m.data).seq for m in blue] == [3, 4, 5, 6, 7]
    assert counter("shoal_eventbus_events_total", outcome="fanned_out") == fanned_out + 7


@pytest.mark.usefixtures("provisioned")
async def test_malformed_events_are_terminated_not_redelivered(
    js: JetStreamContext, settings: EventbusSettings, subjects: Subjects
) -> None:
    await js.publish(subjects.session_event("ses_m", "junk"), b"not json")
    await js.publish(subjects.session_event("ses_m", "junk"), b'{"id": 1}')
    no_owner = Envelope(id="ses_m:1:0", type="x", source="session", time="t", subject="ses_m")
    await js.publish(subjects.session_event("ses_m", "x"), encode(no_owner))
    dotted = event("ses_m", 2, owner="a.b")  # would address another user's subject tree
    await publish(js, subjects, dotted)
    await publish(js, subjects, event("ses_m", 3))
    malformed = counter("shoal_eventbus_events_total", outcome="malformed")

    async with running(settings):
        (msg,) = await delivered(js, subjects, "alice", expected=1)

        async def all_acked() -> bool:
            info = await js.consumer_info(subjects.session_evt_stream, settings.eventbus_consumer)
            return bool(info.ack_floor.stream_seq == 5 and info.num_ack_pending == 0)

        await eventually(all_acked)
    assert decode(msg.data).seq == 3
    assert counter("shoal_eventbus_events_total", outcome="malformed") == malformed + 4
    info = await js.consumer_info(subjects.session_evt_stream, settings.eventbus_consumer)
    assert info.num_redelivered == 0
    assert (await js.stream_info(subjects.deliver_stream)).state.messages == 1


async def test_health_readiness_and_metrics(settings: EventbusSettings) -> None:
    import httpx

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://eventbus") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok", "service": "eventbus"}
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["checks"] == {"nats": True, "consumer": True}
            metrics = (await client.get("/metrics")).text
            assert "shoal_eventbus_events_total" in metrics
            assert "shoal_eventbus_consumer_pending " in metrics  # sampled at start


async def tagged(
    js: JetStreamContext, subjects: Subjects, owner: str, tag: str, expected: int
) -> list[Msg]:
    """Every message DELIVER holds under ``owner``'s tag ``tag``, replayed from the start."""
    sub = await js.pull_subscribe(
        subjects.deliver_tag(owner, tag),
        stream=subjects.deliver_stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
    )
    msgs: list[Msg] = []
    deadline = time.monotonic() + 15
    while len(msgs) < expected and time.monotonic() < deadline:
        try:
            msgs += await sub.fetch(expected - len(msgs), timeout=1)
        except NatsTimeout:
            continue
    with pytest.raises(NatsTimeout):
        msgs += await sub.fetch(1, timeout=0.5)
    await sub.unsubscribe()
    return msgs


@pytest.mark.usefixtures("provisioned")
async def test_tagged_events_are_delivered_per_owner_and_tag_once_across_a_restart(
    js: JetStreamContext, settings: EventbusSettings, subjects: Subjects
) -> None:
    async def publish_tagged(env: Envelope, tags: str) -> None:
        await js.publish(
            subjects.session_event(env.subject, env.type),
            encode(env),
            headers={MSG_ID_HEADER: env.id, TAGS_HEADER: tags},
        )

    alices = {seq: event("ses_a", seq) for seq in (1, 2, 3)}
    for seq in (1, 2):
        await publish_tagged(alices[seq], "blue,green")
    await publish_tagged(event("ses_b", 1, owner="bob"), "blue")
    await publish(js, subjects, event("ses_c", 1))  # untagged: the owner's stream only
    async with running(settings):
        await eventually(lambda: _has(js, subjects.deliver_tag("alice", "green"), 2))
    await publish_tagged(alices[3], "blue")
    async with running(settings):  # a restart: the redelivered tail is not delivered twice
        blue = await tagged(js, subjects, "alice", "blue", expected=3)
    assert [decode(m.data).seq for m in blue] == [1, 2, 3]
    assert [m.data for m in blue] == [encode(alices[n]) for n in (1, 2, 3)]  # byte-identical
    assert len(await tagged(js, subjects, "alice", "green", expected=2)) == 2
    [bobs] = await tagged(js, subjects, "bob", "blue", expected=1)
    assert decode(bobs.data).subject == "ses_b"
    assert len(await delivered(js, subjects, "alice", expected=4)) == 4


async def _has(js: JetStreamContext, subject: str, count: int) -> bool:
    try:
        sub = await js.pull_subscribe(
            subject, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5)
        )
    except Exception:
        return False
    try:
        msgs = await sub.fetch(count, timeout=0.2)
    except NatsTimeout:
        return False
    finally:
        await sub.unsubscribe()
    return len(msgs) >= count


async def test_an_event_with_a_bad_tag_is_refused_by_the_rules() -> None:
    fanout = EventFanout(Subjects("p"))
    env = event("ses_x", 1)
    [user, tag] = fanout.deliveries(env, {TAGS_HEADER: "ok-tag"})
    assert (user.subject, tag.subject, tag.msg_id) == (
        "p.deliver.user.alice",
        "p.deliver.tag.alice.ok-tag",
        "t:ok-tag:ses_x:1:0",
    )
    with pytest.raises(BadRequest):
        fanout.deliveries(env, {TAGS_HEADER: "a.b"})
