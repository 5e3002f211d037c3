"""The commit protocol of one command under faults, on the real server: lost acks (redelivery),
a crash between publishing events and writing state, and a lost compare-and-set."""

from __future__ import annotations

from typing import Any

import pytest
from _session_support import Gateway, load_state, read_events
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY

from shoal.common.contracts import Event, SessionSnapshot, encode_snapshot
from shoal.common.errors import Fenced
from shoal.common.messaging import Catalog, Subjects, partition, provision
from shoal.session.config import SessionSettings
from shoal.session.handlers import CommandHandler, SessionCache
from shoal.session.store import EventLedger, Replier, SchedulerTimers, StateStore


class LostAck(Msg):
    """The message as delivered, but its ack never reaches the server (a crash right after the
    commit). A fault at the process boundary: everything before the ack really happens."""

    async def ack(self) -> None:
        return None


def lose_ack(msg: Msg) -> LostAck:
    return LostAck(
        _client=msg._client,
        subject=msg.subject,
        reply=msg.reply,
        data=msg.data,
        headers=msg.headers,
    )


class CrashBeforeWrite(StateStore):
    """The first ``n`` state writes fail after the events were published."""

    def __init__(self, inner: StateStore, n: int = 1) -> None:
        self._inner = inner
        self.failures_left = n

    async def load(self, session_id: str) -> tuple[SessionSnapshot | None, int]:
        return await self._inner.load(session_id)

    async def save(self, snapshot: SessionSnapshot, revision: int) -> int:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("simulated: connection lost before the state write")
        return await self._inner.save(snapshot, revision)


