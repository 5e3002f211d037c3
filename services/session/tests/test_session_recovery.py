"""Recovery of a session from its snapshot plus the ledger's tail (lazy snapshots).

The pure part: ``service.replay`` gives the writer's state from any earlier snapshot (none,
far behind the tip, at the tip). The real-NATS part: commands committed with lazy snapshots
leave the bucket behind (or empty), and a fresh handler recovers the state from the ledger,
answers a redelivered command as already applied and appends nothing twice; a ledger an older
version wrote (one message per event) followed by commits; a command too big for one commit.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from _session_support import Gateway, load_state, read_events
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from test_session_edge import lose_ack

from shoal.common.clock import iso
from shoal.common.contracts import SessionSnapshot, encode_snapshot
from shoal.common.messaging import (
    MSG_ID_HEADER,
    Catalog,
    Envelope,
    Subjects,
    decode,
    encode,
    partition,
    provision,
)
from shoal.session.config import SessionSettings
from shoal.session.handlers import CommandHandler, SessionCache
from shoal.session.service import LedgerCommand, apply, replay
from shoal.session.store import (
    Appended,
    EventLedger,
    LedgerTip,
    Replier,
    StateStore,
    _commit_end,
    _resume_after,
    command_headers,
)

_ids = itertools.count(1)


def _command(type_: str, data: dict[str, Any] | None = None, sid: str = "ses_r") -> Envelope:
    return Envelope(
        id=f"cmd_{next(_ids)}",
        type=type_,
        source="gateway",
        time=iso(1_700_000_000.0 + next(_ids)),
        subject=sid,
        owner="u1",
        data=data or {},
    )


def _history(prompts: int) -> list[Envelope]:
    commands = [
        _command("session.create", {"metadata": {}}),
        _command("runner.connect", {"connection_id": "c"}),
    ]
    for n in range(prompts):
        commands.append(_command("prompt.submit", {"prompt_id": f"p{n}", "content": f"q{n}"}))
        commands.append(
            _command(
                "message.complete", {"prompt_id": f"p{n}", "message_id": f"m{n}", "content": "a"}
            )
        )
    return commands


def _run(commands: list[Envelope]) -> tuple[list[SessionSnapshot], list[LedgerCommand]]:
    """Apply the commands as a writer would: the state after each, and the ledger's record
    of each (ledger_seq = its last event's position, counting every event)."""
    state: SessionSnapshot | None = None
    states: list[SessionSnapshot] = []
    ledger: list[LedgerCommand] = []
    position = 0
    for stream_seq, command in enumerate(commands, start=10):
        result = apply(state, command, stream_seq)
        assert result.changed, command.type
        assert result.events
        assert result.new_state is not None
        position += len(result.events)
        state = result.new_state
        state.ledger_seq = position
        states.append(state)
        ledger.append(LedgerCommand(position, command, stream_seq))
    return states, ledger


def test_replay_from_no_snapshot_gives_the_writers_state() -> None:
    states, ledger = _run(_history(5))
    assert replay(None, ledger) == states[-1]


def test_replay_from_a_snapshot_far_behind_the_tip() -> None:
    states, ledger = _run(_history(40))
    assert replay(states[1], ledger) == states[-1]  # 80 commands behind
    assert replay(states[50], ledger) == states[-1]


def test_replay_from_the_tip_changes_nothing() -> None:
    states, ledger = _run(_history(3))
    assert replay(states[-1], ledger) == states[-1]
    assert replay(states[-1], []) == states[-1]


def test_replay_stops_at_the_last_whole_command() -> None:
    """A command cut short mid-append has no record: the state is the one before it, and its
    redelivery (same stream seq) is applied on top, giving the writer's state."""
    commands = _history(2)
    states, ledger = _run(commands)
    recovered = replay(None, ledger[:-1])
    assert recovered == states[-2]
    result = apply(recovered, commands[-1], ledger[-1].stream_seq)
    assert result.new_state is not None
    assert result.new_state.applied_seq == states[-1].applied_seq
    assert result.new_state.event_seq == states[-1].event_seq


def test_a_redelivered_command_after_replay_is_already_applied() -> None:
    commands = _history(1)
    _, ledger = _run(commands)
    recovered = replay(None, ledger)
    assert apply(recovered, commands[-1], ledger[-1].stream_seq).already_applied


# -- on the real server --


async def _handler_and_consumer(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, sid: str, name: str
) -> tuple[CommandHandler, StateStore, Any]:
    await provision(js, Catalog.from_settings(settings))
    subjects = Subjects(settings.subject_prefix)
    states = StateStore(await js.key_value(subjects.session_state_bucket))
    handler = CommandHandler(
        states, EventLedger(js, subjects), Replier(nc), None, subjects, lazy_snapshots=True
    )
    await js.add_consumer(
        subjects.session_cmd_stream,
        ConsumerConfig(
            durable_name=name,
            filter_subject=subjects.session_partition_filter(
                partition(sid, settings.session_partitions)
            ),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=1.0,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=name, stream=subjects.session_cmd_stream)
    return handler, states, sub


async def test_lazy_snapshots_recover_from_the_ledger_tail(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_lazy"
    handler, states, sub = await _handler_and_consumer(nc, js, settings, sid, "lazy")
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))
    for n in range(20):
        await gateway.publish(
            gateway.command(sid, "prompt.submit", {"prompt_id": f"p{n}", "content": "x"})
        )
    msgs = await sub.fetch(22, timeout=2)
    assert len(msgs) == 22
    cache = SessionCache(sid)
    await handler.handle(cache, msgs[0])  # the creation writes its snapshot before the reply
    created = await load_state(js, subjects, sid)
    for msg in msgs[1:]:
        await handler.handle(cache, lose_ack(msg))  # all come back: see the redeliveries below
    await handler.snapshots.settle_all()
    assert cache.state is not None
    written = cache.state
    assert (await load_state(js, subjects, sid)) == written  # coalesced, landed after

    # Put the bucket far behind the tip (only the creation): a fresh replica recovers.
    kv = await js.key_value(subjects.session_state_bucket)
    await kv.delete(sid)
    _, revision = await states.load(sid)
    assert revision == 0
    fresh = CommandHandler(
        states,
        EventLedger(js, subjects),
        Replier(nc),
        None,
        subjects,
        lazy_snapshots=True,
    )
    recovered, _ = await fresh.load(sid)
    assert recovered == written  # no snapshot at all: the whole ledger is replayed

    await kv.put(sid, encode_snapshot(created))
    recovered, _ = await fresh.load(sid)
    assert recovered == written  # a snapshot 21 commands behind

    # Redeliveries of every command: already applied, nothing appended twice.
    events = await read_events(js, subjects, sid)
    again = await sub.fetch(21, timeout=5)
    assert len(again) == 21
    fresh_cache = SessionCache(sid)
    for msg in again:
        await fresh.handle(fresh_cache, msg)
    assert [e.id for e in await read_events(js, subjects, sid)] == [e.id for e in events]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_lazy_snapshot_that_loses_its_cas_is_benign(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    sid = "ses_lazy_cas"
    handler, states, sub = await _handler_and_consumer(nc, js, settings, sid, "lazycas")
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))
    cache = SessionCache(sid)
    for msg in await sub.fetch(2, timeout=2):
        await handler.handle(cache, msg)
    await handler.snapshots.settle_all()
    # A newer snapshot lands behind this replica's back; its next write loses, benignly.
    kv = await js.key_value(subjects.session_state_bucket)
    current = await load_state(js, subjects, sid)
    await kv.put(sid, (await kv.get(sid)).value or b"")
    await gateway.publish(
        gateway.command(sid, "prompt.submit", {"prompt_id": "p1", "content": "x"})
    )
    [submit] = await sub.fetch(1, timeout=2)
    started = time.monotonic()
    await handler.handle(cache, submit)  # the ledger write is the commit: not fenced
    await handler.snapshots.settle_all()
    assert not cache.loaded  # dropped: the next command recovers from bucket + ledger
    recovered, _ = await handler.load(sid)
    assert recovered is not None
    assert recovered.applied_seq > current.applied_seq
    assert recovered.applied_seq == submit.metadata.sequence.stream
    assert time.monotonic() - started < 5


async def test_an_older_per_event_ledger_then_commits_recovers_and_resumes(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    """The upgrade path: a ledger an older version wrote (one message per event, the command on
    the last event of each), one command cut short there after its first event, then this
    version's commits. Recovery replays both shapes; the cut command resumes after its event."""
    sid = "ses_upgrade"
    handler, states, sub = await _handler_and_consumer(nc, js, settings, sid, "upgrade")
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))
    for n in range(4):
        await gateway.publish(
            gateway.command(sid, "prompt.submit", {"prompt_id": f"p{n}", "content": "x"})
        )
    msgs = await sub.fetch(6, timeout=2)
    assert len(msgs) == 6
    stream = subjects.session_evt_stream

    # The older version: create and connect written one event per message.
    state: SessionSnapshot | None = None
    for msg in msgs[:2]:
        command = decode(msg.data)
        seq = msg.metadata.sequence.stream
        result = apply(state, command, seq)
        assert result.new_state is not None
        for n, event in enumerate(result.events):
            last = n == len(result.events) - 1
            await js.publish(
                subjects.session_event(sid, event.type),
                encode(event),
                stream=stream,
                headers={
                    MSG_ID_HEADER: event.id,
                    **(command_headers(command, seq) if last else {}),
                },
            )
        state = result.new_state
        await msg.ack()
    # p0 cut short: its first event (prompt.queued) only, no command recorded.
    cut = apply(state, decode(msgs[2].data), msgs[2].metadata.sequence.stream)
    assert [e.type for e in cut.events][:2] == ["prompt.queued", "prompt.dispatched"]
    first = cut.events[0]
    await js.publish(
        subjects.session_event(sid, first.type),
        encode(first),
        stream=stream,
        headers={MSG_ID_HEADER: first.id},
    )

    # This version, no snapshot at all: replays the old ledger, resumes p0, then commits.
    cache = SessionCache(sid)
    for msg in msgs[2:]:
        await handler.handle(cache, msg)
    await handler.snapshots.settle_all()
    events = await read_events(js, subjects, sid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.id for e in events}) == len(events)
    assert [e.id for e in events if e.data.get("prompt_id") == "p0"] == [
        e.id for e in cut.events if e.data.get("prompt_id") == "p0"
    ]
    info = await js.stream_info(stream, subjects_filter=subjects.session_events(sid))
    assert (info.state.subjects or {}).get(subjects.session_commit(sid)) == 4  # p0's rest, p1..p3
    assert cache.state is not None
    fresh = CommandHandler(
        states, EventLedger(js, subjects), Replier(nc), None, subjects, lazy_snapshots=True
    )
    kv = await js.key_value(subjects.session_state_bucket)
    await kv.delete(sid)
    recovered, _ = await fresh.load(sid)
    assert recovered == cache.state