async def _setup(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, sid: str
) -> tuple[StateStore, EventLedger, Any]:
    await provision(js, Catalog.from_settings(settings))
    subjects = Subjects(settings.subject_prefix)
    states = StateStore(await js.key_value(subjects.session_state_bucket))
    ledger = EventLedger(js, subjects)
    name = "probe"
    await js.add_consumer(
        subjects.session_cmd_stream,
        ConsumerConfig(
            durable_name=name,
            filter_subject=subjects.session_partition_filter(
                partition(sid, settings.session_partitions)
            ),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=1.0,  # seconds: a lost ack comes back quickly
        ),
    )
    sub = await js.pull_subscribe_bind(durable=name, stream=subjects.session_cmd_stream)
    return states, ledger, sub


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_redelivered_command_is_answered_and_publishes_nothing_new(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_lostack"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    handler = CommandHandler(states, ledger, Replier(nc), None, subjects)
    for type_, data in [
        ("session.create", {"metadata": {}}),
        ("runner.connect", {"connection_id": "c"}),
        ("prompt.submit", {"prompt_id": "p1", "content": "x"}),
    ]:
        await gateway.publish(gateway.command(sid, type_, data))
    first = await sub.fetch(3, timeout=2)
    cache = SessionCache(sid)
    for msg in first:
        await handler.handle(cache, lose_ack(msg))
    before = await read_events(js, subjects, sid)
    assert [e.seq for e in before] == [1, 2, 3, 4, 5]

    # The server redelivers all three after ack_wait; a restarted replica (nothing cached)
    # finds each at or below applied_seq and only acks it.
    again = await sub.fetch(3, timeout=5)
    assert [m.metadata.sequence.stream for m in again] == [
        m.metadata.sequence.stream for m in first
    ]
    assert all(m.metadata.num_delivered == 2 for m in again)
    redelivered = _metric(
        "shoal_session_commands_total", type="prompt.submit", outcome="redelivered"
    )
    for msg in again:
        await handler.handle(SessionCache(sid), msg)
    after = await read_events(js, subjects, sid)
    assert [e.id for e in after] == [e.id for e in before]
    assert (
        _metric("shoal_session_commands_total", type="prompt.submit", outcome="redelivered")
        == redelivered + 1
    )
    info = await js.consumer_info(subjects.session_cmd_stream, "probe")
    assert info.num_ack_pending == 0


async def test_a_crash_between_publish_and_write_leaves_no_duplicate(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_crash"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))
    await gateway.publish(
        gateway.command(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    )
    flaky = CrashBeforeWrite(states, n=2)
    handler = CommandHandler(flaky, ledger, Replier(nc), None, subjects)
    retries = _metric("shoal_session_io_retries_total")
    cache = SessionCache(sid)
    for msg in await sub.fetch(3, timeout=2):
        await handler.handle(cache, msg)
    assert flaky.failures_left == 0
    assert _metric("shoal_session_io_retries_total") == retries + 2
    events = await read_events(js, subjects, sid)
    # session.created was published twice (once per failed write) and stored once
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.type for e in events] == [
        Event.SESSION_CREATED,
        Event.RUNNER_CONNECTED,
        Event.PROMPT_QUEUED,
        Event.PROMPT_DISPATCHED,
        Event.SESSION_STATUS,
    ]
    state = await load_state(js, subjects, sid)
    assert state.event_seq == 5
    assert state.status == "running"


async def test_a_lost_compare_and_set_is_fenced_and_lands_nothing(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_fenced"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    handler = CommandHandler(states, ledger, Replier(nc), None, subjects)
    cache = SessionCache(sid)
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    [created] = await sub.fetch(1, timeout=2)
    await handler.handle(cache, created)

    # Someone else writes the session behind this lane's back (what a new owner would do).
    kv = await js.key_value(subjects.session_state_bucket)
    current = await load_state(js, subjects, sid)
    current.metadata = {"written": "elsewhere"}
    await kv.put(sid, encode_snapshot(current))

    fenced = _metric("shoal_session_fenced_writes_total", fence="state")
    await gateway.publish(
        gateway.command(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    )
    [submit] = await sub.fetch(1, timeout=2)
    with pytest.raises(Fenced):
        await handler.handle(cache, submit)
    assert _metric("shoal_session_fenced_writes_total", fence="state") == fenced + 1
    state = await load_state(js, subjects, sid)
    assert state.metadata == {"written": "elsewhere"}  # the stale write did not land
    assert state.queue == []
    # not acked: the partition's next consumer gets it again
    info = await js.consumer_info(subjects.session_cmd_stream, "probe")
    assert info.num_ack_pending == 1


async def test_a_stale_writer_cannot_append_events(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    """The gap of publishing before the CAS: a paused ex-owner's events must not land."""
    sid = "ses_stale"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    stale = CommandHandler(states, ledger, Replier(nc), None, subjects)
    stale_cache = SessionCache(sid)
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    [created] = await sub.fetch(1, timeout=2)
    await stale.handle(stale_cache, created)

    # The stale owner fetched the next command, then paused. A new owner applies two others.
    await gateway.publish(gateway.command(sid, "prompt.submit", {"prompt_id": "a", "content": ""}))
    [held] = await sub.fetch(1, timeout=2)
    fresh = CommandHandler(states, ledger, Replier(nc), None, subjects)
    fresh_cache = SessionCache(sid)
    for pid in ("b", "c"):
        await gateway.publish(
            gateway.command(sid, "prompt.submit", {"prompt_id": pid, "content": ""})
        )
        [msg] = await sub.fetch(1, timeout=2)
        await fresh.handle(fresh_cache, msg)
    before = await read_events(js, subjects, sid)

    fenced = _metric("shoal_session_fenced_writes_total", fence="ledger")
    with pytest.raises(Fenced):
        await stale.handle(stale_cache, held)  # from its cached snapshot: ledger moved
    assert _metric("shoal_session_fenced_writes_total", fence="ledger") == fenced + 1
    after = await read_events(js, subjects, sid)
    assert [e.id for e in after] == [e.id for e in before]  # nothing appended
    assert [e.data.get("prompt_id") for e in after[1:]] == ["b", "c"]
    state = await load_state(js, subjects, sid)
    assert [p.prompt_id for p in state.queue] == ["b", "c"]
    assert state.ledger_seq == (await ledger.tip(sid)).seq  # type: ignore[union-attr]


class RecordingTimers(SchedulerTimers):
    """The scheduler's timers as calls recorded here; the first ``failures`` calls fail (the
    scheduler unreachable right after the commit)."""

    def __init__(self, failures: int = 0) -> None:
        self.failures_left = failures
        self.armed: dict[str, tuple[str, dict[str, Any]]] = {}
        self.cancelled: list[str] = []

    async def set(self, timer_id: str, fire_at: str, subject: str, payload: dict[str, Any]) -> None:
        self._maybe_fail()
        self.armed[timer_id] = (fire_at, payload)

    async def cancel(self, timer_id: str) -> None:
        self._maybe_fail()
        self.armed.pop(timer_id, None)
        self.cancelled.append(timer_id)

    def _maybe_fail(self) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("simulated: the scheduler did not answer")


async def test_a_timer_call_that_fails_after_the_commit_is_retried_until_the_timer_is_set(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_timerfail"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    timers = RecordingTimers(failures=2)
    handler = CommandHandler(states, ledger, Replier(nc), timers, subjects)
    await gateway.publish(gateway.command(sid, "session.create", {"idle_timeout": 60}))
    [msg] = await sub.fetch(1, timeout=2)
    await handler.handle(SessionCache(sid), msg)
    assert timers.failures_left == 0
    [(fire_at, payload)] = timers.armed.values()
    assert list(timers.armed) == [f"{sid}_idle"]
    assert (payload["type"], payload["subject"], payload["time"]) == ("timer.fire", sid, fire_at)
    assert payload["data"] == {"kind": "idle", "ref": "", "armed_seq": 1}
    assert [e.seq for e in await read_events(js, subjects, sid)] == [1]  # committed once


async def test_a_redelivered_command_sets_its_timers_again(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_timerredo"
    states, ledger, sub = await _setup(nc, js, settings, sid)
    await gateway.publish(gateway.command(sid, "session.create", {"idle_timeout": 60}))
    [msg] = await sub.fetch(1, timeout=2)
    # Committed by a replica that died before it reached the scheduler (and before the ack).
    await CommandHandler(states, ledger, Replier(nc), None, subjects).handle(
        SessionCache(sid), lose_ack(msg)
    )
    timers = RecordingTimers()
    [again] = await sub.fetch(1, timeout=5)
    await CommandHandler(states, ledger, Replier(nc), timers, subjects).handle(
        SessionCache(sid), again
    )
    assert list(timers.armed) == [f"{sid}_idle"]
    assert [e.seq for e in await read_events(js, subjects, sid)] == [1]