async def test_a_command_too_big_for_one_message_is_split_and_written_before_the_reply(
    nc: NATS, js: JetStreamContext, settings: SessionSettings, gateway: Gateway, subjects: Subjects
) -> None:
    """Events that do not fit in one commit go out as several, each fenced on the previous; a
    command that does not fit is left out and the snapshot is written before the reply."""
    sid = "ses_big"
    _, states, sub = await _handler_and_consumer(nc, js, settings, sid, "big")
    # A budget that fits one prompt event but not two, nor the command beside one.
    ledger = EventLedger(js, subjects, budget=900)
    handler = CommandHandler(states, ledger, Replier(nc), None, subjects, lazy_snapshots=True)
    await gateway.publish(gateway.command(sid, "session.create", {"metadata": {}}))
    await gateway.publish(gateway.command(sid, "runner.connect", {"connection_id": "c"}))
    await gateway.publish(
        gateway.command(sid, "prompt.submit", {"prompt_id": "p1", "content": "y" * 400})
    )
    msgs = await sub.fetch(3, timeout=2)
    cache = SessionCache(sid)
    for msg in msgs[:2]:
        await handler.handle(cache, msg)
    connected = cache.state
    assert connected is not None
    await handler.handle(cache, msgs[2])
    # No settle: the snapshot of the split command was written before the reply.
    assert await load_state(js, subjects, sid) == cache.state
    events = await read_events(js, subjects, sid)
    assert [e.type for e in events][2:] == ["prompt.queued", "prompt.dispatched", "session.status"]
    info = await js.stream_info(
        subjects.session_evt_stream, subjects_filter=subjects.session_events(sid)
    )
    assert (info.state.subjects or {}).get(subjects.session_commit(sid), 0) >= 4
    # A re-run of the command from the state before it (a crash before its snapshot): its
    # last commit is recognised at the tip, nothing is appended twice, and the command is
    # reported as not recorded (it did not fit), so the caller writes the snapshot.
    seq = msgs[2].metadata.sequence.stream
    submit = decode(msgs[2].data)
    rerun = apply(connected, submit, seq)
    again = await ledger.publish(
        rerun.events, {}, after=connected.ledger_seq, command=command_headers(submit, seq)
    )
    tip = await ledger.tip(sid)
    assert tip is not None
    assert again == Appended(tip.seq, False)
    after = await js.stream_info(
        subjects.session_evt_stream, subjects_filter=subjects.session_events(sid)
    )
    assert after.state.messages == info.state.messages


def test_commits_hold_as_many_events_as_fit_and_at_least_one() -> None:
    assert _commit_end([10, 10, 10], 0, 100) == 3
    assert _commit_end([10, 10, 10], 0, 21) == 2  # 10 + ',' + 10
    assert _commit_end([10, 10, 10], 1, 20) == 2
    assert _commit_end([500, 10], 0, 100) == 1  # never empty (an event alone always fits)


def test_a_tip_of_this_command_resumes_after_its_last_event() -> None:
    events = [
        Envelope(id=f"ses_r:5:{n}", type="x.y", source="s", time="t", subject="ses_r", seq=n + 8)
        for n in range(3)
    ]
    commit = LedgerTip(40, "ses_r:5:0", 10, True)  # this command's whole commit
    assert _resume_after(events, commit) == 3
    first_part = LedgerTip(40, "ses_r:5:0", 8, False)  # a first commit of a split command
    assert _resume_after(events, first_part) == 1
    old_event = LedgerTip(40, "ses_r:5:1", 9, False)  # an older version's one event per message
    assert _resume_after(events, old_event) == 2
    assert _resume_after(events, LedgerTip(40, "ses_r:4:0", 7, True)) is None  # someone else's
    assert _resume_after(events, None) is None
